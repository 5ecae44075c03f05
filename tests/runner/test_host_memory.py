"""keep_freed_memory: repeated large XLA:CPU buffers stop page-faulting once it is called."""

import json
import platform
import statistics
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A gradient whose residuals need a 192 MB temporary buffer (far over glibc's 32 MB mmap
# ceiling), which XLA:CPU mallocs at the start of each call and frees at its end. The child
# prints the minor page faults of each call after warm-up.
_CHILD = """
import json, resource, sys
from jlora.runner.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
import jax, jax.numpy as jnp
grad = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(jnp.tanh(x @ w) @ w))))
w, x = jnp.full((64, 64), 0.01), jnp.ones((1 << 18, 64))
faults = []
for _ in range(3 + 20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    grad(w, x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults[3:]}))
"""
TEMP_PAGES = 192 * 2**20 // 4096


def _faults(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the mallopt settings exist on Linux with glibc only")
def test_large_buffers_are_reused_instead_of_faulted_in_again():
    released, kept = _faults("release"), _faults("keep")
    # Without it, the temp buffer is a new mapping every call: each of its pages faults again.
    assert statistics.median(released["faults"]) >= 0.9 * TEMP_PAGES, released
    # With it, calls reuse the pages of the last one. The heap still grows now and then (a call
    # whose buffer is freed after the next one's is taken), so the typical call is the measure.
    assert kept["applied"] is True
    assert statistics.median(kept["faults"]) < 0.02 * TEMP_PAGES, kept


def test_reports_whether_it_applied():
    code = "from jlora.runner.host_memory import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(GLIBC)
