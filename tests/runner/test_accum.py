"""`jlora finetune` training options: gradient accumulation, LR schedules, AdamW, clipping."""

import glob
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from runner_helpers import DEFAULT, tiny_overrides, write_tiny_weights
from safetensors.numpy import load_file

import jlora
from jlora.runner.config import RunConfig, apply_overrides, load_config
from jlora.runner.finetune import finetune
from jlora.runner.objectives import Supervised
from jlora.runner.optimizer import make_optimizer, make_schedule
from jlora.runner.rundir.directory import read_metrics
from jlora.runner.tasks import lora_config, make_task
from jlora.runner.trainer.step import accumulated_value_and_grad
from jlora.runner.variants import adapt, adapter_optimizer, prepare_base

STEPS = 4


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("w") / "tiny")


def tiny_config(run_dir, weights, steps=STEPS, **extra):
    return load_config(DEFAULT, tiny_overrides(run_dir, weights, steps, **extra))


def adapter_tensors(run_dir):
    (path,) = glob.glob(str(run_dir / "adapter" / "*.safetensors"))
    return load_file(path)


def scores(run_dir):
    """metrics.jsonl without the throughput figures, which depend on the machine's load."""
    return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in read_metrics(run_dir)]


def test_accumulated_gradient_equals_the_gradient_of_the_concatenated_batch(tiny_weights, tmp_path):
    config = tiny_config(tmp_path / "r", tiny_weights, **{"train.batch_size": 2})
    task, cfg = make_task(config), lora_config(config)
    params = adapt(jax.random.key(0), prepare_base(config, task.base), config)
    lora, base = jlora.split(params)
    # Non-zero B, so that A's gradient is not zero too.
    lora = jax.tree.map(lambda x: x + 0.01 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), lora)
    trainable = {"lora": lora, "extra": task.initial_extra(jlora.dequantize(base))}
    objective = Supervised(task, cfg, "factorised")

    def loss_fn(*args):
        return objective.loss(*args)[0]

    micro = [task.train_batch(0), task.train_batch(1)]
    rng = jax.random.key(1)

    (loss, _), grads = jax.jit(accumulated_value_and_grad(objective.loss, task.batch_weight))(
        trainable, base, jax.tree.map(lambda *x: np.stack(x), *micro), rng
    )
    want_loss, want = jax.jit(jax.value_and_grad(loss_fn))(
        trainable, base, jax.tree.map(lambda *x: np.concatenate(x), *micro), rng
    )
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6, atol=1e-6)
    for (path, g), w in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_two_micro_batches_of_two_train_as_one_batch_of_four(tiny_weights, tmp_path):
    # A batch of 4 at position p holds the rows of the batches of 2 at positions 2p and 2p + 1,
    # which are the micro-batches of step p + 1 with grad_accum=2.
    common = {"lora.dropout": 0.0}
    finetune(tiny_config(tmp_path / "big", tiny_weights, **common), log=lambda _: 0)
    accum = {**common, "train.batch_size": 2, "train.grad_accum": 2}
    finetune(tiny_config(tmp_path / "acc", tiny_weights, **accum), log=lambda _: 0)
    big, acc = adapter_tensors(tmp_path / "big"), adapter_tensors(tmp_path / "acc")
    assert big.keys() == acc.keys()
    for name in big:
        np.testing.assert_allclose(acc[name], big[name], rtol=1e-5, atol=1e-5, err_msg=name)
    losses = {
        r["step"]: r["train_loss"] for r in read_metrics(tmp_path / "big") if "train_loss" in r
    }
    for r in read_metrics(tmp_path / "acc"):
        if "train_loss" in r:
            assert r["train_loss"] == pytest.approx(losses[r["step"]], rel=1e-5)


def test_accumulated_run_resumes_exactly(tiny_weights, tmp_path):
    over = {"train.batch_size": 2, "train.grad_accum": 2}
    full = tmp_path / "full"
    finetune(tiny_config(full, tiny_weights, **over), log=lambda _: 0)
    assert jlora.checkpoint_steps(full / "checkpoints") == [2, 4]
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")  # as if killed after step 2
    logs = []
    finetune(tiny_config(resumed, tiny_weights, **over), log=logs.append)
    assert logs == [f"resuming {resumed} from the checkpoint of step 2"]
    assert scores(resumed) == scores(full)
    full_adapter, resumed_adapter = adapter_tensors(full), adapter_tensors(resumed)
    for name, value in full_adapter.items():
        np.testing.assert_array_equal(resumed_adapter[name], value, err_msg=name)


LR, WARM, END = 1e-3, 2, 10


@pytest.mark.parametrize(
    ("schedule", "want"),
    [
        # step: 1 (mid warm-up), 2 (warm-up end), 6 (half way through the decay), 10 (last)
        ("cosine", {1: LR / 2, 2: LR, 6: LR / 10 + 0.9 * LR / 2, 10: LR / 10}),
        ("linear", {1: LR / 2, 2: LR, 6: LR - 0.9 * LR / 2, 10: LR / 10}),
        ("constant", {1: LR / 2, 2: LR, 6: LR, 10: LR}),
    ],
)
def test_schedule_learning_rates(schedule, want):
    keys = {
        "train.schedule": schedule,
        "train.learning_rate": LR,
        "train.warmup_steps": WARM,
        "train.steps": END,
    }
    fn = make_schedule(apply_overrides(RunConfig(), [f"{k}={v}" for k, v in keys.items()]))
    for step, lr in want.items():
        assert float(fn(step)) == pytest.approx(lr, rel=1e-6), step


def test_default_schedule_is_warmup_then_cosine_to_a_tenth():
    t = RunConfig().train
    assert (t.schedule, t.grad_accum, t.weight_decay, t.clip_norm) == ("cosine", 1, 0.0, 1.0)
    old = optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, t.warmup_steps, t.steps, t.learning_rate / 10
    )
    for step in (0, t.warmup_steps, t.steps // 2, t.steps):
        assert float(make_schedule(RunConfig())(step)) == float(old(step))


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.grad_accum=0", r"train.grad_accum: must be >= 1, found 0"),
        ("train.weight_decay=-0.1", r"train.weight_decay: must be a finite number >= 0"),
        ("train.weight_decay=.nan", r"train.weight_decay: must be a finite number >= 0"),
        ("train.clip_norm=0.0", r"train.clip_norm: must be a finite number > 0 \(or null"),
        ("train.clip_norm=.inf", r"train.clip_norm: must be a finite number > 0 \(or null"),
        ("train.schedule=exponential", r"train.schedule: expected one of \('cosine', 'linear'"),
    ],
)
def test_bad_training_options_are_refused(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(RunConfig(), [override])


def one_update(config, grads, params):
    tx = make_optimizer(config)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


@pytest.mark.parametrize("loraplus", [1.0, 4.0])
def test_weight_decay_is_adamw_on_the_adapters(loraplus):
    params = {"lora": {"a": jnp.full((2,), 2.0)}, "extra": {}}
    zero = jax.tree.map(jnp.zeros_like, params)
    keys = [
        "train.warmup_steps=0",
        "train.schedule=constant",
        f"train.loraplus_lr_ratio={loraplus}",
    ]
    plain = apply_overrides(RunConfig(), keys)
    decayed = apply_overrides(plain, ["train.weight_decay=0.5"])
    assert float(one_update(plain, zero, params)["lora"]["a"][0]) == 0.0
    lr = plain.train.learning_rate
    # A leaf that is neither A nor B gets no update under LoRA+; plain LoRA decays it.
    want = 0.0 if loraplus != 1.0 else -lr * 0.5 * 2.0
    assert float(one_update(decayed, zero, params)["lora"]["a"][0]) == pytest.approx(want)
    assert isinstance(adapter_optimizer(decayed, lambda _: lr), optax.GradientTransformation)


def test_clip_norm_none_disables_clipping():
    params = {"lora": {"a": jnp.zeros((1,))}, "extra": {}}
    big = {"lora": {"a": jnp.full((1,), 100.0)}, "extra": {}}
    keys = ["train.warmup_steps=0", "train.schedule=constant", "train.learning_rate=1.0"]
    clipped = apply_overrides(RunConfig(), keys)
    free = apply_overrides(clipped, ["train.clip_norm=null"])
    assert free.train.clip_norm is None
    # Adam's first step is lr·sign(g) either way; the second moment shows the clipping.
    tx_c, tx_f = make_optimizer(clipped), make_optimizer(free)
    _, s_c = tx_c.update(big, tx_c.init(params), params)
    _, s_f = tx_f.update(big, tx_f.init(params), params)
    nu = [x for x in jax.tree.leaves(s_c) if x.shape == (1,)]
    nu_free = [x for x in jax.tree.leaves(s_f) if x.shape == (1,)]
    assert math.isclose(float(nu[-1][0]), 0.001 * 1.0**2, rel_tol=1e-5)
    assert math.isclose(float(nu_free[-1][0]), 0.001 * 100.0**2, rel_tol=1e-5)
