"""PEFT's on-disk format: file names, state-dict keys, task types and rank/alpha patterns.

The one module that knows them. A PEFT LoRA adapter is a directory with
``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and
``...lora_B.weight`` ``(out, r)``; ``...lora_embedding_A`` ``(r, vocab)`` and
``...lora_embedding_B`` ``(dim, r)`` for embeddings; ``...lora_magnitude_vector`` for DoRA;
copies of base weights as ``...base_layer.weight`` or ``...weight``) and
``adapter_config.json`` (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
``use_rslora``, ``target_modules``, ``task_type``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

PREFIX = "base_model.model."
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"  # PyTorch's pickle: recognised to refuse it, never read
CONFIG_FILE = "adapter_config.json"

BASE_SUFFIX = ".base_layer.weight"  # an adapted module's own weight, as PEFT copies it
COPY_SUFFIX = ".weight"  # an un-adapted module's weight
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"  # DoRA, one value per output feature

#: PEFT's ``TaskType`` values.
TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)

_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}


def factor_key(module: str, which: str, embedding: bool) -> str:
    """The state-dict key of factor ``which`` (``"A"`` / ``"B"``) of ``module``.

    Example:
      >>> factor_key("h.0.attn.c_attn", "A", False)
      'base_model.model.h.0.attn.c_attn.lora_A.weight'
    """
    suffix = f".lora_embedding_{which}" if embedding else f".lora_{which}.weight"
    return PREFIX + module + suffix


def parse_key(key: str) -> tuple[str, str, bool] | None:
    """``(module, "A" | "B", is_embedding)`` for a LoRA factor key; ``None`` for any other key.

    Example:
      >>> parse_key("base_model.model.bert.pooler.dense.lora_B.weight")
      ('bert.pooler.dense', 'B', False)
    """
    if not key.startswith(PREFIX):
        return None
    for suffix, (which, embedding) in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[len(PREFIX) : -len(suffix)], which, embedding
    return None


def pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    r"""The value PEFT uses for ``module`` from a ``rank_pattern`` / ``alpha_pattern``.

    PEFT takes the first key ``k`` with ``re.match(rf"(.*\.)?({k})$", module)``.

    Example:
      >>> pattern_value({"q_proj": 4}, "model.layers.0.self_attn.q_proj", 8)
      4
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
