"""A run's instruction data: validated and tokenized up front, packed batches by position.

Everything is read and tokenized when the run starts, so a bad record (its file and line
named) stops the run before any step. Batches are a pure function of ``(seed, position)``:
epoch ``e`` packs the examples in :func:`~jlora.runner.data.chats.epoch_order` ``(n, e,
seed)``, the epochs' rows form one stream, and batch ``p`` is rows ``p·b .. p·b + b - 1`` of it,
so a resumed run that stored only its position sees exactly the rows of an uninterrupted one.

A batch is a dict of ``[b, seq_len]`` arrays, the fields of
:class:`~jlora.runner.data.chats.Packed`: ``tokens``, ``targets``, ``loss_mask``,
``segment_ids`` and ``positions``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from collections.abc import Sequence
from typing import Any, Literal, cast

import numpy as np

from jlora.models.formats.tokenizer import Tokenizer
from jlora.runner.config import DataSection
from jlora.runner.data.chats import (
    Packed,
    Records,
    epoch_order,
    pack,
    read_records,
    tokenize_record,
)
from jlora.runner.data.jsonl import held_out_split

BUILTIN = "builtin:"
FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def builtin_data(kind: str = "instructions") -> list[str]:
    """The data sets shipped with jlora, as ``data.train`` accepts them.

    ``kind`` is ``"instructions"`` (SFT records), ``"preferences"`` (pairs, for a preference
    ``train.objective``) or ``"prompts"`` (prompts with answer columns, for ``grpo``).

    Example:
      >>> "builtin:stdlib_modules/train.jsonl" in builtin_data()
      True
      >>> "builtin:stdlib_modules/eval.jsonl" in builtin_data("preferences")
      True
    """
    root = importlib.resources.files("jlora") / "assets" / kind
    return sorted(
        f"{BUILTIN}{folder.name}/{entry.name}"
        for folder in root.iterdir()
        if folder.is_dir()
        for entry in folder.iterdir()
        if entry.name.endswith(".jsonl")
    )


def resolve_data(spec: str, key: str, kind: str = "instructions") -> str:
    """The path behind ``data.train``/``data.eval``: ``builtin:NAME/FILE.jsonl`` or as given.

    A ``builtin:`` name is looked up among the shipped data of ``kind`` (:func:`builtin_data`).

    Raises:
      FileNotFoundError: for a ``builtin:`` name jlora does not ship (the known ones listed),
        or a path that does not exist; ``key`` names the config key.

    Example:
      >>> resolve_data("builtin:stdlib_modules/eval.jsonl", "data.eval").endswith("eval.jsonl")
      True
    """
    if spec.startswith(BUILTIN):
        path = importlib.resources.files("jlora") / "assets" / kind
        path = path / spec.removeprefix(BUILTIN)
        if not path.is_file():
            raise FileNotFoundError(
                f"config {key}: {spec!r} is not a data set shipped with jlora; known: "
                f"{', '.join(builtin_data(kind))}"
            )
        return str(path)
    if not os.path.exists(spec):
        raise FileNotFoundError(
            f"config {key}: {spec!r} does not exist (cwd {os.getcwd()!r}); give a .jsonl file, "
            "a directory of them, or one of " + ", ".join(builtin_data(kind))
        )
    return spec


def read_instruction_data(data: DataSection, seed: int) -> tuple[Records, Records]:
    """A run's training and held-out records: ``data.train`` and ``data.eval``, checked.

    Without ``data.eval``, ``data.val_fraction`` of the ``data.train`` records are held out
    (:func:`split_records` with ``seed``), so the task and the defaults see the same split.

    Raises:
      FileNotFoundError: as :func:`resolve_data`.
      ValueError: as :func:`~jlora.runner.data.chats.read_records`, or if no record is left
        to train on or to evaluate on.

    Example:
      >>> train, held = read_instruction_data(
      ...     DataSection(train="builtin:stdlib_modules/train.jsonl"), seed=0)
      >>> len(held.records) > 0, held.sources[0].split(":")[0].endswith("train.jsonl")
      (True, True)
    """
    no_assistant = cast(Literal["skip", "error"], data.no_assistant)
    if data.train is None:
        raise ValueError("data.train is not set: this run reads data.source, not records")
    train_path = resolve_data(data.train, "data.train")
    train = read_records(train_path, no_assistant=no_assistant)
    if not train.records:
        raise ValueError(
            f"data.train {data.train!r}: no record left to learn from "
            f"({train.skipped} conversation(s) without an assistant turn skipped)"
        )
    if data.eval is None:
        return split_records(train, data.val_fraction, seed)
    held = read_records(resolve_data(data.eval, "data.eval"), no_assistant=no_assistant)
    if not held.records:
        raise ValueError(
            f"data.eval {data.eval!r}: no record to evaluate on "
            f"({held.skipped} conversation(s) without an assistant turn skipped)"
        )
    return train, held


@dataclasses.dataclass(frozen=True)
class Examples:
    """Tokenized examples and what tokenizing them left out.

    Attributes:
      ids: token ids per example (at most ``seq_len`` each).
      masks: per example, which tokens are learned (see :func:`tokenize_record`).
      sources: ``"file:line"`` per example.
      truncated_examples: examples cut to ``seq_len``.
      truncated_tokens: tokens cut off them.
      no_loss: examples dropped because nothing was left to learn within ``seq_len``.
    """

    ids: list[np.ndarray]
    masks: list[np.ndarray]
    sources: list[str]
    truncated_examples: int = 0
    truncated_tokens: int = 0
    no_loss: int = 0

    def stats(self, prefix: str) -> dict[str, int]:
        """Counts for the run's report, keys prefixed by ``prefix`` (``"train"``/``"eval"``)."""
        return {
            f"{prefix}_examples": len(self.ids),
            f"{prefix}_tokens": int(sum(len(i) for i in self.ids)),
            f"{prefix}_truncated_examples": self.truncated_examples,
            f"{prefix}_truncated_tokens": self.truncated_tokens,
            f"{prefix}_no_loss_examples": self.no_loss,
        }


def tokenize_records(
    records: Records,
    tokenizer: Tokenizer,
    seq_len: int,
    overflow: Literal["truncate", "error"],
) -> Examples:
    """Every record tokenized, cut to ``seq_len`` or refused, and checked to teach something.

    Args:
      records: from :func:`~jlora.runner.data.chats.read_records`.
      tokenizer: the model's tokenizer (and chat template).
      seq_len: most tokens per example.
      overflow: ``"truncate"`` examples longer than ``seq_len`` (counted), or ``"error"``.

    Returns:
      The :class:`Examples`; an example whose learned tokens all fall past ``seq_len`` (or
      that has none beyond its first token) is dropped and counted in ``no_loss``.

    Raises:
      ValueError: naming the record's file and line, for a record the template cannot render
        or one longer than ``seq_len`` under ``overflow="error"``.

    Example:
      >>> from jlora.models.formats.tokenizer import from_gguf_metadata
      >>> tok = from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
      ...     "tokenizer.ggml.tokens": ["a", "b", "</s>"], "tokenizer.ggml.merges": [],
      ...     "tokenizer.ggml.token_type": [1, 1, 3], "tokenizer.ggml.eos_token_id": 2})
      >>> r = Records([{"prompt": "aaa", "completion": "b"}, {"text": "ab"}], ["f:1", "f:2"])
      >>> e = tokenize_records(r, tok, 4, "truncate")
      >>> [i.tolist() for i in e.ids], e.truncated_tokens
      ([[0, 0, 0, 1], [0, 1, 2]], 1)
    """
    ids_out, masks_out, sources = [], [], []
    cut_examples = cut_tokens = no_loss = 0
    for record, where in zip(records.records, records.sources, strict=True):
        ids, mask = tokenize_record(record, tokenizer, where=where)
        if len(ids) > seq_len:
            if overflow == "error":
                raise ValueError(
                    f"{where}: the record is {len(ids)} tokens, more than data.seq_len="
                    f"{seq_len}; raise data.seq_len, shorten the record, or set "
                    "data.overflow=truncate to cut it (the count of tokens cut is reported)"
                )
            cut_examples, cut_tokens = cut_examples + 1, cut_tokens + len(ids) - seq_len
            ids, mask = ids[:seq_len], mask[:seq_len]
        if not mask[1:].any():  # a token's loss is its prediction from the one before
            no_loss += 1
            continue
        ids_out.append(ids)
        masks_out.append(mask)
        sources.append(where)
    return Examples(ids_out, masks_out, sources, cut_examples, cut_tokens, no_loss)


def split_records(records: Records, fraction: float, seed: int) -> tuple[Records, Records]:
    """``records`` split into (train, held out), ``fraction`` of them held out at random.

    Raises:
      ValueError: if either part would be empty.

    Example:
      >>> r = Records([{"text": str(i)} for i in range(10)], [f"f:{i}" for i in range(10)])
      >>> train, held = split_records(r, 0.2, seed=0)
      >>> len(train.records), len(held.records)
      (8, 2)
    """
    parts = held_out_split(len(records.records), fraction, seed, stream=1 << 20, unit="record")
    return tuple(  # type: ignore[return-value]
        Records(
            [records.records[i] for i in part],
            [records.sources[i] for i in part],
            records.skipped if k == 0 else 0,
        )
        for k, part in enumerate(parts)
    )


def rows(packed: Packed, index: Sequence[int] | slice) -> dict[str, np.ndarray]:
    """The rows ``index`` of ``packed`` as a batch dict (:data:`FIELDS`)."""
    return {name: getattr(packed, name)[index] for name in FIELDS}


class InstructionBatches:
    """Training batches of packed (or padded) examples, a pure function of the position.

    Example:
      >>> ex = Examples([np.arange(1, 4)] * 5, [np.ones(3, bool)] * 5, ["f:1"] * 5)
      >>> b = InstructionBatches(ex, seq_len=8, batch_size=2, seed=0, packed=True, pad_id=0)
      >>> b.batch(0)["segment_ids"].tolist()
      [[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 2, 2, 2, 0, 0]]
      >>> (b.batch(3)["tokens"] == b.batch(3)["tokens"]).all()
      np.True_
    """

    def __init__(
        self,
        examples: Examples,
        seq_len: int,
        batch_size: int,
        seed: int,
        *,
        packed: bool,
        pad_id: int,
    ) -> None:
        """Sets up the stream; nothing is packed until a batch is asked for."""
        if not examples.ids:
            raise ValueError("no training examples left to learn from")
        self.examples, self.seq_len, self.batch_size = examples, seq_len, batch_size
        self.seed, self.packed, self.pad_id = seed, packed, pad_id
        self._epochs: dict[int, Packed] = {}
        self._starts = [0]  # first stream row of epoch e, for the epochs packed so far

    def epoch(self, e: int) -> Packed:
        """The rows of epoch ``e`` (the two most recently used epochs are kept)."""
        if e not in self._epochs:
            order = epoch_order(len(self.examples.ids), e, self.seed)
            pairs = [(self.examples.ids[i], self.examples.masks[i]) for i in order]
            if len(self._epochs) >= 2:
                del self._epochs[min(self._epochs)]
            self._epochs[e] = pack(
                pairs, self.seq_len, pad_id=self.pad_id, per_row=None if self.packed else 1
            )
        return self._epochs[e]

    def _locate(self, row: int) -> tuple[int, int]:
        """(epoch, row within it) of stream row ``row``."""
        while self._starts[-1] <= row:
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self.epoch(e).tokens))
        e = int(np.searchsorted(self._starts, row, side="right")) - 1
        return e, row - self._starts[e]

    def batch(self, position: int) -> dict[str, np.ndarray]:
        """Rows ``position·b .. position·b + b - 1`` of the stream, as a batch dict."""
        parts = []
        for row in range(position * self.batch_size, (position + 1) * self.batch_size):
            e, r = self._locate(row)
            parts.append(rows(self.epoch(e), [r]))
        return {name: np.concatenate([p[name] for p in parts]) for name in FIELDS}


def eval_batches(
    examples: Examples, seq_len: int, batch_size: int, *, packed: bool, pad_id: int
) -> list[dict[str, np.ndarray]]:
    """All held-out examples in file order, as whole batches, so evaluation compiles once.

    The last batch is filled up with rows that have nothing to learn.

    Example:
      >>> ex = Examples([np.arange(1, 4)] * 3, [np.ones(3, bool)] * 3, ["f:1"] * 3)
      >>> [b["loss_mask"].sum() for b in eval_batches(ex, 4, 2, packed=True, pad_id=0)]
      [np.int64(4), np.int64(2)]
    """
    if not examples.ids:
        return []
    p = pack(
        list(zip(examples.ids, examples.masks, strict=True)),
        seq_len,
        pad_id=pad_id,
        per_row=None if packed else 1,
    )
    n = -(-len(p.tokens) // batch_size) * batch_size
    out = []
    for start in range(0, n, batch_size):
        batch = rows(p, slice(start, start + batch_size))
        short = batch_size - len(batch["tokens"])
        if short:
            batch = {
                k: np.concatenate([v, np.zeros((short, seq_len), v.dtype)])
                for k, v in batch.items()
            }
        out.append(batch)
    return out


@dataclasses.dataclass(frozen=True)
class Question:
    """A held-out record as a question: the prompt's token ids and the reference answer."""

    prompt: list[int]
    reference: str
    source: str


def questions(records: Records, tokenizer: Tokenizer) -> list[Question]:
    """The held-out records that have an answer to match, as :class:`Question` s.

    A conversation asks everything before its last assistant turn (rendered with the
    generation prompt) and is answered by that turn; a ``prompt``/``completion`` record asks
    its prompt (as a user turn when the tokenizer has a chat template). ``text`` records have
    no question and are left out.

    Example:
      >>> from jlora.models.formats.tokenizer import from_gguf_metadata
      >>> tok = from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
      ...     "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": [],
      ...     "tokenizer.ggml.token_type": [1, 1]})
      >>> questions(Records([{"prompt": "ab", "completion": "b"}, {"text": "a"}], ["f:1", "f:2"]),
      ...           tok)
      [Question(prompt=[0, 1], reference='b', source='f:1')]
    """
    out = []
    for record, where in zip(records.records, records.sources, strict=True):
        if "messages" in record:
            messages = record["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            if last == 0:
                continue
            asked, reference = messages[:last], messages[last]["content"]
        elif "prompt" in record:
            asked = [{"role": "user", "content": record["prompt"]}]
            reference = record["completion"]
        else:
            continue
        if tokenizer.chat_template is None:
            if "prompt" not in record:
                continue
            prompt = tokenizer.encode(record["prompt"])
        else:
            prompt = cast(
                list[int], tokenizer.apply_chat_template(asked, add_generation_prompt=True)
            )
        out.append(Question(prompt, reference, where))
    return out


def exact_match(answers: Sequence[str], references: Sequence[str]) -> float:
    """The share of answers equal to their reference, surrounding whitespace ignored.

    Example:
      >>> exact_match(["json ", "os"], ["json", "sys"])
      0.5
    """
    if len(answers) != len(references) or not answers:
        raise ValueError(
            f"exact_match needs equally many answers and references, at least one; got "
            f"{len(answers)} and {len(references)}"
        )
    hits = sum(a.strip() == r.strip() for a, r in zip(answers, references, strict=True))
    return hits / len(answers)


def describe(stats: dict[str, Any]) -> str:
    """One line on what the data holds and what was left out, for the run's log.

    Example:
      >>> print(describe({"train_examples": 9, "train_tokens": 90, "skipped": 2,
      ...     "train_truncated_examples": 1, "train_truncated_tokens": 4,
      ...     "train_no_loss_examples": 0}))
      train: 9 examples, 90 tokens, 1 truncated (4 tokens cut); skipped 2 without an assistant turn
      >>> print(describe({"skipped_bad_pairs": 1, "first_bad_pair": "p.jsonl:3: not JSON"}))
      ; skipped 1 bad pair(s), the first p.jsonl:3: not JSON
    """
    parts = []
    for split in ("train", "eval"):
        if f"{split}_examples" not in stats:
            continue
        text = (
            f"{split}: {stats[f'{split}_examples']:,} examples, {stats[f'{split}_tokens']:,} tokens"
        )
        if stats[f"{split}_truncated_examples"]:
            text += (
                f", {stats[f'{split}_truncated_examples']:,} truncated "
                f"({stats[f'{split}_truncated_tokens']:,} tokens cut)"
            )
        if stats[f"{split}_no_loss_examples"]:
            text += f", {stats[f'{split}_no_loss_examples']:,} dropped with nothing to learn"
        parts.append(text)
    line = "; ".join(parts)
    if stats.get("skipped"):
        line += f"; skipped {stats['skipped']:,} without an assistant turn"
    if stats.get("skipped_bad_pairs"):
        line += (
            f"; skipped {stats['skipped_bad_pairs']:,} bad pair(s), the first "
            f"{stats['first_bad_pair']}"
        )
    return line
