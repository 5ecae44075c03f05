r"""A small Llama-style decoder in Flax Linen: RMSNorm, rotary positions, SwiGLU, no biases.

Every projection is a 2-D ``nn.Dense`` kernel named as in Llama (``attn/{query,key,value,out}``,
``mlp/{gate,up,down}``), so LoRA targets read like their PyTorch counterparts, e.g.
``r"layer_\d+/attn/(query|value)/kernel"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape of the decoder.

    Attributes:
      vocab_size: number of token ids (256 for the byte-level vocabulary).
      dim: model width.
      n_layers: number of decoder blocks.
      n_heads: attention heads; ``dim`` must be divisible by it.
      ffn_dim: hidden width of the SwiGLU feed-forward.
      max_len: longest sequence the model is used with (generation buffer size).
      rope_theta: base of the rotary frequencies.
      norm_eps: RMSNorm epsilon.

    Example:
      >>> LlamaConfig(dim=64, n_heads=4).head_dim
      16
    """

    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 384
    max_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        """Checks that the heads divide the width evenly."""
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"LlamaConfig: dim {self.dim} must split into n_heads {self.n_heads} heads of "
                "even size (rotary pairs); change dim or n_heads"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) * scale``, as in Llama."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises over the last axis."""
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        norm = x32 * jax.lax.rsqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + self.eps)
        return (norm * scale).astype(x.dtype)


def rotary(x: jax.Array, theta: float) -> jax.Array:
    """Rotates channel pairs of ``x`` ``[batch, seq, heads, head_dim]`` by position angles.

    Pair ``(x[2i], x[2i+1])`` at position ``t`` turns by ``t / theta^(2i/head_dim)``.

    Example:
      >>> import jax.numpy as jnp
      >>> rotary(jnp.ones((1, 3, 1, 4)), 10000.0).shape
      (1, 3, 1, 4)
    """
    seq, half = x.shape[1], x.shape[-1] // 2
    freqs = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None, :]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return out.reshape(x.shape)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Attends each position to itself and earlier ones."""
        c = self.config
        b, t, _ = x.shape
        heads = [
            nn.Dense(c.dim, use_bias=False, name=n)(x).reshape(b, t, c.n_heads, c.head_dim)
            for n in ("query", "key", "value")
        ]
        q, k, v = rotary(heads[0], c.rope_theta), rotary(heads[1], c.rope_theta), heads[2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(c.head_dim).astype(x.dtype)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return nn.Dense(c.dim, use_bias=False, name="out")(out.reshape(b, t, c.dim))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the gated feed-forward."""
        c = self.config
        gate = nn.Dense(c.ffn_dim, use_bias=False, name="gate")(x)
        up = nn.Dense(c.ffn_dim, use_bias=False, name="up")(x)
        return nn.Dense(c.dim, use_bias=False, name="down")(nn.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: attention then SwiGLU."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """One decoder layer."""
        c = self.config
        x = x + Attention(c, name="attn")(RMSNorm(c.norm_eps, name="attn_norm")(x))
        return x + SwiGLU(c, name="mlp")(RMSNorm(c.norm_eps, name="mlp_norm")(x))


class Llama(nn.Module):
    """The decoder: token embedding, ``n_layers`` blocks, final RMSNorm, untied LM head.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64))
      >>> params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
      >>> jax.jit(model.apply)({"params": params}, jnp.zeros((2, 8), jnp.int32)).shape
      (2, 8, 256)
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Returns next-token logits ``[batch, seq, vocab]`` for ``tokens`` ``[batch, seq]``."""
        c = self.config
        x = nn.Embed(c.vocab_size, c.dim, name="embed")(tokens)
        for i in range(c.n_layers):
            x = Block(c, name=f"layer_{i}")(x)
        x = RMSNorm(c.norm_eps, name="final_norm")(x)
        return nn.Dense(c.vocab_size, use_bias=False, name="lm_head")(x)


def lm_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats per token.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(lm_loss(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32))), 4)  # log 4
      1.3863
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def init_params(config: LlamaConfig, seed: int = 0) -> dict[str, Any]:
    """Randomly initialised parameters (the ``"params"`` collection) for ``config``."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    return jax.jit(Llama(config).init)(jax.random.key(seed), tokens)["params"]
