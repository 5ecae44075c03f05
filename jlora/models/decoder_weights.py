"""Hugging Face tensors to :class:`jlora.models.decoder.Decoder` parameters and back.

Design note: :func:`param_layout` is the one table of the correspondence. HF ``X.weight`` of a
``Linear`` ``(out, in)`` becomes ``X/kernel`` ``(in, out)``; norms' ``weight`` become ``scale``;
``model.embed_tokens.weight`` is ``model/embed_tokens/embedding`` as it is; the tensors of
``model.layers.{i}`` fill index ``i`` of one stacked ``model/layers/...`` leaf, and a mixture's
``model.layers.{i}.mlp.experts.{e}`` index ``(i, e)`` of an ``[L, E, ...]`` leaf. Conversion is
numpy only and streams: each finished leaf is handed to ``place`` (e.g. ``jax.device_put``
with a sharding) and its host buffer dropped, so the host holds about one copy of the weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._paths import path_str
from jlora.models.decoder import DecoderConfig

__all__ = ["LayoutEntry", "hf_to_params", "param_layout", "params_to_hf"]

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(.+)")
_BUFFERS = re.compile(r"(.*\.)?rotary_emb\.inv_freq")


@dataclasses.dataclass(frozen=True)
class LayoutEntry:
    """Where one HF tensor lives in the parameter tree.

    Attributes:
      hf: the HF name; for a layer tensor the part after ``model.layers.{i}.``.
      path: keys of the leaf in the ``"params"`` collection.
      shape: the leaf's shape (layer tensors: ``[L, ...]``).
      transpose: the HF tensor is the transpose of one layer's slice (``Linear`` weights).
      stacked: a layer tensor, one per decoder layer.
      experts: for a mixture's expert tensor, the number of experts (``hf`` then holds
        ``{expert}``, and ``shape`` is ``[L, E, ...]``); 0 otherwise.
    """

    hf: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    transpose: bool
    stacked: bool
    experts: int = 0

    def hf_shape(self) -> tuple[int, ...]:
        """The shape of the HF tensor (one layer's, transposed back for ``Linear``)."""
        shape = self.shape[int(self.stacked) + int(self.experts > 0) :]
        return shape[::-1] if self.transpose else shape

    def hf_name(self, layer: int | None, expert: int | None = None) -> str:
        """The full HF name, for ``layer`` when stacked (and ``expert`` for an expert's)."""
        hf = self.hf if expert is None else self.hf.replace("{expert}", str(expert))
        return f"model.layers.{layer}.{hf}" if self.stacked else hf

    def names(self, layers: int) -> list[tuple[str, tuple[int, ...]]]:
        """Every HF tensor of this entry, with its index into the leaf (``()`` if unstacked)."""
        if not self.stacked:
            return [(self.hf, ())]
        if not self.experts:
            return [(self.hf_name(i), (i,)) for i in range(layers)]
        return [(self.hf_name(i, e), (i, e)) for i in range(layers) for e in range(self.experts)]


def param_layout(config: DecoderConfig) -> list[LayoutEntry]:
    """Every parameter of the decoder: HF name, tree path, shape, and how they correspond.

    Args:
      config: the model config.

    Returns:
      Entries in HF ``state_dict`` order (embeddings, one layer's tensors, final norm, head).

    Example:
      >>> from jlora.models.decoder import DecoderConfig
      >>> c = DecoderConfig(vocab_size=10, hidden_size=8, intermediate_size=16,
      ...                   num_hidden_layers=2, num_attention_heads=2)
      >>> e = param_layout(c)[1]
      >>> e.hf, "/".join(e.path), e.shape, e.hf_shape()
      ('self_attn.q_proj.weight', 'model/layers/self_attn/q_proj/kernel', (2, 8, 8), (8, 8))
    """
    c = config
    n, d, f, v = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    hd = c.head_dim or 0
    q, kv = c.num_attention_heads * hd, (c.num_key_value_heads or 0) * hd
    out = [
        LayoutEntry(
            "model.embed_tokens.weight",
            ("model", "embed_tokens", "embedding"),
            (v, d),
            False,
            False,
        )
    ]

    def layer(hf: str, shape: tuple[int, ...]) -> None:
        module, kind = hf.rsplit(".", 1)
        linear = kind == "weight" and module.endswith("_proj")
        leaf = "kernel" if linear else ("bias" if kind == "bias" else "scale")
        path = ("model", "layers", *module.split("."), leaf)
        out.append(LayoutEntry(hf, path, (n, *shape), linear, True))

    for name, width in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        layer(f"self_attn.{name}.weight", (d, width))
        if c.attention_bias:
            layer(f"self_attn.{name}.bias", (width,))
    layer("self_attn.o_proj.weight", (q, d))
    if c.qk_norm:
        layer("self_attn.q_norm.weight", (hd,))
        layer("self_attn.k_norm.weight", (hd,))
    if c.moe is None:
        layer("mlp.gate_proj.weight", (d, f))
        layer("mlp.up_proj.weight", (d, f))
        layer("mlp.down_proj.weight", (f, d))
    else:  # the router, then every expert's projections stacked on an expert axis
        m = c.moe
        router = ("model", "layers", m.block, "gate", "kernel")
        out.append(LayoutEntry(f"{m.block}.gate.weight", router, (n, d, m.num_experts), True, True))
        for proj, shape in m.expert_shapes(d).items():
            path = ("model", "layers", m.block, "experts", proj, "kernel")
            hf = f"{m.block}.experts.{{expert}}.{proj}.weight"
            out.append(LayoutEntry(hf, path, (n, m.num_experts, *shape), True, True, m.num_experts))
    layer("input_layernorm.weight", (d,))
    layer("post_attention_layernorm.weight", (d,))
    if c.gemma:
        layer("pre_feedforward_layernorm.weight", (d,))
        layer("post_feedforward_layernorm.weight", (d,))
    out.append(LayoutEntry("model.norm.weight", ("model", "norm", "scale"), (d,), False, False))
    if not c.tie_word_embeddings:
        out.append(LayoutEntry("lm_head.weight", ("lm_head", "kernel"), (d, v), True, False))
    return out


def _digest(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).view(np.uint8).data).hexdigest()


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def hf_to_params(
    config: DecoderConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    place: Callable[[str, np.ndarray], jax.Array] | None = None,
) -> dict[str, Any]:
    """The ``"params"`` collection from HF-named tensors, consumed one at a time in any order.

    Layer tensors fill preallocated stacked arrays in ``config.param_dtype``; a leaf is passed
    to ``place(path, array)`` as soon as it is complete and its host copy dropped. Buffers such
    as ``rotary_emb.inv_freq`` are skipped; with tied embeddings an ``lm_head.weight`` equal to
    the embedding is accepted and dropped.

    Args:
      config: the model's config.
      tensors: ``(HF name, array)`` pairs (e.g. a ``state_dict`` as numpy, safetensors shards,
        :func:`jlora.models.formats.gguf.gguf_tensors`).
      place: makes the device array of a finished leaf from its ``"a/b/c"`` path and host
        array; default ``jnp.asarray``.

    Returns:
      A nested dict, the tree :class:`~jlora.models.decoder.Decoder` expects as ``"params"``.

    Raises:
      ValueError: for a tensor name that is not part of this model, one given twice, one whose
        shape disagrees with the config, an ``lm_head.weight`` that differs from the tied
        embedding, or tensors missing at the end (all listed).

    Example:
      >>> import numpy as np
      >>> from jlora.models.decoder import DecoderConfig
      >>> c = DecoderConfig(vocab_size=10, hidden_size=8, intermediate_size=16,
      ...                   num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True)
      >>> sd = {e.hf_name(0): np.ones(e.hf_shape(), np.float32) for e in param_layout(c)}
      >>> p = hf_to_params(c, sd.items())
      >>> p["model"]["layers"]["mlp"]["down_proj"]["kernel"].shape
      (1, 16, 8)
    """
    if place is None:
        place = _to_device
    dtype = np.dtype(jnp.dtype(config.param_dtype))
    layers = config.num_hidden_layers
    entries = param_layout(config)
    by_layer = {e.hf: e for e in entries if e.stacked}
    by_name = {e.hf: e for e in entries if not e.stacked}
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    seen: dict[tuple[str, ...], set[tuple[int, ...]]] = {e.path: set() for e in entries}
    params: dict[str, Any] = {}
    tied_head: str | None = None  # digest of a tied lm_head.weight, checked against the embedding
    embed_digest: str | None = None

    def finish(entry: LayoutEntry, array: np.ndarray) -> None:
        _set(params, entry.path, place("/".join(entry.path), array))

    for name, tensor in tensors:
        layer: int | None = None
        index: tuple[int, ...] = ()
        match = _LAYER.fullmatch(name)
        expert = None if match is None else _EXPERT.fullmatch(match.group(2))
        key = None if match is None else match.group(2)
        if expert is not None:  # mlp.experts.3.gate_proj.weight -> mlp.experts.{expert}...
            key = f"{expert.group(1)}.{{expert}}.{expert.group(3)}"
        if match is not None and key in by_layer:
            entry, layer = by_layer[key], int(match.group(1))
            index = (layer,)
            if expert is not None:
                index = (layer, int(expert.group(2)))
                if index[1] >= entry.experts:
                    raise ValueError(
                        f"tensor {name!r} is for expert {index[1]}, but the config has "
                        f"{entry.experts} experts; the checkpoint and config.json disagree"
                    )
            if layer >= layers:
                raise ValueError(
                    f"tensor {name!r} is for layer {layer}, but the config has "
                    f"num_hidden_layers={layers}; the checkpoint and config.json disagree"
                )
        elif name in by_name:
            entry = by_name[name]
        elif name == "lm_head.weight" and config.tie_word_embeddings:
            tied_head = _digest(np.asarray(tensor).astype(dtype))
            if embed_digest is not None and tied_head != embed_digest:
                raise ValueError(_untied_message())
            continue
        elif _BUFFERS.fullmatch(name):
            continue  # recomputed from the config, not a parameter
        else:
            raise ValueError(
                f"tensor {name!r} is not a parameter of {config.architecture} with this config "
                f"(e.g. {entries[1].hf_name(0)!r}); is the checkpoint another architecture, or "
                "does config.json lack a feature it uses (attention_bias, qk norm, untied "
                "embeddings)?"
            )
        array = np.asarray(tensor)
        if tuple(array.shape) != entry.hf_shape():
            raise ValueError(
                f"tensor {name!r} has shape {tuple(array.shape)}, expected {entry.hf_shape()} "
                f"from the config ({'/'.join(entry.path)} {entry.shape}); the checkpoint and its "
                "config.json disagree"
            )
        if index in seen[entry.path]:
            raise ValueError(f"tensor {name!r} is given twice; each tensor must appear once")
        seen[entry.path].add(index)
        value = (array.T if entry.transpose else array).astype(dtype)
        if not entry.stacked:
            if entry.hf == "model.embed_tokens.weight" and config.tie_word_embeddings:
                embed_digest = _digest(value)
                if tied_head is not None and tied_head != embed_digest:
                    raise ValueError(_untied_message())
            finish(entry, value)
            continue
        if entry.path not in buffers:
            buffers[entry.path] = np.empty(entry.shape, dtype)
        buffers[entry.path][index] = value
        del value, array
        if len(seen[entry.path]) == layers * max(entry.experts, 1):
            finish(entry, buffers.pop(entry.path))

    missing = [
        name for e in entries for name, index in e.names(layers) if index not in seen[e.path]
    ]
    if missing:
        shown = ", ".join(missing[:8]) + (
            f", ... ({len(missing)} in all)" if len(missing) > 8 else ""
        )
        raise ValueError(
            f"tensors missing for {config.architecture} with this config: {shown}; is the "
            "checkpoint incomplete (a shard left out) or made for another config?"
        )
    return params


def _to_device(path: str, array: np.ndarray) -> jax.Array:
    return jnp.asarray(array)


def _untied_message() -> str:
    return (
        "lm_head.weight differs from model.embed_tokens.weight, but the config ties them "
        "(tie_word_embeddings=True); set tie_word_embeddings to false in config.json"
    )


def params_to_hf(config: DecoderConfig, params: Any) -> Iterator[tuple[str, np.ndarray]]:
    """HF-named tensors in HF layout (what ``save_pretrained`` writes), one layer at a time.

    Values keep the parameters' dtype; each stacked leaf is sliced on its device per layer, so
    only one layer's tensors are on the host at once.

    Args:
      config: the model's config.
      params: the ``"params"`` collection of a base (un-adapted) decoder.

    Yields:
      ``(HF name, numpy array)`` in ``state_dict`` order; no ``lm_head.weight`` when tied.

    Raises:
      ValueError: if a leaf is missing, has the wrong shape, or is not a decoder parameter
        (e.g. LoRA factors: merge them first with ``jlora.merge_params``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jlora.models.decoder import Decoder, DecoderConfig
      >>> c = DecoderConfig(vocab_size=10, hidden_size=8, intermediate_size=16,
      ...                   num_hidden_layers=1, num_attention_heads=2)
      >>> p = Decoder(c).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
      >>> next(iter(params_to_hf(c, p)))[0]
      'model.embed_tokens.weight'
    """
    entries = param_layout(config)
    leaves = {path_str(k): x for k, x in jax.tree.flatten_with_path(params)[0]}
    known = {"/".join(e.path) for e in entries}
    extra = sorted(set(leaves) - known)
    if extra:
        raise ValueError(
            f"params_to_hf: leaves {extra[:6]} are not parameters of this decoder (expected "
            "the 'params' collection of a base model); merge adapters first with "
            "jlora.merge_params, and pass params['params'] if the tree is wrapped"
        )
    for e in entries:
        leaf = leaves.get("/".join(e.path))
        found = None if leaf is None else tuple(leaf.shape)
        if found != e.shape:
            raise ValueError(
                f"params_to_hf: leaf {'/'.join(e.path)!r} has shape {found}, expected {e.shape} "
                "from the config; pass the config the params were made with"
            )

    def host(e: LayoutEntry, layer: int | None) -> tuple[str, np.ndarray]:
        leaf = leaves["/".join(e.path)]
        value = np.asarray(jax.device_get(leaf if layer is None else leaf[layer]))
        return e.hf_name(layer), np.ascontiguousarray(value.T if e.transpose else value)

    head = [e for e in entries if not e.stacked]
    yield host(head[0], None)
    experts = [e for e in entries if e.experts]
    for i in range(config.num_hidden_layers):
        for e in entries:
            if e.stacked and not e.experts:
                yield host(e, i)
            if experts and e is experts[-1]:  # HF's order: expert by expert, then projection
                on_host = [np.asarray(jax.device_get(leaves["/".join(x.path)][i])) for x in experts]
                for x in range(experts[0].experts):
                    for entry, layer in zip(experts, on_host, strict=True):
                        yield entry.hf_name(i, x), np.ascontiguousarray(layer[x].T)
    for e in head[1:]:
        yield host(e, None)
