"""jlora: LoRA fine-tuning for JAX as pure functions over parameter trees.

Example:
  >>> import jax, jax.numpy as jnp, optax, jlora
  >>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
  >>> cfg = jlora.LoraConfig(rank=2, alpha=4.0)
  >>> p = jlora.init_lora(jax.random.key(0), params, cfg)
  >>> lora, base = jlora.split(p)
  >>> tx = jlora.lora_optimizer(optax.adam(1e-3), p)
  >>> merged = jlora.merge_params(p, cfg)
"""

from jlora._adapter_files import load_adapter, save_adapter
from jlora._adapters import Adapter, add_adapter, delete_adapter, select_adapter
from jlora._axes import axis_roles
from jlora._checkpoint import Restored, checkpoint_steps, restore_checkpoint, save_checkpoint
from jlora._chunked_loss import (
    CHUNK_LOGITS,
    auto_chunk_size,
    chunked_cross_entropy,
    chunked_logps_and_entropy,
    chunked_token_logps,
)
from jlora._collectives import Collective, collectives
from jlora._combination import combine_adapters
from jlora._config import INITS as LORA_INITS
from jlora._config import LoraConfig
from jlora._dora import add_magnitudes, init_dora
from jlora._factorised import lora, value_and_grad
from jlora._grpo import LOSS_TYPES as GRPO_LOSSES
from jlora._grpo import GroupAdvantages, group_advantages, grpo_loss, grpo_policy_loss, token_logps
from jlora._init import init_lora
from jlora._loftq import init_loftq
from jlora._loraplus import loraplus_labels, loraplus_partition
from jlora._merge import merge_params, merge_quantized, unmerge_params
from jlora._mixed import mixed_batch
from jlora._optim import lora_optimizer, optimizer_shardings
from jlora._paths import path_str
from jlora._pissa import init_pissa, pissa_to_lora
from jlora._preference import LOSS_TYPES as PREFERENCE_LOSSES
from jlora._preference import dpo_loss, preference_loss, sequence_logps
from jlora._qlora import KINDS as QUANTIZE_KINDS
from jlora._qlora import Quantized, dequantize, has_quantized, quantize
from jlora._quantized import is_quantized
from jlora._sharding import adapter_specs, lora_shardings, partition_specs
from jlora._split import combine, is_adapter_path, lora_labels, split
from jlora._summary import summary
from jlora.peft import export_peft, import_peft

__all__ = [
    "CHUNK_LOGITS",
    "GRPO_LOSSES",
    "LORA_INITS",
    "PREFERENCE_LOSSES",
    "QUANTIZE_KINDS",
    "Adapter",
    "Collective",
    "GroupAdvantages",
    "LoraConfig",
    "Quantized",
    "Restored",
    "adapter_specs",
    "add_adapter",
    "add_magnitudes",
    "auto_chunk_size",
    "axis_roles",
    "checkpoint_steps",
    "chunked_cross_entropy",
    "chunked_logps_and_entropy",
    "chunked_token_logps",
    "collectives",
    "combine",
    "combine_adapters",
    "delete_adapter",
    "dequantize",
    "dpo_loss",
    "export_peft",
    "group_advantages",
    "grpo_loss",
    "grpo_policy_loss",
    "has_quantized",
    "import_peft",
    "init_dora",
    "init_loftq",
    "init_lora",
    "init_pissa",
    "is_adapter_path",
    "is_quantized",
    "load_adapter",
    "lora",
    "lora_labels",
    "lora_optimizer",
    "lora_shardings",
    "loraplus_labels",
    "loraplus_partition",
    "merge_params",
    "merge_quantized",
    "mixed_batch",
    "optimizer_shardings",
    "partition_specs",
    "path_str",
    "pissa_to_lora",
    "preference_loss",
    "quantize",
    "restore_checkpoint",
    "save_adapter",
    "save_checkpoint",
    "select_adapter",
    "sequence_logps",
    "split",
    "summary",
    "token_logps",
    "unmerge_params",
    "value_and_grad",
]

__version__ = "0.1.0"
