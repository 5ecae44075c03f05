"""Training-state checkpoints: thin, sharding-aware helpers over orbax's ``CheckpointManager``.

A checkpoint is one step directory ``<directory>/<step>/`` holding ``state`` (any pytree of
arrays: adapters, optimizer state, PRNG keys, counters; written by orbax, sharded arrays written
by every host in parallel), ``metadata`` (a JSON dict for what is not an array: data
position, epoch, run config) and ``checksums`` (the SHA-256 of every leaf's values as saved, so
that bytes flipped on disk are caught on restore instead of resuming from garbage; leaves not
fully addressable from this process, i.e. sharded over several hosts, are not hashed). Beside
them, ``files.sha256.json`` holds the SHA-256 of every file orbax wrote for ``state``, checked
before orbax reads any of them: a damaged chunk is then a clear error rather than a failure
inside orbax's readers (single-process saves only). Orbax writes each step to a temporary
directory and renames it when complete, so a crash never leaves a half checkpoint that looks
finished. Only the newest ``keep`` steps are kept.

Restoring takes a ``like`` tree (concrete arrays, or ``jax.ShapeDtypeStruct`` e.g. from
``jax.eval_shape``, with ``.sharding`` where the result should be sharded). Its paths and
shapes are checked against the checkpoint's metadata first, so a state of another shape (an
adapter of another rank, another optimizer) fails naming the leaf instead of deep inside orbax.

Orbax is imported inside the functions that use it, not at the top: ``import jlora`` then
loads neither orbax nor what it brings (tensorstore, yaml, ...) until a checkpoint is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np

from jlora._atomic import atomic_write
from jlora._paths import path_str

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

FILE_CHECKSUMS = "files.sha256.json"


class Restored(NamedTuple):
    """What :func:`restore_checkpoint` returns."""

    step: int
    state: Any
    metadata: dict[str, Any]


def _manager(directory: str | os.PathLike[str], keep: int | None = None) -> ocp.CheckpointManager:
    import orbax.checkpoint as ocp  # here, not at the top: see the module docstring

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=False, create=True
    )
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        "metadata": ocp.JsonCheckpointHandler(),
        "checksums": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(
        os.path.abspath(os.fspath(directory)), options=options, item_handlers=handlers
    )


def _digest(x: Any) -> str | None:
    """SHA-256 of a leaf's dtype, shape and values; ``None`` where this host cannot see them."""
    if not isinstance(x, jax.Array) or not x.is_fully_addressable:
        return None  # numpy / Python leaves may come back as another dtype; multi-host shards
    if _is_key(x):
        x = jax.random.key_data(x)
    host = np.ascontiguousarray(jax.device_get(x))
    h = hashlib.sha256(f"{host.dtype.str}{host.shape}".encode())
    h.update(host.tobytes())
    return h.hexdigest()


def _digests(state: Any) -> dict[str, str]:
    leaves = jax.tree.flatten_with_path(state)[0]
    return {path_str(p): d for p, x in leaves if (d := _digest(x)) is not None}


def _file_digests(step_dir: str) -> dict[str, str]:
    """SHA-256 of every file under ``step_dir/state``, by path relative to ``step_dir``."""
    out = {}
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            path = os.path.join(root, name)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            out[os.path.relpath(path, step_dir)] = h.hexdigest()
    return out


def _verify_files(where: str, step_dir: str) -> None:
    path = os.path.join(step_dir, FILE_CHECKSUMS)
    if not os.path.isfile(path):
        return  # saved by several processes, or before jlora kept file checksums
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    found = _file_digests(step_dir)
    for name, digest in sorted(saved.items()):
        if found.get(name) != digest:
            what = "is missing" if name not in found else "differs from the SHA-256 saved with it"
            raise ValueError(
                f"restore_checkpoint: {where} is corrupted: its file {name!r} {what}; restore "
                "an earlier step, or pass verify=False to read it anyway"
            )


def checkpoint_steps(directory: str | os.PathLike[str]) -> list[int]:
    """The steps with a complete checkpoint in ``directory``, oldest first ([] if none).

    Example:
      >>> import tempfile
      >>> checkpoint_steps(tempfile.mkdtemp())
      []
    """
    if not os.path.isdir(directory):
        return []
    with _manager(directory) as manager:
        return sorted(manager.all_steps())


def save_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    state: Any,
    *,
    metadata: Mapping[str, Any] | None = None,
    keep: int | None = 3,
) -> None:
    """Saves ``state`` (and JSON ``metadata``) as step ``step``; keeps the newest ``keep`` steps.

    Args:
      directory: the run's checkpoint directory (created if missing).
      step: the training step; must not already be saved there.
      state: a pytree of arrays (``jax.Array``, numpy, typed PRNG keys), e.g.
        ``{"lora": lora, "opt_state": opt_state, "rng": key}``. Sharded arrays are saved shard
        by shard; on several hosts every host must call this.
      metadata: JSON-able values that are not arrays (data position, epoch, ...).
      keep: how many of the newest steps to keep (``None``: all).

    Raises:
      ValueError: if ``step`` is negative or already saved, or ``keep`` is < 1.

    Example:
      >>> import jax.numpy as jnp, tempfile
      >>> d = tempfile.mkdtemp()
      >>> save_checkpoint(d, 10, {"w": jnp.ones(3)}, metadata={"batch": 7})
      >>> restore_checkpoint(d, {"w": jnp.zeros(3)}).metadata
      {'batch': 7}
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: step must be an int >= 0; got {step!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"save_checkpoint: keep must be an int >= 1 or None; got {keep!r}")
    import orbax.checkpoint as ocp  # here, not at the top: see the module docstring

    with _manager(directory, keep) as manager:
        if step in manager.all_steps():
            raise ValueError(
                f"save_checkpoint: step {step} already exists in {os.fspath(directory)!r}; "
                "checkpoints are never overwritten. Save under a new step or delete that one"
            )
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                metadata=ocp.args.JsonSave(dict(metadata or {})),
                checksums=ocp.args.JsonSave({"sha256": _digests(state)}),
            ),
        )
        manager.wait_until_finished()
    if jax.process_count() == 1:  # with several hosts, no one process sees every file
        step_dir = os.path.join(os.path.abspath(os.fspath(directory)), str(step))
        data = json.dumps(_file_digests(step_dir), indent=1, sort_keys=True).encode()
        atomic_write(os.path.join(step_dir, FILE_CHECKSUMS), data)


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _check_like(where: str, saved: Any, like: Any) -> None:
    found = {path_str(p): x for p, x in jax.tree.flatten_with_path(saved)[0] if x is not None}
    want = {path_str(p): x for p, x in jax.tree.flatten_with_path(like)[0]}
    for name in want:
        if name not in found:
            raise ValueError(
                f"restore_checkpoint: {where} has no leaf {name!r}, which `like` expects; the "
                f"checkpoint holds e.g. {sorted(found)[:6]}. Pass a `like` built the way the "
                "saved state was"
            )
    for name in found:
        if name not in want:
            raise ValueError(
                f"restore_checkpoint: {where} holds {name!r}, which `like` lacks; pass a `like` "
                "with the same structure as the saved state"
            )
    for name, x in want.items():
        if _is_key(x):
            continue
        got = tuple(getattr(found[name], "shape", ()) or ())
        if got != tuple(x.shape):
            raise ValueError(
                f"restore_checkpoint: {name!r} in {where} has shape {got}, but `like` expects "
                f"{tuple(x.shape)} (an adapter of another rank, or another model?)"
            )


def _short(err: Exception) -> str:
    """The first line of an orbax / tensorstore error, without its long JSON spec."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text.split(" [tensorstore_spec=")[0][:300]


def _verify(where: str, state: Any, saved: Mapping[str, str]) -> None:
    found = _digests(state)
    for name, digest in saved.items():
        if name in found and found[name] != digest:
            raise ValueError(
                f"restore_checkpoint: {where} is corrupted: the values of {name!r} do not match "
                f"the SHA-256 saved with them ({found[name][:12]}... vs {digest[:12]}...); "
                "restore an earlier step, or pass verify=False to read it anyway"
            )


def restore_checkpoint(
    directory: str | os.PathLike[str],
    like: Any,
    *,
    step: int | None = None,
    verify: bool = True,
) -> Restored:
    """Restores the checkpoint of ``step`` (default: the latest) shaped and placed like ``like``.

    Args:
      directory: the run's checkpoint directory.
      like: a tree like the saved state: arrays or ``jax.ShapeDtypeStruct`` leaves. Each leaf's
        ``sharding`` (if any) places the restored array, so a state can be restored onto another
        mesh; leaves without one go to the default device.
      step: which step; ``None`` for the latest.
      verify: check the checkpoint's files, before reading them, and the restored values
        against the SHA-256s saved with them (checkpoints saved before jlora stored checksums
        are restored unchecked).

    Returns:
      ``Restored(step, state, metadata)``.

    Raises:
      FileNotFoundError: if there is no checkpoint, or none for ``step`` (available steps
        listed).
      ValueError: if a leaf of ``like`` is missing from the checkpoint, the checkpoint holds a
        leaf ``like`` lacks, or a shape differs; if the checkpoint's files cannot be decoded,
        or (with ``verify``) a leaf's values differ from the checksum saved with them: the
        checkpoint is corrupted.

    Example:
      >>> import jax, jax.numpy as jnp, tempfile
      >>> d = tempfile.mkdtemp()
      >>> state = {"lora": {"a": jnp.ones((4, 2))}, "rng": jax.random.key(0)}
      >>> for s in (1, 2):
      ...     save_checkpoint(d, s, state)
      >>> r = restore_checkpoint(d, jax.eval_shape(lambda: state))
      >>> r.step, r.state["lora"]["a"].shape
      (2, (4, 2))
    """
    where = os.fspath(directory)
    steps = checkpoint_steps(directory)
    if not steps:
        raise FileNotFoundError(f"restore_checkpoint: no checkpoint in {where!r}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(
            f"restore_checkpoint: no checkpoint for step {step} in {where!r}; found steps {steps}"
        )
    import orbax.checkpoint as ocp  # here, not at the top: see the module docstring

    # Python / numpy scalars in `like` (counters, data positions) are restored as 0-d arrays.
    like = jax.tree.map(lambda x: x if hasattr(x, "shape") else np.asarray(x), like)
    at = f"step {step} of {where!r}"
    items = {
        "state": ocp.args.StandardRestore(jax.tree.map(_abstract, like)),
        "metadata": ocp.args.JsonRestore(),
    }
    if verify and os.path.isdir(os.path.join(where, str(step), "checksums")):
        items["checksums"] = ocp.args.JsonRestore()
    if verify:
        _verify_files(at, os.path.join(where, str(step)))
    with _manager(directory) as manager:
        try:
            saved = manager.item_metadata(step)["state"]
            _check_like(at, saved, like)
            out = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # tensorstore: a chunk that does not decompress or parse
            if str(err).startswith("restore_checkpoint:"):
                raise
            raise ValueError(
                f"restore_checkpoint: {at} is corrupted: its files cannot be read ({_short(err)}); "
                f"restore an earlier step (found steps {steps})"
            ) from err
    if "checksums" in items:
        _verify(at, out["state"], (out["checksums"] or {}).get("sha256", {}))
    return Restored(step, out["state"], dict(out["metadata"] or {}))
