"""The language-model task: the built-in Llama base, byte-level text, loss, evaluation, samples."""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import os
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from jlora.models.llama import Llama, LlamaConfig, lm_loss
from jlora.models.weights import load_params
from jlora.runner.config import RunConfig
from jlora.runner.tasks import FixedBatches, NoHead
from jlora.runner.text import LMBatches, decode, encode, eval_windows, load_text, split_tokens

BUILTIN = "builtin:"


def weights_path(spec: str) -> str:
    """The file behind a ``model.weights`` value: ``builtin:NAME`` or a path.

    Raises:
      FileNotFoundError: if no such built-in or file exists.

    Example:
      >>> os.path.basename(weights_path("builtin:llama_pydoc"))
      'llama_pydoc.safetensors'
    """
    if spec.startswith(BUILTIN):
        name = spec[len(BUILTIN) :]
        path = str(importlib.resources.files("jlora") / "assets" / f"{name}.safetensors")
    else:
        path = spec
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model.weights {spec!r}: no file at {path!r}; use 'builtin:llama_pydoc' or the path "
            "to a safetensors file written by scripts/pretrain_base.py"
        )
    return path


def next_token(logits: jax.Array, temperature: jax.Array, key: jax.Array) -> jax.Array:
    """A token drawn from ``softmax(logits / temperature)``; ``temperature == 0`` is argmax.

    The logits are shifted by their maximum before dividing, so a tiny temperature drives the
    others to ``-inf`` (greedy in effect) instead of overflowing to ``inf - inf = nan``.

    Example:
      >>> logits = jnp.array([1.0, 3.0, 2.0])
      >>> int(next_token(logits, jnp.float32(0.0), jax.random.key(0)))
      1
      >>> int(next_token(logits, jnp.float32(1e-30), jax.random.key(0)))
      1
    """
    greedy = temperature <= 0
    shifted = (logits - jnp.max(logits)) / jnp.where(greedy, 1.0, temperature)
    return jnp.where(greedy, jnp.argmax(logits), jax.random.categorical(key, shifted))


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def _sample(
    model: Llama,
    params: Any,
    buf: jax.Array,
    start: jax.Array,
    steps: int,
    key: jax.Array,
    temp: jax.Array,
) -> jax.Array:
    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        buf, key = carry
        logits = cast(jax.Array, model.apply({"params": params}, buf[None]))[0, start + i - 1]
        key, sub = jax.random.split(key)
        token = next_token(logits, temp, sub)
        return buf.at[start + i].set(token.astype(buf.dtype)), key

    return jax.lax.fori_loop(0, steps, body, (buf, key))[0]


def _model_config(path: str, meta: dict[str, str]) -> LlamaConfig:
    """The :class:`LlamaConfig` stored in a weights file's metadata."""
    if "config" not in meta:
        raise ValueError(
            f"model.weights {path!r} has no 'config' in its metadata, so it is not a jlora "
            "Llama base; use 'builtin:llama_pydoc' or a file written by scripts/pretrain_base.py"
        )
    try:
        return LlamaConfig(**json.loads(meta["config"]))
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(
            f"model.weights {path!r}: its metadata 'config' is not a Llama config ({err}); use "
            "a file written by scripts/pretrain_base.py"
        ) from None


class LanguageModelTask(FixedBatches, NoHead):
    """Fine-tuning the byte-level Llama base on a text: next-token loss in nats per byte."""

    unit = "tok"

    def __init__(self, config: RunConfig) -> None:
        """Loads the base weights and the text named by ``config``."""
        path = weights_path(config.model.weights)
        self.base, meta = load_params(path)
        self.model_config = _model_config(path, meta)
        self.model = Llama(self.model_config)
        self.extra: dict[str, Any] = {}
        self.config = config
        seq, batch = config.data.seq_len, config.train.batch_size
        if seq > self.model_config.max_len:
            raise ValueError(
                f"config data.seq_len {seq} exceeds the model's max_len "
                f"{self.model_config.max_len}; lower data.seq_len"
            )
        source = config.data.source
        train, val = split_tokens(encode(load_text(source)), config.data.val_fraction)
        try:
            self.batches = LMBatches(train, seq, batch, config.train.seed)
            windows = eval_windows(val, seq, config.train.eval_batches * batch)
        except ValueError as err:  # too little text: say which text
            raise ValueError(f"data.source {source!r}: {err}") from None
        # Whole batches only, so evaluation compiles once (at least one batch, padded by reuse).
        self.val = np.resize(windows, (max(len(windows) // batch, 1) * batch, seq + 1))
        model = self.model

        def eval_loss(params: Any, batch: jax.Array) -> jax.Array:
            logits = cast(jax.Array, model.apply({"params": params}, batch[:, :-1]))
            return lm_loss(logits, batch[:, 1:])

        self._eval_loss = jax.jit(eval_loss)
        self.units_per_batch = batch * seq
        self.data_stats: dict[str, Any] = {}

    def loss(self, params: Any, extra: Any, batch: jax.Array) -> jax.Array:
        """Mean next-token cross-entropy of ``batch`` ``[b, seq + 1]``."""
        del extra
        logits = cast(jax.Array, self.model.apply({"params": params}, batch[:, :-1]))
        return lm_loss(logits, batch[:, 1:])

    def train_batch(self, position: int) -> np.ndarray:
        """The training batch at data position ``position``."""
        return self.batches.batch(position)

    def evaluate(self, params: Any, extra: Any) -> dict[str, float]:
        """Validation loss (nats per byte) over the held-out windows."""
        bs = self.config.train.batch_size
        chunks = range(0, len(self.val), bs)
        losses = [float(self._eval_loss(params, self.val[i : i + bs])) for i in chunks]
        return {"eval_loss": float(np.mean(losses))}

    def generate(
        self, params: Any, prompt: str, max_new_tokens: int, temperature: float, seed: int
    ) -> str:
        """Samples a continuation of ``prompt`` (the prompt included in the result).

        Args:
          params: the (merged) model parameters.
          prompt: the text to continue; non-empty and shorter than the model's ``max_len``.
          max_new_tokens: bytes to sample (>= 0; fewer if the model's ``max_len`` is reached).
          temperature: softmax temperature (>= 0); 0 is greedy (argmax) decoding.
          seed: seeds the sampling.

        Raises:
          ValueError: for an empty or too long prompt, a negative ``max_new_tokens``, or a
            negative or non-finite ``temperature``.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, found {max_new_tokens}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(
                f"temperature must be a finite number >= 0, found {temperature} (0 is greedy)"
            )
        tokens = encode(prompt)
        room = self.model_config.max_len - len(tokens)
        if not tokens.size or room < 1:
            raise ValueError(
                f"prompt of {len(tokens)} bytes must be non-empty and shorter than the model's "
                f"max_len {self.model_config.max_len}"
            )
        steps = min(max_new_tokens, room)
        buf = jnp.zeros(self.model_config.max_len, jnp.int32).at[: len(tokens)].set(tokens)
        key = jax.random.key(seed)
        start, temp = jnp.int32(len(tokens)), jnp.float32(temperature)
        out = _sample(self.model, params, buf, start, steps, key, temp)
        return decode(np.asarray(out[: len(tokens) + steps]))

    def show(self, params: Any, extra: Any) -> dict[str, Any]:
        """What this task reports before and after: validation loss and samples."""
        g = self.config.generate
        samples = [
            self.generate(params, p, g.max_new_tokens, g.temperature, self.config.train.seed + i)
            for i, p in enumerate(g.prompts)
        ]
        return {**self.evaluate(params, extra), "samples": samples}
