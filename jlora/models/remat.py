"""Rematerialisation policies of the decoder's layers: what the backward pass keeps or recomputes.

A decoder layer's forward saves activations for its backward pass; at long sequences they are
most of a train step's memory. ``DecoderConfig.remat`` (the runner's ``model.remat``) picks:

- ``"none"``: keep everything the backward pass needs (fastest, most memory).
- ``"full"``: keep only each layer's input; recompute the layer in the backward pass (least
  memory, about one more forward pass of time). ``True`` means this.
- ``"dots"``: keep the outputs of the matrix products without batch dimensions (the q/k/v/o
  and MLP projections, ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``) and
  recompute the rest (norms, rotary, attention scores, activations): between the two.
- ``"offload"``: as ``"dots"``, but the kept products wait in pinned host memory
  (``offload_dot_with_no_batch_dims("device", "pinned_host")``) and are copied back for the
  backward pass. It needs a device with a ``pinned_host`` memory space (GPU, TPU). The CPU
  backend has one too, but there host and device are the same memory: it runs and gives the
  same values, and saves nothing.

Every policy computes the same values; only memory and time differ.
"""

from __future__ import annotations

from typing import Any

import jax

__all__ = ["REMAT_POLICIES", "check_offload", "checkpoint_policy", "remat_name"]

#: The names ``DecoderConfig.remat`` accepts (and ``True``/``False`` for full/none).
REMAT_POLICIES = ("none", "full", "dots", "offload")


def remat_name(value: Any) -> str:
    """The policy name of a ``remat`` setting: ``True`` is ``"full"``, ``False`` ``"none"``.

    Raises:
      ValueError: for anything other than a bool or one of :data:`REMAT_POLICIES`.

    Example:
      >>> remat_name(True), remat_name(False), remat_name("dots")
      ('full', 'none', 'dots')
    """
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMAT_POLICIES:
        raise ValueError(
            f"remat {value!r} is not a rematerialisation policy; expected one of "
            f"{REMAT_POLICIES}, or true (full) / false (none)"
        )
    return str(value)


def check_offload(backend: str | None = None) -> None:
    """Refuses ``remat="offload"`` where the device has no pinned host memory to offload to.

    Raises:
      ValueError: if the default device (of ``backend``) lists no ``pinned_host`` memory.

    Example:
      >>> check_offload()  # the CPU backend lists pinned_host (the same memory)
    """
    device = jax.devices(backend)[0]
    kinds = {m.kind for m in device.addressable_memories()}
    if "pinned_host" not in kinds:
        raise ValueError(
            f"remat='offload' needs a device with pinned host memory; {device.platform} "
            f"device {device} has only {sorted(kinds)}. Use remat='dots' (the same products "
            "kept on the device) or remat='full'"
        )


def checkpoint_policy(name: str) -> Any:
    """The ``jax.checkpoint`` policy of a remat name (``None``: save nothing, for ``"full"``).

    Raises:
      ValueError: for ``"none"`` (no checkpoint at all) or an unknown name; for
        ``"offload"`` on a device without pinned host memory (:func:`check_offload`).

    Example:
      >>> checkpoint_policy("full") is None
      True
    """
    if name == "full":
        return None
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "offload":
        check_offload()
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(
        f"checkpoint_policy: {name!r} has no checkpoint policy; expected 'full', 'dots' or "
        "'offload' ('none' does not checkpoint)"
    )
