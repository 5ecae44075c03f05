"""GRPO (and Dr. GRPO, DAPO, BNPO) on an RL task's rollouts, sampled through the live adapters.

A step of the run is one batch of rollouts and ``train.num_iterations`` updates on it: sample
``num_generations`` completions of each of the step's prompts through ``jlora.lora`` over the
current adapters (the sampling key is ``fold_in(rng, step)``, so a resumed run samples as an
uninterrupted one), score them with the reward functions, turn the rewards into group
advantages (:func:`jlora.group_advantages`), then update with :func:`jlora.grpo_policy_loss`,
whose reference (``train.beta > 0``) is the base with the adapters off. Logged as TRL logs
them: ``reward``, ``reward_std``, ``rewards/NAME/mean``, ``kl``, ``clip_ratio/...``,
``completions/mean_length``, ``frac_reward_zero_std``, and the seconds spent sampling and
updating (``time/sampling``, ``time/update``).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.runner.config import RunConfig
from jlora.runner.rewards import mean_scored
from jlora.runner.tasks.rl import RLTask, Rollout, adapted_step, take_groups


class GRPO:
    """The GRPO family's loss, and the rollout step that feeds it.

    Raises:
      ValueError: for ``train.train_step=merge`` (the sampler and the reference run on the
        factorised adapters).
    """

    def __init__(self, task: RLTask, cfg: jlora.LoraConfig, config: RunConfig) -> None:
        """Reads the loss settings of ``config.train``."""
        t = config.train
        if t.train_step != "factorised":
            raise ValueError(
                "train.objective='grpo' runs with train.train_step=factorised (it samples "
                "through the live adapters; its reference is the base with the adapters off); "
                f"found train.train_step={t.train_step!r}"
            )
        self.task, self.cfg, self.config = task, cfg, config
        self.options: dict[str, Any] = {
            "loss_type": t.loss_type,
            "beta": t.beta,
            "epsilon_low": t.epsilon,
            "epsilon_high": t.epsilon_high,
            "temperature": t.temperature,
        }
        if t.loss_type == "dr_grpo":
            self.options["max_completion_length"] = t.max_new_tokens
        self._sampler = adapted_step(task, cfg)
        self._old_logps = jax.jit(self._policy_logps)

    def loss(
        self, trainable: Any, base: Any, batch: Any, rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """:func:`jlora.grpo_policy_loss` of the adapted model on a scored rollout batch."""
        params = jlora.combine(trainable["lora"], base)
        batch = dict(batch)
        old = batch.pop("old_logps", None)
        chunked = self.config.train.loss_chunk != 0
        return jlora.grpo_policy_loss(
            None if chunked else self.task.apply_fn,
            params,
            self.cfg,
            batch,
            old_logps=old,
            dropout_rng=rng,
            deterministic=False,
            logps_fn=self.task.logps_fn if chunked else None,
            **self.options,
        )

    def batch_weight(self, batch: Any) -> jax.Array:
        """Completions in ``batch``."""
        return jnp.float32(batch["tokens"].shape[0])

    def _policy_logps(self, params: Any, batch: dict[str, Any]) -> jax.Array:
        kw = {k: batch[k] for k in ("positions", "segment_ids")}
        temperature = self.config.train.temperature
        if self.config.train.loss_chunk != 0:  # the chunked head, no [B, T, V] logits
            fn = jlora.lora(self.task.logps_fn, self.cfg)
            args = (batch["tokens"], batch["targets"], batch["loss_mask"])
            return fn(params, *args, temperature=temperature, **kw)[0]
        logits = jlora.lora(self.task.apply_fn, self.cfg)(params, batch["tokens"], **kw)
        return jlora.token_logps(logits, batch["targets"], temperature=temperature)

    def rollout_step(self, step_fn: Any, base: Any, put: Any) -> Any:
        """The loop's ``step_fn(state, prompt_indices, step)``: rollouts, then the updates."""
        t = self.config.train

        def run(state: Any, indices: np.ndarray, step: int) -> Any:
            self.task.current_step = step
            tic = time.perf_counter()
            params = jlora.combine(state["trainable"]["lora"], base)
            key = jax.random.fold_in(jax.random.fold_in(state["rng"], step), 1 << 30)
            rollout = self.task.rollout(self._sampler, params, indices, key)
            stats = self._stats(rollout)  # of the step's own prompts, before any filling
            if t.dynamic_sampling:
                rollout, stats["sampling_rounds"] = self._fill(rollout, params, key, step)
            groups = jlora.group_advantages(
                rollout.rewards, t.num_generations, scale_rewards=t.scale_rewards
            )
            batch = dict(rollout.batch)
            batch["advantages"] = np.asarray(groups.advantages)
            keep = np.repeat(np.asarray(groups.nonzero_std), t.num_generations)
            if t.dynamic_sampling:  # DAPO: groups that all scored alike teach nothing
                batch["loss_mask"] = batch["loss_mask"] & keep[:, None]
            batch = put(batch)
            if t.num_iterations > 1:  # the sampling policy's log-probs, for the ratio
                batch["old_logps"] = self._old_logps(params, batch)
            sampled = time.perf_counter()
            finite = True
            for i in range(t.num_iterations):
                state, (loss, ok, metrics) = step_fn(
                    state, base, batch, (step - 1) * t.num_iterations + i + 1
                )
                finite = finite and bool(ok)
            loss = float(loss)
            updated = time.perf_counter()
            stats["time/sampling"] = sampled - tic
            stats["time/update"] = updated - sampled
            return state, (loss, finite, {**metrics, **stats})

        return run

    def _fill(self, rollout: Rollout, params: Any, key: jax.Array, step: int) -> Any:
        """DAPO's dynamic sampling: the batch's groups whose rewards differ, topped up.

        Groups that all scored alike are replaced by such groups of further prompts, drawn
        in rounds of ``batch_size`` (at most ``dynamic_sampling_rounds``) from a generator
        seeded by the step, so a resumed run draws the same. The batch keeps its size (no
        recompiles): if the rounds run out, uniform groups fill the rest, and the loss
        leaves them out. Returns the batch and the extra rounds it took.
        """
        t = self.config.train
        g, b = t.num_generations, t.batch_size
        found = [rollout]
        useful = [(0, int(j)) for j in np.flatnonzero(_differs(rollout.rewards, g))]
        rounds = 0
        while len(useful) < b and rounds < t.dynamic_sampling_rounds:
            rounds += 1
            draw = np.random.default_rng([t.seed, step, rounds])
            n = len(self.task.train_prompts.prompts)
            indices = draw.choice(n, size=b, replace=n < b)
            more = self.task.rollout(
                self._sampler, params, indices, jax.random.fold_in(key, rounds)
            )
            useful += [(rounds, int(j)) for j in np.flatnonzero(_differs(more.rewards, g))]
            found.append(more)
        picked = useful[:b]
        taken = set(picked)
        picked += [(0, j) for j in range(b) if (0, j) not in taken][: b - len(picked)]
        return take_groups(found, picked, g), float(rounds)

    def _stats(self, rollout: Rollout) -> dict[str, float]:
        """TRL's rollout metrics: rewards, their spread, completion lengths."""
        t = self.config.train
        grouped = rollout.rewards.reshape(-1, t.num_generations)
        # Each group's std over its scored rewards (Bessel-corrected, as TRL's), then the mean.
        centred = grouped - mean_scored(grouped, axis=1)[:, None]
        count = (~np.isnan(grouped)).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            stds = np.sqrt(np.nansum(centred**2, axis=1) / (count - 1))
        stats = {
            "reward": mean_scored(rollout.rewards),
            "reward_std": mean_scored(np.where(count > 1, stds, np.nan)),
            "completions/mean_length": float(np.mean(rollout.lengths)),
            "frac_reward_zero_std": float(
                1.0 - np.mean(_differs(rollout.rewards, t.num_generations))
            ),
        }
        for reward, values in zip(self.task.rewards, rollout.per_function, strict=True):
            stats[f"rewards/{reward.name}/mean"] = mean_scored(values)
        return stats


def _differs(rewards: np.ndarray, num_generations: int) -> np.ndarray:
    """``[groups]``: whether a group's rewards are not all alike (GRPO's non-zero std)."""
    return np.asarray(jlora.group_advantages(rewards, num_generations).nonzero_std)
