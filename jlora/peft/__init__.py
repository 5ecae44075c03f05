"""PEFT interoperability: jlora adapters as PyTorch ``peft`` LoRA adapters, both ways.

Example:
  >>> import jax, jax.numpy as jnp, jlora, tempfile
  >>> cfg = jlora.LoraConfig(rank=2)
  >>> base = {"fc": {"kernel": jnp.ones((4, 3))}}
  >>> d = tempfile.mkdtemp()
  >>> jlora.peft.export_peft(d, jlora.init_lora(jax.random.key(0), base, cfg), cfg, LLAMA)
  ['fc']
  >>> params, config = jlora.peft.import_peft(d, base, LLAMA)
"""

from jlora.peft._builtin import BUILTIN_BERT, BUILTIN_LLAMA, builtin_llama
from jlora.peft._export import export_peft
from jlora.peft._import import import_peft
from jlora.peft._mapping import (
    BERT,
    GPT2,
    HF_DECODER,
    LLAMA,
    ModuleRule,
    PeftMapping,
    hf_mapping,
)

__all__ = [
    "BERT",
    "BUILTIN_BERT",
    "BUILTIN_LLAMA",
    "GPT2",
    "HF_DECODER",
    "LLAMA",
    "ModuleRule",
    "PeftMapping",
    "builtin_llama",
    "export_peft",
    "hf_mapping",
    "import_peft",
]
