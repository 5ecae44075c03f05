r"""Mixture-of-experts MLPs for the decoder (Qwen3-MoE, Mixtral): router, top-k, experts, aux loss.

Design note: a sparse block keeps Hugging Face's module names, and its experts' kernels are
stacked on an ``experts`` axis after the layer axis, so each expert is one LoRA adapter
(axis roles ``("stack", "stack", "in", "out")``) and PEFT's per-expert ``nn.Linear`` modules
are the stack indices::

    model/layers/mlp/gate/kernel                    [L, D, E]     (router; Qwen3-MoE)
    model/layers/mlp/experts/{gate,up}_proj/kernel  [L, E, D, F]  mlp.experts.{e}.{gate,up}_proj
    model/layers/mlp/experts/down_proj/kernel       [L, E, F, D]  mlp.experts.{e}.down_proj
    model/layers/block_sparse_moe/gate/kernel       [L, D, E]     (router; Mixtral)
    model/layers/block_sparse_moe/experts/w{1,3}/kernel  [L, E, D, F]  (w1 gate, w3 up)
    model/layers/block_sparse_moe/experts/w2/kernel      [L, E, F, D]  (down)

Routing follows transformers: ``p = softmax(x·W_gate)`` in float32, the top ``k`` experts by
``p``, their weights renormalised to sum to one when :attr:`MoeConfig.norm_topk_prob` (always
for Mixtral, which equals a softmax over the top-k logits). Dispatch is *dense*: every token
goes through every expert as one batched product ``[E, N, D]·[E, D, F]`` (the kernels' expert
axis is the product's batch axis, which is what the factorised engine's ``stack`` role
expects), and the outputs are summed with the sparse top-k weights (zero for the experts a
token was not routed to). That is exact, gradients included, but costs ``E/k`` times the
expert FLOPs of a sparse dispatch. :attr:`MoeConfig.capacity_factor` opts into a *grouped*
dispatch instead: each expert gets a buffer of ``C = ceil(factor · N·k / E)`` token slots,
filled in token order (scatter), run as one batched product ``[E, C, D]·[E, D, F]`` and
gathered back; a token routed to an expert whose buffer is full skips that expert (Switch
Transformer's token dropping), so it equals the dense dispatch only while no buffer overflows
(always with ``factor >= E/k``). Each layer sows its router logits (``"intermediates"``
collection), from which :func:`load_balancing_loss` computes transformers' auxiliary loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "MOE_ARCHITECTURES",
    "MoeConfig",
    "SparseMoe",
    "load_balancing_loss",
    "moe_from_hf",
    "router_logits",
    "routing_weights",
]

#: HF module name of the sparse block and of its (gate, up, down) projections, per architecture.
_NAMES: dict[str, tuple[str, tuple[str, str, str]]] = {
    "Qwen3MoeForCausalLM": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "MixtralForCausalLM": ("block_sparse_moe", ("w1", "w3", "w2")),
}
#: The decoder architectures whose MLPs are sparse mixtures of experts.
MOE_ARCHITECTURES = tuple(_NAMES)


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """The sparse MLP of a mixture-of-experts decoder (every layer sparse).

    Attributes:
      architecture: ``"Qwen3MoeForCausalLM"`` or ``"MixtralForCausalLM"``; fixes the HF names.
      num_experts: experts per layer (``E``).
      num_experts_per_tok: experts each token is routed to (``k``).
      expert_size: width of one expert's gate and up projections (``F``).
      norm_topk_prob: the top-k weights are renormalised to sum to one.
      router_aux_loss_coef: weight of :func:`load_balancing_loss` in the training loss.
      capacity_factor: ``None`` for the exact dense dispatch; else the grouped dispatch with
        ``ceil(capacity_factor · tokens · k / E)`` slots per expert (overflowing tokens skip
        the expert). Not part of config.json: set it with ``dataclasses.replace``.

    Example:
      >>> m = MoeConfig("MixtralForCausalLM", num_experts=4, num_experts_per_tok=2,
      ...               expert_size=16)
      >>> m.block, m.projections
      ('block_sparse_moe', ('w1', 'w3', 'w2'))
    """

    architecture: str
    num_experts: int
    num_experts_per_tok: int
    expert_size: int
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    capacity_factor: float | None = None

    def __post_init__(self) -> None:
        """Checks the architecture, that ``0 < k <= E`` and a positive capacity factor."""
        if self.architecture not in _NAMES:
            raise ValueError(
                f"MoeConfig: architecture {self.architecture!r} has no sparse MLP here; "
                f"supported: {', '.join(MOE_ARCHITECTURES)}"
            )
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"MoeConfig: num_experts_per_tok {self.num_experts_per_tok} must be in 1.."
                f"num_experts ({self.num_experts}); fix the config"
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"MoeConfig: capacity_factor must be positive (slots per expert relative to an "
                f"even share of the tokens) or None for the dense dispatch; got "
                f"{self.capacity_factor}"
            )

    @property
    def block(self) -> str:
        """HF module name of the sparse block in a layer (``mlp`` or ``block_sparse_moe``)."""
        return _NAMES[self.architecture][0]

    @property
    def projections(self) -> tuple[str, str, str]:
        """HF names of an expert's gate, up and down projections."""
        return _NAMES[self.architecture][1]

    def expert_shapes(self, hidden: int) -> dict[str, tuple[int, int]]:
        """One expert's ``(in, out)`` kernel per projection, in HF's ``state_dict`` order.

        Example:
          >>> MoeConfig("MixtralForCausalLM", 4, 2, 16).expert_shapes(8)
          {'w1': (8, 16), 'w2': (16, 8), 'w3': (8, 16)}
        """
        gate, up, down = self.projections
        shapes = {gate: (hidden, self.expert_size), up: (hidden, self.expert_size)}
        shapes[down] = (self.expert_size, hidden)
        return dict(sorted(shapes.items())) if self.architecture == "MixtralForCausalLM" else shapes

    def to_hf(self) -> dict[str, Any]:
        """The config.json keys of this block.

        Example:
          >>> MoeConfig("Qwen3MoeForCausalLM", 8, 2, 16).to_hf()["moe_intermediate_size"]
          16
        """
        if self.architecture == "MixtralForCausalLM":
            return {  # Mixtral has one MLP width, its experts'
                "intermediate_size": self.expert_size,
                "num_local_experts": self.num_experts,
                "num_experts_per_tok": self.num_experts_per_tok,
                "router_aux_loss_coef": self.router_aux_loss_coef,
                "router_jitter_noise": 0.0,
            }
        return {
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.expert_size,
            "norm_topk_prob": self.norm_topk_prob,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }


def moe_from_hf(architecture: str, hf: Mapping[str, Any], intermediate_size: int) -> MoeConfig:
    """The :class:`MoeConfig` of a config.json, with transformers' defaults for missing keys.

    Args:
      architecture: one of :data:`MOE_ARCHITECTURES`.
      hf: the parsed config.json.
      intermediate_size: the config's ``intermediate_size`` (Mixtral's expert width).

    Returns:
      A :class:`MoeConfig`.

    Raises:
      ValueError: for dense layers among the sparse ones (Qwen3-MoE ``decoder_sparse_step``
        other than 1, or ``mlp_only_layers``), no experts, or router jitter (Mixtral's
        ``router_jitter_noise`` > 0, a training-time noise this model does not apply).

    Example:
      >>> m = moe_from_hf("Qwen3MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2}, 64)
      >>> m.num_experts, m.num_experts_per_tok, m.expert_size, m.norm_topk_prob
      (4, 2, 768, False)
    """
    coef = float(hf.get("router_aux_loss_coef", 0.001))
    if architecture == "MixtralForCausalLM":
        jitter = hf.get("router_jitter_noise") or 0.0
        if jitter:
            raise ValueError(
                f"config.json: router_jitter_noise {jitter} (MixtralForCausalLM) is not "
                "supported: jlora's router applies no noise; set it to 0.0"
            )
        experts, k = int(hf.get("num_local_experts", 8)), int(hf.get("num_experts_per_tok", 2))
        return MoeConfig(architecture, experts, k, intermediate_size, True, coef)
    step = hf.get("decoder_sparse_step", 1)
    dense = list(hf.get("mlp_only_layers") or [])
    experts = int(hf.get("num_experts", 128))
    if step != 1 or dense or experts < 1:
        raise ValueError(
            f"config.json: {architecture} with decoder_sparse_step {step}, mlp_only_layers "
            f"{dense} and num_experts {experts} has dense MLP layers; jlora supports only "
            "all-sparse models (decoder_sparse_step 1, mlp_only_layers [], num_experts > 0)"
        )
    return MoeConfig(
        architecture,
        experts,
        int(hf.get("num_experts_per_tok", 8)),
        int(hf.get("moe_intermediate_size", 768)),
        bool(hf.get("norm_topk_prob", False)),
        coef,
    )


def routing_weights(logits: jax.Array, k: int, normalize: bool) -> jax.Array:
    """Each token's weight per expert: the top-``k`` softmax probabilities, zero elsewhere.

    ``p = softmax(logits)`` in float32; the ``k`` largest ``p`` are kept (divided by their sum
    when ``normalize``), the others set to zero, as transformers' sparse MoE blocks do.

    Args:
      logits: router logits ``[..., E]``.
      k: experts per token.
      normalize: renormalise the kept weights to sum to one.

    Returns:
      Float32 ``[..., E]`` weights with ``k`` non-zero entries per token.

    Example:
      >>> import jax.numpy as jnp
      >>> w = routing_weights(jnp.log(jnp.array([[0.1, 0.6, 0.3]])), 2, True)
      >>> [round(float(v), 3) for v in w[0]]
      [0.0, 0.667, 0.333]
    """
    top, chosen = _top_k(logits, k, normalize)
    one_hot = jax.nn.one_hot(chosen, logits.shape[-1], dtype=jnp.float32)  # [..., k, E]
    return jnp.einsum("...k,...ke->...e", top, one_hot)


def _top_k(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """The ``k`` largest softmax probabilities (float32, renormalised if asked) and experts."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, chosen = jax.lax.top_k(probs, k)
    if normalize:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return top, chosen


class _Linears(nn.Module):
    """One ``[E, in, out]`` kernel: the same projection of every expert, applied batched."""

    experts: int
    features: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.initializers.normal(0.02),
            (self.experts, x.shape[-1], self.features),
            self.param_dtype,
        )
        # the expert axis is a batch axis of the product: the engine's "stack" role
        return jnp.einsum("end,edf->enf", x, kernel.astype(self.dtype))


class _Experts(nn.Module):
    """Every expert's SwiGLU MLP, ``down(silu(gate(x)) * up(x))``, on ``x [E, N, D]``."""

    config: MoeConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        m = self.config
        gate_name, up_name, down_name = m.projections

        def linear(features: int, name: str) -> _Linears:
            return _Linears(m.num_experts, features, self.dtype, self.param_dtype, name=name)

        h = nn.silu(linear(m.expert_size, gate_name)(x)) * linear(m.expert_size, up_name)(x)
        return linear(x.shape[-1], down_name)(h)


class SparseMoe(nn.Module):
    """The sparse MLP block of one layer: router, top-k routing and the stacked experts.

    Sows the router logits ``[B, T, E]`` as ``"intermediates"`` / ``"router_logits"``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> m = MoeConfig("Qwen3MoeForCausalLM", 4, 2, 8)
      >>> x = jnp.ones((1, 3, 16))
      >>> params = SparseMoe(m, jnp.float32, jnp.float32).init(jax.random.key(0), x)["params"]
      >>> params["experts"]["down_proj"]["kernel"].shape
      (4, 8, 16)
      >>> SparseMoe(m, jnp.float32, jnp.float32).apply({"params": params}, x).shape
      (1, 3, 16)
    """

    config: MoeConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``sum_e w_e(x) · expert_e(x)`` over the top-k experts of each token."""
        m = self.config
        b, t, d = x.shape
        logits = nn.Dense(
            m.num_experts,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(0.02),
            name="gate",
        )(x)
        self.sow("intermediates", "router_logits", logits)
        experts = _Experts(m, self.dtype, self.param_dtype, name="experts")
        n, e = b * t, m.num_experts
        if m.capacity_factor is not None:
            out = _grouped(experts, m, x.reshape(n, d), logits.reshape(n, e))
            return out.reshape(b, t, d)
        weights = routing_weights(logits, m.num_experts_per_tok, m.norm_topk_prob)
        # dense dispatch: every token through every expert (exact; E/k times the expert FLOPs)
        out = experts(jnp.broadcast_to(x.reshape(1, n, d), (e, n, d)))
        w = weights.reshape(n, e).astype(self.dtype)
        return jnp.einsum("end,ne->nd", out, w).reshape(b, t, d)


def _grouped(experts: _Experts, m: MoeConfig, x: jax.Array, logits: jax.Array) -> jax.Array:
    """Capacity-bounded dispatch of tokens ``x [N, D]`` (see the module's design note)."""
    n, d = x.shape
    e, k = m.num_experts, m.num_experts_per_tok
    capacity = min(n, math.ceil(cast(float, m.capacity_factor) * n * k / e))
    top, chosen = _top_k(logits, k, m.norm_topk_prob)  # [N, k]
    one_hot = jax.nn.one_hot(chosen, e, dtype=jnp.int32)  # [N, k, E]
    # each (token, choice)'s slot in its expert's buffer, in token order
    before = jnp.cumsum(one_hot.reshape(n * k, e), axis=0).reshape(n, k, e) - 1
    slot = jnp.sum(before * one_hot, axis=-1)
    kept = slot < capacity
    slot = jnp.where(kept, slot, capacity)  # a spare last slot takes the overflow, unused
    buffer = jnp.zeros((e, capacity + 1, d), x.dtype)
    buffer = buffer.at[chosen, slot].set(jnp.broadcast_to(x[:, None], (n, k, d)))
    out = experts(buffer[:, :capacity])  # [E, C, D]
    out = jnp.pad(out, ((0, 0), (0, 1), (0, 0)))[chosen, slot]  # [N, k, D]
    w = jnp.where(kept, top, 0.0).astype(out.dtype)
    return jnp.einsum("nkd,nk->nd", out, w)


def router_logits(intermediates: Mapping[str, Any]) -> jax.Array:
    """The router logits a decoder sowed, ``[L, B, T, E]``, from its ``"intermediates"``.

    Args:
      intermediates: the ``"intermediates"`` collection returned by
        ``Decoder(config).apply(..., mutable=["intermediates"])`` (or the whole returned
        state holding it).

    Returns:
      The stacked router logits of every layer.

    Raises:
      ValueError: if no router logits were sown (a dense model, or ``"intermediates"`` not
        made mutable).

    Example:
      >>> import jax.numpy as jnp
      >>> state = {"intermediates": {"model": {"layers": {"mlp": {
      ...     "router_logits": (jnp.zeros((2, 1, 3, 4)),)}}}}}
      >>> router_logits(state).shape
      (2, 1, 3, 4)
    """
    tree = intermediates.get("intermediates", intermediates)
    found = [
        leaf
        for path, leaf in jax.tree.flatten_with_path(tree)[0]
        if any(getattr(k, "key", None) == "router_logits" for k in path)
    ]
    if len(found) != 1:
        raise ValueError(
            f"router_logits: expected one sown 'router_logits' entry, found {len(found)}; apply "
            "a mixture-of-experts Decoder with mutable=['intermediates'] and pass the state"
        )
    return jnp.asarray(found[0])


def load_balancing_loss(
    logits: jax.Array, num_experts_per_tok: int, mask: jax.typing.ArrayLike | None = None
) -> jax.Array:
    """Switch Transformer's load-balancing loss, as transformers' ``load_balancing_loss_func``.

    With ``p = softmax(logits)`` and ``f[j, e]`` the share of tokens (over every layer and
    unmasked token) whose ``j``-th choice is expert ``e``: ``E · sum_{j,e} f[j, e] · mean(p)[e]``.
    A model's training loss adds ``router_aux_loss_coef`` times this.

    Args:
      logits: router logits ``[L, B, T, E]`` (:func:`router_logits`).
      num_experts_per_tok: ``k``.
      mask: ``[B, T]``, true for real tokens (transformers' ``attention_mask``); ``None``
        counts every token.

    Returns:
      A float32 scalar.

    Raises:
      ValueError: if ``logits`` is not 4-D or ``mask`` is not ``[B, T]``.

    Example:
      >>> import jax.numpy as jnp
      >>> float(load_balancing_loss(jnp.zeros((1, 1, 2, 4)), 2))  # uniform router: k
      2.0
    """
    if logits.ndim != 4:
        raise ValueError(
            f"load_balancing_loss: logits must be [layers, batch, seq, experts]; got shape "
            f"{tuple(logits.shape)}"
        )
    layers, b, t, experts = logits.shape
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    _, chosen = jax.lax.top_k(probs, num_experts_per_tok)
    one_hot = jax.nn.one_hot(chosen, experts, dtype=jnp.float32)  # [L, B, T, k, E]
    if mask is None:
        weight = jnp.ones((b, t), jnp.float32)
    else:
        weight = jnp.asarray(mask, jnp.float32)
        if weight.shape != (b, t):
            raise ValueError(
                f"load_balancing_loss: mask must be [batch, seq] = {(b, t)}; got "
                f"{tuple(weight.shape)}"
            )
    count = layers * jnp.sum(weight)
    tokens_per_expert = jnp.einsum("lbtke,bt->ke", one_hot, weight) / count
    prob_per_expert = jnp.einsum("lbte,bt->e", probs, weight) / count
    return experts * jnp.sum(tokens_per_expert * prob_per_expert[None])
