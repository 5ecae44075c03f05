"""Converting one kernel's jlora factors to PEFT's ``lora_A`` / ``lora_B`` and back.

jlora keeps ``A: S + I + (r,)`` and ``B: S + (r,) + O`` (``_layout``); PEFT keeps, per PyTorch
module, ``lora_A: (r, in)`` and ``lora_B: (out, r)`` with ``delta_W = s·lora_B @ lora_A``. When
jlora's ``in`` axes are PyTorch's ``in`` axes, ``lora_A = A.reshape(-1, r).T`` and
``lora_B = B.reshape(r, -1).T``; when the kernel is stored transposed (jlora's ``in`` is
PyTorch's ``out``), A and B swap places. Each index along the stack axis is its own module.
Only reshapes and transposes: the conversion is exact, and the scale is the same on both sides.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from jlora._layout import fans, role_sizes


def orientation(name: str, jlora_roles: Sequence[str], torch_roles: Sequence[str]) -> bool:
    """Whether the factors swap (``True``) or keep their places (``False``) for this kernel.

    Raises:
      ValueError: if the two role lists differ other than by exchanging every in and out.
    """
    jr, tr = tuple(jlora_roles), tuple(torch_roles)
    if jr == tr:
        return False
    swapped = tuple({"in": "out", "out": "in"}.get(r, r) for r in jr)
    if swapped == tr:
        return True
    raise ValueError(
        f"kernel {name!r}: its jlora axis roles {jr} and the mapping's PyTorch axes {tr} differ "
        "by more than exchanging in and out, so A and B cannot be written as PEFT factors. Make "
        "LoraConfig.axis_rules agree with the mapping (see PeftMapping.axis_rules)"
    )


def stack_indices(shape: Sequence[int], roles: Sequence[str]) -> list[tuple[int, ...]]:
    """Every index along the kernel's stack axes (``[()]`` for an unstacked kernel)."""
    stack, _, _ = role_sizes(shape, roles)
    return list(itertools.product(*(range(n) for n in stack)))


def to_peft(
    a: np.ndarray, b: np.ndarray, index: tuple[int, ...], swap: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(lora_A, lora_B)`` for one stack ``index`` of jlora factors ``a``, ``b``."""
    a_i, b_i = a[index], b[index]
    r = a_i.shape[-1]
    a2, b2 = a_i.reshape(-1, r), b_i.reshape(r, -1)  # (in_j, r), (r, out_j)
    if swap:
        return np.ascontiguousarray(b2), np.ascontiguousarray(a2)
    return np.ascontiguousarray(a2.T), np.ascontiguousarray(b2.T)


def peft_shapes(
    shape: Sequence[int], jlora_roles: Sequence[str], swap: bool, rank: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The ``(lora_A, lora_B)`` shapes PEFT has for one module of this kernel."""
    fan_in, fan_out = fans(shape, jlora_roles)
    if swap:
        fan_in, fan_out = fan_out, fan_in
    return (rank, fan_in), (fan_out, rank)


def from_peft(
    lora_a: np.ndarray,
    lora_b: np.ndarray,
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    swap: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """One stack slice of jlora's ``(A, B)`` (shapes without the stack axes) from PEFT factors."""
    if swap:
        return lora_b.reshape(a_shape), lora_a.reshape(b_shape)
    return lora_a.T.reshape(a_shape), lora_b.T.reshape(b_shape)


def module_names(
    name: str, template: str, shape: tuple[int, ...], roles: tuple[str, ...]
) -> list[tuple[tuple[int, ...], str]]:
    """``(stack index, module name)`` for every PyTorch module a kernel maps to.

    ``{layer}`` in ``template`` is the index along the first stack axis and ``{expert}`` the
    index along the second (a mixture's experts stacked inside each layer).

    Raises:
      ValueError: if ``{layer}`` is in the module name but the kernel has no stack axis (or the
        reverse), the kernel has two stack axes but no ``{expert}`` placeholder (or the
        reverse), or more than two stack axes.
    """
    indices = stack_indices(shape, roles)
    stacked = indices != [()]
    if stacked != ("{layer}" in template):
        need = "holds a stack axis" if stacked else "has no stack axis"
        raise ValueError(
            f"kernel {name!r} {need} (roles {roles}), but its mapped module name {template!r} "
            f"{'lacks' if stacked else 'has'} a '{{layer}}' placeholder; a stacked kernel maps to "
            "one PyTorch module per layer, e.g. 'encoder.layer.{layer}.attention.self.query'"
        )
    axes = len(indices[0])
    if axes > 2 or (axes == 2) != ("{expert}" in template):
        raise ValueError(
            f"kernel {name!r} has {axes} stack axes (roles {roles}) and module name "
            f"{template!r}; PEFT files support one stack axis ('{{layer}}'), or two with "
            "'{layer}' and '{expert}' placeholders, e.g. 'model.layers.{layer}.mlp.experts."
            "{expert}.gate_proj'"
        )

    def fill(idx: tuple[int, ...]) -> str:
        out = template.replace("{layer}", str(idx[0])) if idx else template
        return out.replace("{expert}", str(idx[1])) if len(idx) == 2 else out

    return [(idx, fill(idx)) for idx in indices]
