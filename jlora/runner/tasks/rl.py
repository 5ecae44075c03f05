"""The decoder task on prompts and rewards (``train.objective: grpo``): rollouts and scores.

The model, tokenizer, sampler and reports are :class:`~jlora.runner.tasks.causal_lm.
CausalLMTask`'s; the data are prompt records (:mod:`jlora.runner.data.prompts`) and the
reward functions of ``train.rewards`` (:mod:`jlora.runner.rewards`), loaded when the task is
made so that a bad name stops the run before its directory is touched.

A rollout samples ``train.num_generations`` completions per prompt with the KV-cache sampler
*through the live adapters* (``jlora.lora`` over the adapted tree: no merge, no second copy,
no weight sync), scores them, and lays each prompt plus completion out as one right-padded
row of ``data.seq_len`` tokens: the prompt keeps its last ``seq_len - train.max_new_tokens``
tokens, ``loss_mask`` marks the completion's targets (its EOS included). Evaluation decodes
the held-out prompts greedily and reports the mean reward (``eval_reward``) and each
function's (``eval_rewards/NAME``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.models.lm_head import mean_nll
from jlora.models.sampling import generate
from jlora.runner.data.chats import epoch_order
from jlora.runner.data.prompts import PromptRecords, read_prompt_data
from jlora.runner.rewards import Reward, load_rewards, mean_scored, score
from jlora.runner.rundir.directory import COMPLETIONS_FILE
from jlora.runner.tasks.causal_lm import CausalLMTask, _eos_ids

#: Held-out completions written to :data:`COMPLETIONS_FILE` per evaluation.
SAMPLES_PER_EVAL = 4


class Rollout:
    """A batch of scored completions, laid out for :func:`jlora.grpo_policy_loss`.

    Attributes:
      batch: ``tokens``, ``targets``, ``loss_mask``, ``positions``, ``segment_ids``
        ``[N, seq_len]`` numpy arrays (``advantages`` is added by the objective).
      rewards: ``[N]`` each completion's weighted reward (NaN where no function scored it).
      per_function: ``[F, N]`` each function's reward.
      texts: the completions' text.
      lengths: ``[N]`` tokens per completion.
    """

    def __init__(
        self,
        batch: dict[str, np.ndarray],
        rewards: np.ndarray,
        per_function: np.ndarray,
        texts: list[str],
        lengths: np.ndarray,
    ) -> None:
        """Holds what :meth:`RLTask.rollout` made."""
        self.batch, self.rewards, self.per_function = batch, rewards, per_function
        self.texts, self.lengths = texts, lengths


def take_groups(rollouts: list[Rollout], groups: list[tuple[int, int]], size: int) -> Rollout:
    """The completion groups ``(rollout, group)`` of ``rollouts``, in order, as one rollout.

    ``size`` is the completions per group (``num_generations``): group ``j`` of a rollout is
    its rows ``j * size`` to ``(j + 1) * size``.
    """
    rows = [(r, j * size + k) for r, j in groups for k in range(size)]

    def gather(get: Any) -> np.ndarray:
        return np.stack([get(rollouts[r])[i] for r, i in rows])

    return Rollout(
        {key: gather(lambda r, key=key: r.batch[key]) for key in rollouts[0].batch},
        gather(lambda r: r.rewards),
        np.stack(
            [gather(lambda r, f=f: r.per_function[f]) for f in range(len(rollouts[0].per_function))]
        ),
        [rollouts[r].texts[i] for r, i in rows],
        gather(lambda r: r.lengths),
    )


class RLTask(CausalLMTask):
    """A checkpoint's decoder trained on rewards of its own samples (``objective: grpo``)."""

    def _read_data(self) -> Any:
        """The prompts, split; and the reward functions (a bad name stops here)."""
        t = self.config.train
        self.rewards: list[Reward] = load_rewards(t.rewards, t.reward_weights)
        return read_prompt_data(self.config.data, t.seed)

    def _use_data(self, raw: Any) -> None:
        train, held = cast(tuple[PromptRecords, PromptRecords], raw)
        config = self.config
        seq, new = config.data.seq_len, config.train.max_new_tokens
        self.prompt_room = seq - new
        if self.prompt_room < 1:
            raise ValueError(
                f"config data.seq_len {seq} leaves no room for a prompt before "
                f"train.max_new_tokens {new} completion tokens; raise data.seq_len or lower "
                "train.max_new_tokens"
            )
        self.train_prompts, self.held_prompts = train, held
        self._train_ids = [
            self._prompt_ids(p, w) for p, w in zip(train.prompts, train.sources, strict=True)
        ]
        self._held_ids = [
            self._prompt_ids(p, w) for p, w in zip(held.prompts, held.sources, strict=True)
        ]
        rows = config.train.batch_size * config.train.num_generations
        self.units_per_batch = rows * seq
        self.data_stats = {
            "train_examples": len(self._train_ids),
            "train_tokens": sum(map(len, self._train_ids)),
            "eval_examples": len(self._held_ids),
            "eval_tokens": sum(map(len, self._held_ids)),
            **dict.fromkeys(
                ("train_truncated_examples", "train_truncated_tokens", "train_no_loss_examples"),
                0,
            ),
            **dict.fromkeys(
                ("eval_truncated_examples", "eval_truncated_tokens", "eval_no_loss_examples"), 0
            ),
        }
        self.val: list[Any] = []
        self.run_dir: str | None = None
        self.current_step = 0
        self._orders: dict[int, np.ndarray] = {}

    def _prompt_ids(self, prompt: Any, where: str) -> list[int]:
        """A prompt's ids (chat-rendered with the assistant's turn opened), keeping its end."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            ids = list(tok.encode(prompt))
        else:
            if tok.chat_template is None:
                raise ValueError(
                    f"{where}: a prompt of messages needs a chat template, but the tokenizer "
                    f"from {tok.source} has none; give string prompts"
                )
            ids = cast(list[int], tok.apply_chat_template(prompt, add_generation_prompt=True))
        return ids[-self.prompt_room :]

    def train_batch(self, position: int) -> Any:
        """The indices of the ``train.batch_size`` prompts of step ``position + 1``.

        Prompt ``i`` of the stream is ``epoch_order(n, i // n, seed)[i % n]``, so a resumed
        run sees the same prompts.
        """
        n, b = len(self._train_ids), self.config.train.batch_size
        out = []
        for i in range(position * b, (position + 1) * b):
            e = i // n
            if e not in self._orders:
                if len(self._orders) >= 2:
                    del self._orders[min(self._orders)]
                self._orders[e] = epoch_order(n, e, self.config.train.seed)
            out.append(int(self._orders[e][i % n]))
        return np.asarray(out, np.int64)

    def loss(self, params: Any, extra: Any, batch: dict[str, jax.Array]) -> jax.Array:
        """The completions' mean next-token cross-entropy (the task's own loss)."""
        del extra
        return mean_nll(self.scores(params, batch), batch["loss_mask"])

    def batch_weight(self, batch: dict[str, jax.Array]) -> jax.Array:
        """Rows (completions) a batch holds."""
        return jnp.float32(batch["tokens"].shape[0])

    def _apply(self, params: Any, batch: dict[str, Any]) -> jax.Array:
        logits = self.model.apply(
            {"params": params},
            batch["tokens"],
            batch.get("positions"),
            segment_ids=batch.get("segment_ids"),
        )
        return cast(jax.Array, logits)

    def apply_fn(self, params: Any, tokens: Any, **kw: Any) -> jax.Array:
        """``logits`` of ``tokens`` (with ``positions``/``segment_ids``), as the loss calls it."""
        return self._apply(params, {"tokens": tokens, **kw})

    def sample(
        self,
        step: Any,
        params: Any,
        rows: list[list[int]],
        *,
        temperature: float,
        key: jax.Array,
        max_new_tokens: int | None = None,
    ) -> list[list[int]]:
        """Completions of ``rows`` by ``step`` (e.g. ``jlora.lora`` of the model's step)."""
        t = self.config.train
        return generate(
            step,
            params,
            rows,
            init_cache=self._init_cache,
            max_new_tokens=t.max_new_tokens if max_new_tokens is None else max_new_tokens,
            eos_ids=_eos_ids(self.tokenizer, self.pretrained.config),
            pad_id=self.tokenizer.pad_token_id or 0,
            temperature=temperature,
            top_k=t.top_k if temperature > 0 else None,
            top_p=t.top_p if temperature > 0 else None,
            key=key,
            cache_len=self.config.data.seq_len,
            pad_to=self.prompt_room,
        )

    def rollout(
        self, step: Any, params: Any, indices: np.ndarray, key: jax.Array, *, held: bool = False
    ) -> Rollout:
        """``num_generations`` sampled completions of each prompt at ``indices``, scored.

        ``held`` (evaluation): one greedy completion per held-out prompt instead.
        """
        t = self.config.train
        records = self.held_prompts if held else self.train_prompts
        ids = self._held_ids if held else self._train_ids
        copies = 1 if held else t.num_generations
        order = [int(i) for i in indices for _ in range(copies)]
        rows = [ids[i] for i in order]
        new = self.sample(step, params, rows, temperature=0.0 if held else t.temperature, key=key)
        texts = [self.tokenizer.decode(n, skip_special_tokens=True) for n in new]
        chat = [not isinstance(records.prompts[i], str) for i in order]
        completions: list[Any] = [
            [{"role": "assistant", "content": x}] if c else x
            for x, c in zip(texts, chat, strict=True)
        ]
        names = sorted({k for i in order for k in records.columns[i]})
        columns = {k: [records.columns[i].get(k) for i in order] for k in names}
        per, total = score(self.rewards, [records.prompts[i] for i in order], completions, columns)
        return Rollout(self._rows(rows, new), total, per, texts, np.asarray([len(n) for n in new]))

    def _rows(self, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, Any]:
        """Prompt then completion per row, right-padded to ``data.seq_len``."""
        seq, pad = self.config.data.seq_len, self.tokenizer.pad_token_id or 0
        n = len(prompts)
        tokens = np.full((n, seq + 1), pad, np.int32)
        mask = np.zeros((n, seq), bool)
        segment = np.zeros((n, seq), np.int32)
        for r, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            row = p + c
            tokens[r, : len(row)] = row
            mask[r, len(p) - 1 : len(row) - 1] = True  # target t is token t + 1
            segment[r, : len(row)] = 1
        positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (n, seq)).copy()
        return {
            "tokens": tokens[:, :seq],
            "targets": tokens[:, 1:],
            "loss_mask": mask,
            "positions": positions,
            "segment_ids": segment,
        }

    def prepare_run(self, run_dir: str, start_model: Any, log: Callable[[str], None]) -> None:
        """Remembers the run directory, where evaluations append sampled completions."""
        del start_model, log
        self.run_dir = run_dir

    def evaluate(self, params: Any, extra: Any) -> dict[str, float]:
        """The mean reward of greedy completions of the held-out prompts, and per function.

        ``params`` is the merged model. A few completions go to ``completions.jsonl`` in the
        run directory, with the step they were sampled at.
        """
        del extra
        index = np.arange(len(self._held_ids))
        batch = self.config.train.batch_size * self.config.train.num_generations
        rollouts = [
            self.rollout(self._step, params, index[i : i + batch], jax.random.key(0), held=True)
            for i in range(0, len(index), batch)
        ]
        rewards = np.concatenate([r.rewards for r in rollouts])
        per = np.concatenate([r.per_function for r in rollouts], axis=1)
        scores = {"eval_reward": mean_scored(rewards)}
        for reward, values in zip(self.rewards, per, strict=True):
            scores[f"eval_rewards/{reward.name}"] = mean_scored(values)
        if self.run_dir is not None:
            texts = [t for r in rollouts for t in r.texts][:SAMPLES_PER_EVAL]
            with open(os.path.join(self.run_dir, COMPLETIONS_FILE), "a", encoding="utf-8") as f:
                for i, text in enumerate(texts):
                    record = {
                        "step": self.current_step,
                        "source": self.held_prompts.sources[i],
                        "completion": text,
                        "reward": float(rewards[i]),
                    }
                    f.write(json.dumps(record) + "\n")
        return scores


def adapted_step(task: RLTask, cfg: jlora.LoraConfig) -> Any:
    """The task's sampler step through the live adapters (one object: it compiles once)."""
    return jlora.lora(task._step, cfg)
