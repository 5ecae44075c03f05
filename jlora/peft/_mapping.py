"""Mappings from jlora kernel paths to PyTorch module names, and the layout of each kernel.

A :class:`PeftMapping` is a list of :class:`ModuleRule`: a regex ``re.fullmatch``-ed against a
kernel's ``"a/b/c"`` path, the PyTorch module name it becomes (``match.expand`` template; every
``/`` then turns into ``.``; ``{layer}`` is filled with the index along a stacked ``nn.scan``
axis), and optionally the PyTorch role (``"in"``, ``"out"``, ``"stack"``) of each kernel axis
when the JAX kernel is not laid out as jlora's defaults say (Flax GPT-2 stores ``(out, in)``),
and optionally an ``out_permutation`` for a PyTorch twin that orders a layer's output features
differently (rotary pairs interleaved in one model and split in halves in the other).

PEFT stores ``lora_A`` as ``(r, in)`` and ``lora_B`` as ``(out, r)``, with an N-d kernel's
``in`` axes and ``out`` axes each flattened in kernel order (C order), as a PyTorch ``Linear``
sees a reshaped input. The first matching rule wins; a kernel no rule matches cannot be
exported (an error names it).

The shipped mappings cover the Flax models of ``transformers<5`` (whose parameter paths mirror
PyTorch module names) and any model that names its parameters the Hugging Face way, such as the
project's own MiniLM BERT (``encoder/layer/0/attention/self/query/kernel`` with ``(in, out)``
kernels maps to ``encoder.layer.0.attention.self.query``). A model that names its parameters
its own way keeps its mapping beside it, e.g. ``jlora.models.decoder.PEFT_MAPPING``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np

_ROLES = ("stack", "in", "out")


@dataclasses.dataclass(frozen=True)
class ModuleRule:
    r"""One rule of a :class:`PeftMapping`.

    Attributes:
      pattern: regex ``re.fullmatch``-ed against the jlora kernel path.
      module: the PyTorch module name, as a ``match.expand`` template (``\1``, ``\g<name>``);
        ``/`` become ``.`` and ``{layer}`` is the index along the kernel's stack axis.
      axes: the PyTorch role of each kernel axis (``"in"``, ``"out"``, ``"stack"``), or ``None``
        to use the kernel's jlora axis roles. Also offered to ``LoraConfig.axis_rules`` via
        :attr:`PeftMapping.axis_rules`, so jlora factorises the kernel the way PEFT does.
      out_permutation: ``None`` when PyTorch orders the module's output features as the JAX
        kernel does; else a function of the output width giving an index array ``perm``:
        PyTorch feature ``j`` is jlora's (flattened) output feature ``perm[j]``. Export writes
        ``lora_B[perm]`` (and a DoRA magnitude ``m[perm]``); import undoes it.

    Example:
      >>> ModuleRule(r"(.*)/kernel", r"\1").module_for("encoder/layer/0/query/kernel")
      'encoder.layer.0.query'
      >>> ModuleRule("q/kernel", "q", out_permutation=lambda n: [1, 0]).permutation(2)
      array([1, 0])
    """

    pattern: str
    module: str
    axes: tuple[str, ...] | None = None
    out_permutation: Callable[[int], Sequence[int] | np.ndarray] | None = None

    def __post_init__(self) -> None:
        """Validates the regex and the axis roles."""
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"ModuleRule: {self.pattern!r} is not a valid regex: {err}") from None
        if self.axes is not None:
            axes = tuple(self.axes)
            if any(a not in _ROLES for a in axes) or "in" not in axes or "out" not in axes:
                raise ValueError(
                    f"ModuleRule {self.pattern!r}: axes {axes} must use only {_ROLES} and hold at "
                    "least one 'in' and one 'out'"
                )
            object.__setattr__(self, "axes", axes)

    def module_for(self, path: str) -> str | None:
        """The PyTorch module name for the kernel at ``path``, or ``None`` if not matched."""
        match = re.fullmatch(self.pattern, path)
        if match is None:
            return None
        return match.expand(self.module).replace("/", ".")

    def permutation(self, width: int) -> np.ndarray | None:
        """``out_permutation(width)`` checked to be a permutation of ``range(width)``.

        Raises:
          ValueError: if it is not one (wrong length, repeated or out-of-range indices).
        """
        if self.out_permutation is None:
            return None
        perm = np.asarray(self.out_permutation(width))
        if (
            perm.shape != (width,)
            or perm.dtype.kind not in "iu"
            or not np.array_equal(np.sort(perm), np.arange(width))
        ):
            raise ValueError(
                f"ModuleRule {self.pattern!r}: out_permutation({width}) must return a "
                f"permutation of range({width}) (integers); got {perm.tolist()[:8]} (shape "
                f"{perm.shape}, dtype {perm.dtype})"
            )
        return perm


@dataclasses.dataclass(frozen=True)
class PeftMapping:
    r"""How a JAX model's adapted kernels correspond to a PyTorch model's ``nn.Module`` names.

    Attributes:
      name: a label for error messages.
      rules: tried in order; the first whose pattern matches a kernel path wins.
      fan_in_fan_out: written to PEFT's config; ``True`` for models whose PyTorch layers store
        ``(in, out)`` weights (GPT-2's ``Conv1D``).
      task_type: PEFT's ``task_type`` (e.g. ``"CAUSAL_LM"``), or ``None`` for a plain
        ``PeftModel`` that works on any model class.

    Example:
      >>> m = PeftMapping("mine", (ModuleRule(r"blocks/(\d+)/attn/(q|v)/kernel", r"h.\1.\2"),))
      >>> m.module_for("blocks/3/attn/q/kernel")
      ('h.3.q', None)
    """

    name: str
    rules: tuple[ModuleRule, ...]
    fan_in_fan_out: bool = False
    task_type: str | None = None

    def __post_init__(self) -> None:
        """Normalises ``rules`` to a tuple and checks its entries."""
        rules = tuple(self.rules)
        for rule in rules:
            if not isinstance(rule, ModuleRule):
                raise TypeError(
                    f"PeftMapping {self.name!r}: rules must be ModuleRule objects; got {rule!r}"
                )
        object.__setattr__(self, "rules", rules)

    def rule_for(self, path: str) -> ModuleRule | None:
        """The first rule whose pattern matches ``path``; ``None`` if none does."""
        return next((r for r in self.rules if re.fullmatch(r.pattern, path)), None)

    def permutation(self, path: str, width: int) -> np.ndarray | None:
        """The matching rule's :meth:`ModuleRule.permutation` for a module ``width`` wide.

        ``None`` if no rule matches ``path`` or the rule keeps PyTorch's order.

        Example:
          >>> LLAMA.permutation("fc/kernel", 3) is None
          True
        """
        rule = self.rule_for(path)
        return None if rule is None else rule.permutation(width)

    def module_for(self, path: str) -> tuple[str, tuple[str, ...] | None] | None:
        """``(module name, axes)`` for the kernel at ``path``; ``None`` if no rule matches."""
        for rule in self.rules:
            module = rule.module_for(path)
            if module is not None:
                return module, rule.axes
        return None

    def with_prefix(self, prefix: str) -> PeftMapping:
        """The same mapping with ``prefix`` put before every module name.

        For a PyTorch model that wraps the mapped one, e.g. ``BertForSequenceClassification``
        holding a ``BertModel`` as ``bert``.

        Example:
          >>> LLAMA.with_prefix("model.").module_for("fc/kernel")
          ('model.fc', None)
        """
        rules = tuple(
            dataclasses.replace(r, module=prefix.replace("\\", "\\\\") + r.module)
            for r in self.rules
        )
        return dataclasses.replace(self, name=f"{prefix}{self.name}", rules=rules)

    @property
    def axis_rules(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``LoraConfig.axis_rules`` that make jlora factorise kernels as PEFT does.

        Example:
          >>> GPT2.axis_rules
          (('(.*)/kernel', ('out', 'in')),)
        """
        return tuple((r.pattern, r.axes) for r in self.rules if r.axes is not None)


def hf_mapping(
    name: str,
    *,
    kernel_axes: Sequence[str] | None = None,
    fan_in_fan_out: bool = False,
    embeddings: bool = True,
) -> PeftMapping:
    """A mapping for models whose parameter paths spell the PyTorch module names.

    ``a/b/kernel`` maps to module ``a.b`` (and, with ``embeddings``, ``a/b/embedding`` too).

    Args:
      name: the mapping's label.
      kernel_axes: PyTorch roles of every ``kernel``'s axes when not jlora's defaults.
      fan_in_fan_out: PEFT's flag for ``(in, out)``-stored PyTorch weights.
      embeddings: also map ``*/embedding`` tables (to PEFT's ``lora_embedding_A/B``).

    Returns:
      A :class:`PeftMapping`.

    Example:
      >>> hf_mapping("bert").module_for("bert/encoder/layer/0/attention/self/query/kernel")
      ('bert.encoder.layer.0.attention.self.query', None)
    """
    axes = None if kernel_axes is None else tuple(kernel_axes)
    rules = [ModuleRule(r"(.*)/kernel", r"\1", axes)]
    if embeddings:
        rules.append(ModuleRule(r"(.*)/embedding", r"\1"))
    return PeftMapping(name, tuple(rules), fan_in_fan_out=fan_in_fan_out)


#: Flax GPT-2 of ``transformers<5``: kernels stored ``(out, in)``, PyTorch ``Conv1D`` layers
#: (``fan_in_fan_out``). Embeddings are left out: ``wte`` is tied to the LM head in Flax but not
#: in a PEFT-wrapped PyTorch model, so an adapter on it cannot mean the same thing in both.
GPT2 = hf_mapping("gpt2", kernel_axes=("out", "in"), fan_in_fan_out=True, embeddings=False)
#: Flax Llama of ``transformers<5``: ``(in, out)`` kernels named like the PyTorch modules.
LLAMA = hf_mapping("llama")
#: Flax BERT of ``transformers<5``, and any BERT (e.g. jlora's MiniLM) named the HF way.
BERT = hf_mapping("bert")
