"""The runner's mesh section: a sharded run equals the single-device run; bad meshes refused."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from runner_helpers import DEFAULT, ROOT

from jlora.runner import mesh as runner_mesh
from jlora.runner.config import load_config


def test_sharded_run_matches_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["PYTHONPATH"] = os.path.join(ROOT, "tests")
    script = os.path.join(ROOT, "tests", "runner_mesh_check.py")
    done = subprocess.run(
        [sys.executable, script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and len(out["mesh"]) == 4
    np.testing.assert_allclose(out["mesh"], out["one"], rtol=1e-5)
    assert "batch_size 6 must be divisible by mesh data*fsdp = 4" in out["batch_error"]
    # A checkpoint's decoder laid out by the decoder rules, on packed chats, accumulated.
    decoder = out["decoder"]
    assert len(decoder["mesh"]) == 3 and len(decoder["mesh_eval"]) == 2
    np.testing.assert_allclose(decoder["mesh"], decoder["one"], rtol=1e-4)
    np.testing.assert_allclose(decoder["mesh_eval"], decoder["one_eval"], rtol=1e-4)
    specs = decoder["specs"]
    assert specs["model/layers/self_attn/q_proj/kernel"] == [None, "fsdp", "tensor"]
    assert specs["model/layers/mlp/down_proj/kernel"] == [None, "tensor", "fsdp"]
    assert specs["model/embed_tokens/embedding"] == [None, "fsdp"]


def test_mesh_larger_than_the_devices_is_refused():
    cfg = load_config(DEFAULT, ["mesh.data=2", "mesh.tensor=2"])
    with pytest.raises(ValueError, match=r"2\*1\*2 = 4 devices, but JAX sees 1"):
        runner_mesh.make_mesh(cfg.mesh)


def test_bad_rule_axis_is_refused():
    cfg = load_config(DEFAULT, ["mesh.rules=[['.*kernel', 'fsdp', 'model']]"])
    with pytest.raises(ValueError, match=r"axes from \['data', 'fsdp', 'tensor', 'none'\]"):
        runner_mesh.rules(cfg.mesh)


def test_mesh_sizes_must_be_positive():
    with pytest.raises(ValueError, match=r"mesh.fsdp: must be >= 1, found 0"):
        load_config(DEFAULT, ["mesh.fsdp=0"])
