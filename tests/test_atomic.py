"""Atomic writes leave nothing behind: stale temp files of killed writers are swept, and the
file gets the mode ``open(path, "w")`` would give it."""

import os
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from jlora._atomic import atomic_path, atomic_write, temp_name
from jlora.models.formats.weights import save_params


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid  # reaped, so no process has it until the kernel wraps around


def age(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_temp_names_carry_host_and_pid(tmp_path):
    name = os.path.basename(temp_name(tmp_path / "x.json"))
    host = socket.gethostname().split(".")[0]
    assert name.startswith(".x.json.") and name.endswith(".tmp")
    assert f".{os.getpid()}." in name
    assert all(c.isalnum() or c in "._-" for c in name)
    assert host.replace("_", "-") in name or not host


def test_a_killed_writers_temp_file_is_swept_on_the_next_save(tmp_path):
    dest = tmp_path / "adapter_config.json"
    host = os.path.basename(temp_name(dest)).split(".")[3]
    stale = tmp_path / f".adapter_config.json.{host}.{dead_pid()}.0a1b2c3d.tmp"
    stale.write_bytes(b"half")
    age(stale, 120)
    legacy = tmp_path / ".adapter_config.json.k2x_9qab.tmp"  # mkstemp's, from older versions
    legacy.write_bytes(b"half")
    age(legacy, 2 * 3600)
    atomic_write(dest, b"{}")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json"]


@pytest.mark.parametrize("seconds", [0, 120])
def test_temp_files_that_may_be_in_use_are_kept(tmp_path, seconds):
    dest = tmp_path / "a.json"
    host = os.path.basename(temp_name(dest)).split(".")[3]
    live = tmp_path / f".a.json.{host}.{os.getpid()}.0a1b2c3d.tmp"  # this process is alive
    fresh_dead = tmp_path / f".a.json.{host}.{dead_pid()}.0a1b2c3e.tmp"
    other_host = tmp_path / ".a.json.elsewhere.12345.0a1b2c3f.tmp"
    for path in (live, fresh_dead, other_host):
        path.write_bytes(b"")
        age(path, seconds)
    age(fresh_dead, 0)  # a writer that died this instant: its file may be a reused PID's
    other = tmp_path / ".b.json.x.1.00000000.tmp"  # another destination's: never touched
    other.write_bytes(b"")
    age(other, 10 * 3600)
    atomic_write(dest, b"{}")
    assert live.exists() and fresh_dead.exists() and other_host.exists() and other.exists()


def test_an_hour_old_temp_file_of_another_host_is_swept(tmp_path):
    other_host = tmp_path / ".a.json.elsewhere.12345.0a1b2c3f.tmp"
    other_host.write_bytes(b"")
    age(other_host, 2 * 3600)
    atomic_write(tmp_path / "a.json", b"{}")
    assert not other_host.exists()


def expected_mode(tmp_path):
    with open(tmp_path / "by_open", "w") as f:
        f.write("x")
    return stat.S_IMODE(os.stat(tmp_path / "by_open").st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.json", b"{}")
        save_params(tmp_path / "w.safetensors", {"k": np.ones(2, np.float32)}, {})
        want = expected_mode(tmp_path)
    finally:
        os.umask(old)
    assert want == 0o666 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == want
    assert stat.S_IMODE(os.stat(tmp_path / "w.safetensors").st_mode) == want


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    dest = tmp_path / "a.json"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"new")
        raise RuntimeError("boom")
    assert dest.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.json"]


def test_save_params_leaves_no_temp_file(tmp_path):
    save_params(tmp_path / "w.safetensors", {"k": np.ones(2, np.float32)}, {"m": "1"})
    assert os.listdir(tmp_path) == ["w.safetensors"]
