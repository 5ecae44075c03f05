"""For every test and doctest: keep one long pytest process within Linux's mapping limit."""

import gc

import jax
import pytest


def _memory_mappings() -> int:
    """This process's memory mappings (0 where ``/proc`` has no such file)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


# Linux allows 65530 per process (vm.max_map_count); drop compiled programs well before.
_MAPPINGS_BEFORE_CLEARING = 30_000


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops JAX's compiled programs after a test module once mappings pile up.

    Every XLA:CPU executable keeps a few memory mappings for its code; over the whole suite
    they passed Linux's 65530 per process and a later compile segfaulted. Clearing after
    every module would recompile what later modules share, so only past a threshold.
    """
    yield
    if _memory_mappings() > _MAPPINGS_BEFORE_CLEARING:
        jax.clear_caches()
        gc.collect()
