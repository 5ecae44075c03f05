"""The LoRA family through `jlora finetune`: DoRA, a QLoRA base, LoRA+, and every subcommand."""

import shutil

import jax
import numpy as np
import pytest
from runner_helpers import DEFAULT, tiny_overrides, write_tiny_weights

import jlora
from jlora.cli import main
from jlora.models.formats.weights import load_params
from jlora.runner.config import load_config
from jlora.runner.finetune import finetune
from jlora.runner.rundir.directory import read_metrics
from jlora.runner.tasks import make_task
from jlora.runner.variants import prepare_base

FAMILY = {"lora.dora": True, "lora.quantize": "nf4", "lora.quantize_block": 32}


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("w") / "tiny")


def losses(run_dir):
    return {r["step"]: r["train_loss"] for r in read_metrics(str(run_dir)) if "train_loss" in r}


def run(run_dir, weights, steps, **extra):
    config = load_config(DEFAULT, tiny_overrides(run_dir, weights, steps, **extra))
    return finetune(config, log=lambda _: 0), config


def test_dora_on_a_quantised_base_trains_resumes_and_serves(tmp_path, tiny_weights, capsys):
    results, config = run(tmp_path / "full", tiny_weights, 4, **FAMILY)
    before, after = results["before"]["eval_loss"], results["after"]["eval_loss"]
    assert after < before
    # The adapter holds DoRA magnitudes and fits the quantised base it was trained on.
    params, _ = jlora.load_adapter(
        tmp_path / "full" / "adapter", prepare_base(config, make_task(config).base)
    )
    quantised = lambda x: isinstance(x, jlora.Quantized)  # noqa: E731
    assert any(map(quantised, jax.tree.leaves(params, is_leaf=quantised)))
    assert any(p.endswith("_lora_m") for p in map(jlora.path_str, _paths(params)))
    # "before" is the quantised base, not the float one: QLoRA starts from the former.
    float_base = run(tmp_path / "float", tiny_weights, 1)[0]["before"]["eval_loss"]
    assert before != float_base
    # Resumed from its step-2 checkpoint (the quantised base rebuilt from the float weights),
    # the run repeats steps 3 and 4 with exactly the same losses.
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    assert jlora.checkpoint_steps(tmp_path / "resumed" / "checkpoints") == [2]
    run(tmp_path / "resumed", tiny_weights, 4, **FAMILY)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")
    # eval, merge and generate rebuild the same model.
    main(["eval", str(tmp_path / "full")])
    assert f"adapted {after:.4f}" in capsys.readouterr().out
    main(["merge", str(tmp_path / "full")])
    assert "merged.safetensors" in capsys.readouterr().out
    merged, _ = load_params(str(tmp_path / "full" / "merged.safetensors"))
    task = make_task(config)
    assert task.evaluate(merged, None)["eval_loss"] == pytest.approx(after, rel=1e-5)
    main(["generate", str(tmp_path / "full"), "Shall I", "--max-new-tokens", "4"])
    assert capsys.readouterr().out.startswith("Shall I")


def _paths(tree):
    return [p for p, _ in jax.tree.leaves_with_path(tree)]


def test_merge_train_step_on_a_quantised_base_matches_factorised(tmp_path, tiny_weights):
    family = {"lora.quantize": "int8", "lora.quantize_block": 32}
    run(tmp_path / "f", tiny_weights, 3, **family)
    run(tmp_path / "m", tiny_weights, 3, **family, **{"train.train_step": "merge"})
    got, want = losses(tmp_path / "m"), losses(tmp_path / "f")
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [want[s] for s in (1, 2, 3)], 1e-5)


def test_loraplus_moves_b_faster(tmp_path, tiny_weights):
    b_change = {}
    for ratio in (1.0, 16.0):
        run(tmp_path / str(ratio), tiny_weights, 3, **{"train.loraplus_lr_ratio": ratio})
        config = load_config(DEFAULT, tiny_overrides(tmp_path / str(ratio), tiny_weights, 3))
        params, _ = jlora.load_adapter(tmp_path / str(ratio) / "adapter", make_task(config).base)
        lora, _ = jlora.split(params)
        b = [x for p, x in jax.tree.leaves_with_path(lora) if jlora.path_str(p).endswith("_b")]
        b_change[ratio] = float(sum(np.abs(np.asarray(x)).sum() for x in b))  # B starts at 0
    assert b_change[16.0] > 4 * b_change[1.0]


def test_bad_family_options_are_clear_errors(tmp_path, tiny_weights):
    with pytest.raises(ValueError, match=r"lora\.quantize: expected one of .*'nf4'.*'int4'"):
        load_config(DEFAULT, [*tiny_overrides(tmp_path, tiny_weights), "lora.quantize=int4"])
    config = load_config(
        DEFAULT, [*tiny_overrides(tmp_path, tiny_weights), "mesh.data=2", "lora.quantize=int8"]
    )
    with pytest.raises(ValueError, match=r"lora\.quantize='int8' with a mesh"):
        prepare_base(config, make_task(config).base)
    with pytest.raises(ValueError, match=r"block_size=48; pick a block size"):
        run(tmp_path / "b", tiny_weights, 1, **{"lora.quantize": "int8", "lora.quantize_block": 48})
    with pytest.raises(
        ValueError, match=r"loraplus_lr_ratio: must be a finite number > 0, found -1.0"
    ):
        run(tmp_path / "r", tiny_weights, 1, **{"train.loraplus_lr_ratio": -1.0})
    assert not (tmp_path / "b").exists() and not (tmp_path / "r").exists()
