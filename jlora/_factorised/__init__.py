"""The factorised engine: ``jlora.lora`` runs a function on ``W + s·A·B`` without forming it.

The wrapped function is traced with the base kernels, and the jaxpr is interpreted
(``interpret``) with each adapted kernel carried as a symbolic
:class:`~jlora._factorised.value.LoraValue`. Ops that only move the kernel move it
(``moves``); products, convolutions and lookups compute ``op(x, W) + s·((x·A)·B)``
(``consume``); ``jit``, ``remat``, ``scan``, ``while``, ``cond``, custom derivatives and
``shard_map`` run their bodies through the interpreter again (``interpret``). Beside them:
LoRA dropout (``dropout``), DoRA's magnitude and norm (``dora``), a QLoRA base kept quantised
until its use (``quantized_view``), the cache of eager calls (``eager``) and the readers of
primitive parameters across JAX releases (``primitive_params``). The rule contract is in
``rule`` and this package's README; :data:`RULES` lists every primitive with a rule.
"""

from jlora._factorised import consume, interpret, moves  # noqa: F401  (they register rules)
from jlora._factorised.rule import RULES, Context, Rule, Unsupported
from jlora._factorised.transform import lora, value_and_grad
from jlora._factorised.value import LoraValue

__all__ = ["RULES", "Context", "LoraValue", "Rule", "Unsupported", "lora", "value_and_grad"]
