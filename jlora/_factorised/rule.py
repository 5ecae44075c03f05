"""The rule contract: what the interpreter hands a rule, what it gets back, and the rule table.

A :data:`Rule` receives the interpretation's :class:`Context`, the equation (``eqn.primitive``,
``eqn.params``) and the equation's input values, each a plain array or a
:class:`~jlora._factorised.value.LoraValue`; it returns the equation's outputs as a list (one
entry per ``eqn.outvars``), each again a plain array or a ``LoraValue``. It raises
:class:`Unsupported`, with the reason, when it cannot keep the kernel factorised; the
interpreter then raises an error naming the primitive and kernel or, under
``on_unsupported="merge"``, merges that one use. Each rule module registers its rules beside
their definitions with :func:`register`; :data:`RULES` is the read-only table the interpreter
(and the documentation) reads.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from jax.extend import core

from jlora._factorised.dropout import Dropout


class Unsupported(Exception):
    """Raised by a rule that cannot keep an adapted kernel factorised; says why."""


@dataclasses.dataclass
class Context:
    """What one interpretation needs besides the jaxpr: the fallback policy and dropout."""

    on_unsupported: str
    dropout: Dropout

    def child(self, index: Any) -> Context:
        """The context of a loop body (dropout keys vary with the iteration ``index``)."""
        return Context(self.on_unsupported, self.dropout.child(index))


class Rule(Protocol):
    """The factorised form of one primitive, called for an equation with an adapted input."""

    def __call__(self, ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
        """The equation's outputs for ``invals`` (arrays or ``LoraValue``), or Unsupported."""
        ...


_RULES: dict[str, Rule] = {}

#: Primitive name -> its rule; each rule's docstring says in one line what it does.
RULES: Mapping[str, Rule] = types.MappingProxyType(_RULES)


def register(*primitives: str) -> Callable[[Rule], Rule]:
    """Decorator: ``rule`` handles ``primitives`` (names as in ``eqn.primitive.name``)."""

    def add(rule: Rule) -> Rule:
        _RULES.update(dict.fromkeys(primitives, rule))
        return rule

    return add


def bind(eqn: core.JaxprEqn, invals: Sequence[Any]) -> list[Any]:
    """The equation re-bound as traced on plain ``invals``; its outputs as a list."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]
