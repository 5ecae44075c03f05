"""Encoding and decoding safetensors bytes, with every failure a clear ``ValueError``.

The ``safetensors`` package writes any numpy dtype (``bfloat16`` via ``ml_dtypes``) but its numpy
loader does not read ``BF16`` back, so decoding goes through ``safetensors.deserialize`` and the
dtype table here. Both jlora's own adapter files and PEFT files use this module.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


def encode(tensors: Mapping[str, np.ndarray]) -> bytes:
    """The safetensors bytes of ``tensors`` (names to numpy arrays).

    Example:
      >>> import numpy as np
      >>> decode(encode({"w": np.ones((2, 3), np.float32)}), "example")["w"].shape
      (2, 3)
    """
    return safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def decode(data: bytes, where: str) -> dict[str, np.ndarray]:
    """The tensors in safetensors ``data``; ``where`` names the file in error messages.

    Raises:
      ValueError: if the bytes are not a complete safetensors file (truncated or corrupted), or
        hold a dtype jlora does not read.
    """
    try:
        items = safetensors.deserialize(bytes(data))
    except Exception as err:  # SafetensorError is not importable under a stable name
        raise ValueError(
            f"{where} is not a valid safetensors file ({err}); it is truncated or corrupted. "
            "Save it again from the trained parameters"
        ) from None
    out = {}
    for name, info in items:
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(
                f"{where}: tensor {name!r} has dtype {info['dtype']}, which jlora does not read; "
                f"supported: {sorted(_DTYPES)}"
            )
        out[name] = np.frombuffer(bytes(info["data"]), dtype).reshape(info["shape"]).copy()
    return out
