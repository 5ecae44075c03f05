"""A run's optimizer: Adam(W) on the adapters by a warm-up + decay schedule, Adam for a head."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jlora.runner.config import RunConfig
from jlora.runner.variants import adapter_optimizer


def make_schedule(config: RunConfig) -> optax.Schedule:
    """The adapters' learning rate by step: warm-up, then ``train.schedule``.

    Linear warm-up from 0 to ``train.learning_rate`` over ``train.warmup_steps``, then cosine or
    linear decay to ``learning_rate / 10`` at ``train.steps``, or constant.

    Example:
      >>> from jlora.runner.config import apply_overrides
      >>> cfg = apply_overrides(RunConfig(), ["train.schedule=constant", "train.steps=10"])
      >>> round(float(make_schedule(cfg)(9)), 6), cfg.train.learning_rate
      (0.003, 0.003)
    """
    t = config.train
    lr, warm = t.learning_rate, min(t.warmup_steps, t.steps - 1)
    if t.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, t.steps, lr / 10)
    after = (
        optax.linear_schedule(lr, lr / 10, t.steps - warm)
        if t.schedule == "linear"
        else optax.constant_schedule(lr)
    )
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def make_optimizer(config: RunConfig) -> optax.GradientTransformation:
    """Adam(W) on the adapters by :func:`make_schedule`, Adam for a head, clipped together.

    AdamW when ``train.weight_decay`` > 0; the gradient is clipped at global norm
    ``train.clip_norm`` (``None``: unclipped).

    With ``train.loraplus_lr_ratio`` the adapters' Adam runs in LoRA+ groups (B faster).
    """
    t = config.train

    def labels(tree: dict[str, Any]) -> dict[str, Any]:
        return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in tree.items()}

    # identity() for no clipping keeps the optimizer state's structure the same either way.
    clip = optax.identity() if t.clip_norm is None else optax.clip_by_global_norm(t.clip_norm)
    return optax.chain(
        clip,
        optax.partition(
            {
                "lora": adapter_optimizer(config, make_schedule(config)),
                "extra": optax.adam(t.head_learning_rate),
            },
            labels,
        ),
    )
