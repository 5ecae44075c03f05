"""The `jlora finetune` runner end to end: outputs, subcommands, kill-and-resume, determinism."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from runner_helpers import DEFAULT, ROOT, tiny_overrides, write_tiny_weights

from jlora.cli import main
from jlora.runner.config import load_config
from jlora.runner.finetune import finetune
from jlora.runner.rundir.directory import read_metrics

STEPS = 10


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("w") / "tiny")


def train_losses(run_dir):
    return {r["step"]: r["train_loss"] for r in read_metrics(str(run_dir)) if "train_loss" in r}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_weights):
    """An uninterrupted tiny run of STEPS steps (factorised train step), done in-process."""
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    finetune(load_config(DEFAULT, tiny_overrides(run_dir, tiny_weights, STEPS)), log=lambda _: 0)
    return run_dir


def test_default_config_end_to_end_with_shipped_base(tmp_path, capsys):
    # The real default config and the shipped pretrained base, with a tiny step count.
    over = ["train.steps=3", "train.eval_every=3", "train.eval_batches=1", "train.progress=false"]
    over += ["generate.max_new_tokens=8", f"run_dir={tmp_path / 'run'}", "train.batch_size=4"]
    assert main(["finetune", DEFAULT, *over]) == 0
    out = capsys.readouterr().out
    assert "what LoRA did" in out and "eval_loss: before" in out and "sample 1 after" in out
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png", "results.json"):
        assert (run / name).is_file(), name
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert sorted(os.listdir(run / "checkpoints")) == ["3"]
    results = json.loads((run / "results.json").read_text())
    assert results["trainable_params"] < results["total_params"] / 5
    # The other subcommands work on the finished run.
    assert main(["eval", str(run)]) == 0
    assert "eval_loss: base" in capsys.readouterr().out
    assert main(["generate", str(run), "Thy ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("Thy ")
    assert main(["merge", str(run)]) == 0
    assert (run / "merged.safetensors").is_file()
    assert main(["summary", DEFAULT, "lora.rank=4"]) == 0
    assert "trainable" in capsys.readouterr().out


def test_kill_at_any_moment_then_rerun_resumes_with_identical_losses(
    tmp_path, tiny_weights, finished_run
):
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jlora.cli", "finetune", DEFAULT]
    cmd += tiny_overrides(run_dir, tiny_weights, STEPS)
    # Both processes share a compilation cache: the resumed one skips recompiling.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    log = tmp_path / "killed.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        ckpts = run_dir / "checkpoints"
        deadline = time.monotonic() + 240

        def mid_save():  # orbax writes a step into a temporary directory, then renames it
            return ckpts.is_dir() and any("tmp" in d for d in os.listdir(ckpts))

        # Once step 4 is saved, kill during the next save if we catch one in the act, else as
        # soon as step 6 exists (then the process is training step 7).
        while proc.poll() is None and time.monotonic() < deadline:
            if (ckpts / "4").is_dir() and (mid_save() or (ckpts / "6").is_dir()):
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert steps and steps[-1] < STEPS
    # A save torn by a kill is left as orbax's temporary directory; it must be ignored.
    torn = ckpts / f"{steps[-1] + 2}.orbax-checkpoint-tmp-1"
    torn.mkdir(exist_ok=True)
    (torn / "garbage").write_text("half a checkpoint")

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming {run_dir} from the checkpoint of step {steps[-1]}" in done.stdout
    resumed, full = train_losses(run_dir), train_losses(finished_run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == full  # bitwise: same data position, optimizer state and rng
    adapter = json.loads((run_dir / "results.json").read_text())["after"]["eval_loss"]
    assert adapter == json.loads((finished_run / "results.json").read_text())["after"]["eval_loss"]


def test_rerunning_a_finished_run_trains_nothing_more(finished_run, tiny_weights):
    before = read_metrics(str(finished_run))
    logs = []
    cfg = load_config(DEFAULT, tiny_overrides(finished_run, tiny_weights, STEPS))
    finetune(cfg, log=logs.append)
    assert logs == [f"resuming {finished_run} from the checkpoint of step {STEPS}"]
    assert read_metrics(str(finished_run)) == before


def test_the_last_steps_evaluation_is_reported_without_evaluating_again(
    monkeypatch, tmp_path, tiny_weights
):
    from jlora.runner.tasks.causal_lm import CausalLMTask

    evaluate, calls = CausalLMTask.evaluate, []

    def counted(self, params, extra):
        calls.append(1)
        return evaluate(self, params, extra)

    monkeypatch.setattr(CausalLMTask, "evaluate", counted)
    run_dir = tmp_path / "run"
    finetune(load_config(DEFAULT, tiny_overrides(run_dir, tiny_weights, 3)), log=lambda _: 0)
    # the base once, step 2 (eval_every=2), step 3 (the last): the report reuses step 3's
    assert len(calls) == 3
    last = [r for r in read_metrics(str(run_dir)) if "eval_loss" in r][-1]
    results = json.loads((run_dir / "results.json").read_text())
    assert last["step"] == 3 and results["after"]["eval_loss"] == last["eval_loss"]


def test_merge_train_step_matches_factorised(tmp_path, tiny_weights, finished_run):
    over = tiny_overrides(tmp_path / "merge", tiny_weights, 4, **{"train.train_step": "merge"})
    finetune(load_config(DEFAULT, over), log=lambda _: 0)
    merged, factorised = train_losses(tmp_path / "merge"), train_losses(finished_run)
    # Same first steps (the schedules differ in length, but warm-up covers steps 1-4 alike).
    np.testing.assert_allclose(
        [merged[s] for s in range(1, 3)], [factorised[s] for s in range(1, 3)], rtol=1e-5
    )


def test_lora_dropout_changes_training_once_b_is_nonzero(tmp_path, tiny_weights):
    losses = {}
    for rate in (0.0, 0.5):
        over = tiny_overrides(tmp_path / str(rate), tiny_weights, 3, **{"lora.dropout": rate})
        finetune(load_config(DEFAULT, over), log=lambda _: 0)
        losses[rate] = train_losses(tmp_path / str(rate))
    # Warm-up makes update 1 zero, so B = 0 through step 2: dropout cannot matter yet.
    assert [losses[0.5][s] for s in (1, 2)] == [losses[0.0][s] for s in (1, 2)]
    assert losses[0.5][3] != losses[0.0][3]


@pytest.mark.parametrize(("setting", "calls"), [("true", 1), ("false", 0)])
def test_finetune_keeps_freed_memory_unless_told_not_to(monkeypatch, tmp_path, setting, calls):
    import jlora.cli
    import jlora.runner.finetune

    seen = []
    monkeypatch.setattr(jlora.cli, "keep_freed_memory", lambda: seen.append("kept") or True)

    def stop(config, **_):  # the point where training would start
        seen.append("train")
        raise ValueError("stopped before training")

    monkeypatch.setattr(jlora.runner.finetune, "finetune", stop)
    over = [f"run_dir={tmp_path / 'run'}", f"train.keep_freed_memory={setting}"]
    assert main(["finetune", DEFAULT, *over]) == 2
    assert seen == ["kept"] * calls + ["train"]  # and before the first computation
