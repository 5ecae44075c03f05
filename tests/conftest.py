"""Strict settings for the whole suite: highest matmul precision, one tolerance table."""

import jax
import jax.numpy as jnp
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# Relative tolerances per dtype, for comparisons where the maths is exact but rounding is not.
TOLERANCE = {jnp.dtype("float32"): 1e-5, jnp.dtype("bfloat16"): 2e-2, jnp.dtype("float16"): 2e-3}


@pytest.fixture(params=["eager", "jit"])
def maybe_jit(request):
    """Runs a function as is or under ``jax.jit`` (static config arguments allowed)."""
    if request.param == "eager":
        return lambda fn, **kw: fn
    return lambda fn, **kw: jax.jit(fn, **kw)


@pytest.fixture(autouse=True)
def _keep_the_suites_allocator(monkeypatch):
    """In-process ``jlora finetune`` calls leave this process's malloc settings alone.

    ``keep_freed_memory`` is process-wide; its own tests and the CLI runs in subprocesses
    exercise it for real.
    """
    import jlora.cli

    monkeypatch.setattr(jlora.cli, "keep_freed_memory", lambda: False)


# The application's end-to-end tests (runs of the command, benchmarks, docs): CI's newest-JAX
# job leaves them to the first job, keeping one runner file, so both jobs fit CI's time.
_APPLICATION = (
    "runner/",
    "test_runner_",
    "test_benchmarks_",
    "test_docs",
    "test_examples",
    "test_cli",
)
_KEPT_IN_BOTH = ("runner/test_finetune.py",)


def pytest_collection_modifyitems(config, items):
    """Marks the application's end-to-end tests ``application`` (see ``_APPLICATION``)."""
    del config
    for item in items:
        path = item.path.as_posix()
        where = path.split("/tests/", 1)[-1]
        if where.startswith(_APPLICATION) and not where.startswith(_KEPT_IN_BOTH):
            item.add_marker(pytest.mark.application)
