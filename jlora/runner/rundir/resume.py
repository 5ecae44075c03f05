"""Which checkpoint a run resumes from, and keeping ``checkpoints/`` to what is worth keeping.

A checkpoint is used only if it restores, matches the checksums saved with it and holds only
finite values. One that fails is not deleted: it is renamed ``<step>.corrupt`` (or
``<step>.diverged`` when training from it gave a non-finite loss), which orbax does not count
as a step, so the run falls back to the previous one and a later save of that step number is
not refused. The newest ``keep`` good steps are kept, on resume as well as on save, so
interrupted runs do not pile up checkpoints.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import jlora


def non_finite(tree: Any) -> str | None:
    """The path of the first floating-point leaf of ``tree`` holding a NaN or infinity.

    Example:
      >>> import jax.numpy as jnp
      >>> non_finite({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.nan])})
      'b'
    """
    for path, x in jax.tree.flatten_with_path(tree)[0]:
        dtype = getattr(x, "dtype", None)
        if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.inexact):
            continue
        if not np.isfinite(np.asarray(jax.device_get(x))).all():
            return jlora.path_str(path)
    return None


def set_aside(ckpt_dir: str, step: int, why: str) -> str:
    """Renames the checkpoint of ``step`` to ``<step>.<why>`` (replacing an older one); its path."""
    src = os.path.join(ckpt_dir, str(step))
    dst = os.path.join(ckpt_dir, f"{step}.{why}")
    if os.path.isdir(dst):  # the same step set aside before; the newer evidence wins
        shutil.rmtree(dst)
    os.replace(src, dst)
    return dst


def prune(ckpt_dir: str, keep: int) -> None:
    """Deletes all but the newest ``keep`` checkpoints (as a save with ``keep`` would)."""
    for step in jlora.checkpoint_steps(ckpt_dir)[:-keep]:
        shutil.rmtree(os.path.join(ckpt_dir, str(step)))


def restore_good(ckpt_dir: str, like: Any, log: Callable[[str], Any]) -> jlora.Restored | None:
    """Restores the newest usable checkpoint, setting aside newer unusable ones; ``None`` if none.

    Raises:
      ValueError: if there are checkpoints but none is usable (each one's reason listed); they
        are left in place.
    """
    steps = jlora.checkpoint_steps(ckpt_dir)
    reasons = []
    for step in reversed(steps):
        try:
            restored = jlora.restore_checkpoint(ckpt_dir, like, step=step)
        except (ValueError, OSError) as err:
            reasons.append((step, str(err).removeprefix("restore_checkpoint: ").split("; ")[0]))
            continue
        bad = non_finite(restored.state)
        if bad is not None:
            reasons.append((step, f"step {step} holds non-finite values in {bad!r}"))
            continue
        for old, why in reasons:
            where = set_aside(ckpt_dir, old, "corrupt")
            log(
                f"warning: the checkpoint of step {old} is unusable ({why}); moved it to "
                f"{where!r} and resumed from step {step} instead"
            )
        return restored
    if reasons:
        raise ValueError(
            f"no checkpoint in {ckpt_dir!r} can be resumed from:\n  "
            + "\n  ".join(why for _, why in reasons)
            + f"\ndelete {ckpt_dir!r} to start this run over"
        )
    return None


def save(ckpt_dir: str, step: int, state: Any, metadata: dict[str, Any], keep: int) -> None:
    """``jlora.save_checkpoint``, with an ``OSError`` that names the directory and the step.

    Raises:
      OSError: if the checkpoint cannot be written (a full or read-only file system); the
        previous checkpoints are intact, and the message says which one the run resumes from.
    """
    try:
        jlora.save_checkpoint(ckpt_dir, step, state, metadata=metadata, keep=keep)
    except OSError as err:
        done = jlora.checkpoint_steps(ckpt_dir)
        then = f"re-running resumes from step {done[-1]}" if done else "no checkpoint was saved"
        raise OSError(
            err.errno or errno.EIO,
            f"{err.strerror or err}: could not save the checkpoint of step {step} ({then}); "
            "free space or fix the permissions and re-run the same command",
            ckpt_dir,
        ) from err
