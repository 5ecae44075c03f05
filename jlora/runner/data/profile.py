"""A run's data measured with the model's tokenizer alone: token lengths, counts and epochs.

Design note: the numbers here are the ones the task will see, from the same records, split,
tokenization, truncation and packing (:mod:`jlora.runner.data.chat_batches`,
:mod:`jlora.runner.data.text`), but computed without the weights and without building any
batch. Each instruction example is kept as two numbers, its token length and the first
position ``t >= 1`` whose token is learned, which is all that deciding truncation
(``length > seq_len``), dropping (nothing learned before ``seq_len``) and packing needs, for
any ``seq_len``. :mod:`jlora.runner.defaults` chooses ``data.seq_len`` and ``train.steps``
from a :class:`DataProfile`, and the dry run prints its statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jlora.models.formats.tokenizer import Tokenizer
from jlora.runner.data.chats import Records, epoch_order, tokenize_record
from jlora.runner.data.preferences import PreferenceRecords, prompt_ids, tokenize_pairs
from jlora.runner.data.prompts import PromptRecords
from jlora.runner.data.text import split_tokens

# How many held-out tokens are decoded to find the first words of the held-out text.
_HELD_TEXT_TOKENS = 512
#: ``Lengths.first_learned`` of an example with no token to learn: past any ``seq_len``.
NOTHING_LEARNED = np.iinfo(np.int64).max


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Tokenized examples, as much of them as truncation, dropping and packing depend on.

    Attributes:
      lengths: tokens per example, before any truncation.
      first_learned: per example, the first position ``t >= 1`` whose token is learned (a
        token's loss is its prediction from the one before), or :data:`NOTHING_LEARNED`.
    """

    lengths: np.ndarray
    first_learned: np.ndarray

    @classmethod
    def of(cls, examples: list[tuple[np.ndarray, np.ndarray]]) -> Lengths:
        """From ``(ids, loss_mask)`` pairs, as :func:`~jlora.runner.data.chats.tokenize_record`.

        Example:
          >>> m = Lengths.of([(np.arange(4), np.array([0, 0, 1, 1], bool))])
          >>> m.lengths.tolist(), m.first_learned.tolist()
          ([4], [2])
        """
        lengths = [len(ids) for ids, _ in examples]
        first = [
            1 + int(np.argmax(mask[1:])) if mask[1:].any() else NOTHING_LEARNED
            for _, mask in examples
        ]
        return cls(np.asarray(lengths, np.int64), np.asarray(first, np.int64))

    def kept(self, seq_len: int) -> np.ndarray:
        """The lengths, cut to ``seq_len``, of the examples that still teach something.

        Example:
          >>> Lengths(np.array([3, 9, 9]), np.array([1, 2, 8])).kept(4).tolist()
          [3, 4]
        """
        keep = self.first_learned < seq_len
        return np.minimum(self.lengths[keep], seq_len)

    def stats(self, prefix: str, seq_len: int) -> dict[str, int]:
        """The counts :meth:`~jlora.runner.data.chat_batches.Examples.stats` gives at ``seq_len``.

        Example:
          >>> Lengths(np.array([3, 9, 9]), np.array([1, 2, 8])).stats("train", 4)
          ... # doctest: +NORMALIZE_WHITESPACE
          {'train_examples': 2, 'train_tokens': 7, 'train_truncated_examples': 2,
           'train_truncated_tokens': 10, 'train_no_loss_examples': 1}
        """
        long = self.lengths > seq_len
        kept = self.kept(seq_len)
        return {
            f"{prefix}_examples": len(kept),
            f"{prefix}_tokens": int(kept.sum()),
            f"{prefix}_truncated_examples": int(long.sum()),
            f"{prefix}_truncated_tokens": int((self.lengths[long] - seq_len).sum()),
            f"{prefix}_no_loss_examples": int((self.first_learned >= seq_len).sum()),
        }


def tokenized_lengths(records: Records, tokenizer: Tokenizer) -> Lengths:
    """Every record tokenized as for training (:func:`tokenize_record`), kept as :class:`Lengths`.

    Raises:
      ValueError: as :func:`tokenize_record`, naming the record's file and line.

    Example:
      >>> from jlora.models.formats.tokenizer import byte_level
      >>> r = Records([{"text": "abc"}, {"prompt": "a", "completion": "bc"}], ["f:1", "f:2"])
      >>> tokenized_lengths(r, byte_level()).lengths.tolist()
      [3, 3]
    """
    pairs = [
        tokenize_record(record, tokenizer, where=where)
        for record, where in zip(records.records, records.sources, strict=True)
    ]
    return Lengths.of(pairs)


def epoch_rows(kept: np.ndarray, seq_len: int, seed: int, *, packed: bool) -> int:
    """Rows of ``seq_len`` that epoch 0 of the training stream packs ``kept`` examples into.

    Next-fit in epoch 0's shuffled order (:func:`~jlora.runner.data.chats.epoch_order`), as
    :func:`~jlora.runner.data.chats.pack` fills rows; unpacked, one example per row.

    Example:
      >>> epoch_rows(np.array([3, 3, 3]), 6, seed=0, packed=True)
      2
      >>> epoch_rows(np.array([3, 3, 3]), 6, seed=0, packed=False)
      3
    """
    if not packed:
        return len(kept)
    rows, used = 0, seq_len
    for i in epoch_order(len(kept), 0, seed):
        if used + kept[i] > seq_len:
            rows, used = rows + 1, 0
        used += int(kept[i])
    return rows


@dataclasses.dataclass(frozen=True)
class DataProfile:
    """A run's training and held-out data, measured.

    Instruction data (``data.train``) has ``train``/``held`` :class:`Lengths` and the records;
    a text (``data.source``) has its token counts and the start of the held-out text.

    Attributes:
      train: the training examples (instruction data), or ``None``.
      held: the held-out examples (instruction data), or ``None``.
      train_records: the training records (instruction data), or ``None``.
      held_records: the held-out records (instruction data), or ``None``.
      skipped: conversations without an assistant turn left out.
      train_tokens: tokens of the training text (text), or 0.
      held_tokens: tokens of the held-out text (text), or 0.
      held_text: the start of the held-out text, decoded (text), or ``""``.
      unit: ``""`` for instruction examples or a text; ``"pairs"`` for preference pairs (one
        padded ``[2, seq_len]`` pair of rows each, prompt plus the longer completion) and
        ``"prompts"`` for GRPO prompts (one row per completion, prompt plus
        ``max_new_tokens``): never packed or dropped.
    """

    train: Lengths | None = None
    held: Lengths | None = None
    train_records: Records | None = None
    held_records: Records | None = None
    skipped: int = 0
    train_tokens: int = 0
    held_tokens: int = 0
    held_text: str = ""
    unit: str = ""

    @property
    def instructions(self) -> bool:
        """Whether this is instruction data (else a text)."""
        return self.train is not None

    def stats(self, seq_len: int) -> dict[str, Any]:
        """The run's data statistics at ``seq_len``, keyed as the task's ``data_stats``.

        Example:
          >>> DataProfile(train_tokens=1000, held_tokens=100).stats(64)["train_windows"]
          15
        """
        if self.train is None or self.held is None:
            return {
                "train_tokens": self.train_tokens,
                "train_windows": max(self.train_tokens - 1, 0) // seq_len,
                "eval_tokens": self.held_tokens,
                "eval_windows": max(self.held_tokens - 1, 0) // seq_len,
            }
        return {
            **self.train.stats("train", seq_len),
            **self.held.stats("eval", seq_len),
            "skipped": self.skipped,
        }

    def epoch_rows(self, seq_len: int, seed: int, *, packed: bool) -> int:
        """Rows of ``seq_len`` (text windows, or packed or padded examples) in one epoch.

        Example:
          >>> DataProfile(train_tokens=1000).epoch_rows(64, seed=0, packed=True)
          15
        """
        if self.train is None:
            return max(self.train_tokens - 1, 0) // seq_len
        kept = self.train.kept(seq_len)
        return epoch_rows(kept, seq_len, seed, packed=packed and not self.unit)


def instruction_profile(train: Records, held: Records, tokenizer: Tokenizer) -> DataProfile:
    """The :class:`DataProfile` of instruction records (as the task splits them).

    Example:
      >>> from jlora.models.formats.tokenizer import byte_level
      >>> r = Records([{"text": "abc"}], ["f:1"])
      >>> instruction_profile(r, r, byte_level()).stats(2)["train_truncated_tokens"]
      1
    """
    return DataProfile(
        train=tokenized_lengths(train, tokenizer),
        held=tokenized_lengths(held, tokenizer),
        train_records=train,
        held_records=held,
        skipped=train.skipped + held.skipped,
    )


def preference_profile(
    train: PreferenceRecords, held: PreferenceRecords, tokenizer: Tokenizer
) -> DataProfile:
    """The :class:`DataProfile` of preference pairs, as the task splits and tokenizes them.

    A pair's length is its prompt's plus its longer completion's, as
    :func:`~jlora.runner.data.preferences.tokenize_pairs` lays it out.

    The held-out records are the prompts with their chosen answers, so that sample prompts
    come from them as from instruction data.

    Raises:
      ValueError: as :func:`~jlora.runner.data.preferences.tokenize_pairs`.

    Example:
      >>> from jlora.models.formats.tokenizer import byte_level
      >>> r = PreferenceRecords(["ab"], ["c"], ["de"], ["f:1"])
      >>> p = preference_profile(r, r, byte_level())
      >>> p.train.lengths.tolist(), p.held_records.records
      ([4], [{'prompt': 'ab', 'completion': 'c'}])
    """

    def lengths(records: PreferenceRecords) -> Lengths:
        pairs, _ = tokenize_pairs(records, tokenizer, NOTHING_LEARNED, "truncate")
        n = [len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs]
        return Lengths(np.asarray(n, np.int64), np.ones(len(n), np.int64))

    def as_records(records: PreferenceRecords) -> Records:
        out = [
            {"prompt": p, "completion": c} if isinstance(p, str) else {"messages": [*p, *c]}
            for p, c in zip(records.prompts, records.chosen, strict=True)
        ]
        return Records(out, list(records.sources))

    return DataProfile(
        train=lengths(train),
        held=lengths(held),
        train_records=as_records(train),
        held_records=as_records(held),
        unit="pairs",
    )


def prompt_profile(
    train: PromptRecords, held: PromptRecords, tokenizer: Tokenizer, new_tokens: int
) -> DataProfile:
    """The :class:`DataProfile` of GRPO prompts: each prompt's tokens plus ``new_tokens``.

    The held-out records are the prompts, so that sample prompts come from them.

    Example:
      >>> from jlora.models.formats.tokenizer import byte_level
      >>> r = PromptRecords(["ab"], [{}], ["f:1"])
      >>> prompt_profile(r, r, byte_level(), 8).train.lengths.tolist()
      [10]
    """

    def lengths(records: PromptRecords) -> Lengths:
        n = [
            len(prompt_ids(p, tokenizer, w)) + new_tokens
            for p, w in zip(records.prompts, records.sources, strict=True)
        ]
        return Lengths(np.asarray(n, np.int64), np.ones(len(n), np.int64))

    def as_records(records: PromptRecords) -> Records:
        out = [
            {"prompt": p, "completion": ""}
            if isinstance(p, str)
            else {"messages": [*p, {"role": "assistant", "content": ""}]}
            for p in records.prompts
        ]
        return Records(out, list(records.sources))

    return DataProfile(
        train=lengths(train),
        held=lengths(held),
        train_records=as_records(train),
        held_records=as_records(held),
        unit="prompts",
    )


def text_profile(text: str, tokenizer: Tokenizer, val_fraction: float) -> DataProfile:
    r"""The :class:`DataProfile` of a text, tokenized and split as the task does.

    Example:
      >>> from jlora.models.formats.tokenizer import byte_level
      >>> p = text_profile("one two\nthree four\n", byte_level(), 0.5)
      >>> p.train_tokens, p.held_text
      (9, 'hree four\n')
    """
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)
    train, held = split_tokens(ids, val_fraction)
    held_text = tokenizer.decode(held[:_HELD_TEXT_TOKENS].tolist(), skip_special_tokens=True)
    return DataProfile(train_tokens=len(train), held_tokens=len(held), held_text=held_text)
