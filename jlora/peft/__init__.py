"""PEFT interoperability: jlora adapters as PyTorch ``peft`` LoRA adapters, both ways.

The mappings here are the generic ones (Hugging Face parameter names, the Flax models of
``transformers<5``). A model that names its parameters its own way keeps its mapping beside
it: ``jlora.models.decoder.PEFT_MAPPING``, ``jlora.models.bert.PEFT_MAPPING``. Their former
names ``jlora.peft.HF_DECODER`` and ``jlora.peft.BUILTIN_BERT`` still work, resolved on first
use (they import the model, Flax included; importing ``jlora.peft`` does not).

Example:
  >>> import jax, jax.numpy as jnp, jlora, tempfile
  >>> cfg = jlora.LoraConfig(rank=2)
  >>> base = {"fc": {"kernel": jnp.ones((4, 3))}}
  >>> d = tempfile.mkdtemp()
  >>> jlora.peft.export_peft(d, jlora.init_lora(jax.random.key(0), base, cfg), cfg, LLAMA)
  ['fc']
  >>> params, config = jlora.peft.import_peft(d, base, LLAMA)
"""

import importlib

from jlora.peft._export import export_peft
from jlora.peft._import import import_peft
from jlora.peft._mapping import BERT, GPT2, LLAMA, ModuleRule, PeftMapping, hf_mapping

__all__ = [
    "BERT",
    "GPT2",
    "LLAMA",
    "ModuleRule",
    "PeftMapping",
    "export_peft",
    "hf_mapping",
    "import_peft",
]

# Former names of mappings that now live with their models: (module, attribute).
_MOVED = {
    "HF_DECODER": ("jlora.models.decoder", "PEFT_MAPPING"),
    "BUILTIN_BERT": ("jlora.models.bert", "PEFT_MAPPING"),
}


def __getattr__(name: str) -> PeftMapping:
    """``jlora.peft.HF_DECODER`` and ``jlora.peft.BUILTIN_BERT``, kept for existing code.

    Each is its model's ``PEFT_MAPPING``, imported on first use so that ``import jlora`` does
    not load the models (nor Flax).

    Raises:
      AttributeError: for any other name, as for a missing module attribute.

    Example:
      >>> import jlora
      >>> jlora.peft.HF_DECODER is jlora.models.decoder.PEFT_MAPPING
      True
    """
    if name in _MOVED:
        module, attribute = _MOVED[name]
        mapping: PeftMapping = getattr(importlib.import_module(module), attribute)
        return mapping
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
