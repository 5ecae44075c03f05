"""Whether a product's result feeds a nonlinearity: the choice of form for ``h·B``.

:func:`jlora._rules.low_rank_product` can give XLA the low-rank term ``h·B`` as r
multiply-adds, which it fuses into every loop fusion that reads the layer's output. That saves
writing and reading an activation-sized buffer when the output is read once: by a residual
sum, or by the transposing copy in front of an attention product. It costs when the output
feeds a nonlinearity or a product with another activation (gelu, silu, a gated unit): the
op's forward and its derivative each read the output, and every fusion that does recomputes
the r multiply-adds. On ``benchmarks/train_step.py`` (XLA:CPU, rank 8) giving only the MLP's
up projection, which feeds gelu, the matmul form took the step from 1.16x to 1.13x the limit
in summed op time.

:class:`Readers` answers that for one jaxpr: it follows a value through layout ops,
scalings and bias adds, and through calls into their bodies.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from jax.extend import core

# Ops that move or relabel values: the question passes on to their result.
_LAYOUT = {
    "reshape",
    "transpose",
    "squeeze",
    "expand_dims",
    "convert_element_type",
    "copy",
    "copy_p",
    "reduce_precision",
    "sharding_constraint",
    "neg",
}
# Linear in the value when the other operand is a constant or a broadcast (a bias, a scale);
# with another activation, ``add``/``sub`` end the question (a residual sum is written once)
# and ``mul``/``div`` answer it (the derivative reads the value again).
_AFFINE = {"add", "sub", "add_any", "mul", "div"}
# Elementwise ops whose derivative reads their input again.
_NONLINEAR = {
    "tanh",
    "logistic",
    "exp",
    "exp2",
    "expm1",
    "log",
    "log1p",
    "erf",
    "erfc",
    "sqrt",
    "rsqrt",
    "cbrt",
    "integer_pow",
    "pow",
    "square",
    "max",
    "min",
    "abs",
    "sin",
    "cos",
    "select_n",
}
# Calls: the question continues at the matching input of the body.
_BODIES = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}


def _open(jaxpr: Any) -> Any:
    return getattr(jaxpr, "jaxpr", jaxpr)  # a ClosedJaxpr's jaxpr, or the jaxpr itself


class Readers:
    """The equations of one jaxpr that read each of its variables, built once per jaxpr."""

    def __init__(self, jaxpr: Any):
        self.jaxpr = _open(jaxpr)
        self._readers: dict[Any, list[tuple[Any, int]]] | None = None
        self._producer: dict[Any, Any] = {}

    def _index(self) -> dict[Any, list[tuple[Any, int]]]:
        if self._readers is None:
            self._readers = defaultdict(list)
            for eqn in self.jaxpr.eqns:
                for i, v in enumerate(eqn.invars):
                    if not isinstance(v, core.Literal):
                        self._readers[v].append((eqn, i))
                for v in eqn.outvars:
                    self._producer[v] = eqn
        return self._readers

    def _is_broadcast(self, v: Any) -> bool:
        """A literal, or an array made by broadcasting: a bias or a scale, not an activation."""
        if isinstance(v, core.Literal) or not getattr(v.aval, "shape", ()):
            return True
        eqn = self._producer.get(v)
        return eqn is not None and eqn.primitive.name == "broadcast_in_dim"

    def feeds_nonlinearity(self, var: Any, _seen: set[int] | None = None) -> bool:
        """Whether ``var`` reaches an op whose derivative reads it again.

        Args:
          var: a variable of this jaxpr (typically a product's result).

        Returns:
          True if, through layout ops, scalings, bias adds and calls, ``var`` meets a
          nonlinear elementwise op or a product with another activation.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
          >>> closed = jax.make_jaxpr(lambda x, w: jax.nn.gelu(x @ w))(x, w)
          >>> Readers(closed).feeds_nonlinearity(closed.jaxpr.eqns[0].outvars[0])
          True
          >>> closed = jax.make_jaxpr(lambda x, w: x @ w + 1.0)(x, w)
          >>> Readers(closed).feeds_nonlinearity(closed.jaxpr.eqns[0].outvars[0])
          False
        """
        seen = set() if _seen is None else _seen
        if id(var) in seen:
            return False
        seen.add(id(var))
        for eqn, pos in self._index().get(var, ()):
            name = eqn.primitive.name
            if name in _NONLINEAR:
                return True
            if name in _AFFINE:
                (other,) = [v for i, v in enumerate(eqn.invars) if i != pos] or [var]
                if not self._is_broadcast(other):
                    if name in ("mul", "div"):
                        return True
                    continue  # a residual sum: its result is another activation
            elif name in _BODIES:
                body = Readers(eqn.params[_BODIES[name]])
                if body.feeds_nonlinearity(body.jaxpr.invars[pos], seen):
                    return True
                continue
            elif name not in _LAYOUT:
                continue  # a product, a reduction, a result: read once, fused once
            if any(self.feeds_nonlinearity(out, seen) for out in eqn.outvars):
                return True
        return False
