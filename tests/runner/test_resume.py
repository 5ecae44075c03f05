"""Resuming `jlora finetune`: corrupted checkpoints, recovery after NaN, Ctrl-C, pruning."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from runner_helpers import DEFAULT, ROOT, tiny_overrides, write_tiny_weights
from test_checkpoint import flip_bytes

import jlora
from jlora.runner.config import load_config
from jlora.runner.finetune import finetune
from jlora.runner.rundir.directory import read_metrics

# checkpoint_every is not a multiple of log_every: a resume from step 7 starts mid-window.
RUN = {"train.log_every": 5, "train.checkpoint_every": 7, "train.eval_every": 5}
STEPS = 10


# Orbax's failed reads of a corrupted step leave tensorstore callbacks for an event loop it has
# already closed; they are reported (as unraisable exceptions, not raised) during whichever
# test of this module runs next, so the whole module tolerates them.


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("w") / "tiny")


def run(run_dir, weights, log=None, steps=STEPS, **extra):
    over = tiny_overrides(run_dir, weights, steps, **{**RUN, **extra})
    return finetune(load_config(DEFAULT, over), log=(lambda _: 0) if log is None else log)


def scores(run_dir):
    """metrics.jsonl without the throughput figures, which depend on the machine's load."""
    return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_weights):
    """An uninterrupted run; its checkpoints are steps 7 and 10."""
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    results = run(run_dir, tiny_weights)
    assert jlora.checkpoint_steps(run_dir / "checkpoints") == [7, 10]
    return run_dir, results


def copy_of(reference, tmp_path):
    shutil.copytree(reference[0], tmp_path / "r")
    return tmp_path / "r"


def test_log_window_does_not_depend_on_where_the_run_stopped(reference, tiny_weights, tmp_path):
    run_dir = copy_of(reference, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "10")  # as if killed after step 7
    logs = []
    results = run(run_dir, tiny_weights, logs.append)
    assert logs == [f"resuming {run_dir} from the checkpoint of step 7"]
    assert scores(run_dir) == scores(reference[0])  # train_loss at step 10 averages 6..10
    assert results["after"]["eval_loss"] == reference[1]["after"]["eval_loss"]


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(
    reference, tiny_weights, tmp_path
):
    run_dir = copy_of(reference, tmp_path)
    flip_bytes(run_dir / "checkpoints" / "10")
    logs = []
    results = run(run_dir, tiny_weights, logs.append)
    assert logs[0].startswith("warning: the checkpoint of step 10 is unusable (step 10 of")
    assert "is corrupted" in logs[0] and logs[0].endswith("resumed from step 7 instead")
    assert logs[1:] == [f"resuming {run_dir} from the checkpoint of step 7"]
    assert (run_dir / "checkpoints" / "10.corrupt").is_dir()  # set aside, not deleted
    assert jlora.checkpoint_steps(run_dir / "checkpoints") == [7, 10]
    assert scores(run_dir) == scores(reference[0])
    assert results["after"]["eval_loss"] == reference[1]["after"]["eval_loss"]


def test_no_usable_checkpoint_is_a_clear_error(reference, tiny_weights, tmp_path):
    run_dir = copy_of(reference, tmp_path)
    for step in (7, 10):
        flip_bytes(run_dir / "checkpoints" / str(step))
    adapter = (run_dir / "adapter" / "adapter_config.json").read_bytes()
    with pytest.raises(ValueError, match=r"(?s)no checkpoint in .* can be resumed from:.*step 7"):
        run(run_dir, tiny_weights)
    assert jlora.checkpoint_steps(run_dir / "checkpoints") == [7, 10]  # left for the user
    assert (run_dir / "adapter" / "adapter_config.json").read_bytes() == adapter


def test_resume_prunes_to_keep_checkpoints(reference, tiny_weights, tmp_path):
    run_dir = copy_of(reference, tmp_path)
    for extra in ("1", "3"):  # left over by earlier kills
        shutil.copytree(run_dir / "checkpoints" / "7", run_dir / "checkpoints" / extra)
    run(run_dir, tiny_weights)  # finished already: nothing is trained or saved
    assert jlora.checkpoint_steps(run_dir / "checkpoints") == [7, 10]


def test_after_nan_a_lower_learning_rate_resumes_from_a_finite_checkpoint(tmp_path, tiny_weights):
    run_dir = tmp_path / "r"
    bad = {"train.learning_rate": 1e30, "train.warmup_steps": 1, "train.checkpoint_every": 1}
    with pytest.raises(FloatingPointError, match=r"the last good checkpoint is step (\d+)") as e:
        run(run_dir, tiny_weights, steps=6, **bad)
    good = int(str(e.value).split("the last good checkpoint is step ")[1].split()[0])
    assert jlora.checkpoint_steps(run_dir / "checkpoints")[-1] == good
    assert "re-run the same command: it resumes from step" in str(e.value)
    logs = []
    results = run(
        run_dir, tiny_weights, logs.append, steps=6, **{**bad, "train.learning_rate": 1e-3}
    )
    assert logs[-1] == f"resuming {run_dir} from the checkpoint of step {good}"
    assert "train.learning_rate 1e+30 -> 0.001" in logs[-2]
    change = {"step": good, "config_change": {"train.learning_rate": [1e30, 1e-3]}}
    assert change in read_metrics(run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["learning_rate"] == 1e-3
    assert np.isfinite(results["after"]["eval_loss"])
    # Keys that shape the data or the state still refuse a resume.
    with pytest.raises(ValueError, match=r"train\.batch_size: 4 \(saved\) vs 2"):
        run(run_dir, tiny_weights, steps=6, **{**bad, "train.batch_size": 2})


def _wait_for(predicate, proc, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_ctrl_c_stops_between_steps_saves_and_resumes(tmp_path, tiny_weights):
    run_dir = tmp_path / "r"
    steps = 400
    extra = {"train.progress": "true", "train.eval_every": steps, "train.checkpoint_every": steps}
    cmd = [sys.executable, "-m", "jlora.cli", "finetune", DEFAULT]
    cmd += tiny_overrides(run_dir, tiny_weights, steps, **extra)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
        try:
            # Not a terminal: one progress line per step, so the loop is running once one shows.
            started = _wait_for(lambda: "step 3/" in err.read_text(), proc, 120)
            assert started, err.read_text()
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    said, errors = out.read_text(), err.read_text()
    assert proc.returncode == 130, errors
    assert "Traceback" not in errors and "jlora finetune: interrupted" in errors
    stopped = int(said.split("resume with the same command: resumes from step ")[1].split()[0])
    assert 3 <= stopped < steps
    assert jlora.checkpoint_steps(run_dir / "checkpoints") == [stopped]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming {run_dir} from the checkpoint of step {stopped}" in done.stdout
    logged = [r["step"] for r in read_metrics(run_dir) if "train_loss" in r]
    assert logged == list(range(1, steps + 1))
