"""``LoraConfig``: what to adapt, with which rank and scale, and how; validated and JSON-able."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union, cast

import jax
import jax.numpy as jnp

from jlora._layout import ROLES

Predicate = Callable[[str, jax.ShapeDtypeStruct], bool]
Selector = Union[str, Predicate]
Selectors = Union[Selector, Sequence[Selector]]

INITS = ("kaiming", "gaussian")


def selectors(value: Selectors) -> tuple[Selector, ...]:
    """A validated config's ``targets`` / ``exclude`` as the tuple it is stored as."""
    return cast(tuple[Selector, ...], value)


def _selectors(value: Any, field: str) -> tuple[Selector, ...]:
    items = (value,) if isinstance(value, str) or callable(value) else value
    if not isinstance(items, Sequence):
        raise TypeError(
            f"LoraConfig.{field} must be a regex string, a (path, leaf) -> bool predicate or a "
            f"list of these; got {type(value).__name__}"
        )
    for item in items:
        if isinstance(item, str):
            _compile(item, field)
        elif not callable(item):
            raise TypeError(
                f"LoraConfig.{field} entries must be regex strings or (path, leaf) -> bool "
                f"predicates; got {item!r} of type {type(item).__name__}"
            )
    return tuple(items)


def _compile(pattern: str, field: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"LoraConfig.{field}: {pattern!r} is not a valid regex: {err}") from None


def _check_number(value: Any, field: str, kind: type, low: float, low_open: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise TypeError(f"LoraConfig.{field} must be {kind.__name__}; got {value!r}")
    bound = f"> {low}" if low_open else f">= {low}"
    if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison
        raise ValueError(f"LoraConfig.{field} must be a finite number {bound}; got {value!r}")
    if value < low or (low_open and value == low):
        raise ValueError(f"LoraConfig.{field} must be {bound}; got {value!r}")


def _pattern_map(value: Any, field: str, kind: type) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(
            f"LoraConfig.{field} must map path regexes to values, e.g. "
            f"{{'.*/query/kernel': 4}}; got {type(value).__name__}"
        )
    for pattern, item in value.items():
        if not isinstance(pattern, str):
            raise TypeError(f"LoraConfig.{field} keys must be regex strings; got {pattern!r}")
        _compile(pattern, field)
        _check_number(item, f"{field}[{pattern!r}]", kind, 0, True)
    return dict(value)


def _axis_rules(value: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    example = "axis_rules=[(r'.*/layers/mlp/kernel', ('stack', 'in', 'out'))]"
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"LoraConfig.axis_rules must be a list of (regex, roles); e.g. {example}")
    rules = []
    for rule in value:
        if (
            isinstance(rule, str)
            or not isinstance(rule, Sequence)
            or len(rule) != 2
            or not isinstance(rule[0], str)
            or isinstance(rule[1], str)
            or not isinstance(rule[1], Sequence)
        ):
            raise TypeError(
                f"LoraConfig.axis_rules entries must be (regex, roles) pairs; got {rule!r}. "
                f"Example: {example}"
            )
        pattern, roles = rule[0], tuple(rule[1])
        _compile(pattern, "axis_rules")
        bad = [r for r in roles if r not in ROLES]
        if bad or "in" not in roles or "out" not in roles:
            raise ValueError(
                f"LoraConfig.axis_rules: roles {roles} for {pattern!r} must use only {ROLES} and "
                f"contain at least one 'in' and one 'out'. Example: {example}"
            )
        rules.append((pattern, roles))
    return tuple(rules)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which kernels get LoRA adapters, and how they are shaped, scaled and initialised.

    The adapted kernel computes ``W + s·A·B`` with ``s = alpha / rank`` (``alpha / sqrt(rank)``
    with ``use_rslora``). Paths are ``"a/b/c"`` strings built from the tree's keys; every regex
    here is ``re.fullmatch``-ed against them.

    Attributes:
      rank: adapter rank ``r`` (> 0).
      alpha: scale numerator (> 0).
      targets: which leaves to adapt: a regex, a ``(path, leaf) -> bool`` predicate (``leaf`` is
        a ``jax.ShapeDtypeStruct``), or a list of these (any match selects).
      exclude: leaves never adapted, in the same forms as ``targets``.
      rank_pattern: per-path ranks, ``{regex: rank}``; the first matching regex wins.
      alpha_pattern: per-path alphas, ``{regex: alpha}``; the first matching regex wins.
      use_rslora: scale by ``alpha / sqrt(rank)`` (rank-stabilised LoRA).
      init: ``"kaiming"`` (Kaiming-uniform A, as the LoRA paper's code) or ``"gaussian"``
        (A ~ N(0, 1/r²) as PEFT); B is zero either way, so the model is unchanged at step 0.
      dtype: adapter dtype, whatever the kernel's (default ``"float32"``).
      dropout: LoRA dropout rate on the adapter input, used by the factorised path.
      axis_rules: ``[(regex, roles), ...]`` giving each axis of a matching kernel a role
        (``"stack"``, ``"in"`` or ``"out"``); first match wins, before the built-in defaults.
      embed_pattern: kernels that are embedding tables (looked up, not multiplied); they get
        loralib's init (A zero, B normal).

    Example:
      >>> cfg = LoraConfig(rank=4, alpha=8.0, targets=r".*/(query|value)/kernel")
      >>> cfg.scale_for("encoder/query/kernel")
      2.0
      >>> LoraConfig.from_dict(cfg.to_dict()) == cfg
      True
    """

    rank: int = 8
    alpha: float = 8.0
    targets: Selectors = r"(.*/)?kernel"
    exclude: Selectors = ()
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    init: str = "kaiming"
    dtype: str = "float32"
    dropout: float = 0.0
    axis_rules: Sequence[tuple[str, Sequence[str]]] = ()
    embed_pattern: str = r"(.*/)?embedding"

    def __post_init__(self) -> None:
        """Validates every field and normalises containers to immutable forms."""
        _check_number(self.rank, "rank", int, 0, True)
        _check_number(self.alpha, "alpha", float, 0, True)
        _check_number(self.dropout, "dropout", float, 0, False)
        if self.dropout >= 1:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1); got {self.dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"LoraConfig.use_rslora must be bool; got {self.use_rslora!r}")
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init must be one of {INITS}; got {self.init!r}")
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            raise TypeError(f"LoraConfig.dtype {self.dtype!r} is not a dtype") from None
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"LoraConfig.dtype must be a float dtype; got {dtype.name}")
        if not isinstance(self.embed_pattern, str):
            raise TypeError(
                f"LoraConfig.embed_pattern must be a regex string; got {self.embed_pattern!r}"
            )
        _compile(self.embed_pattern, "embed_pattern")
        set_ = object.__setattr__
        set_(self, "dtype", dtype.name)
        set_(self, "alpha", float(self.alpha))
        set_(self, "dropout", float(self.dropout))
        set_(self, "targets", _selectors(self.targets, "targets"))
        set_(self, "exclude", _selectors(self.exclude, "exclude"))
        set_(self, "rank_pattern", _pattern_map(self.rank_pattern, "rank_pattern", int))
        set_(self, "alpha_pattern", _pattern_map(self.alpha_pattern, "alpha_pattern", float))
        set_(self, "axis_rules", _axis_rules(self.axis_rules))

    def __hash__(self) -> int:
        """Hash of every field, so configs can be static arguments of ``jax.jit``."""
        return hash(
            tuple(
                tuple(sorted(v.items())) if isinstance(v, dict) else v
                for v in dataclasses.astuple(self, tuple_factory=tuple)
            )
        )

    def rank_for(self, path: str) -> int:
        """The adapter rank for a kernel at ``path`` (``rank_pattern`` first, then ``rank``)."""
        for pattern, rank in self.rank_pattern.items():
            if re.fullmatch(pattern, path):
                return int(rank)
        return self.rank

    def alpha_for(self, path: str) -> float:
        """The alpha for a kernel at ``path`` (``alpha_pattern`` first, then ``alpha``)."""
        for pattern, alpha in self.alpha_pattern.items():
            if re.fullmatch(pattern, path):
                return float(alpha)
        return self.alpha

    def scale_for(self, path: str, rank: int | None = None) -> float:
        """The scale ``s`` for a kernel at ``path``: ``alpha/r``, or ``alpha/sqrt(r)`` (rsLoRA).

        Args:
          path: the kernel's ``"a/b/c"`` path.
          rank: the adapter's rank if known (e.g. from A's shape); defaults to ``rank_for(path)``.

        Returns:
          The scale as a Python float.
        """
        r = self.rank_for(path) if rank is None else rank
        return self.alpha_for(path) / (math.sqrt(r) if self.use_rslora else r)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; predicate selectors cannot be serialised and raise.

        Raises:
          ValueError: if ``targets`` or ``exclude`` holds a Python predicate.
        """
        for field in ("targets", "exclude"):
            if any(callable(s) for s in selectors(getattr(self, field))):
                raise ValueError(
                    f"LoraConfig.{field} holds a Python predicate, which cannot be saved as "
                    "JSON; express it as a regex to save this config"
                )
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["targets"] = list(selectors(self.targets))
        out["exclude"] = list(selectors(self.exclude))
        out["axis_rules"] = [[p, list(r)] for p, r in self.axis_rules]
        out["rank_pattern"] = dict(self.rank_pattern)
        out["alpha_pattern"] = dict(self.alpha_pattern)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Builds a config from :meth:`to_dict` output, refusing unknown keys.

        Raises:
          TypeError: if ``data`` is not a mapping.
          KeyError: for an unknown key, with the nearest known one suggested.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"LoraConfig.from_dict expects a mapping; got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                near = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {known}"
                raise KeyError(f"unknown LoraConfig key {key!r}{hint}")
        return cls(**dict(data))
