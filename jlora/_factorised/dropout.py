"""LoRA dropout inside the factorised path: on the adapter's input only, one mask per use.

The base term ``x·W`` sees ``x`` unchanged; the low-rank term sees ``dropout(x)``, as PEFT
applies it. Keys are folded from a trace-time counter (and the iteration index inside loop
bodies), so the same key gives the same masks in every run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Dropout:
    """LoRA dropout state for one interpretation: rate, key, and a per-use counter."""

    rate: float = 0.0
    key: Any = None
    count: int = 0

    def next_key(self) -> Any:
        """A fresh key for the next use (fold in a trace-time counter: stable across runs)."""
        self.count += 1
        return jax.random.fold_in(self.key, self.count)

    def child(self, index: Any) -> Dropout:
        """The state inside a loop body, whose key also depends on the iteration ``index``."""
        if self.key is None:
            return Dropout()
        return Dropout(self.rate, jax.random.fold_in(self.next_key(), index))

    def apply(self, x: jax.Array) -> jax.Array:
        """Inverted dropout on ``x`` (identity when off)."""
        if self.key is None or self.rate == 0.0:
            return x
        keep = jax.random.bernoulli(self.next_key(), 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))
