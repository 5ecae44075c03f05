"""``python -m benchmarks`` and ``python -m benchmarks.render`` on the smallest path (no timing)."""

import copy
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, ROOT)

from benchmarks import __main__ as runner  # noqa: E402
from benchmarks import render  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cpu.json"
    cmd = [sys.executable, "-m", "benchmarks", "--only", "train_step", "--quick", "--out", str(out)]
    got = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    assert "| jlora.lora" in got.stdout  # the benchmark's table went through
    return json.loads(out.read_text())


def test_results_hold_machine_versions_and_each_benchmarks_tables(results):
    assert {"machine", "versions", "date", "sizes", "benchmarks", "seconds"} <= set(results)
    assert results["versions"]["jax"] and results["machine"]["cpu_count"] >= 1
    assert {"load_average_start", "load_average_end"} <= set(results["machine"])
    assert results["sizes"] == "smoke"
    entry = results["benchmarks"]["train_step"]
    assert entry["returncode"] == 0
    assert entry["command"].startswith("python benchmarks/train_step.py --quick")
    assert entry["settings"]["quick"] is True and entry["settings"]["batch"] == 2
    (table,) = entry["tables"]
    assert table["name"] == "train_step" and table["header"][:2] == ["approach", "ms"]
    assert [row[0] for row in table["rows"]][:3] == [
        "full fine-tune",
        "merge W+sAB in step",
        "jlora.lora",
    ]
    assert entry["results"]["rows"]["jlora.lora"]["ms"] > 0


def test_render_writes_each_table_with_its_command(results, tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "performance.md"
    render.main(["--cpu", str(path), "--gpu", str(tmp_path / "absent.json"), "--out", str(out)])
    page = out.read_text()
    entry = results["benchmarks"]["train_step"]
    assert entry["command"] in page
    assert entry["tables"][0]["title"] in page
    assert "| full fine-tune" in page and "## Tuning history" in page


def test_render_puts_cpu_and_gpu_side_by_side(results):
    gpu = copy.deepcopy(results)
    gpu["machine"]["gpu"] = ["NVIDIA H200"]
    table = gpu["benchmarks"]["train_step"]["tables"][0]
    table["rows"] = table["rows"][:2]  # a row only the CPU has reads "-" on the GPU side
    page = render.render({"cpu": results, "gpu": gpu})
    header = next(line for line in page.splitlines() if line.startswith("| approach"))
    assert "ms (CPU)" in header and "ms (GPU)" in header
    lora = next(line for line in page.splitlines() if line.startswith("| jlora.lora "))
    assert lora.rstrip(" |").endswith("-")
    assert "NVIDIA H200" in page


def test_runner_refuses_unknown_names_and_a_missing_gpu(capsys):
    with pytest.raises(SystemExit):
        runner.parse_args(["--only", "train_step,nope"])
    assert "unknown benchmarks ['nope']" in capsys.readouterr().err
    try:
        names = runner.gpu_names()
    except SystemExit as e:
        assert "--device gpu: jax finds no GPU here" in str(e)
        assert "jax[cuda12]" in str(e)
    else:
        pytest.skip(f"GPUs present: {names}")


def test_render_without_results_says_what_to_run(tmp_path, capsys):
    absent = [str(tmp_path / "no.json")]
    with pytest.raises(SystemExit):
        render.main(["--cpu", *absent, "--gpu", *absent, "--out", str(tmp_path / "p.md")])
    assert "run `python -m benchmarks`" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no results to render"):
        render.render({})
