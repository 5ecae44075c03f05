"""GGUF checkpoints (llama.cpp's file format) as a Hugging Face config and HF-named tensors.

Design note: this module owns the whole GGUF -> Hugging Face mapping, in one place: metadata
keys (``llama.embedding_length`` -> ``hidden_size``), tensor names (``blk.3.attn_q.weight`` ->
``model.layers.3.self_attn.q_proj.weight``), layout (GGUF lists dimensions innermost first;
once ``gguf`` reads them as numpy they are HF's ``(out, in)``) and llama.cpp's reordering of
the q/k rows and Gemma's norm weights stored as ``1 + w``, both undone here so that every
tensor equals the Hugging Face weight.
Tensors are dequantised one at a time with ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import dequantize

#: ``general.architecture`` -> (HF ``architectures`` entry, ``model_type``).
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}
#: Tensor types that ``gguf.quants.dequantize`` turns into float32.
SUPPORTED_TYPES = tuple(
    GGMLQuantizationType[name]
    for name in ("F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K".split())
)
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma's four norms per layer; "ffn_norm" is the norm before the MLP there too
_GEMMA_LAYER_NAMES = _LAYER_NAMES | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Gemma 3's (Gemma 2 has no q/k norms: the last two only).
_GEMMA_REQUIRED_LAYER = (
    "self_attn.q_norm",
    "self_attn.k_norm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_REQUIRED_LAYER = (
    "input_layernorm",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "post_attention_layernorm",
    "gate_proj",
    "up_proj",
    "down_proj",
)


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """An opened GGUF file: its HF config, raw metadata and where each HF tensor lives.

    Attributes:
      path: the file.
      config: what the equivalent Hugging Face model's ``config.json`` holds, plus
        ``rope_freq_factors`` (Llama 3.1/3.2's ``rope_freqs.weight``, which llama.cpp's
        converter writes instead of their ``llama3`` ``rope_scaling``) when the file has them.
      metadata: every GGUF key -> its value (str, int, float, bool or a list of them).
      shapes: HF tensor name -> HF shape, in file order.
    """

    path: str
    config: dict[str, Any]
    metadata: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    _reader: GGUFReader = dataclasses.field(repr=False)
    _tensors: dict[str, ReaderTensor] = dataclasses.field(repr=False)


def _value(field: Any) -> Any:
    value = field.contents()
    if field.types[0] == GGUFValueType.FLOAT32:
        # float32 1e-5 is 9.99999974e-06 as a double; HF configs hold the decimal the user wrote
        value = float(str(np.float32(value)))
    return value


_ROPE_FREQS = "rope_freqs.weight"


def _rope_freqs(path: str, tensor: ReaderTensor, config: dict[str, Any]) -> list[float]:
    """llama.cpp's per-pair rotary divisors: its converter's ``llama3`` factors (Llama 3.1+)."""
    d = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factors = np.zeros(0, np.float32)
    if tensor.tensor_type in SUPPORTED_TYPES:
        factors = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).ravel()
    if factors.shape != (d // 2,) or not np.all(np.isfinite(factors) & (factors > 0)):
        raise ValueError(
            f"GGUF file {path!r}: tensor {_ROPE_FREQS!r} ({tensor.tensor_type.name}, "
            f"{int(np.prod(tensor.shape))} values) should hold {d // 2} positive float rotary "
            f"divisors, one per pair of head_dim {d}; re-convert the model with llama.cpp"
        )
    return [float(f) for f in factors]


def _config(path: str, meta: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"GGUF file {path!r} has general.architecture={arch!r}; jlora reads "
            f"{sorted(ARCHITECTURES)}. Convert another model family with its Hugging Face loader"
        )

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise ValueError(
                f"GGUF file {path!r} lacks metadata key {arch}.{key!r}, which a {arch} model "
                "needs; re-convert it with a current llama.cpp convert_hf_to_gguf.py"
            )
        return meta[f"{arch}.{key}"]

    hf_class, model_type = ARCHITECTURES[arch]
    # llama.cpp files Mistral models under "llama"; transformers tells them apart by name
    if arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        hf_class, model_type = "MistralForCausalLM", "mistral"
    heads = need("attention.head_count")
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    for name, count in (("head_count", heads), ("head_count_kv", kv_heads)):
        if isinstance(count, list):
            if len(set(count)) != 1:
                raise ValueError(
                    f"GGUF file {path!r}: {arch}.attention.{name} varies per layer ({count}); "
                    "jlora's decoders need one count for all layers"
                )
            count = count[0]
        if name == "head_count":
            heads = count
        else:
            kv_heads = count
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size", len(tokens) if tokens else None)
    if vocab is None and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[1])
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": need("embedding_length"),
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": need("context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
    }
    head_dim = meta.get(f"{arch}.attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = meta.get(f"{arch}.rope.dimension_count")
    if head_dim is not None:
        config["head_dim"] = head_dim
    if arch != "qwen2":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling in ("linear", "yarn"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": need("rope.scaling.factor")}
        if f"{arch}.rope.scaling.original_context_length" in meta:
            original = meta[f"{arch}.rope.scaling.original_context_length"]
            config["rope_scaling"]["original_max_position_embeddings"] = original
    elif scaling != "none":
        raise ValueError(
            f"GGUF file {path!r}: {arch}.rope.scaling.type={scaling!r}; jlora maps "
            "'none', 'linear' and 'yarn'"
        )
    if arch == "gemma2":
        _gemma2_config(config, meta, need)
    if arch == "gemma3":
        _gemma3_config(config, meta, need)
    if _ROPE_FREQS in tensors:  # divides inv_freq pair by pair, as llama.cpp's rope does
        config["rope_freq_factors"] = _rope_freqs(path, tensors[_ROPE_FREQS], config)
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        if f"tokenizer.ggml.{key}" in meta:
            config[key.replace("padding", "pad")] = meta[f"tokenizer.ggml.{key}"]
    return config


def _gemma2_config(config: dict[str, Any], meta: dict[str, Any], need: Any) -> None:
    """Gemma 2's keys, as llama.cpp runs the file (and transformers' GGUF loader reads it).

    The file stores the window and both soft-caps; llama.cpp fixes the rest: sliding and full
    layers alternate, GeLU-tanh, and queries scaled by ``key_length**-0.5``.
    """
    config.pop("hidden_act")
    config["hidden_activation"] = "gelu_pytorch_tanh"
    config["sliding_window"] = need("attention.sliding_window")
    config["attn_logit_softcapping"] = need("attn_logit_softcapping")
    config["final_logit_softcapping"] = need("final_logit_softcapping")
    config["query_pre_attn_scalar"] = config.get("head_dim", 256)


def _gemma3_config(config: dict[str, Any], meta: dict[str, Any], need: Any) -> None:
    """Gemma 3's keys, as llama.cpp runs the file (and transformers' GGUF loader reads it).

    llama.cpp fixes what the file does not say: every 6th layer global, the others sliding
    with rotary base 10000, GeLU-tanh, and queries scaled by ``key_length**-0.5``.
    """
    config.pop("hidden_act")
    config["hidden_activation"] = "gelu_pytorch_tanh"
    config["sliding_window"] = need("attention.sliding_window")
    config["sliding_window_pattern"] = 6
    config["rope_local_base_freq"] = 10000.0
    config["query_pre_attn_scalar"] = config.get("head_dim", 256)


def _layer_names(arch: str) -> dict[str, str]:
    return _GEMMA_LAYER_NAMES if arch.startswith("gemma") else _LAYER_NAMES


def _hf_name(path: str, name: str, layers: int, arch: str = "llama") -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    names = _layer_names(arch)
    match = _LAYER_RE.fullmatch(name)
    if match and match[2] in names and int(match[1]) < layers:
        return f"model.layers.{match[1]}.{names[match[2]]}.{match[3]}"
    raise ValueError(
        f"GGUF file {path!r} holds tensor {name!r}, which has no Hugging Face counterpart "
        f"jlora knows for a {layers}-layer decoder; known: {sorted(_GLOBAL_NAMES)} and "
        f"blk.<i>.{{{','.join(names)}}}.weight|bias"
    )


def _expected_shape(hf: str, c: dict[str, Any]) -> tuple[int, ...]:
    d, ffn = c["hidden_size"], c["intermediate_size"]
    hd = c.get("head_dim", d // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    part, kind = hf.rsplit(".", 2)[-2:]
    rows = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": d, "gate_proj": ffn}
    rows |= {"up_proj": ffn, "down_proj": d, "q_norm": hd, "k_norm": hd}
    if hf in ("model.embed_tokens.weight", "lm_head.weight"):
        return (c["vocab_size"], d)
    if part in rows and kind == "weight" and part not in ("q_norm", "k_norm"):
        cols = {"o_proj": q, "down_proj": ffn}.get(part, d)
        return (rows[part], cols)
    return (rows.get(part, d),)


def _open(path: str) -> GGUFReader:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as err:
        raise ValueError(
            f"{path!r} is not a readable GGUF file ({type(err).__name__}: {err}); it may be "
            "truncated or another format. Give a .gguf file from llama.cpp's converter"
        ) from None
    return reader


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every metadata key of a GGUF file -> its value; no architecture checks (tokenizers).

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if it is not a readable GGUF file.

    Example:
      >>> import os, tempfile, gguf
      >>> f = os.path.join(tempfile.mkdtemp(), "t.gguf")
      >>> w = gguf.GGUFWriter(f, "gemma2")
      >>> for write in (w.write_header_to_file, w.write_kv_data_to_file, w.close):
      ...     write()
      >>> read_gguf_metadata(f)["general.architecture"]
      'gemma2'
    """
    path = os.fspath(path)
    return {name: _value(field) for name, field in _open(path).fields.items()}


def read_gguf(path: str | os.PathLike[str]) -> GGUFCheckpoint:
    """Opens a GGUF file (memory-mapped): HF config, metadata and tensor shapes, no tensor data.

    Validates everything on entry: architecture, metadata keys, tensor names, tensor types and
    every shape against the config, so that :func:`gguf_tensors` cannot fail half way.

    Args:
      path: a ``.gguf`` file written by llama.cpp's converter or ``gguf.GGUFWriter``.

    Returns:
      A :class:`GGUFCheckpoint`; read its tensors with :func:`gguf_tensors`.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the file is not GGUF or is truncated, its architecture is not one of
        :data:`ARCHITECTURES`, a needed metadata key is missing, a tensor has no HF name, an
        unsupported type or a shape that disagrees with the config, or a tensor is missing.

    Example:
      >>> import os, tempfile, numpy as np, gguf
      >>> f = os.path.join(tempfile.mkdtemp(), "tiny.gguf")
      >>> w = gguf.GGUFWriter(f, "llama")
      >>> for add, v in [(w.add_block_count, 0), (w.add_context_length, 32),
      ...                (w.add_embedding_length, 4), (w.add_feed_forward_length, 8),
      ...                (w.add_head_count, 2), (w.add_layer_norm_rms_eps, 1e-5),
      ...                (w.add_vocab_size, 3)]:
      ...     add(v)
      >>> w.add_tensor("token_embd.weight", np.ones((3, 4), np.float32))
      >>> w.add_tensor("output_norm.weight", np.ones(4, np.float32))
      >>> for write in (w.write_header_to_file, w.write_kv_data_to_file,
      ...               w.write_tensors_to_file, w.close):
      ...     write()
      >>> ckpt = read_gguf(f)
      >>> ckpt.config["architectures"], ckpt.config["tie_word_embeddings"], ckpt.shapes
      (['LlamaForCausalLM'], True, {'model.embed_tokens.weight': (3, 4), 'model.norm.weight': (4,)})
    """
    path = os.fspath(path)
    reader = _open(path)
    meta = {name: _value(field) for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    config = _config(path, meta, tensors)
    by_hf: dict[str, ReaderTensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in tensors.items():
        if name == _ROPE_FREQS:  # read into config['rope_freq_factors']
            continue
        hf = _hf_name(path, name, config["num_hidden_layers"], meta["general.architecture"])
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(
                f"GGUF file {path!r}: tensor {name!r} has type {tensor.tensor_type.name}; jlora "
                f"dequantises {[t.name for t in SUPPORTED_TYPES]}. Re-quantise the file with "
                "llama.cpp's llama-quantize to one of those"
            )
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        if shape != (expected := _expected_shape(hf, config)):
            raise ValueError(
                f"GGUF file {path!r}: tensor {name!r} ({hf}) has shape {shape}, but the "
                f"config's sizes give {expected}; the metadata and tensors disagree"
            )
        by_hf[hf], shapes[hf] = tensor, shape
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(config["num_hidden_layers"]):
        for part in _REQUIRED_LAYER:
            module = "self_attn" if part.endswith("_proj") and part[0] in "qkvo" else "mlp"
            module = "" if "layernorm" in part else f"{module}."
            required.append(f"model.layers.{i}.{module}{part}.weight")
        if meta["general.architecture"].startswith("gemma"):
            parts = _GEMMA_REQUIRED_LAYER[meta["general.architecture"] == "gemma2" and 2 :]
            required += [f"model.layers.{i}.{part}.weight" for part in parts]
    if missing := [hf for hf in required if hf not in by_hf]:
        raise ValueError(
            f"GGUF file {path!r} lacks {len(missing)} tensor(s) a {meta['general.architecture']} "
            f"decoder needs, e.g. {missing[:3]}; the file is incomplete"
        )
    return GGUFCheckpoint(path, config, meta, shapes, reader, by_hf)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's permute(w, n_head, n_head_kv) interleaves each head's two rotary halves;
    # as a view, so the caller's astype makes the only copy
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2)


def gguf_tensor(ckpt: GGUFCheckpoint, name: str, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
    """One tensor under its Hugging Face name, dequantised to ``dtype``, in HF's (out, in) layout.

    llama-architecture files store q_proj/k_proj rows reordered for llama.cpp's rotary
    embedding; they are put back so the result equals the Hugging Face weight.

    Args:
      ckpt: from :func:`read_gguf`.
      name: a key of ``ckpt.shapes``, e.g. ``"model.layers.0.self_attn.q_proj.weight"``.
      dtype: a floating numpy dtype (``np.float32``, ``np.float16``, ``jnp.bfloat16``).

    Raises:
      KeyError: if the file has no tensor ``name``.
      TypeError: if ``dtype`` is not floating.

    Example:
      >>> import os, tempfile, numpy as np, gguf
      >>> f = os.path.join(tempfile.mkdtemp(), "tiny.gguf")
      >>> w = gguf.GGUFWriter(f, "llama")
      >>> for add, v in [(w.add_block_count, 0), (w.add_context_length, 32),
      ...                (w.add_embedding_length, 4), (w.add_feed_forward_length, 8),
      ...                (w.add_head_count, 2), (w.add_layer_norm_rms_eps, 1e-5),
      ...                (w.add_vocab_size, 3)]:
      ...     add(v)
      >>> w.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
      >>> w.add_tensor("output_norm.weight", np.ones(4, np.float32))
      >>> for write in (w.write_header_to_file, w.write_kv_data_to_file,
      ...               w.write_tensors_to_file, w.close):
      ...     write()
      >>> gguf_tensor(read_gguf(f), "model.embed_tokens.weight", np.float16)[1]
      array([4., 5., 6., 7.], dtype=float16)
    """
    if name not in ckpt._tensors:
        raise KeyError(
            f"GGUF file {ckpt.path!r} has no tensor {name!r}; it has e.g. {list(ckpt.shapes)[:4]}"
        )
    if not np.issubdtype(np.dtype(dtype), np.floating) and np.dtype(dtype).name != "bfloat16":
        raise TypeError(f"dtype must be floating (float32, float16, bfloat16), got {dtype!r}")
    tensor = ckpt._tensors[name]
    w = dequantize(tensor.data, tensor.tensor_type)
    arch, config = ckpt.metadata["general.architecture"], ckpt.config
    if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        kv = "k_proj" in name
        w = _unpermute(w, config["num_key_value_heads" if kv else "num_attention_heads"])
    if arch.startswith("gemma") and name.endswith("norm.weight"):
        # llama.cpp's converter stores Gemma's norm weights as 1 + w (its norm multiplies by
        # the weight); transformers' GGUF loader subtracts the 1 again, and so does this
        w = w - np.float32(1.0)
    # np.array copies (never aliases the memory map) into a plain contiguous ndarray
    return np.array(w, dtype=dtype).reshape(ckpt.shapes[name])


def gguf_tensors(
    ckpt: GGUFCheckpoint, dtype: npt.DTypeLike = np.float32
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(hf_name, array)`` per tensor, dequantised one at a time by :func:`gguf_tensor`.

    Example:
      >>> import os, tempfile, numpy as np, gguf
      >>> f = os.path.join(tempfile.mkdtemp(), "tiny.gguf")
      >>> w = gguf.GGUFWriter(f, "llama")
      >>> for add, v in [(w.add_block_count, 0), (w.add_context_length, 32),
      ...                (w.add_embedding_length, 4), (w.add_feed_forward_length, 8),
      ...                (w.add_head_count, 2), (w.add_layer_norm_rms_eps, 1e-5),
      ...                (w.add_vocab_size, 3)]:
      ...     add(v)
      >>> w.add_tensor("token_embd.weight", np.ones((3, 4), np.float32))
      >>> w.add_tensor("output_norm.weight", np.ones(4, np.float32))
      >>> for write in (w.write_header_to_file, w.write_kv_data_to_file,
      ...               w.write_tensors_to_file, w.close):
      ...     write()
      >>> [(n, a.dtype.name) for n, a in gguf_tensors(read_gguf(f))]
      [('model.embed_tokens.weight', 'float32'), ('model.norm.weight', 'float32')]
    """
    for name in ckpt.shapes:
        yield name, gguf_tensor(ckpt, name, dtype)
