"""Every bad input to the runner is a clear error, raised before anything saved is damaged."""

import dataclasses
import os

import numpy as np
import pytest
import yaml
from runner_helpers import DEFAULT, tiny_overrides, write_tiny_weights

import jlora
import jlora.runner.finetune as loop
from jlora.cli import main
from jlora.models.formats.weights import load_params
from jlora.runner.config import RunConfig, from_dict, load_config, parse_override
from jlora.runner.data.text import LMBatches, eval_windows, load_text
from jlora.runner.finetune import finetune
from jlora.runner.rundir.directory import load_run_config, prepare_run_dir
from jlora.runner.tasks import make_task


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("w") / "tiny")


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(KeyError, match=r"'train\.stpes'; did you mean 'train\.steps'\?"):
        load_config(DEFAULT, ["train.stpes=3"])
    with pytest.raises(KeyError, match=r"unknown config key 'zzz'; known keys"):
        from_dict(RunConfig, {"zzz": 1})


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rnak: 4\n")
    with pytest.raises(KeyError, match=r"did you mean 'lora\.rank'"):
        load_config(str(path))


def test_wrong_types_name_the_field():
    with pytest.raises(TypeError, match=r"train\.steps: expected int, found 'many'"):
        load_config(DEFAULT, ["train.steps=many"])
    with pytest.raises(TypeError, match=r"train\.steps: expected int, found True"):
        load_config(DEFAULT, ["train.steps=true"])
    with pytest.raises(TypeError, match=r"lora\.targets: expected a list of str"):
        load_config(DEFAULT, ["lora.targets=abc"])
    with pytest.raises(TypeError, match=r"config train: expected a mapping"):
        from_dict(RunConfig, {"train": 3})
    with pytest.raises(TypeError, match=r"override train\.steps\.x: 'steps' is a value"):
        load_config(DEFAULT, ["train.steps.x=1"])


def test_values_out_of_range_or_choices():
    with pytest.raises(ValueError, match=r"train\.train_step: expected one of"):
        load_config(DEFAULT, ["train.train_step=fast"])
    with pytest.raises(ValueError, match=r"val_fraction: must be in \(0, 1\), found 1\.5"):
        load_config(DEFAULT, ["data.val_fraction=1.5"])
    with pytest.raises(ValueError, match=r"train\.steps: must be >= 1, found 0"):
        load_config(DEFAULT, ["train.steps=0"])
    with pytest.raises(ValueError, match="is not key=value"):
        parse_override("train.steps")


def test_numbers_in_overrides_parse_as_numbers():
    assert parse_override("train.learning_rate=1e-3") == ("train.learning_rate", 1e-3)
    assert load_config(DEFAULT, ["train.learning_rate=2"]).train.learning_rate == 2.0


def test_missing_files():
    with pytest.raises(FileNotFoundError, match=r"config 'no/such\.yaml' is neither a file"):
        load_config("no/such.yaml")
    with pytest.raises(FileNotFoundError, match=r"model\.path 'nope' does not exist"):
        load_config(DEFAULT, ["model.path=nope"])
    with pytest.raises(ValueError, match=r"unknown built-in model 'builtin:nope'"):
        load_config(DEFAULT, ["model.path=builtin:nope"])
    with pytest.raises(FileNotFoundError, match=r"weights file 'nope' does not exist"):
        load_params("nope")
    with pytest.raises(FileNotFoundError, match=r"text source 'nope\.txt' is neither"):
        load_text("nope.txt")
    with pytest.raises(FileNotFoundError, match="is not a jlora run directory"):
        load_run_config(os.path.dirname(DEFAULT))


def test_cli_prints_one_clear_line_and_exits_2(capsys):
    assert main(["finetune", DEFAULT, "train.stpes=3"]) == 2
    assert "did you mean 'train.steps'?" in capsys.readouterr().err


def test_data_too_short_and_bad_model_shapes(tmp_path, tiny_weights):
    with pytest.raises(ValueError, match="fewer than batch_size 4"):
        LMBatches(np.arange(20), seq_len=8, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="shorter than one window"):
        eval_windows(np.arange(5), 8, 1)
    over = tiny_overrides(tmp_path / "r", tiny_weights, **{"data.seq_len": 128})
    with pytest.raises(ValueError, match=r"data\.seq_len 128 exceeds .*max_position_embeddings 64"):
        make_task(load_config(DEFAULT, over))
    task = make_task(load_config(DEFAULT, tiny_overrides(tmp_path / "r", tiny_weights)))
    with pytest.raises(ValueError, match="must be non-empty and shorter than"):
        task.generate(task.base, "", 4, 1.0, 0)


def test_target_regex_matching_nothing_fails_before_the_run_dir_exists(tmp_path, tiny_weights):
    over = tiny_overrides(tmp_path / "r", tiny_weights, **{"lora.targets": "['.*/qkv/kernel']"})
    with pytest.raises(
        ValueError,
        match=r"(?s)match no kernel; regexes are fullmatched .*model/layers/self_attn/q_proj",
    ):
        finetune(load_config(DEFAULT, over))
    assert not (tmp_path / "r").exists()


def test_different_config_in_run_dir_is_refused_and_left_untouched(tmp_path, tiny_weights):
    cfg = load_config(DEFAULT, tiny_overrides(tmp_path / "r", tiny_weights))
    prepare_run_dir(cfg)
    (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 1, "train_loss": 1.0}\n')
    saved = (tmp_path / "r" / "config.yaml").read_text()
    other = load_config(DEFAULT, tiny_overrides(tmp_path / "r", tiny_weights, **{"lora.rank": 4}))
    with pytest.raises(ValueError, match=r"different config:\n  lora\.rank: 8 \(saved\) vs 4"):
        finetune(other)
    assert (tmp_path / "r" / "config.yaml").read_text() == saved
    assert (tmp_path / "r" / "metrics.jsonl").is_file()
    # overwrite=true starts over: the old run is gone, the new config saved.
    assert prepare_run_dir(dataclasses.replace(other, overwrite=True)) is False
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["lora"]["rank"] == 4
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_non_run_directory_is_refused(tmp_path, tiny_weights):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    cfg = load_config(DEFAULT, tiny_overrides(tmp_path / "mine", tiny_weights))
    with pytest.raises(ValueError, match="is not a jlora run; choose another run_dir"):
        prepare_run_dir(dataclasses.replace(cfg, overwrite=True))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_nan_loss_stops_naming_the_step_and_keeps_good_checkpoints(tmp_path, tiny_weights):
    extra = {"train.learning_rate": 1e30, "train.warmup_steps": 1, "train.checkpoint_every": 1}
    cfg = load_config(DEFAULT, tiny_overrides(tmp_path / "r", tiny_weights, 6, **extra))
    with pytest.raises(FloatingPointError, match=r"training loss is (nan|inf) at step (\d+); .*"):
        finetune(cfg, log=lambda _: 0)
    ckpts = tmp_path / "r" / "checkpoints"
    good = jlora.checkpoint_steps(ckpts)
    assert good and good[-1] < 6
    restored = jlora.restore_checkpoint(ckpts, _like(cfg))
    assert all(np.isfinite(x).all() for x in jax_leaves(restored.state["trainable"]))
    assert not (tmp_path / "r" / "adapter").exists()


def _like(cfg):
    import jax

    task = make_task(cfg)
    p = jlora.init_lora(jax.random.key(0), task.base, loop.lora_config(cfg))
    lora, _ = jlora.split(p)
    tx = loop.make_optimizer(cfg)
    trainable = {"lora": lora, "extra": {}}
    return jax.eval_shape(
        lambda: {"trainable": trainable, "opt_state": tx.init(trainable), "rng": jax.random.key(0)}
    )


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_dropout_with_the_merge_step_is_refused(tmp_path, tiny_weights):
    extra = {"lora.dropout": 0.1, "train.train_step": "merge"}
    cfg = load_config(DEFAULT, tiny_overrides(tmp_path / "r", tiny_weights, **extra))
    with pytest.raises(ValueError, match=r"lora\.dropout=0\.1 needs train\.train_step=factorised"):
        finetune(cfg)
    assert not (tmp_path / "r").exists()
