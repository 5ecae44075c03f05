"""The dtype a checkpoint stores its weights in, read from headers and config only.

What ``model.base_dtype: auto`` decides by, and the dtype ``jlora merge --format hf`` writes
the merged weights in. A Hugging Face directory's safetensors headers give each tensor's
dtype (the one most parameters have wins: a few float32 norms in a bf16 checkpoint do not
make it float32); a directory without weights (a ``config.json`` alone, to plan a run) falls
back on config.json's ``torch_dtype`` (``dtype`` in newer transformers), float32 if absent,
as transformers loads it. A GGUF file's most common tensor type is named as GGML names it
(``F32``, ``F16``, ``BF16``, ``Q4_K``, ...).
"""

from __future__ import annotations

import collections
import math
import os
from typing import Any

from jlora.models.formats import hf_dir

__all__ = ["SIXTEEN_BIT", "float_dtype", "stored_dtype"]

#: Stored dtypes of 16 bits a weight or fewer: what ``base_dtype: auto`` holds in bfloat16.
SIXTEEN_BIT = ("bfloat16", "float16", "F16", "BF16")


def _most(counts: collections.Counter[str]) -> str:
    return counts.most_common(1)[0][0]


def stored_dtype(source: str, hf_config: dict[str, Any] | None = None) -> str:
    """The dtype most of the checkpoint's parameters are stored in; no tensor data is read.

    Args:
      source: a Hugging Face model directory or a ``.gguf`` file (already resolved:
        :func:`jlora.models.pretrained.resolve_source`).
      hf_config: the directory's parsed config.json, if already read.

    Returns:
      A numpy dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``) for a directory; a
      GGML type name (``"F32"``, ``"F16"``, ``"BF16"``, ``"Q4_K"``, ...) for a GGUF file.

    Raises:
      ValueError: for a config.json whose ``torch_dtype`` is not a float dtype name.

    Example:
      >>> import json, os, tempfile
      >>> d = tempfile.mkdtemp()
      >>> with open(os.path.join(d, "config.json"), "w") as f:
      ...     json.dump({"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}, f)
      >>> stored_dtype(d)
      'bfloat16'
    """
    if not os.path.isdir(source):
        from jlora.models.formats.gguf import read_gguf

        counts: collections.Counter[str] = collections.Counter()
        for tensor in read_gguf(source)._tensors.values():
            counts[tensor.tensor_type.name] += int(tensor.n_elements)
        return _most(counts) if counts else "F32"
    has_weights = any(
        os.path.isfile(os.path.join(source, f)) for f in (hf_dir.WEIGHTS_FILE, hf_dir.INDEX_FILE)
    )
    if has_weights:
        weights = hf_dir.open_weights(source)
        counts = collections.Counter()
        for name, shape in weights.shapes.items():
            counts[weights.dtypes[name].name] += math.prod(shape)
        if counts:
            return _most(counts)
    config = hf_dir.read_config(source) if hf_config is None else hf_config
    name = config.get("torch_dtype", config.get("dtype")) or "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(
            f"{os.path.join(source, hf_dir.CONFIG_FILE)}: torch_dtype {name!r} is not a float "
            "dtype jlora reads (float32, bfloat16, float16); fix config.json"
        )
    return str(name)


def float_dtype(stored: str) -> str:
    """The float dtype that writes weights ``stored`` so: a quantised GGUF type gives float32.

    Example:
      >>> float_dtype("bfloat16"), float_dtype("F16"), float_dtype("Q4_K")
      ('bfloat16', 'float16', 'float32')
    """
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    if stored in ("float32", "bfloat16", "float16"):
        return stored
    return names.get(stored, "float32")
