"""The LoRA family in a run: a quantised (QLoRA) base, DoRA magnitudes, LoRA+ learning rates.

Every part of the runner that builds, restores or merges an adapted model goes through these,
so ``jlora finetune``, ``merge``, ``eval``, ``generate`` and ``summary`` agree on the model a
run's ``lora`` section describes. A quantised base is derived from the float weights each time
(quantisation is deterministic), so checkpoints and adapter files hold only what was trained.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

import jlora
from jlora.runner.config import RunConfig
from jlora.runner.tasks import lora_config


def prepare_base(config: RunConfig, base: Any) -> Any:
    """The base a run adapts: ``base`` itself, or quantised as ``lora.quantize`` asks.

    Raises:
      ValueError: ``lora.quantize`` with a ``mesh`` (quantised kernels are not laid out on a
        mesh by the runner), or a kernel whose size ``lora.quantize_block`` does not divide.
    """
    s = config.lora
    if s.quantize == "none":
        return base
    if config.mesh.data * config.mesh.fsdp * config.mesh.tensor > 1:
        raise ValueError(
            f"lora.quantize={s.quantize!r} with a mesh: the runner lays out float bases only; "
            "set lora.quantize=none or use a single device (mesh.data=mesh.fsdp=mesh.tensor=1)"
        )
    return jlora.quantize(base, lora_config(config), kind=s.quantize, block_size=s.quantize_block)


def adapt(key: jax.Array, base: Any, config: RunConfig) -> Any:
    """``base`` with fresh adapters on the run's targets: LoRA, or DoRA with ``lora.dora``."""
    init = jlora.init_dora if config.lora.dora else jlora.init_lora
    return init(key, base, lora_config(config))


def dense_model(params: Any, cfg: jlora.LoraConfig) -> Any:
    """The adapted model as dense weights, adapters merged in.

    A quantised base is merged in float (``merge_quantized(store="float")``): exactly the model
    that was trained.
    """
    if jlora.has_quantized(params):
        return jlora.merge_quantized(params, cfg, store="float")
    return jlora.merge_params(params, cfg)


def adapter_optimizer(config: RunConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Adam on the adapters, AdamW with ``train.weight_decay`` > 0.

    With ``train.loraplus_lr_ratio`` != 1, LoRA+ groups (B faster, its decay scaled alike).
    """
    t = config.train
    # Plain Adam at 0 keeps the optimizer state of runs saved before weight_decay existed.
    adam = (
        optax.adamw(schedule, weight_decay=t.weight_decay)
        if t.weight_decay > 0
        else optax.adam(schedule)
    )
    if t.loraplus_lr_ratio == 1.0:
        return adam
    return jlora.loraplus_partition(adam, t.loraplus_lr_ratio)
