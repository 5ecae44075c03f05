"""Reading the parameters of traced JAX primitives, which JAX renames between releases.

``jlora.lora`` re-binds the equations it interprets, so it reads primitive parameters that are
JAX internals (``scan``'s split of its operands into consts, carry and scanned inputs,
``while``'s const counts, ``shard_map``'s specs). Every such read goes through
:class:`PrimitiveParams`, so a parameter a newer (or older) JAX no longer has is one clear error
naming the primitive, the parameter and the installed JAX, never a bare ``KeyError`` from deep
inside a trace. Where JAX changed a parameter's form, the helpers here read both forms.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax

# The JAX releases CI runs the suite on; pyproject.toml's bounds say the same.
TESTED_JAX = "0.10.2 to 0.12"


def unsupported_jax(primitive: str, what: str) -> RuntimeError:
    """The error for a primitive whose parameters this JAX lays out in a way jlora cannot read.

    Example:
      >>> "scan" in str(unsupported_jax("scan", "no parameter 'num_consts'"))
      True
    """
    return RuntimeError(
        f"jlora.lora cannot read the parameters of JAX primitive '{primitive}' in JAX "
        f"{jax.__version__}: {what}. jlora is tested with JAX {TESTED_JAX}; install a JAX in "
        "that range (pip install 'jax>=0.10.2,<0.13'), or report this JAX version to jlora"
    )


class PrimitiveParams(Mapping[str, Any]):
    """A read-only view of an equation's ``params`` whose missing keys name the JAX version.

    It is a mapping, so ``prim.bind(*args, **PrimitiveParams(eqn))`` re-binds as traced.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> eqn = jax.make_jaxpr(lambda x: x.T)(jnp.ones((2, 3))).eqns[0]
      >>> PrimitiveParams(eqn)["permutation"]
      (1, 0)
    """

    def __init__(self, eqn: Any) -> None:
        self._name = eqn.primitive.name
        self._params: Mapping[str, Any] = eqn.params

    def __getitem__(self, key: str) -> Any:
        try:
            return self._params[key]
        except KeyError:
            found = ", ".join(sorted(self._params)) or "none"
            raise unsupported_jax(
                self._name, f"it has no parameter '{key}' (it has: {found})"
            ) from None

    def get(self, key: str, default: Any = None) -> Any:
        """The parameter ``key``, or ``default`` where this JAX does not set it."""
        return self._params.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._params

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


def scan_operand_counts(params: PrimitiveParams) -> tuple[int, int]:
    """How many of a ``scan``'s operands are loop constants and how many are its carry.

    JAX up to 0.10 stores them as ``num_consts`` and ``num_carry``; JAX 0.12 stores a flat
    tree ``ft_in`` of three groups (consts, carry, scanned inputs).

    Raises:
      RuntimeError: if this JAX has neither form.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> f = lambda c, xs: jax.lax.scan(lambda c, x: (c + x, c), c, xs)
      >>> eqn = jax.make_jaxpr(f)(jnp.zeros(3), jnp.ones((4, 3))).eqns[-1]
      >>> scan_operand_counts(PrimitiveParams(eqn))
      (0, 1)
    """
    groups = params.get("ft_in")
    if groups is not None:
        parts = list(groups.unpack())
        if len(parts) != 3:
            raise unsupported_jax("scan", f"'ft_in' has {len(parts)} groups, not 3")
        return len(parts[0]), len(parts[1])
    if "num_consts" not in params:
        found = ", ".join(sorted(params)) or "none"
        raise unsupported_jax("scan", f"it has neither 'ft_in' nor 'num_consts' (it has: {found})")
    return int(params["num_consts"]), int(params["num_carry"])
