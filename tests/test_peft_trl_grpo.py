"""jlora's GRPO objective agrees with TRL's own ``GRPOTrainer`` on one model, adapter and rollout.

A tiny random ``LlamaForCausalLM`` is built in PyTorch (fixed seed), saved as safetensors and
loaded into jlora with ``jlora.models.load_pretrained``. For each case, TRL's ``GRPOTrainer`` is
built on it with a PEFT ``LoraConfig`` (random non-zero A and B on q/v,
``init_lora_weights=False``), a word-level tokenizer and a reward that depends on the
completion's length. TRL's own ``_generate_and_score_completions`` samples four completions for
each of two prompts, scores them and computes the advantages and (``beta > 0``) the reference
log-probabilities with the adapter disabled; old log-probabilities are then set to the policy's
shifted by fixed amounts, so the ratio is off 1 and both clip bounds are hit; TRL's
``_compute_loss`` gives the loss and metrics. The trainer's adapter is saved with PEFT and read
with ``jlora.import_peft``, and on the same tokens, advantages and old log-probabilities
``jlora.grpo_policy_loss`` must give the same loss and metrics to 1e-5 (relative, with 1e-6
absolute for values near zero), and ``jlora.group_advantages`` of the logged rewards the same
advantages. The reference is PEFT's model with the adapter disabled, jlora's base with the
adapters off. Needs the ``peft`` extra (torch, transformers, peft, trl).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import jlora  # noqa: E402
from jlora.models import load_pretrained  # noqa: E402
from jlora.models.decoder import PEFT_MAPPING  # noqa: E402

pytestmark = pytest.mark.peft

RTOL, ATOL = 1e-5, 1e-6
GENERATIONS = 4
MAX_COMPLETION = 6
# Two prompts of three tokens each, so TRL's left padding adds nothing jlora would have to mask.
PROMPTS = [{"prompt": "w1 w2 w3"}, {"prompt": "w9 w10 w11"}]
# old = logp + SHIFTS[t % 4] (GSPO: SHIFTS[row % 4]): ratios e^0.5, e^0.1, e^-0.1, e^-0.5,
# clipped at 0.8 and 1.2 (1.28 for clip-higher) below and above, and none near a bound.
SHIFTS = np.array([-0.5, -0.1, 0.1, 0.5], np.float32)
METRICS = [
    "kl",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
]
GRAD_RTOL = 1e-4  # gradients: relative to the largest entry of the whole gradient
AGREEMENT: dict[str, tuple[float, str, float]] = {}  # worst relative difference per case
GRADIENTS: dict[str, float] = {}  # worst gradient difference over the largest entry, per case


@pytest.fixture(autouse=True)
def _accelerate_in_float32(monkeypatch):
    """TRL's trainer runs without mixed precision whatever an earlier trainer left behind.

    ``bf16=False`` keeps ``ACCELERATE_MIXED_PRECISION`` from the environment, which any
    ``TrainingArguments`` with ``bf16=True`` (the TRL configs' default) sets process-wide; with
    ``bf16`` there TRL scores tokens under bf16 autocast, 0.5-1% off float32.
    """
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")


def _tokenizer():
    words = [f"w{i}" for i in range(40)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )


def length_reward(completions, **kwargs):
    """A reward with ties inside some groups: the completion's word count modulo 3."""
    return [float(len(c.split()) % 3) for c in completions]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The torch model's directory, and the same model loaded into jlora."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=43,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # a model whose predictions differ from uniform
        for p in model.parameters():
            p.mul_(8.0 if p.ndim == 2 else 1.0)
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained(directory, safe_serialization=True)
    return directory, load_pretrained(directory)


def _trl(base, tmp_path, **options):
    """TRL's rollout, (loss, metrics) and advantages with shifted old log-probabilities."""
    directory, _ = base
    torch.manual_seed(1)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=GENERATIONS * len(PROMPTS),
        num_generations=GENERATIONS,
        max_completion_length=MAX_COMPLETION,
        **options,
    )
    model = transformers.LlamaForCausalLM.from_pretrained(directory, attn_implementation="eager")
    trainer = trl.GRPOTrainer(
        model=model.float(),
        reward_funcs=length_reward,
        args=args,
        train_dataset=datasets.Dataset.from_list(PROMPTS),
        processing_class=_tokenizer(),
        peft_config=peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    assert trainer.accelerator.mixed_precision == "no"  # float32, as jlora computes
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is not run
    rows = [prompt for prompt in PROMPTS for _ in range(GENERATIONS)]  # TRL's RepeatSampler order
    inputs = trainer._generate_and_score_completions(rows)
    rewards = np.array(list(trainer._logs["rewards"]["length_reward"])[-len(rows) :], np.float32)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attention, width
        )
    if options.get("importance_sampling_level") == "sequence":  # one ratio per row: shift rows
        shifts = torch.from_numpy(np.resize(SHIFTS, len(rows)))[:, None]
    else:
        shifts = torch.from_numpy(np.resize(SHIFTS, width))
    inputs["old_per_token_logps"] = logps + shifts
    for store in trainer._metrics.values():
        store.clear()
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k in METRICS}
    trainer.model.save_pretrained(tmp_path / "adapter")
    # The gradient as an adapter: each LoRA factor replaced by its gradient, saved by PEFT, so
    # import_peft lays it out as jlora's adapter tree (the import is linear: no scale applied)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_" in name:
                param.copy_(param.grad)
    trainer.model.save_pretrained(tmp_path / "gradient")
    return trainer, inputs, rewards, (loss.item(), metrics)


def _jlora_batch(inputs):
    """TRL's rollout as jlora's ``[B, P + C]`` batch; old logps in the same layout."""
    prompt = inputs["prompt_ids"].numpy()
    completion_mask = inputs["completion_mask"].numpy()
    assert inputs["prompt_mask"].numpy().all()  # no prompt padding (equal-length prompts)
    tokens = np.concatenate([prompt, inputs["completion_ids"].numpy()], axis=1)
    targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
    # target t predicts tokens[t + 1]: completion token j sits at target P - 1 + j
    lead = np.zeros((len(tokens), prompt.shape[1] - 1), np.float32)
    tail = np.zeros((len(tokens), 1), np.float32)

    def placed(per_completion_token):
        return jnp.asarray(np.concatenate([lead, per_completion_token, tail], axis=1))

    batch = {
        "tokens": jnp.asarray(tokens),
        "targets": jnp.asarray(targets),
        "loss_mask": placed(completion_mask.astype(np.float32)) > 0,
        "advantages": jnp.asarray(inputs["advantages"].numpy()),
    }
    return batch, placed(inputs["old_per_token_logps"].numpy())


def _agree(case, got, want):
    """Asserts jlora's (loss, metrics) equal TRL's; records the worst relative difference."""
    loss, metrics = got
    want_loss, want_metrics = want
    pairs = [("loss", float(loss), want_loss)]
    pairs += [(k, float(metrics[k]), float(want_metrics[k])) for k in sorted(want_metrics)]
    worst = (0.0, "")
    for name, a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"{case}: {name}")
        worst = max(worst, (abs(a - b) / abs(b) if b else abs(a - b), name))
    relative = abs(float(loss) - want_loss) / abs(want_loss) if want_loss else 0.0
    AGREEMENT[case] = (*worst, relative)


CASES = [
    # GRPO as published: per-sequence means, group std, a KL penalty; delta caps the ratio
    ("grpo", {"loss_type": "grpo", "beta": 0.1, "delta": 1.5}),
    # Dr. GRPO: no std scaling, a constant normaliser
    ("dr_grpo", {"loss_type": "dr_grpo", "beta": 0.1, "scale_rewards": "none"}),
    # DAPO: clip-higher, token-level normalisation; sampled at temperature 0.7
    ("dapo", {"loss_type": "dapo", "beta": 0.1, "epsilon_high": 0.28, "temperature": 0.7}),
    # BNPO with batch-scaled rewards and no reference
    ("bnpo", {"loss_type": "bnpo", "beta": 0.0, "scale_rewards": "batch"}),
    # GSPO: one ratio per sequence
    ("gspo", {"loss_type": "grpo", "beta": 0.1, "importance_sampling_level": "sequence"}),
]


@pytest.mark.parametrize(("case", "options"), CASES, ids=[c for c, _ in CASES])
def test_grpo_trainer(base, tmp_path, case, options):
    _, loaded = base
    trainer, inputs, rewards, want = _trl(base, tmp_path, **options)
    lengths = inputs["completion_mask"].sum(1).numpy()
    assert (
        len(set(lengths.tolist())) > 1
    )  # completions of different lengths: the normalisers differ

    advantages = jlora.group_advantages(
        rewards, GENERATIONS, scale_rewards=options.get("scale_rewards", "group")
    )
    np.testing.assert_allclose(
        advantages.advantages, inputs["advantages"].numpy(), rtol=RTOL, atol=ATOL
    )

    params, cfg = jlora.import_peft(tmp_path / "adapter", loaded.params, PEFT_MAPPING)
    batch, old = _jlora_batch(inputs)
    ours = dict(options)
    ours.pop("scale_rewards", None)
    if "epsilon_high" in ours:
        ours["epsilon_low"] = trainer.epsilon_low
    if case == "dr_grpo":
        ours["max_completion_length"] = MAX_COMPLETION
    adapters, frozen = jlora.split(params)

    def of_adapters(adapters):
        return jlora.grpo_policy_loss(
            lambda p, tokens: loaded.model.apply({"params": p}, tokens),
            jlora.combine(adapters, frozen),
            cfg,
            batch,
            old_logps=old,
            **ours,
        )

    got, grads = jax.value_and_grad(of_adapters, has_aux=True)(adapters)
    if options["beta"]:
        assert want[1]["kl"] > 1e-3  # the adapter moves the policy off the reference
    assert want[1]["clip_ratio/region_mean"] > 0  # some tokens are clipped
    _agree(f"GRPOTrainer {case}", got, want)

    want_grads, _ = jlora.split(
        jlora.import_peft(tmp_path / "gradient", loaded.params, PEFT_MAPPING)[0]
    )
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads))
    worst = 0.0
    for (path, g), w in zip(
        jax.tree.leaves_with_path(grads), jax.tree.leaves(want_grads), strict=True
    ):
        np.testing.assert_allclose(
            g, w, rtol=GRAD_RTOL, atol=GRAD_RTOL * scale, err_msg=f"{case}: d/d{path}"
        )
        worst = max(worst, float(jnp.max(jnp.abs(g - w))) / scale)
    GRADIENTS[f"GRPOTrainer {case}"] = worst


@pytest.fixture(scope="module", autouse=True)
def _report_agreement(pytestconfig):
    """Prints each case's worst relative difference after the module's tests."""
    yield
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    if capture is None or not AGREEMENT:
        return
    with capture.global_and_fixture_disabled():
        print("\nworst relative difference, jlora vs TRL GRPOTrainer, per case (the quantity):")
        for case, (worst, name, loss) in AGREEMENT.items():
            grad = f"; gradient {GRADIENTS[case]:.1e}" if case in GRADIENTS else ""
            print(f"  {case}: {worst:.1e} ({name}); loss {loss:.1e}{grad}")
