"""Sharded and multi-process LoRA on fake CPU devices, each run in its own subprocess."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[1]
CHECK = ROOT / "tests" / "distributed_check.py"
EXAMPLE = ROOT / "examples" / "sharded_train.py"


def run(args, devices, timeout=600):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run(
        [sys.executable, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mesh_report():
    return run([CHECK], devices=8)


def test_2x2x2_mesh_losses_equal_single_device(mesh_report):
    assert len(mesh_report["losses"]) == 5
    np.testing.assert_allclose(mesh_report["losses"], mesh_report["single"], rtol=1e-5)
    assert mesh_report["finite"]


def test_adapters_keep_the_derived_shardings(mesh_report):
    assert mesh_report["n_adapters"] == 14  # A and B of 7 projections, each stacked over layers
    assert mesh_report["spec_mismatches"] == []


def test_no_weight_sized_gradient_is_reduced(mesh_report):
    # full fine-tuning all-reduces / reduce-scatters kernel-shaped gradients; LoRA must not
    assert mesh_report["full_reduced_weight_shapes"], "the check would not see W-sized reductions"
    assert mesh_report["lora_reduced_weight_shapes"] == []
    assert mesh_report["lora_bytes"] < mesh_report["full_bytes"]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_agree_and_their_checkpoint_restores_in_one(tmp_path):
    port, ckpt = _free_port(), tmp_path / "ckpt"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, str(EXAMPLE), "--mesh", "2,2,1", "--steps", "3"),
                *("--coordinator", f"localhost:{port}", "--processes", "2", "--id", str(i)),
                *("--save", str(ckpt), "--json", str(tmp_path / f"p{i}.json")),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert [r["devices"] for r in reports] == [4, 4]
    assert reports[0]["losses"] == reports[1]["losses"]
    one = run([CHECK, ckpt, 3], devices=1)
    np.testing.assert_allclose(reports[0]["losses"], one["losses"], rtol=1e-5)
    assert one["step"] == 3
    assert one["max_diff"] < 1e-4
