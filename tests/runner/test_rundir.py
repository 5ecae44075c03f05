"""The run directory: overwrite keeps the user's files, one process at a time, clear file errors."""

import errno
import json

import jax
import numpy as np
import pytest
from runner_helpers import DEFAULT, tiny_overrides, write_tiny_weights

import jlora
import jlora._adapter_files
import jlora.runner.finetune as loop
from jlora.cli import main
from jlora.runner.config import load_config
from jlora.runner.finetune import finetune
from jlora.runner.rundir.directory import OWNED, prepare_run_dir
from jlora.runner.rundir.lock import hold_lock


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("w") / "tiny")


def config(run_dir, weights, steps=2, **extra):
    return load_config(DEFAULT, tiny_overrides(run_dir, weights, steps, **extra))


def test_overwrite_deletes_only_what_jlora_wrote(tmp_path, tiny_weights):
    run = tmp_path / "r"
    finetune(config(run, tiny_weights), log=lambda _: 0)
    (run / "notes.txt").write_text("precious")
    (run / "mine").mkdir()
    (run / "merged.safetensors").write_bytes(b"from `jlora merge`")
    assert {p.name for p in run.iterdir()} - {"notes.txt", "mine"} <= set(OWNED)
    other = config(run, tiny_weights, **{"lora.rank": 4, "overwrite": "true"})
    assert prepare_run_dir(other) is False
    # The lock file stays: it is only a name to flock (released when a run ends), not data.
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.yaml", "mine", "notes.txt"]
    assert (run / "notes.txt").read_text() == "precious"


def test_overwrite_in_the_current_directory_keeps_its_files(tmp_path, tiny_weights, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepare_run_dir(config(".", tiny_weights))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "train.py").write_text("# the user's script")
    prepare_run_dir(config(".", tiny_weights, **{"lora.rank": 2, "overwrite": "true"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "train.py"]


def test_a_config_yaml_jlora_did_not_write_is_refused_even_with_overwrite(tmp_path, tiny_weights):
    run = tmp_path / "r"
    run.mkdir()
    mine = "# my experiment\ntrain:\n  steps: 2\n"
    (run / "config.yaml").write_text(mine)
    (run / "notes.txt").write_text("precious")
    cfg = config(run, tiny_weights, overwrite="true")
    with pytest.raises(
        ValueError, match=r"config\.yaml' was not written by jlora .* choose another"
    ):
        finetune(cfg)
    assert (run / "config.yaml").read_text() == mine
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "notes.txt"]


def test_run_dir_that_is_a_file_is_refused(tmp_path, tiny_weights):
    (tmp_path / "x").write_text("a file")
    with pytest.raises(ValueError, match=r"run_dir '.*x' is a file, not a directory"):
        finetune(config(tmp_path / "x", tiny_weights))
    assert (tmp_path / "x").read_text() == "a file"


def test_run_dir_that_cannot_be_created_is_one_line_naming_it(tmp_path, tiny_weights, capsys):
    (tmp_path / "x").write_text("a file")
    assert main(["finetune", DEFAULT, *tiny_overrides(tmp_path / "x" / "r", tiny_weights)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "x") in err, err


def test_second_lock_on_a_run_dir_fails_at_once(tmp_path, tiny_weights):
    run = tmp_path / "r"
    run.mkdir()
    with hold_lock(str(run)):
        with pytest.raises(ValueError, match=r"run_dir '.*r' is in use by another jlora process"):
            with hold_lock(str(run)):
                pass
        with pytest.raises(ValueError, match="in use by another jlora process"):
            finetune(config(run, tiny_weights))
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
    with hold_lock(str(run)):  # released with the block
        pass


def test_full_disk_during_a_checkpoint_names_the_directory(tmp_path, tiny_weights, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jlora, "save_checkpoint", full)
    run = tmp_path / "r"
    with pytest.raises(OSError, match=r"could not save the checkpoint of step 2") as info:
        finetune(config(run, tiny_weights), log=lambda _: 0)
    assert info.value.filename == str(run / "checkpoints")
    assert info.value.errno == errno.ENOSPC
    assert not (run / "adapter").exists()


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_failed_final_save_keeps_the_previous_adapter(tmp_path, tiny_weights, monkeypatch):
    run = tmp_path / "r"
    finetune(config(run, tiny_weights), log=lambda _: 0)
    before = _snapshot(run / "adapter")
    real = jlora._adapter_files.atomic_write

    def full_on_the_manifest(path, data):
        if str(path).endswith(".json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(jlora._adapter_files, "atomic_write", full_on_the_manifest)
    # A finished run re-run saves its adapter again; that save fails half way.
    with pytest.raises(OSError, match="could not save the adapter") as info:
        finetune(config(run, tiny_weights), log=lambda _: 0)
    assert info.value.filename == str(run / "adapter")
    assert {k: v for k, v in _snapshot(run / "adapter").items() if k in before} == before
    base = loop.make_task(config(run, tiny_weights)).base
    params, _ = jlora.load_adapter(run / "adapter", base)
    leaves = jax.tree.leaves(jlora.split(params)[0])
    assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_a_non_finite_adapter_never_replaces_a_saved_one(tmp_path, tiny_weights):
    run = tmp_path / "r"
    cfg = config(run, tiny_weights)
    finetune(cfg, log=lambda _: 0)
    before = _snapshot(run / "adapter")
    task = loop.make_task(cfg)
    params = jlora.init_lora(jax.random.key(0), task.base, loop.lora_config(cfg))
    lora, base = jlora.split(params)
    lora = jax.tree.map(lambda x: x * np.nan, lora)
    state = {"trainable": {"lora": lora, "extra": {}}}
    with pytest.raises(FloatingPointError, match=r"holds NaN or infinite values; not saved to"):
        loop._finish(cfg, task, loop.lora_config(cfg), state, base, {})
    assert _snapshot(run / "adapter") == before


def test_progress_is_one_line_per_log_step_when_stderr_is_not_a_terminal(
    tmp_path, tiny_weights, capsys
):
    extra = {"train.progress": "true", "train.log_every": 2}
    finetune(config(tmp_path / "r", tiny_weights, 4, **extra), log=lambda _: 0)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"], lines
    assert "train_loss" in lines[0] and "tok/s" in lines[0]
    metrics = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in metrics if "train_loss" in r]
    assert f"train_loss {logged[0]['train_loss']:.4f}" in lines[0]


def test_a_run_saved_before_a_config_key_existed_still_resumes(tmp_path, tiny_weights):
    import yaml

    cfg = config(tmp_path / "run", tiny_weights, 2)
    assert prepare_run_dir(cfg) is False
    path = tmp_path / "run" / "config.yaml"
    mark, body = path.read_text().split("\n", 1)
    saved = yaml.safe_load(body)
    del saved["model"]["remat"]  # as written by a jlora that had no such key
    path.write_text(mark + "\n" + yaml.safe_dump(saved, sort_keys=False))
    assert prepare_run_dir(cfg) is True
    changed = config(tmp_path / "run", tiny_weights, 2, **{"train.seed": 7})
    with pytest.raises(ValueError, match=r"train.seed: 0 \(saved\) vs 7 \(now\)"):
        prepare_run_dir(changed)
