"""Hugging Face checkpoint directories: ``config.json`` and safetensors shards, in and out.

Design note: this module owns the file layout of a Hugging Face model directory and nothing
about any model: ``config.json``; the weights in ``model.safetensors`` or in shards
``model-0000k-of-0000n.safetensors`` listed by ``model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {tensor: shard}}``); the tokenizer and
generation files beside them. Every shard header is read and checked (files present and
complete, index and shards agreeing, shapes as expected) before any tensor data is, so a bad
directory fails before anything is built. Tensors are then read one at a time as numpy arrays,
straight from the file at the offsets the header gives, so at most one tensor is in flight and
``BF16`` comes back as ``ml_dtypes.bfloat16`` on every ``safetensors`` version (its numpy
loader reads ``BF16`` only in recent ones). A directory is written beside its final name and
renamed into place, so a failed save never leaves half a directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
from safetensors import safe_open
from safetensors.numpy import save_file

from jlora._atomic import fsync_dir

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: Tokenizer files of a Hugging Face directory, copied as they are when a model is saved again.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def read_json(path: str, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``what`` says what the file is, for the error message.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if it is not JSON, or not a JSON object.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path!r} holds a JSON {type(data).__name__}, not an object")
    return data


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face model directory.

    Raises:
      FileNotFoundError: if ``directory`` is not a directory or has no ``config.json``.
      ValueError: if ``config.json`` is not a JSON object.

    Example:
      >>> import json, os, tempfile
      >>> d = tempfile.mkdtemp()
      >>> with open(os.path.join(d, "config.json"), "w") as f:
      ...     json.dump({"model_type": "llama"}, f)
      >>> read_config(d)
      {'model_type': 'llama'}
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a directory")
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory!r} has no {CONFIG_FILE}; give a Hugging Face model directory "
            "(save_pretrained's output: config.json and model*.safetensors) or a .gguf file"
        )
    return read_json(path, "model config")


@dataclasses.dataclass(frozen=True)
class _Entry:
    file: str
    offset: int  # from the start of the file
    dtype: np.dtype
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class HFWeights:
    """The checked safetensors weights of a Hugging Face directory; no tensor data read yet.

    Attributes:
      directory: the directory.
      files: the weight files, in the order their tensors are read.
      shapes: tensor name -> shape, grouped by file.
      dtypes: tensor name -> numpy dtype as stored.
    """

    directory: str
    files: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]
    _entries: dict[str, _Entry] = dataclasses.field(repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors as stored."""
        return sum(math.prod(s) * self.dtypes[n].itemsize for n, s in self.shapes.items())


def _header(path: str) -> dict[str, _Entry]:
    try:
        # safetensors checks the header: offsets that overlap or a file that is too short
        with safe_open(path, framework="numpy") as f:
            names = set(f.keys())
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except Exception as err:  # SafetensorError has no stable import path; OSError, JSON
        raise ValueError(
            f"weights file {path!r} is not a complete safetensors file ({err}); it is "
            "truncated or corrupted. Download or save it again"
        ) from None
    entries = {}
    # in file order, so reading streams through the file
    for name in sorted(names, key=lambda k: header[k]["data_offsets"][0]):
        info = header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(
                f"weights file {path!r}: tensor {name!r} has dtype {info['dtype']}; jlora reads "
                f"floating tensors ({', '.join(_DTYPES)})"
            )
        shape = tuple(int(d) for d in info["shape"])
        entries[name] = _Entry(
            path, 8 + n + int(info["data_offsets"][0]), _DTYPES[info["dtype"]], shape
        )
    return entries


def open_weights(directory: str | os.PathLike[str]) -> HFWeights:
    """Finds and checks the weight files of a Hugging Face directory, reading headers only.

    ``model.safetensors.index.json`` when present (every shard it names must exist and be
    complete, and hold every tensor the index gives it), else ``model.safetensors``.

    Raises:
      FileNotFoundError: if there are no weights, or a shard the index names is missing.
      ValueError: if the index is not JSON or lacks ``weight_map``, a file is truncated or not
        safetensors, a tensor is not floating, the index names a tensor its shard lacks, or
        two files hold the same tensor.

    Example:
      >>> import os, tempfile, numpy as np
      >>> from safetensors.numpy import save_file
      >>> d = tempfile.mkdtemp()
      >>> save_file({"w": np.ones((2, 3), np.float16)}, os.path.join(d, "model.safetensors"))
      >>> w = open_weights(d)
      >>> w.shapes, read_tensor(w, "w", np.float32).dtype
      ({'w': (2, 3)}, dtype('float32'))
    """
    directory = os.fspath(directory)
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        index = read_json(index_path, "weights index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise ValueError(
                f"weights index {index_path!r} has no weight_map object (tensor name -> shard "
                "file); the file is damaged"
            )
        files = list(dict.fromkeys(weight_map.values()))
        for name in files:
            if os.path.basename(name) != name or not os.path.isfile(os.path.join(directory, name)):
                raise FileNotFoundError(
                    f"shard {os.path.join(directory, name)!r}, named in {index_path!r}, is "
                    "missing; download the complete checkpoint"
                )
    elif os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
        weight_map, files = None, [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(
            f"{directory!r} has no {WEIGHTS_FILE} or {INDEX_FILE}; jlora reads safetensors "
            "weights only (never pickled pytorch_model.bin)"
        )
    entries: dict[str, _Entry] = {}
    for name in files:
        path = os.path.join(directory, name)
        header = _header(path)
        for tensor, entry in header.items():
            if tensor in entries:
                raise ValueError(
                    f"tensor {tensor!r} is in both {entries[tensor].file!r} and {path!r}; the "
                    "checkpoint is inconsistent"
                )
            entries[tensor] = entry
        if weight_map is not None:
            listed = [t for t, f in weight_map.items() if f == name and t not in header]
            if listed:
                raise ValueError(
                    f"weights index {index_path!r} puts tensor {listed[0]!r} in shard {path!r}, "
                    f"which has no such tensor (it has e.g. {sorted(header)[:3]}); the index "
                    "and shards are from different checkpoints"
                )
    return HFWeights(
        directory,
        tuple(os.path.join(directory, f) for f in files),
        {n: e.shape for n, e in entries.items()},
        {n: e.dtype for n, e in entries.items()},
        entries,
    )


def read_tensor(weights: HFWeights, name: str, dtype: npt.DTypeLike | None = None) -> np.ndarray:
    """One tensor as a fresh numpy array (read from its offset, no memory map), cast to ``dtype``.

    Raises:
      KeyError: if there is no tensor ``name``.
    """
    if name not in weights._entries:
        raise KeyError(
            f"{weights.directory!r} has no tensor {name!r}; it has e.g. {list(weights.shapes)[:4]}"
        )
    e = weights._entries[name]
    count = math.prod(e.shape)
    array = np.fromfile(e.file, dtype=e.dtype, count=count, offset=e.offset).reshape(e.shape)
    return array if dtype is None else array.astype(dtype, copy=False)


def read_tensors(
    weights: HFWeights, dtype: npt.DTypeLike | None = None, skip: Iterable[str] = ()
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(name, array)`` file by file, one tensor at a time, leaving out ``skip``."""
    skipped = set(skip)
    for name in weights.shapes:
        if name not in skipped:
            yield name, read_tensor(weights, name, dtype)


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or ``"2GB"`` (10**9), ``"500MiB"`` (2**20), ...

    Raises:
      ValueError: if it is not a positive size.

    Example:
      >>> parse_size("2GB"), parse_size("1.5KiB"), parse_size(10)
      (2000000000, 1536, 10)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.fullmatch(str(size))
        if match is None:
            raise ValueError(f"max_shard_size {size!r} is not a size; write e.g. 2GB or 500MiB")
        value = int(float(match[1]) * _UNITS[(match[2] or "").upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive; got {size!r}")
    return value


def _shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def _write_shards(tmp: str, tensors: Iterable[tuple[str, np.ndarray]], limit: int) -> None:
    # Shards are written as they fill (their final names need the count, so they are renamed at
    # the end); one shard's tensors are in memory at a time.
    written: list[tuple[str, list[str]]] = []
    shard: dict[str, np.ndarray] = {}
    size = total = 0

    def flush() -> None:
        name = f".shard-{len(written)}"
        save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
        written.append((name, list(shard)))
        shard.clear()

    for name, array in tensors:
        array = np.ascontiguousarray(array)
        if shard and size + array.nbytes > limit:
            flush()
            size = 0
        shard[name] = array
        size += array.nbytes
        total += array.nbytes
    if shard or not written:
        flush()
    if len(written) == 1:
        os.rename(os.path.join(tmp, written[0][0]), os.path.join(tmp, WEIGHTS_FILE))
        return
    weight_map: dict[str, str] = {}
    for k, (name, names) in enumerate(written, 1):
        final = _shard_name(k, len(written))
        os.rename(os.path.join(tmp, name), os.path.join(tmp, final))
        weight_map |= dict.fromkeys(names, final)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


def write_hf_dir(
    path: str | os.PathLike[str],
    config: Mapping[str, Any],
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    files: Mapping[str, bytes] | None = None,
    max_shard_size: int | str = "2GB",
) -> None:
    """Writes a Hugging Face directory: ``config.json``, safetensors weights and ``files``.

    Tensors are consumed one at a time and written as shards of at most ``max_shard_size``
    bytes (a bigger tensor gets a shard of its own): ``model.safetensors`` if one shard is
    enough, else ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json``, as
    transformers writes them (safetensors metadata ``{"format": "pt"}``).

    The directory is built beside ``path`` and renamed into place: all or nothing. An existing
    ``path`` is replaced only if it is a model directory (has ``config.json``) or empty.

    Args:
      path: the output directory.
      config: the ``config.json`` contents.
      tensors: ``(hf_name, numpy array)`` pairs.
      files: further files, name -> contents (tokenizer, generation config).
      max_shard_size: bytes per shard, or a size like ``"2GB"`` / ``"500MiB"``.

    Raises:
      FileExistsError: if ``path`` exists and is not a model directory (or empty).
      ValueError: if ``max_shard_size`` is not a positive size.

    Example:
      >>> import os, tempfile, numpy as np
      >>> d = os.path.join(tempfile.mkdtemp(), "out")
      >>> t = [("a", np.ones(4, np.float32)), ("b", np.ones(4, np.float32))]
      >>> write_hf_dir(d, {"model_type": "llama"}, t, max_shard_size=16)
      >>> sorted(os.listdir(d))  # doctest: +NORMALIZE_WHITESPACE
      ['config.json', 'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors',
       'model.safetensors.index.json']
    """
    limit = parse_size(max_shard_size)
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not (
        os.path.isfile(os.path.join(path, CONFIG_FILE))
        or (os.path.isdir(path) and not os.listdir(path))
    ):
        raise FileExistsError(
            f"{path!r} exists and is not a model directory (no {CONFIG_FILE}); jlora replaces "
            "only a previous save. Choose a new path or remove it"
        )
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    old = None
    try:
        _write_shards(tmp, tensors, limit)
        payload = {CONFIG_FILE: (json.dumps(dict(config), indent=2) + "\n").encode()}
        for name, data in {**payload, **(files or {})}.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        for name in os.listdir(tmp):  # flushed before the rename makes them visible
            fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".old")
            os.rename(path, os.path.join(old, "previous"))
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(path):  # put the previous save back
            os.rename(os.path.join(old, "previous"), path)
            os.rmdir(old)
        raise
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_shapes(
    weights: HFWeights,
    expected: Mapping[str, tuple[int, ...]],
    *,
    optional: Iterable[str] = (),
    ignore: Iterable[str] = (),
) -> None:
    """Checks that the files hold exactly the ``expected`` tensors with their shapes.

    Tensors named in ``optional`` may be absent; those in ``ignore`` are not checked at all.

    Raises:
      ValueError: for a tensor the model lacks, a missing one, or a shape that differs; the
        message names the tensor and its file.
    """
    ignored = set(ignore)
    for name, shape in weights.shapes.items():
        where = weights._entries[name].file
        if name in ignored:
            continue
        if name not in expected:
            raise ValueError(
                f"weights file {where!r} holds tensor {name!r}, which the model the config "
                f"describes does not have (it has e.g. {list(expected)[:3]}); the config and "
                "weights are from different models"
            )
        if shape != tuple(expected[name]):
            raise ValueError(
                f"weights file {where!r}: tensor {name!r} has shape {shape}, but config.json's "
                f"sizes give {tuple(expected[name])}; the config and weights disagree"
            )
    absent = set(optional)
    if missing := [n for n in expected if n not in weights.shapes and n not in absent]:
        raise ValueError(
            f"{weights.directory!r} lacks {len(missing)} tensor(s) the model needs, e.g. "
            f"{missing[:3]}; the checkpoint is incomplete"
        )
