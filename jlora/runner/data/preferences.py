r"""Preference pairs from JSONL, tokenized as TRL's ``DPOTrainer`` does, and their batches.

Design note (the layout of preference data lives here and only here):

- A record is one JSON object per line, in one of TRL's formats: ``{"prompt", "chosen",
  "rejected"}`` strings; conversational ``{"chosen": [messages], "rejected": [messages]}``,
  whose shared leading messages are the prompt; or ``{"prompt": [messages], "chosen":
  [messages], "rejected": [messages]}``.
- A string pair is tokenized apart: the prompt as the tokenizer encodes a text (special tokens
  added as it adds them), each completion without special tokens and followed by EOS. A
  conversational pair renders the prompt with the chat template and the generation prompt,
  and each completion is what the template adds for the answer's messages, trailing whitespace
  left out (as :mod:`~jlora.runner.data.chats` marks assistant turns): for ChatML, the answer
  and its ``<|im_end|>``.
- :class:`Pair` holds ``prompt`` ids and ``chosen``/``rejected`` ids. A batch of ``B`` pairs is
  ``[2B, seq_len]`` padded rows (:func:`~jlora.runner.data.chats.pack`, one example a row): rows
  ``0..B-1`` are prompt + chosen, rows ``B..2B-1`` prompt + rejected, and ``loss_mask`` marks
  the completion's targets, which is what :func:`jlora.dpo_loss` reads.
- A pair longer than ``seq_len`` (prompt + the longer completion) is, under ``overflow:
  truncate``, cut as TRL cuts it: the prompt keeps its end (``truncation_mode="keep_end"``), at
  most ``seq_len // 2`` tokens of it when the completion needs the room, and each completion
  keeps its start.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any, Literal, cast

import numpy as np

from jlora.models.formats.chat_template import render_chat_template
from jlora.models.formats.tokenizer import Tokenizer
from jlora.runner.config import DataSection
from jlora.runner.data.chat_batches import resolve_data, rows
from jlora.runner.data.chats import ROLES, epoch_order, pack
from jlora.runner.data.jsonl import held_out_split, read_jsonl

KEYS = ("prompt", "chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class PreferenceRecords:
    """Preference records read from JSONL, normalised, with where each came from.

    Attributes:
      prompts: a string, or the prompt's messages, per record.
      chosen: the chosen completion: a string, or its messages.
      rejected: the rejected completion, likewise.
      sources: ``"file:line"`` of each record.
      skipped: why each record left out under ``bad_pairs="skip"`` was (``"file:line: ..."``).
    """

    prompts: list[Any]
    chosen: list[Any]
    rejected: list[Any]
    sources: list[str]
    skipped: list[str] = dataclasses.field(default_factory=list)


def _messages(value: Any, key: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f'{where}: "{key}" must be a non-empty list of messages or a string')
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise ValueError(
                f'{where}: "{key}" message {i} has role {role!r}; allowed roles are {list(ROLES)}'
            )
        if not isinstance(m.get("content"), str):
            raise ValueError(f'{where}: "{key}" message {i} content must be a string')
    return cast(list[dict[str, Any]], value)


def _normalise(record: Any, where: str) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` of a record in any of TRL's formats, validated."""
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: a record must be a JSON object; got {type(record).__name__}. Write one "
            'object per line, e.g. {"prompt": "...", "chosen": "...", "rejected": "..."}'
        )
    missing = [k for k in ("chosen", "rejected") if k not in record]
    unknown = sorted(k for k in record if k not in KEYS)
    if missing or unknown:
        raise ValueError(
            f"{where}: a preference record has keys {list(KEYS)} (prompt optional for "
            f"conversations); missing {missing}, unknown {unknown}"
        )
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(chosen, str) or isinstance(rejected, str):
        for key in KEYS:
            if not isinstance(record.get(key), str):
                raise ValueError(
                    f'{where}: a string pair needs "prompt", "chosen" and "rejected" as strings; '
                    f'"{key}" is {type(record.get(key)).__name__}'
                )
        if not chosen.strip() or not rejected.strip():
            raise ValueError(f"{where}: an empty completion (chosen or rejected) teaches nothing")
    else:
        chosen = _messages(chosen, "chosen", where)
        rejected = _messages(rejected, "rejected", where)
        if prompt is None:  # the shared leading messages are the prompt
            n = 0
            while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            if not prompt:
                raise ValueError(
                    f'{where}: "chosen" and "rejected" share no leading message, so there is no '
                    'prompt; give "prompt" as a list of messages'
                )
        else:
            prompt = _messages(prompt, "prompt", where)
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not value or value[-1]["role"] != "assistant" or not value[-1]["content"].strip():
                raise ValueError(
                    f'{where}: the "{key}" completion must end in a non-empty assistant message '
                    "after the prompt"
                )
    if chosen == rejected:
        raise ValueError(f"{where}: chosen and rejected are identical; a pair must differ")
    return prompt, chosen, rejected


def read_preferences(
    path: str | pathlib.Path, bad_pairs: Literal["error", "skip"] = "error"
) -> PreferenceRecords:
    r"""Reads preference records from a JSONL file or a directory of ``*.jsonl`` files.

    Blank lines are ignored; files in a directory are read in sorted name order.

    Args:
      path: a ``.jsonl`` file or a directory of them.
      bad_pairs: a line that is not a pair (any of the errors below but the last two):
        ``"error"`` raises, ``"skip"`` leaves it out and records why in
        :attr:`PreferenceRecords.skipped`.

    Raises:
      ValueError: naming the file and line, for malformed JSON, a record that is not an
        object, a missing or unknown key, a string pair with a non-string field, messages
        with an unknown role or non-string content, an empty completion, a conversation
        without a prompt, chosen identical to rejected; an empty file; no pair left.

    Example:
      >>> import tempfile, pathlib
      >>> f = pathlib.Path(tempfile.mkdtemp()) / "p.jsonl"
      >>> _ = f.write_text('{"prompt": "2+2=", "chosen": "4", "rejected": "5"}\n'
      ...                  '{"prompt": "1+1=", "chosen": "2", "rejected": "2"}\n')
      >>> r = read_preferences(f, bad_pairs="skip")
      >>> r.prompts, r.chosen, r.rejected, r.sources[0].endswith("p.jsonl:1")
      (['2+2='], ['4'], ['5'], True)
      >>> r.skipped[0].split(": ", 1)[1]
      'chosen and rejected are identical; a pair must differ'
    """
    if bad_pairs not in ("error", "skip"):
        raise ValueError(f'bad_pairs must be "error" or "skip"; got {bad_pairs!r}')
    out = PreferenceRecords([], [], [], [])

    def skip(err: ValueError) -> None:
        if bad_pairs == "error":
            raise err
        out.skipped.append(str(err))

    for where, record in read_jsonl(path, on_error=skip):
        try:
            prompt, chosen, rejected = _normalise(record, where)
        except ValueError as err:
            skip(err)
            continue
        out.prompts.append(prompt)
        out.chosen.append(chosen)
        out.rejected.append(rejected)
        out.sources.append(where)
    if not out.sources:
        raise ValueError(
            f"{path}: no preference pair left after skipping {len(out.skipped)} bad "
            f"record(s), the first: {out.skipped[0]}"
        )
    return out


def read_preference_data(
    data: DataSection, seed: int
) -> tuple[PreferenceRecords, PreferenceRecords]:
    """A preference run's training and held-out pairs: ``data.train`` and ``data.eval``.

    Without ``data.eval``, ``data.val_fraction`` of the training pairs (at least one) are held
    out, chosen by ``seed``, so the task and the defaults see the same split.

    Raises:
      FileNotFoundError: as :func:`~jlora.runner.data.chat_batches.resolve_data`.
      ValueError: as :func:`read_preferences`; no ``data.train``; too few pairs to split.

    Example:
      >>> train, held = read_preference_data(
      ...     DataSection(train="builtin:stdlib_modules/train.jsonl"), seed=0)
      >>> len(held.sources) > 0, len(train.sources) > len(held.sources)
      (True, True)
    """
    if data.train is None:
        raise ValueError("data.train is not set: a preference run reads pairs from it")
    bad = cast(Literal["error", "skip"], data.bad_pairs)
    train = read_preferences(resolve_data(data.train, "data.train", "preferences"), bad)
    if data.eval is not None:
        return train, read_preferences(resolve_data(data.eval, "data.eval", "preferences"), bad)
    n = len(train.sources)
    try:
        kept, held = held_out_split(n, data.val_fraction, seed, stream=1 << 20, unit="pair")
    except ValueError as err:
        raise ValueError(f"data.train {data.train!r}: {err}") from None
    return _subset(train, kept), _subset(train, held)


def _subset(records: PreferenceRecords, index: list[int]) -> PreferenceRecords:
    return PreferenceRecords(
        [records.prompts[i] for i in index],
        [records.chosen[i] for i in index],
        [records.rejected[i] for i in index],
        [records.sources[i] for i in index],
        records.skipped,
    )


@dataclasses.dataclass(frozen=True)
class Pair:
    """One tokenized pair: the prompt's ids and each completion's ids."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    source: str


def prompt_ids(prompt: Any, tokenizer: Tokenizer, where: str = "<record>") -> list[int]:
    """The prompt's token ids: a text encoded, or messages rendered with the generation prompt.

    Raises:
      ValueError: messages without a chat template (naming ``where``).
    """
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    text = _render(tokenizer, prompt, where, generation=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _render(tokenizer: Tokenizer, messages: list[Any], where: str, generation: bool) -> str:
    if tokenizer.chat_template is None:
        raise ValueError(
            f"{where}: a conversation needs a chat template, but the tokenizer from "
            f"{tokenizer.source} has none; give string pairs or a tokenizer with a template"
        )
    return render_chat_template(
        tokenizer.chat_template,
        messages,
        add_generation_prompt=generation,
        source=tokenizer.source,
        **tokenizer.special_tokens,
    )


def _completion_ids(prompt: Any, completion: Any, tokenizer: Tokenizer, where: str) -> list[int]:
    eos = tokenizer.eos_token_id
    if isinstance(completion, str):
        ids = list(tokenizer.encode(completion, add_special_tokens=False))
        return ids + ([] if eos is None else [eos])
    head = _render(tokenizer, prompt, where, generation=True)
    whole = _render(tokenizer, [*prompt, *completion], where, generation=False)
    if not whole.startswith(head):
        raise ValueError(
            f"{where}: the chat template of {tokenizer.source} does not render the prompt "
            "(with the generation prompt) as a prefix of the whole conversation, so the "
            "completion cannot be cut from it"
        )
    return list(tokenizer.encode(whole[len(head) :].rstrip(), add_special_tokens=False))


def tokenize_pairs(
    records: PreferenceRecords,
    tokenizer: Tokenizer,
    seq_len: int,
    overflow: Literal["truncate", "error"],
) -> tuple[list[Pair], dict[str, int]]:
    """Every record tokenized (see the module's note), cut to ``seq_len`` or refused.

    Returns:
      The pairs and counts: ``examples`` (pairs), ``tokens`` (of both rows),
      ``truncated_examples``, ``truncated_tokens``.

    Raises:
      ValueError: naming the record's file and line, for a pair longer than ``seq_len`` under
        ``overflow="error"``, a completion that tokenizes to nothing, or a template that cannot
        render it.

    Example:
      >>> from jlora.models.formats.tokenizer import from_gguf_metadata
      >>> tok = from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
      ...     "tokenizer.ggml.tokens": ["a", "b", "</s>"], "tokenizer.ggml.merges": [],
      ...     "tokenizer.ggml.token_type": [1, 1, 3], "tokenizer.ggml.eos_token_id": 2})
      >>> r = PreferenceRecords(["aaaa"], ["b"], ["bb"], ["f:1"])
      >>> pairs, stats = tokenize_pairs(r, tok, 5, "truncate")
      >>> pairs[0].prompt.tolist(), pairs[0].rejected.tolist(), stats["truncated_tokens"]
      ([0, 0], [1, 1, 2], 2)
    """
    pairs, cut_pairs, cut_tokens, total = [], 0, 0, 0
    for prompt, chosen, rejected, where in zip(
        records.prompts, records.chosen, records.rejected, records.sources, strict=True
    ):
        p = prompt_ids(prompt, tokenizer, where)
        c = _completion_ids(prompt, chosen, tokenizer, where)
        r = _completion_ids(prompt, rejected, tokenizer, where)
        if not c or not r:
            raise ValueError(f"{where}: a completion tokenizes to no token; nothing to compare")
        longest = len(p) + max(len(c), len(r))
        if longest > seq_len:
            if overflow == "error":
                raise ValueError(
                    f"{where}: the pair is {longest} tokens (prompt and the longer completion), "
                    f"more than data.seq_len={seq_len}; raise data.seq_len, shorten it, or set "
                    "data.overflow=truncate (the prompt keeps its end, completions their start)"
                )
            room = seq_len - max(len(c), len(r))
            keep = max(room, min(len(p), seq_len // 2))
            before = len(p) + len(c) + len(r)
            p = p[len(p) - keep :] if keep else []
            c, r = c[: seq_len - len(p)], r[: seq_len - len(p)]
            cut_pairs, cut_tokens = cut_pairs + 1, cut_tokens + before - len(p) - len(c) - len(r)
        total += 2 * len(p) + len(c) + len(r)
        ids = [np.asarray(x, np.int32) for x in (p, c, r)]
        pairs.append(Pair(ids[0], ids[1], ids[2], where))
    stats = {
        "examples": len(pairs),
        "tokens": total,
        "truncated_examples": cut_pairs,
        "truncated_tokens": cut_tokens,
        "no_loss_examples": 0,
    }
    return pairs, stats


def pair_rows(pairs: list[Pair], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """``B`` pairs as one ``[2B, seq_len]`` batch: chosen rows, then rejected rows.

    ``loss_mask`` marks the targets that are completion tokens; ``segment_ids`` (1 on tokens,
    0 on padding) and ``positions`` keep padding out of attention.

    Example:
      >>> p = Pair(np.array([5, 6]), np.array([7]), np.array([8, 9]), "f:1")
      >>> b = pair_rows([p], 4, pad_id=0)
      >>> b["tokens"].tolist(), b["loss_mask"].astype(int).tolist()
      ([[5, 6, 7, 0], [5, 6, 8, 9]], [[0, 1, 0, 0], [0, 1, 1, 0]])
    """

    def example(completion: np.ndarray, p: Pair) -> tuple[np.ndarray, np.ndarray]:
        ids = np.concatenate([p.prompt, completion]).astype(np.int32)
        mask = np.concatenate([np.zeros(len(p.prompt), bool), np.ones(len(completion), bool)])
        return ids, mask

    examples = [example(p.chosen, p) for p in pairs] + [example(p.rejected, p) for p in pairs]
    return rows(pack(examples, seq_len, pad_id=pad_id, per_row=1), slice(None))


class PreferenceBatches:
    """Training batches of ``batch_size`` pairs, a pure function of ``(seed, position)``.

    Pair ``i`` of the stream is pair ``epoch_order(n, i // n, seed)[i % n]``: each epoch is a
    permutation seeded by ``(seed, epoch)``, so a resumed run sees the same pairs. With
    :attr:`reference` set (``[2, n]``: each pair's reference log-probability of the chosen,
    then of the rejected completion), a batch also holds ``ref_logps`` ``[2b]``, row by row.

    Raises:
      ValueError: for no pairs.

    Example:
      >>> ps = [Pair(np.array([1]), np.array([2]), np.array([3]), "f:1")] * 3
      >>> b = PreferenceBatches(ps, seq_len=4, batch_size=2, seed=0, pad_id=0)
      >>> b.batch(5)["tokens"].shape
      (4, 4)
      >>> b.reference = np.array([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
      >>> b.batch(0)["ref_logps"].shape
      (4,)
    """

    def __init__(
        self, pairs: list[Pair], seq_len: int, batch_size: int, seed: int, pad_id: int
    ) -> None:
        """Sets up the stream; nothing is laid out until a batch is asked for."""
        if not pairs:
            raise ValueError("no preference pairs to train on")
        self.pairs, self.seq_len, self.batch_size = pairs, seq_len, batch_size
        self.seed, self.pad_id = seed, pad_id
        self.reference: np.ndarray | None = None
        self._orders: dict[int, np.ndarray] = {}

    def _index(self, i: int) -> int:
        n = len(self.pairs)
        e = i // n
        if e not in self._orders:
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            self._orders[e] = epoch_order(n, e, self.seed)
        return int(self._orders[e][i % n])

    def batch(self, position: int) -> dict[str, np.ndarray]:
        """The pairs ``position·b .. position·b + b - 1`` of the stream, as ``[2b, seq]``."""
        b = self.batch_size
        index = [self._index(i) for i in range(position * b, (position + 1) * b)]
        rows = pair_rows([self.pairs[i] for i in index], self.seq_len, self.pad_id)
        if self.reference is not None:
            rows["ref_logps"] = np.concatenate([self.reference[0, index], self.reference[1, index]])
        return rows


def eval_pair_batches(
    pairs: list[Pair], seq_len: int, batch_size: int, pad_id: int
) -> list[dict[str, np.ndarray]]:
    """All held-out pairs in file order as whole batches (the last one filled up by repeats).

    Only the first ``len(pairs)`` pairs of the concatenated batches are real; an evaluation
    drops the rest, so the repeats never count.

    Example:
      >>> ps = [Pair(np.array([1]), np.array([2]), np.array([3]), "f:1")] * 3
      >>> [b["tokens"].shape for b in eval_pair_batches(ps, 4, 2, 0)]
      [(4, 4), (4, 4)]
    """
    n = -(-len(pairs) // batch_size) * batch_size
    padded = [pairs[i % len(pairs)] for i in range(n)]
    return [pair_rows(padded[i : i + batch_size], seq_len, pad_id) for i in range(0, n, batch_size)]


def answer_of(completion: Any) -> str:
    """The text of a completion: the string, or its last (assistant) message's content.

    Example:
      >>> answer_of([{"role": "assistant", "content": "json"}])
      'json'
    """
    if isinstance(completion, str):
        return completion
    return cast(str, cast(Mapping[str, Any], completion[-1])["content"])
