"""Instruction data from JSONL: records, token ids with an assistant-only loss mask, packed rows.

Design note (the layout of this data lives here and only here):

- A record is one JSON object per line: ``{"messages": [{"role", "content"}, ...]}``,
  ``{"prompt", "completion"}`` or ``{"text"}``.
- :func:`tokenize_record` gives ``ids`` and ``loss_mask`` of equal length, where
  ``loss_mask[t]`` says that token ``t`` is one the model should learn to *produce* (an
  assistant token, a completion token, any token of a ``text`` record).
- :func:`pack` shifts that into training arrays: ``targets[r, j]`` is the next token of the
  same segment and ``loss_mask[r, j]`` is the ``loss_mask`` of that next token, so a segment's
  last slot and padding predict nothing. ``segment_ids`` number the examples of a row 1, 2, ...
  (0 for padding) and ``positions`` restart at 0 in each segment, which is what
  :class:`jlora.models.decoder.Decoder` needs to keep packed examples independent.

Assistant tokens come from character spans mapped to tokens the way transformers'
``return_assistant_tokens_mask`` does (``Encoding.char_to_token`` of a span's first and last
character). Templates with ``{% generation %}`` blocks give the spans directly; for the others
a turn's span runs from the end of ``messages[:i]`` rendered with the generation prompt to the
end of ``messages[:i+1]``, trailing whitespace excluded (the separator before the next turn is
not something the model generates), so both kinds of ChatML template give the same mask.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from jlora.models.formats.chat_template import render_chat_template, render_chat_template_spans
from jlora.models.formats.tokenizer import Tokenizer
from jlora.runner.data.jsonl import read_jsonl

ROLES = ("system", "user", "assistant", "tool")
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclasses.dataclass(frozen=True)
class Records:
    """Records read from JSONL, with where each came from.

    Attributes:
      records: the JSON objects, in file then line order.
      sources: ``"file:line"`` of each record, for error messages.
      skipped: conversations without an assistant turn that were left out.
    """

    records: list[dict[str, Any]]
    sources: list[str]
    skipped: int = 0


@dataclasses.dataclass(frozen=True)
class Packed:
    """Rows of packed examples, ready for ``Decoder.apply(..., positions, segment_ids=...)``.

    Attributes:
      tokens: int32 ``[N, seq_len]``, padding filled with the ``pad_id`` given to :func:`pack`.
      targets: int32 ``[N, seq_len]``: the next token within the same segment (0 elsewhere).
      loss_mask: bool ``[N, seq_len]``: the target is a token to learn.
      segment_ids: int32 ``[N, seq_len]``: 1, 2, ... per example in a row, 0 for padding.
      positions: int32 ``[N, seq_len]``: restart at 0 in each segment (0 for padding).
      truncated: tokens cut off examples longer than ``seq_len``.
    """

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    truncated: int = 0


def _kind(record: Any, where: str) -> str:
    """Which of ``messages``, ``prompt``/``completion``, ``text`` a record is, validated."""
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: a record must be a JSON object; got {type(record).__name__}. Write one "
            'object per line, e.g. {"text": "..."}'
        )
    kinds = [k for k in ("messages", "prompt", "text") if k in record]
    if "completion" in record and "prompt" not in kinds:
        kinds.append("prompt")
    if len(kinds) != 1:
        found = "none" if not kinds else " and ".join(kinds)
        raise ValueError(
            f'{where}: a record needs exactly one of "messages", "prompt"+"completion" or '
            f'"text"; found {found} among keys {sorted(record)}'
        )
    kind = kinds[0]
    if kind == "messages":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f'{where}: "messages" must be a non-empty list of messages')
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                role = m.get("role") if isinstance(m, dict) else m
                raise ValueError(
                    f"{where}: message {i} has role {role!r}; allowed roles are {list(ROLES)}"
                )
            if not isinstance(m.get("content"), str):
                raise ValueError(
                    f"{where}: message {i} ({m['role']}) has content "
                    f"{type(m.get('content')).__name__}; content must be a string"
                )
    else:
        keys = ("prompt", "completion") if kind == "prompt" else ("text",)
        for key in keys:
            if not isinstance(record.get(key), str):
                raise ValueError(
                    f'{where}: "{key}" must be a string; got {type(record.get(key)).__name__}'
                )
    return kind


def read_records(
    path: str | os.PathLike[str], *, no_assistant: Literal["skip", "error"] = "skip"
) -> Records:
    r"""Reads instruction records from a JSONL file or a directory of ``*.jsonl`` files.

    Blank lines are ignored; files in a directory are read in sorted name order.

    Args:
      path: a ``.jsonl`` file or a directory holding them.
      no_assistant: what to do with a conversation without an assistant turn (nothing to
        learn from): ``"skip"`` it and count it in :attr:`Records.skipped`, or ``"error"``.

    Returns:
      The records, their ``file:line`` sources and the number skipped.

    Raises:
      ValueError: naming the file and line, for malformed JSON, a record that is not an
        object or has none (or several) of the known kinds, an unknown role, content that
        is not a string, a conversation without an assistant turn under ``"error"``, an empty
        file, or a directory without ``.jsonl`` files.

    Example:
      >>> import tempfile, pathlib
      >>> d = pathlib.Path(tempfile.mkdtemp())
      >>> _ = (d / "a.jsonl").write_text('{"text": "hi"}\n{"messages": [{"role": "user", '
      ...                               '"content": "?"}]}\n')
      >>> r = read_records(d)
      >>> r.records, r.sources[0].endswith("a.jsonl:1"), r.skipped
      ([{'text': 'hi'}], True, 1)
    """
    if no_assistant not in ("skip", "error"):
        raise ValueError(f'no_assistant must be "skip" or "error"; got {no_assistant!r}')
    records: list[dict[str, Any]] = []
    sources: list[str] = []
    skipped = 0
    for where, record in read_jsonl(path):
        kind = _kind(record, where)
        if kind == "messages" and all(m["role"] != "assistant" for m in record["messages"]):
            if no_assistant == "error":
                raise ValueError(
                    f"{where}: conversation has no assistant turn, so nothing to learn; "
                    'add one or read with no_assistant="skip"'
                )
            skipped += 1
            continue
        records.append(record)
        sources.append(where)
    return Records(records, sources, skipped)


def _spans_to_mask(encoding: Any, spans: Sequence[tuple[int, int]], n: int) -> np.ndarray:
    """Tokens covering character spans, as transformers' ``assistant_masks`` marks them."""
    mask = np.zeros(n, bool)
    for start, end in spans:
        first = encoding.char_to_token(start)
        last = encoding.char_to_token(end - 1)
        if first is None:  # as transformers: a span outside the tokens ends the marking
            break
        # transformers treats a missing (or zero) last token as "to the end"
        mask[first : last + 1 if last else n] = True
    return mask


def _prefix_spans(
    tokenizer: Tokenizer,
    template: str,
    messages: list[dict[str, Any]],
    text: str,
    ids: list[int],
    where: str,
) -> list[tuple[int, int]]:
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat_template(
            template,
            messages[:i],
            add_generation_prompt=True,
            source=tokenizer.source,
            **tokenizer.special_tokens,
        )
        through = render_chat_template(
            template, messages[: i + 1], source=tokenizer.source, **tokenizer.special_tokens
        )
        before_ids = tokenizer.encode(before, add_special_tokens=False)
        if (
            not through.startswith(before)
            or not text.startswith(through)
            or ids[: len(before_ids)] != before_ids
        ):
            raise ValueError(
                f"{where}: the chat template of {tokenizer.source} does not render "
                f"prefix-consistently at message {i}: the conversation up to it (with the "
                "generation prompt) is not a prefix of the whole, in text or tokens, so the "
                "assistant tokens cannot be found. Mark them with {% generation %} blocks in "
                "the template"
            )
        end = len(before) + len(through[len(before) :].rstrip())
        spans.append((len(before), end))
    return spans


def tokenize_record(
    record: Mapping[str, Any], tokenizer: Tokenizer, *, where: str = "<record>"
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of one record and the mask of the tokens to learn.

    - ``messages``: rendered with the tokenizer's chat template; loss on assistant turns.
    - ``prompt``/``completion``: with a chat template, a user turn then an assistant turn (so
      the model learns the format it will be prompted with); without one, ``prompt +
      completion`` as text (special tokens added as the tokenizer adds them) then EOS, with
      loss on the completion and EOS.
    - ``text``: the text (special tokens added) then EOS; loss on every token.

    Args:
      record: one record, as :func:`read_records` returns them.
      tokenizer: the model's tokenizer.
      where: where the record came from (``Records.sources[i]``), for error messages.

    Returns:
      ``(ids, loss_mask)``: int32 and bool arrays of equal length.

    Raises:
      ValueError: for an invalid record, a conversation without a chat template, a template
        that fails to render or does not render prefix-consistently (naming ``where``).

    Example:
      >>> from jlora.models.formats.tokenizer import from_gguf_metadata
      >>> tok = from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
      ...     "tokenizer.ggml.tokens": ["a", "b", "</s>"], "tokenizer.ggml.merges": [],
      ...     "tokenizer.ggml.token_type": [1, 1, 3], "tokenizer.ggml.eos_token_id": 2})
      >>> ids, mask = tokenize_record({"prompt": "aa", "completion": "b"}, tok)
      >>> ids.tolist(), mask.tolist()
      ([0, 0, 1, 2], [False, False, True, True])
    """
    kind = _kind(record, where)
    eos = tokenizer.eos_token_id
    if kind == "text":
        ids = tokenizer.encode(record["text"]) + ([] if eos is None else [eos])
        return np.asarray(ids, np.int32), np.ones(len(ids), bool)
    if kind == "prompt" and tokenizer.chat_template is None:
        prompt, text = record["prompt"], record["prompt"] + record["completion"]
        encoding = tokenizer.backend.encode(text)
        ids = list(encoding.ids)
        mask = _spans_to_mask(encoding, [(len(prompt), len(text))], len(ids))
        if eos is not None:
            ids, mask = [*ids, eos], np.append(mask, True)
        return np.asarray(ids, np.int32), mask
    if kind == "prompt":
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
    else:
        messages = list(record["messages"])
    template = tokenizer.chat_template
    if template is None:
        raise ValueError(
            f"{where}: a conversation needs a chat template, but the tokenizer from "
            f"{tokenizer.source} has none; set tokenizer.chat_template"
        )
    try:
        if _GENERATION.search(template):
            text, spans = render_chat_template_spans(
                template, messages, source=tokenizer.source, **tokenizer.special_tokens
            )
            encoding = tokenizer.backend.encode(text, add_special_tokens=False)
        else:
            text = render_chat_template(
                template, messages, source=tokenizer.source, **tokenizer.special_tokens
            )
            encoding = tokenizer.backend.encode(text, add_special_tokens=False)
            spans = _prefix_spans(tokenizer, template, messages, text, list(encoding.ids), where)
    except ValueError as err:
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where}: {err}") from None
    ids = list(encoding.ids)
    return np.asarray(ids, np.int32), _spans_to_mask(encoding, spans, len(ids))


def pack(
    examples: Sequence[tuple[np.ndarray, np.ndarray]],
    seq_len: int,
    *,
    overflow: Literal["truncate", "error"] = "error",
    pad_id: int = 0,
    per_row: int | None = None,
) -> Packed:
    """Greedily packs ``(ids, loss_mask)`` examples into rows of ``seq_len`` tokens.

    Examples go in order into the current row while they fit, then a new row starts (next
    fit: the order a shuffle gave is kept). A packed example's loss equals its loss alone
    because attention stays inside segments and positions restart.

    Args:
      examples: ``(ids, loss_mask)`` pairs from :func:`tokenize_record`.
      seq_len: tokens per row.
      overflow: an example longer than ``seq_len`` is cut to its first ``seq_len`` tokens
        (``"truncate"``, counted in :attr:`Packed.truncated`) or refused (``"error"``).
      pad_id: token id written into padding.
      per_row: at most this many examples per row (1 gives padded, unpacked rows); ``None``
        packs as many as fit.

    Returns:
      A :class:`Packed` with ``[rows, seq_len]`` arrays.

    Raises:
      ValueError: for ``seq_len < 2``, ``per_row < 1``, an unknown ``overflow``, an empty
        example, ids and mask of different lengths, or an example too long under
        ``overflow="error"``.

    Example:
      >>> import numpy as np
      >>> p = pack([(np.array([5, 6, 7]), np.array([0, 1, 1], bool)),
      ...           (np.array([8, 9]), np.array([1, 1], bool))], 6)
      >>> p.tokens.tolist(), p.targets.tolist(), p.loss_mask.astype(int).tolist()
      ([[5, 6, 7, 8, 9, 0]], [[6, 7, 0, 9, 0, 0]], [[1, 1, 0, 1, 0, 0]])
      >>> p.segment_ids.tolist(), p.positions.tolist()
      ([[1, 1, 1, 2, 2, 0]], [[0, 1, 2, 0, 1, 0]])
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (a token and its target); got {seq_len}")
    if overflow not in ("truncate", "error"):
        raise ValueError(f'overflow must be "truncate" or "error"; got {overflow!r}')
    if per_row is not None and per_row < 1:
        raise ValueError(f"per_row must be at least 1 (or None to fill rows); got {per_row}")
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    used = seq_len  # forces a first row
    truncated = 0
    for index, (ids, mask) in enumerate(examples):
        ids, mask = np.asarray(ids), np.asarray(mask, bool)
        if ids.ndim != 1 or ids.shape != mask.shape or len(ids) == 0:
            raise ValueError(
                f"example {index}: ids and loss_mask must be equal-length non-empty 1-D arrays; "
                f"got shapes {ids.shape} and {mask.shape}"
            )
        if len(ids) > seq_len:
            if overflow == "error":
                raise ValueError(
                    f"example {index} has {len(ids)} tokens, more than seq_len={seq_len}; "
                    'raise seq_len or pack with overflow="truncate"'
                )
            truncated += len(ids) - seq_len
            ids, mask = ids[:seq_len], mask[:seq_len]
        if used + len(ids) > seq_len or (per_row is not None and len(rows[-1]) >= per_row):
            rows.append([])
            used = 0
        rows[-1].append((ids, mask))
        used += len(ids)
    shape = (len(rows), seq_len)
    tokens = np.full(shape, pad_id, np.int32)
    targets = np.zeros(shape, np.int32)
    loss_mask = np.zeros(shape, bool)
    segment_ids = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    for r, row in enumerate(rows):
        start = 0
        for segment, (ids, mask) in enumerate(row, start=1):
            end = start + len(ids)
            tokens[r, start:end] = ids
            targets[r, start : end - 1] = ids[1:]
            loss_mask[r, start : end - 1] = mask[1:]
            segment_ids[r, start:end] = segment
            positions[r, start:end] = np.arange(len(ids))
            start = end
    return Packed(tokens, targets, loss_mask, segment_ids, positions, truncated)


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """The order of ``n`` examples in ``epoch``: a permutation seeded by ``(seed, epoch)``.

    The same ``(n, epoch, seed)`` always gives the same order, in any process, so a resumed
    run sees the data it would have seen; each epoch has its own order.

    Raises:
      ValueError: for negative ``n``, ``epoch`` or ``seed``.

    Example:
      >>> (epoch_order(5, 0, seed=1) == epoch_order(5, 0, seed=1)).all()
      np.True_
      >>> sorted(epoch_order(5, 3, seed=1).tolist())
      [0, 1, 2, 3, 4]
    """
    if min(n, epoch, seed) < 0:
        raise ValueError(
            f"n, epoch and seed must be non-negative integers; got {n}, {epoch}, {seed}"
        )
    return np.random.default_rng([seed, epoch]).permutation(n)
