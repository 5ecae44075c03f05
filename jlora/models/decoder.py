r"""The Llama-family decoder every real checkpoint runs on (Llama, Mistral, Qwen2/3, MoE).

Design note (the layout lives here and in :mod:`jlora.models.decoder_weights` only): the
``"params"`` collection uses Hugging Face's module names, kernels ``(in, out)`` = HF
``weight.T``, and the decoder layers stacked on axis 0 by ``nn.scan`` (role ``"stack"``), so
LoRA targets read like PEFT's (``r".*(q_proj|v_proj)/kernel"``) and one layer is compiled once::

    model/embed_tokens/embedding                 [V, D]
    model/layers/input_layernorm/scale           [L, D]
    model/layers/self_attn/{q,k,v}_proj/kernel   [L, D, H*hd]   (+ bias [L, H*hd], Qwen2)
    model/layers/self_attn/o_proj/kernel         [L, H*hd, D]
    model/layers/self_attn/{q,k}_norm/scale      [L, hd]        (Qwen3)
    model/layers/post_attention_layernorm/scale  [L, D]
    model/layers/mlp/{gate,up}_proj/kernel       [L, D, F]
    model/layers/mlp/down_proj/kernel            [L, F, D]
    model/norm/scale                             [D]
    model/layers/{mlp,block_sparse_moe}/...      (Qwen3-MoE, Mixtral: jlora.models.moe)
    lm_head/kernel                               [D, V]   (absent with tied embeddings)

The stacked kernels need axis rules, :data:`DECODER_AXIS_RULES` (``("stack", "in", "out")``;
a mixture's experts ``("stack", "stack", "in", "out")``), also given by
``PEFT_MAPPING.axis_rules``: :data:`PEFT_MAPPING`
names each adapted kernel's PyTorch module for PEFT files (at the end of this module).

Attention follows transformers' eager path: scores ``q·kᵀ/sqrt(hd)`` masked with the dtype's
minimum (never ``-inf``, so a query with no visible key gets a uniform, finite softmax),
softmax in float32, grouped-query heads sharing kv head ``h // (H / H_kv)``. Masks work on
*slots*: the token index in the row without a cache, the cache slot with one; a sliding
window keeps keys at slots ``s > q - window``, as transformers does for unpadded input. The
mask is a :class:`jlora.models.attention.MaskSpec`, never a ``[T, S]`` array unless the
chosen implementation (``DecoderConfig.attention``) builds one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.models.attention import MaskSpec, attend_per_kind, check_attention
from jlora.models.gemma import DEFAULTS as _GEMMA_DEFAULTS
from jlora.models.gemma import (
    GEMMA_ARCHITECTURES,
    HIDDEN_ACTIVATIONS,
    LAYER_TYPES,
    gemma_fields,
    gemma_to_hf,
    layer_kinds,
)
from jlora.models.moe import MOE_ARCHITECTURES, MoeConfig, SparseMoe, moe_from_hf
from jlora.models.remat import checkpoint_policy, remat_name
from jlora.models.rope import (
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
    rope_scaling_from_hf,
    rope_scaling_to_hf,
)
from jlora.peft import ModuleRule, PeftMapping

__all__ = [
    "DECODER_AXIS_RULES",
    "DECODER_TARGETS",
    "PEFT_MAPPING",
    "SUPPORTED_ARCHITECTURES",
    "Decoder",
    "DecoderConfig",
    "causal_lm_loss",
    "init_cache",
]

#: ``LoraConfig.axis_rules`` for the stacked layer kernels ``[L, in, out]``.
DECODER_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"(?:.*/)?model/layers/(.*)/experts/(.*)/kernel", ("stack", "stack", "in", "out")),
    (r"(?:.*/)?model/layers/(.*)/kernel", ("stack", "in", "out")),
)

#: ``LoraConfig.targets`` for every attention and MLP projection of a :class:`Decoder` (what
#: PEFT's ``target_modules="all-linear"`` picks on these models, less ``lm_head``); on a
#: mixture of experts, every expert's projections and not the router (``gate``).
DECODER_TARGETS = (
    r"(?:.*/)?model/layers/(self_attn/[qkvo]_proj|mlp/(experts/)?(gate|up|down)_proj"
    r"|block_sparse_moe/experts/w[123])/kernel"
)

# transformers' defaults per architecture for keys a config.json may leave out
_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, head_dim=None, rms_norm_eps=1e-6,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
    ),
    "MistralForCausalLM": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=None, rms_norm_eps=1e-6,
        max_position_embeddings=4096 * 32, bos_token_id=1, eos_token_id=2, sliding_window=4096,
    ),
    "Qwen2ForCausalLM": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=None, rms_norm_eps=1e-6,
        max_position_embeddings=32768, bos_token_id=None, eos_token_id=None,
    ),
    "Qwen3ForCausalLM": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-6,
        max_position_embeddings=32768, bos_token_id=None, eos_token_id=None,
    ),
    "Qwen3MoeForCausalLM": dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=4, head_dim=None, rms_norm_eps=1e-6,
        max_position_embeddings=32768, bos_token_id=None, eos_token_id=None,
    ),
    "MixtralForCausalLM": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=None, rms_norm_eps=1e-5,
        max_position_embeddings=4096 * 32, bos_token_id=1, eos_token_id=2,
    ),
}  # fmt: skip
_DEFAULTS.update(_GEMMA_DEFAULTS)
#: The ``architectures`` values :meth:`DecoderConfig.from_hf` accepts.
SUPPORTED_ARCHITECTURES = tuple(_DEFAULTS)
_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}
_MODEL_TYPES.update(GEMMA_ARCHITECTURES)
_OPTIONS = ("dtype", "param_dtype", "remat", "scan_layers", "attention", "attention_block")


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shape and options of a Llama-family decoder, readable from a Hugging Face config.json.

    The first fields mean what the same keys of a transformers ``config.json`` mean.

    Attributes:
      vocab_size: tokens in the vocabulary (rows of the embedding).
      hidden_size: width of the residual stream.
      intermediate_size: width of the MLP's gate and up projections.
      num_hidden_layers: decoder layers.
      num_attention_heads: query heads.
      num_key_value_heads: key/value heads (grouped-query attention); ``None`` for as many as
        query heads.
      head_dim: width of a head; ``None`` for ``hidden_size // num_attention_heads``.
      rms_norm_eps: the RMSNorm epsilon.
      rope_theta: the rotary embedding's base.
      rope_scaling: transformers' ``rope_scaling`` dict (any type of
        :data:`jlora.models.rope.SUPPORTED_ROPE_TYPES`), or ``None``.
      max_position_embeddings: longest sequence the model is configured for.
      rope_freq_factors: llama.cpp's per-pair rotary divisors (a GGUF's ``rope_freqs.weight``,
        Llama 3.1/3.2: their ``llama3`` scaling), ``head_dim / 2`` of them, or ``None``.
      tie_word_embeddings: the output head is the embedding's transpose.
      bos_token_id: beginning-of-sequence token id, or ``None``.
      eos_token_id: end-of-sequence token id(s), or ``None``.
      attention_bias: q/k/v projections have biases (Qwen2).
      qk_norm: RMSNorm over each head of q and k before the rotation (Qwen3).
      sliding_window: every layer attends only to the last ``sliding_window`` slots, or
        ``None`` (Mistral; Qwen2/3 with ``use_sliding_window`` on all layers); with
        ``layer_types``, the window of the sliding layers only.
      layer_types: per layer ``"sliding_attention"`` or ``"full_attention"`` (Gemma), or
        ``None`` for every layer alike.
      hidden_activation: the MLP's activation: ``"silu"`` (SwiGLU) or, on Gemma,
        ``"gelu_pytorch_tanh"`` / ``"gelu"`` (GeGLU).
      query_pre_attn_scalar: queries are scaled by its ``**-0.5``; ``None`` for ``head_dim``.
      attn_logit_softcapping: attention scores become ``cap · tanh(s / cap)``, or ``None``.
      final_logit_softcapping: the logits become ``cap · tanh(l / cap)``, or ``None``.
      rope_local_base_freq: the rotary base of sliding layers (Gemma 3), or ``None`` for
        ``rope_theta`` on every layer.
      architecture: the HF class name, e.g. ``"LlamaForCausalLM"``.
      moe: the sparse MLP of a mixture-of-experts architecture (Qwen3-MoE, Mixtral), else
        ``None``; :class:`jlora.models.moe.MoeConfig`.
      dtype: compute dtype (activations); logits are returned in float32 anyway.
      param_dtype: dtype the parameters are created and loaded in.
      remat: what each layer keeps for the backward pass (:mod:`jlora.models.remat`):
        ``"none"``, ``"full"`` (recompute the layer), ``"dots"`` (keep the projections'
        outputs) or ``"offload"`` (keep them in pinned host memory); ``True`` is
        ``"full"``, ``False`` ``"none"``. Stored as the name.
      scan_layers: ``True`` compiles one layer in a loop; ``False`` unrolls the loop (same
        stacked parameters), to compare compile and run times.
      attention: how attention is computed (:mod:`jlora.models.attention`): ``"auto"``
        (cuDNN's ``"fused"`` kernel on a GPU in half precision, else ``"blockwise"`` past
        ``attention_block`` tokens and ``"einsum"`` below),
        ``"einsum"`` (scores and mask as ``[T, S]`` arrays), ``"fused"``
        (``jax.nn.dot_product_attention``, cuDNN on GPU) or ``"blockwise"`` (online softmax
        over blocks, memory linear in the sequence length).
      attention_block: query and key slots per block of ``"blockwise"`` attention.

    Example:
      >>> c = DecoderConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
      ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
      >>> c.head_dim, c.to_hf()["architectures"]
      (8, ['LlamaForCausalLM'])
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    rope_freq_factors: tuple[float, ...] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    hidden_activation: str = "silu"
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope_local_base_freq: float | None = None
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    moe: MoeConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool | str = False
    scan_layers: bool = True
    attention: str = "auto"
    attention_block: int = 512

    def __post_init__(self) -> None:
        """Fills ``num_key_value_heads``/``head_dim`` and checks heads and rope scaling."""
        object.__setattr__(self, "remat", remat_name(self.remat))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.architecture not in _DEFAULTS:
            raise ValueError(_unsupported(self.architecture))
        is_moe = self.architecture in MOE_ARCHITECTURES
        if is_moe != (self.moe is not None) or (
            self.moe is not None and self.moe.architecture != self.architecture
        ):
            raise ValueError(
                f"DecoderConfig: architecture {self.architecture} needs "
                f"{'a MoeConfig of the same architecture' if is_moe else 'moe=None'} as moe; "
                f"got {self.moe!r}. Read the config with DecoderConfig.from_hf"
            )
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if kv is None or kv < 1 or heads % kv:
            raise ValueError(
                f"DecoderConfig: num_attention_heads {heads} must be a multiple of "
                f"num_key_value_heads {kv} (grouped-query attention); fix the config"
            )
        if self.head_dim is None or self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(
                f"DecoderConfig: head_dim {self.head_dim} must be even (rotary pairs); fix the "
                "config's head_dim"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(
                f"DecoderConfig: sliding_window must be a positive int or None; got "
                f"{self.sliding_window}"
            )
        if self.rope_freq_factors is not None:
            object.__setattr__(self, "rope_freq_factors", tuple(self.rope_freq_factors))
        rope_inv_freq(  # validates rope_scaling and rope_freq_factors
            self.head_dim,
            self.rope_theta,
            self.rope_scaling,
            max_position_embeddings=self.max_position_embeddings,
            freq_factors=self.rope_freq_factors,
        )
        self._check_gemma()
        check_attention(
            self.attention, self.attention_block, self.attn_logit_softcapping, "DecoderConfig"
        )

    @property
    def gemma(self) -> bool:
        """Gemma's (1 + w) float32 norms, four norms per layer and scaled embedding."""
        return self.architecture in GEMMA_ARCHITECTURES

    def _check_gemma(self) -> None:
        allowed = tuple(HIDDEN_ACTIVATIONS) if self.gemma else ("silu",)
        if self.hidden_activation not in allowed:
            raise ValueError(
                f"DecoderConfig: hidden_activation {self.hidden_activation!r} is not supported "
                f"for {self.architecture}; supported: {allowed}"
            )
        if self.layer_types is None:
            return
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(
            LAYER_TYPES
        ):
            raise ValueError(
                f"DecoderConfig: layer_types {self.layer_types} must give one of {LAYER_TYPES} "
                f"for each of the {self.num_hidden_layers} layers"
            )
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError(
                "DecoderConfig: layer_types has sliding_attention layers but sliding_window is "
                "None; give the window"
            )

    def __hash__(self) -> int:
        """Hashes the fields with ``rope_scaling`` and lists made hashable."""
        return hash(tuple(_freeze(getattr(self, f.name)) for f in dataclasses.fields(self)))

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **options: Any) -> DecoderConfig:
        """The config for a Hugging Face ``config.json`` (as a dict).

        Keys the file leaves out take transformers' default for its architecture.

        Args:
          hf: the parsed config.json.
          **options: execution options, not in config.json: ``dtype``, ``param_dtype``,
            ``remat``, ``scan_layers``, ``attention``, ``attention_block``.

        Returns:
          A :class:`DecoderConfig`.

        Raises:
          ValueError: for an architecture other than :data:`SUPPORTED_ARCHITECTURES`, a
            feature this decoder does not implement (``hidden_act`` other than silu, MLP or
            output-projection biases, sliding windows on only some layers, an unsupported
            ``rope_scaling``; for Gemma, see :func:`jlora.models.gemma.gemma_fields`), or
            inconsistent head counts.
          TypeError: for an unknown option.

        Example:
          >>> c = DecoderConfig.from_hf({"architectures": ["Qwen2ForCausalLM"],
          ...     "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2})
          >>> c.attention_bias, c.head_dim, c.vocab_size
          (True, 8, 151936)
        """
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(
                f"DecoderConfig.from_hf: unknown options {unknown}; options are {_OPTIONS} "
                "(everything else comes from config.json)"
            )
        arch = _architecture(hf)
        d = dict(_DEFAULTS[arch])
        d.update({k: hf[k] for k in d if k in hf})
        if arch in GEMMA_ARCHITECTURES:
            d.update(gemma_fields(arch, hf, d["num_hidden_layers"]))
            d["rope_scaling"] = rope_scaling_from_hf(hf)
            return cls(**d, architecture=arch, **options)
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(
                f"config.json: hidden_act {hf['hidden_act']!r} is not supported ({arch}); this "
                "decoder implements SwiGLU with silu"
            )
        if hf.get("mlp_bias", False):
            raise ValueError("config.json: mlp_bias true is not supported; only bias-free MLPs")
        attention_bias = arch == "Qwen2ForCausalLM"
        if arch != "Qwen2ForCausalLM" and hf.get("attention_bias", False):
            raise ValueError(
                f"config.json: attention_bias true ({arch}) adds an o_proj bias, which this "
                "decoder does not implement (only Qwen2's q/k/v biases)"
            )
        sliding = _sliding_window(arch, hf, d["num_hidden_layers"])
        d.pop("sliding_window", None)
        moe = None
        if arch in MOE_ARCHITECTURES:
            moe = moe_from_hf(arch, hf, d["intermediate_size"])
        theta = 1e6 if arch == "MixtralForCausalLM" else 10000.0
        return cls(
            **d,
            rope_theta=float(hf.get("rope_theta", theta)),
            rope_scaling=rope_scaling_from_hf(hf),
            rope_freq_factors=hf.get("rope_freq_factors"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            sliding_window=sliding,
            architecture=arch,
            moe=moe,
            **options,
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json (dict) that transformers loads as this model.

        Example:
          >>> DecoderConfig(hidden_size=32, num_attention_heads=4).to_hf()["model_type"]
          'llama'
        """
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": _MODEL_TYPES[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            **rope_scaling_to_hf(
                self.rope_scaling,
                self.rope_freq_factors,
                head_dim=self.head_dim,
                theta=self.rope_theta,
            ),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": jnp.dtype(self.param_dtype).name,
        }
        if self.architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
            out["attention_bias"] = False
        if self.architecture in ("MistralForCausalLM", "MixtralForCausalLM"):
            out["sliding_window"] = self.sliding_window
        if self.architecture == "Qwen3MoeForCausalLM":
            out["use_sliding_window"] = self.sliding_window is not None
            out["sliding_window"] = self.sliding_window
        if self.moe is not None:
            out.update(self.moe.to_hf())
        if self.architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
            out["use_sliding_window"] = self.sliding_window is not None
            out["sliding_window"] = self.sliding_window
            out["max_window_layers"] = 0  # every layer slides, as this config says
        if self.gemma:
            del out["hidden_act"]
            out.update(gemma_to_hf(self))
        return out


def _unsupported(arch: Any) -> str:
    return (
        f"architecture {arch!r} is not supported by jlora's decoder; supported: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _architecture(hf: Mapping[str, Any]) -> str:
    archs = hf.get("architectures")
    if archs:
        if len(archs) != 1 or archs[0] not in _DEFAULTS:
            raise ValueError(f"config.json: {_unsupported(archs[0] if len(archs) == 1 else archs)}")
        return str(archs[0])
    by_type = {v: k for k, v in _MODEL_TYPES.items()}
    if hf.get("model_type") in by_type:
        return by_type[hf["model_type"]]
    raise ValueError(
        f"config.json: neither 'architectures' nor a known 'model_type' (found "
        f"{hf.get('model_type')!r}); {_unsupported(None)}"
    )


def _sliding_window(arch: str, hf: Mapping[str, Any], layers: int) -> int | None:
    if arch == "MistralForCausalLM":
        return hf.get("sliding_window", 4096)
    if arch == "MixtralForCausalLM":
        return hf.get("sliding_window")
    if arch == "Qwen3MoeForCausalLM":  # one window for every layer when on
        return int(hf.get("sliding_window", 4096)) if hf.get("use_sliding_window") else None
    if arch not in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") or not hf.get("use_sliding_window"):
        return None
    window = hf.get("sliding_window", 4096)
    types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and i >= hf.get("max_window_layers", 28)
        else "full_attention"
        for i in range(layers)
    ]  # fmt: skip
    if all(t == "full_attention" for t in types):
        return None
    if all(t == "sliding_attention" for t in types):
        return int(window)
    raise ValueError(
        f"config.json: sliding window on some layers only ({types.count('sliding_attention')} "
        f"of {layers}, max_window_layers {hf.get('max_window_layers', 28)}) is not supported; "
        "this decoder slides on all layers or none"
    )


def _heads(c: DecoderConfig) -> tuple[int, int, int]:
    """``(heads, kv heads, head_dim)``; ``__post_init__`` has filled the optional ones."""
    return c.num_attention_heads, cast(int, c.num_key_value_heads), cast(int, c.head_dim)


def init_cache(
    config: DecoderConfig, batch: int, max_len: int, dtype: Any = None
) -> dict[str, jax.Array]:
    """An empty key/value cache: ``{"k", "v"}`` of shape ``[L, batch, max_len, H_kv, hd]``.

    The layer axis comes first so the cache is scanned with the stacked layers. Keys are
    stored after the rotation, so a slot's entry never changes once written.

    Args:
      config: the model's config.
      batch: rows decoded together.
      max_len: slots per row (prompt plus generated tokens).
      dtype: storage dtype; defaults to ``config.dtype``.

    Returns:
      A dict of zero arrays.

    Example:
      >>> c = DecoderConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
      ...                   num_hidden_layers=3)
      >>> init_cache(c, batch=2, max_len=16)["k"].shape
      (3, 2, 16, 2, 8)
    """
    _, kv, hd = _heads(config)
    shape = (config.num_hidden_layers, batch, max_len, kv, hd)
    dtype = config.dtype if dtype is None else dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


class RMSNorm(nn.Module):
    """``scale · x / sqrt(mean(x²) + eps)``, normalised in float32 as transformers does.

    With ``offset`` (Gemma): ``(1 + scale) · ...``, all in float32, ``scale`` initialised to 0.
    """

    eps: float
    dtype: Any
    param_dtype: Any
    offset: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises over the last axis."""
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        # transformers casts back to the input dtype before multiplying by the weight
        return scale.astype(self.dtype) * normed.astype(self.dtype)


def _dense(c: DecoderConfig, features: int, name: str, bias: bool = False) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


class _Attention(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: MaskSpec,
        kind: jax.Array,
        layer_cache: dict[str, jax.Array] | None,
        cache_index: jax.Array | None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        c = self.config
        b, t, _ = x.shape
        h, kv, hd = _heads(c)
        q = _dense(c, h * hd, "q_proj", c.attention_bias)(x).reshape(b, t, h, hd)
        k = _dense(c, kv * hd, "k_proj", c.attention_bias)(x).reshape(b, t, kv, hd)
        v = _dense(c, kv * hd, "v_proj", c.attention_bias)(x).reshape(b, t, kv, hd)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, c.gemma, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, c.gemma, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_cache = None
        if layer_cache is not None:
            zero = jnp.zeros((), jnp.int32)
            start = (zero, jnp.asarray(cache_index, jnp.int32), zero, zero)
            ck = jax.lax.dynamic_update_slice(
                layer_cache["k"], k.astype(layer_cache["k"].dtype), start
            )
            cv = jax.lax.dynamic_update_slice(
                layer_cache["v"], v.astype(layer_cache["v"].dtype), start
            )
            new_cache = {"k": ck, "v": cv}
            k, v = ck.astype(c.dtype), cv.astype(c.dtype)
        scalar = hd if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar
        out = attend_per_kind(
            q,
            k,
            v,
            mask,
            kind=kind,
            windows=[w for w, _, _ in layer_kinds(c)[0]],
            implementation=c.attention,
            scale=scalar**-0.5,
            softcap=c.attn_logit_softcapping,
            block=c.attention_block,
        )
        return _dense(c, c.hidden_size, "o_proj")(out.reshape(b, t, h * hd)), new_cache


class _MLP(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = _dense(c, c.intermediate_size, "gate_proj")(x)
        up = _dense(c, c.intermediate_size, "up_proj")(x)
        if c.hidden_activation == "silu":
            act = nn.silu(gate)
        else:
            act = nn.gelu(gate, approximate=HIDDEN_ACTIVATIONS[c.hidden_activation])
        return _dense(c, c.hidden_size, "down_proj")(act * up)


class _Layer(nn.Module):
    """One pre-norm decoder layer; the scan body (carry ``x``, per-layer cache slice and kind).

    ``kind`` indexes the first axis of ``cos``/``sin`` and picks the window: this layer's
    rotary table and window (:func:`jlora.models.gemma.layer_kinds`); ``mask`` is the
    :class:`jlora.models.attention.MaskSpec` every layer shares.
    """

    config: DecoderConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        layer_cache: dict[str, jax.Array] | None,
        kind: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: MaskSpec,
        cache_index: jax.Array | None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        c = self.config
        norm = functools.partial(RMSNorm, c.rms_norm_eps, c.dtype, c.param_dtype, c.gemma)
        cos, sin = cos[kind], sin[kind]
        attn, new_cache = _Attention(c, name="self_attn")(
            norm(name="input_layernorm")(x), cos, sin, mask, kind, layer_cache, cache_index
        )
        if c.gemma:
            x = x + norm(name="post_attention_layernorm")(attn)
            h = _MLP(c, name="mlp")(norm(name="pre_feedforward_layernorm")(x))
            return x + norm(name="post_feedforward_layernorm")(h), new_cache
        x = x + attn
        h = norm(name="post_attention_layernorm")(x)
        if c.moe is None:
            return x + _MLP(c, name="mlp")(h), new_cache
        return x + SparseMoe(c.moe, c.dtype, c.param_dtype, name=c.moe.block)(h), new_cache


class _Model(nn.Module):
    """HF's ``model``: embeddings, the stacked layers and the final norm."""

    config: DecoderConfig

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            embedding_init=nn.initializers.normal(0.02),
        )
        layer: Any = _Layer
        if c.remat != "none":  # under nn.scan, so CSE cannot undo it: prevent_cse=False
            policy = checkpoint_policy(remat_name(c.remat))
            layer = nn.remat(_Layer, prevent_cse=False, policy=policy)
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0, "intermediates": 0},  # MoE router logits per layer
            split_rngs={"params": True},
            in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_hidden_layers,
            # a fully unrolled scan lowers to straight-line code, with the same stacked params
            unroll=1 if c.scan_layers else c.num_hidden_layers,
        )(c)
        self.norm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, c.gemma)

    def __call__(
        self,
        tokens: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: MaskSpec,
        cache: dict[str, jax.Array] | None,
        cache_index: jax.Array | None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        x = self.embed_tokens(tokens)
        if self.config.gemma:  # transformers scales in the activations' dtype
            x = x * jnp.asarray(self.config.hidden_size**0.5, x.dtype)
        kind = jnp.asarray(layer_kinds(self.config)[1])
        x, new_cache = self.layers(x, cache, kind, cos, sin, mask, cache_index)
        return self.norm(x), new_cache


class Decoder(nn.Module):
    r"""A Llama-family causal LM (HF ``*ForCausalLM``) in Flax Linen, with HF parameter names.

    ``__call__(tokens, positions=None, *, segment_ids=None, cache=None, cache_index=None,
    kv_mask=None)``:

    - ``tokens`` int ``[B, T]``; ``positions`` int ``[B, T]`` rotary positions, default
      ``arange(T)`` per row (plus ``cache_index`` with a cache).
    - Without ``cache``: causal attention over the T tokens. ``segment_ids`` ``[B, T]`` (packed
      rows) stop attention across segments (a query sees keys with an equal id; no id is
      special, so padding given its own id, e.g. 0, is seen only by padding); give
      ``positions`` that restart per segment. ``kv_mask`` ``[B, T]`` hides keys. Returns
      logits ``[B, T, V]`` float32.
    - With ``cache`` (:func:`init_cache`, ``S`` slots): the T tokens' keys and values are
      written at slots ``cache_index .. cache_index+T-1`` (``cache_index`` a scalar, may be
      traced), and the query at slot ``cache_index+t`` sees slots ``s <= cache_index+t`` with
      ``kv_mask[b, s]`` true (``[B, S]``, default all true; false for left padding). Returns
      ``(logits, new_cache)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> c = DecoderConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
      ...                   num_hidden_layers=2, num_attention_heads=2)
      >>> tokens = jnp.zeros((1, 4), jnp.int32)
      >>> params = Decoder(c).init(jax.random.key(0), tokens)["params"]
      >>> params["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape
      (2, 16, 16)
      >>> Decoder(c).apply({"params": params}, tokens).shape
      (1, 4, 50)
    """

    config: DecoderConfig

    def setup(self) -> None:
        """Declares ``model`` and, unless the embeddings are tied, ``lm_head``."""
        c = self.config
        self.model = _Model(c)
        if not c.tie_word_embeddings:
            self.lm_head = _dense(c, c.vocab_size, "lm_head")

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        cache: dict[str, jax.Array] | None = None,
        cache_index: jax.Array | int | None = None,
        kv_mask: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Next-token logits for ``tokens`` (and the updated cache when one is given).

        With ``return_hidden``, the final-normed hidden states ``[B, T, H]`` (in ``dtype``)
        instead of the logits, for a head run in chunks (:mod:`jlora.models.lm_head`).

        Raises:
          ValueError: for ``tokens`` not 2-D, ``positions``/``segment_ids``/``kv_mask`` of
            the wrong shape, a cache without ``cache_index`` (or the reverse), a cache that
            does not fit the config or batch, or ``segment_ids`` with a cache.
        """
        c = self.config
        _check_inputs(c, tokens, positions, segment_ids, cache, cache_index, kv_mask)
        b, t = tokens.shape
        positions_given = positions
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            if cache is not None:
                positions = positions + jnp.asarray(cache_index, jnp.int32)
        # dynamic/longrope rope: transformers' length max(position_ids) + 1, static when known
        seq_len = t if positions_given is None and cache is None else jnp.max(positions) + 1
        index = None if cache is None else jnp.asarray(cache_index, jnp.int32)
        # one rotary table per layer kind, stacked; each layer picks its own (and its window)
        tables = []
        for _, theta, scaling in layer_kinds(c)[0]:
            inv_freq, factor = rope_inv_freq(
                _heads(c)[2],
                theta,
                scaling,
                max_position_embeddings=c.max_position_embeddings,
                seq_len=seq_len,
                freq_factors=c.rope_freq_factors,
            )
            tables.append(rope_cos_sin(positions, inv_freq, factor, c.dtype))
        mask = MaskSpec(index, segment_ids, None if kv_mask is None else jnp.asarray(kv_mask, bool))
        cos, sin = jnp.stack([a for a, _ in tables]), jnp.stack([z for _, z in tables])
        x, new_cache = self.model(tokens, cos, sin, mask, cache, index)
        if return_hidden:
            return x if cache is None else (x, cast(dict[str, jax.Array], new_cache))
        if c.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x)
        logits = logits.astype(jnp.float32)
        if c.final_logit_softcapping is not None:
            logits = jnp.tanh(logits / c.final_logit_softcapping) * c.final_logit_softcapping
        if cache is None:
            return logits
        return logits, cast(dict[str, jax.Array], new_cache)


def _check_inputs(
    c: DecoderConfig,
    tokens: Any,
    positions: Any,
    segment_ids: Any,
    cache: Any,
    cache_index: Any,
    kv_mask: Any,
) -> int | None:
    shape = tuple(getattr(tokens, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"Decoder: tokens must be [batch, seq] int; got shape {shape}")
    for name, value in (("positions", positions), ("segment_ids", segment_ids)):
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(
                f"Decoder: {name} must have the tokens' shape {shape}; got {tuple(value.shape)}"
            )
    if (cache is None) != (cache_index is None):
        raise ValueError(
            "Decoder: cache and cache_index go together (cache_index is the first slot the new "
            f"tokens are written to); got cache {'None' if cache is None else 'given'} and "
            f"cache_index {cache_index!r}"
        )
    if cache is None:
        if kv_mask is not None and tuple(kv_mask.shape) != shape:
            raise ValueError(
                f"Decoder: without a cache, kv_mask must be [batch, seq] = {shape}; got "
                f"{tuple(kv_mask.shape)}"
            )
        return None
    if segment_ids is not None:
        raise ValueError(
            "Decoder: segment_ids (packed rows) cannot be used with a cache; decode one "
            "sequence per row and mark padding with kv_mask"
        )
    expected = (c.num_hidden_layers, shape[0], None, c.num_key_value_heads, c.head_dim)
    for key in ("k", "v"):
        found = tuple(getattr(cache.get(key) if isinstance(cache, dict) else None, "shape", ()))
        if len(found) != 5 or any(
            e is not None and e != f for e, f in zip(expected, found, strict=True)
        ):
            raise ValueError(
                f"Decoder: cache[{key!r}] has shape {found}; expected [layers, batch, max_len, "
                f"kv_heads, head_dim] = {expected} (None: any). Make it with init_cache(config, "
                f"batch={shape[0]}, max_len=...)"
            )
    cache_len = int(cache["k"].shape[2])
    if kv_mask is not None and tuple(kv_mask.shape) != (shape[0], cache_len):
        raise ValueError(
            f"Decoder: with a cache, kv_mask must be [batch, max_len] = {(shape[0], cache_len)}; "
            f"got {tuple(kv_mask.shape)}"
        )
    return cache_len


def causal_lm_loss(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Mean cross-entropy of ``targets`` under ``logits`` over the tokens where ``mask`` is true.

    ``logits[b, t]`` predicts ``targets[b, t]`` (shift targets yourself); with no mask, every
    token counts. A mask with no true entry gives 0.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(causal_lm_loss(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32))), 4)
      1.3863
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if mask is None:
        return jnp.mean(nll)
    weights = jnp.asarray(mask, jnp.float32)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


#: :class:`Decoder` -> transformers ``*ForCausalLM``, for ``jlora.export_peft`` /
#: ``jlora.import_peft``: ``model/layers/self_attn/q_proj/kernel`` is
#: ``model.layers.{i}.self_attn.q_proj`` for every layer ``i`` of the stack, plus ``lm_head`` and
#: ``model.embed_tokens``. Its ``axis_rules`` equal :data:`DECODER_AXIS_RULES`. Also reachable as
#: ``jlora.peft.HF_DECODER`` (its name before it moved here).
PEFT_MAPPING = PeftMapping(
    "hf-decoder",
    (
        ModuleRule(  # a mixture's experts: model.layers.{i}.mlp.experts.{e}.gate_proj
            r"(?:.*/)?model/layers/(.*)/experts/(.*)/kernel",
            r"model.layers.{layer}.\1.experts.{expert}.\2",
            axes=("stack", "stack", "in", "out"),
        ),
        ModuleRule(
            r"(?:.*/)?model/layers/(.*)/kernel",
            r"model.layers.{layer}.\1",
            axes=("stack", "in", "out"),
        ),
        ModuleRule(r"(?:.*/)?lm_head/kernel", "lm_head"),
        ModuleRule(r"(?:.*/)?model/embed_tokens/embedding", "model.embed_tokens"),
    ),
    task_type="CAUSAL_LM",
)
