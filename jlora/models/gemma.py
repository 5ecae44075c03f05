r"""Gemma 2 and Gemma 3 (text) as configurations of the Llama-family decoder.

What Gemma changes, and where :class:`jlora.models.decoder.Decoder` does it when
``config.gemma`` is true (``architecture`` one of :data:`GEMMA_ARCHITECTURES`):

- the embedding is multiplied by ``sqrt(hidden_size)`` in the compute dtype;
- every RMSNorm is ``(1 + w) · x / sqrt(mean(x²) + eps)``, computed in float32 (the weight
  is stored as ``w``, initialised to 0, as in transformers);
- four norms per layer: ``x + post_attention(attn(input(x)))``, then
  ``x + post_feedforward(mlp(pre_feedforward(x)))``;
- the MLP's activation is ``hidden_activation`` (GeLU with the tanh approximation);
- queries are scaled by ``query_pre_attn_scalar**-0.5`` instead of ``head_dim**-0.5``;
- attention scores may be soft-capped, ``cap · tanh(s / cap)`` (Gemma 2), and so may the
  logits (``final_logit_softcapping``);
- Gemma 3 normalises q and k per head (as Qwen3, with Gemma's norm);
- sliding-window and global layers are interleaved (``layer_types``), each kind with its own
  rotary base (Gemma 3: ``rope_local_base_freq`` on sliding layers).

Design note: the per-layer differences are *layer kinds* (:func:`layer_kinds`): the distinct
``(window, rope_theta, rope_scaling)`` triples and, per layer, the index of its kind. The
decoder computes one mask and one rotary table per kind and the scanned layer body picks its
own with the index, an array scanned with the layers, so one layer is still compiled once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from jlora.models.decoder import DecoderConfig

__all__ = [
    "CHAT_TEMPLATES",
    "GEMMA_ARCHITECTURES",
    "HIDDEN_ACTIVATIONS",
    "gemma_fields",
    "layer_kinds",
]

#: The Gemma ``architectures`` the decoder reads, with their ``model_type``.
GEMMA_ARCHITECTURES = {"Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text"}
#: ``hidden_activation`` values -> whether GeLU uses the tanh approximation.
HIDDEN_ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu": False}
LAYER_TYPES = ("sliding_attention", "full_attention")

# The families' chat templates as Google ships them with the instruction-tuned checkpoints
# (Gemma 2's: no system role; Gemma 3's: a system turn prefixed to the first user turn), for
# GGUF files that carry none (llama.cpp does not copy it for the base models).
_GEMMA2_TEMPLATE = """{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '
' + message['content'] | trim + '<end_of_turn>
' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model
'}}{% endif %}"""  # noqa: E501 (Google's one-line template)
_GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"""
#: ``architecture`` -> the family's chat template.
CHAT_TEMPLATES = {"Gemma2ForCausalLM": _GEMMA2_TEMPLATE, "Gemma3ForCausalLM": _GEMMA3_TEMPLATE}

# transformers' defaults (Gemma2Config, Gemma3TextConfig) for keys a config.json may leave out
DEFAULTS: dict[str, dict[str, Any]] = {
    "Gemma2ForCausalLM": dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
        max_position_embeddings=8192, bos_token_id=2, eos_token_id=1,
    ),
    "Gemma3ForCausalLM": dict(
        vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
        max_position_embeddings=131072, bos_token_id=2, eos_token_id=1,
    ),
}  # fmt: skip
_SOFTCAPS = {"Gemma2ForCausalLM": (50.0, 30.0), "Gemma3ForCausalLM": (None, None)}
_ROPE_THETA = {"Gemma2ForCausalLM": 10000.0, "Gemma3ForCausalLM": 1_000_000.0}


def _positive(arch: str, key: str, value: Any, allow_none: bool = True) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(
            f"config.json: {key} {value!r} ({arch}) must be a positive number"
            + (" or null" if allow_none else "")
            + "; fix the config"
        )
    return value


def gemma_fields(arch: str, hf: Mapping[str, Any], layers: int) -> dict[str, Any]:
    """The Gemma-specific :class:`~jlora.models.decoder.DecoderConfig` fields of a config.json.

    Keys left out take transformers' defaults (``Gemma2Config``, ``Gemma3TextConfig``); without
    ``layer_types``, Gemma 2 alternates sliding and full layers and Gemma 3 makes every
    ``sliding_window_pattern``-th layer (default 6) full, as transformers does.

    Args:
      arch: ``"Gemma2ForCausalLM"`` or ``"Gemma3ForCausalLM"``.
      hf: the parsed config.json.
      layers: ``num_hidden_layers``.

    Returns:
      A dict of ``DecoderConfig`` keyword arguments.

    Raises:
      ValueError: for a value this decoder would not compute as transformers does: a
        ``hidden_activation`` other than :data:`HIDDEN_ACTIVATIONS`, ``attention_bias``,
        ``use_bidirectional_attention``, ``attn_logit_softcapping`` on Gemma 3 (which
        transformers ignores), ``layer_types`` of the wrong length or with other entries than
        sliding/full attention, or a missing ``sliding_window`` with sliding layers.

    Example:
      >>> f = gemma_fields("Gemma3ForCausalLM", {"sliding_window": 4}, 6)
      >>> f["layer_types"][-2:], f["sliding_window"], f["rope_local_base_freq"]
      (('sliding_attention', 'full_attention'), 4, 10000.0)
    """
    act = hf.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in HIDDEN_ACTIVATIONS:
        raise ValueError(
            f"config.json: hidden_activation {act!r} is not supported ({arch}); supported: "
            f"{sorted(HIDDEN_ACTIVATIONS)}"
        )
    if hf.get("attention_bias", False):
        raise ValueError(
            f"config.json: attention_bias true ({arch}) adds q/k/v/o biases, which this decoder "
            "does not implement for Gemma; use a bias-free checkpoint"
        )
    if hf.get("use_bidirectional_attention", False):
        raise ValueError(
            f"config.json: use_bidirectional_attention true ({arch}) is an encoder setting; "
            "jlora's decoder is causal. Set it to false (or drop it) for a causal LM"
        )
    attn_cap, final_cap = _SOFTCAPS[arch]
    attn_cap = _positive(arch, "attn_logit_softcapping", hf.get("attn_logit_softcapping", attn_cap))
    if arch == "Gemma3ForCausalLM" and attn_cap is not None:
        raise ValueError(
            f"config.json: attn_logit_softcapping {attn_cap!r} ({arch}): transformers' Gemma 3 "
            "ignores it, so a model using it would not match; set it to null"
        )
    final_cap = _positive(
        arch, "final_logit_softcapping", hf.get("final_logit_softcapping", final_cap)
    )
    head_dim = hf.get("head_dim", DEFAULTS[arch]["head_dim"])
    scalar = _positive(
        arch, "query_pre_attn_scalar", hf.get("query_pre_attn_scalar", 256), allow_none=False
    )
    types = hf.get("layer_types")
    if types is None:
        if arch == "Gemma2ForCausalLM":
            types = [
                "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)
            ]
        else:
            every = hf.get("sliding_window_pattern", 6)
            if isinstance(every, bool) or not isinstance(every, int) or every < 1:
                raise ValueError(
                    f"config.json: sliding_window_pattern {every!r} ({arch}) must be a positive "
                    "int (every n-th layer is a full-attention layer)"
                )
            types = [
                "sliding_attention" if (i + 1) % every else "full_attention" for i in range(layers)
            ]
    types = list(types)
    if len(types) != layers:
        raise ValueError(
            f"config.json: layer_types has {len(types)} entries for num_hidden_layers={layers} "
            f"({arch}); give one per layer"
        )
    if bad := sorted({t for t in types if t not in LAYER_TYPES}):
        raise ValueError(
            f"config.json: layer_types entries {bad} are not supported ({arch}); each must be one "
            f"of {LAYER_TYPES}"
        )
    window = hf.get("sliding_window", 4096)
    if "sliding_attention" in types:
        window = _positive(arch, "sliding_window", window, allow_none=False)
    local = None
    if arch == "Gemma3ForCausalLM":
        local = float(_positive(arch, "rope_local_base_freq", hf.get("rope_local_base_freq", 1e4)))
    return {
        "head_dim": head_dim,
        "hidden_activation": act,
        "query_pre_attn_scalar": float(scalar),
        "attn_logit_softcapping": None if attn_cap is None else float(attn_cap),
        "final_logit_softcapping": None if final_cap is None else float(final_cap),
        "layer_types": tuple(types),
        "sliding_window": None if window is None else int(window),
        "rope_local_base_freq": local,
        "rope_theta": float(hf.get("rope_theta", _ROPE_THETA[arch])),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "qk_norm": arch == "Gemma3ForCausalLM",
    }


def gemma_to_hf(config: DecoderConfig) -> dict[str, Any]:
    """The Gemma keys of a config.json for ``config`` (what transformers' Gemma configs read)."""
    out: dict[str, Any] = {
        "hidden_activation": config.hidden_activation,
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "attn_logit_softcapping": config.attn_logit_softcapping,
        "final_logit_softcapping": config.final_logit_softcapping,
        "layer_types": list(config.layer_types or ()),
        "sliding_window": config.sliding_window,
        "attention_bias": False,
    }
    if config.rope_local_base_freq is not None:
        out["rope_local_base_freq"] = config.rope_local_base_freq
    return out


Kind = tuple[int | None, float, Any]


def layer_kinds(config: DecoderConfig) -> tuple[tuple[Kind, ...], np.ndarray]:
    """The distinct ``(window, rope_theta, rope_scaling)`` of the layers, and each layer's.

    Without ``layer_types`` every layer is one kind: ``config.sliding_window`` (or ``None``)
    with the global rotary base. A full-attention layer has window ``None``; a sliding layer
    has ``sliding_window`` and, with ``rope_local_base_freq``, that base and no scaling
    (Gemma 3's local rotary embedding), else the global one.

    Args:
      config: the decoder's config.

    Returns:
      ``(kinds, index)``: the kinds in first-use order, and int32 ``[num_hidden_layers]``
      giving each layer's position in ``kinds``.

    Example:
      >>> from jlora.models.decoder import DecoderConfig
      >>> c = DecoderConfig.from_hf({"model_type": "gemma3_text", "num_hidden_layers": 3,
      ...     "sliding_window": 8, "sliding_window_pattern": 3, "rope_local_base_freq": 10.0})
      >>> kinds, index = layer_kinds(c)
      >>> kinds, index.tolist()
      (((8, 10.0, None), (None, 1000000.0, None)), [0, 0, 1])
    """
    c = config
    if c.layer_types is None:
        kinds: list[Kind] = [(c.sliding_window, c.rope_theta, c.rope_scaling)]
        return tuple(kinds), np.zeros(c.num_hidden_layers, np.int32)
    kinds, index = [], []
    for kind in c.layer_types:
        if kind == "full_attention":
            entry: Kind = (None, c.rope_theta, c.rope_scaling)
        elif c.rope_local_base_freq is not None:
            entry = (c.sliding_window, c.rope_local_base_freq, None)
        else:
            entry = (c.sliding_window, c.rope_theta, c.rope_scaling)
        if entry not in kinds:
            kinds.append(entry)
        index.append(kinds.index(entry))
    return tuple(kinds), np.asarray(index, np.int32)
