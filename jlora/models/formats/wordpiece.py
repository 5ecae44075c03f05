"""BERT's uncased WordPiece tokenizer, from a ``vocab.txt``: basic split, then greedy sub-words.

Matches Hugging Face's ``BertTokenizer`` (``do_lower_case=True``): control characters dropped,
CJK characters and punctuation split off, accents stripped, then each word cut into the
longest vocabulary pieces from the left (continuations prefixed ``##``), ``[UNK]`` if none fit.
"""

from __future__ import annotations

import os
import unicodedata

import numpy as np

MAX_WORD_CHARS = 100


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def basic_tokens(text: str) -> list[str]:
    """Lower-cased, accent-stripped words and punctuation marks.

    Example:
      >>> basic_tokens("Héllo, World!")
      ['hello', ',', 'world', '!']
    """
    chars = []
    for ch in text:
        cp = ord(ch)
        if (
            cp == 0
            or cp == 0xFFFD
            or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r")
        ):
            continue
        if ch.isspace():
            chars.append(" ")
        elif _is_cjk(cp):
            chars.append(f" {ch} ")
        else:
            chars.append(ch)
    words = []
    for word in "".join(chars).lower().split():
        word = "".join(
            c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn"
        )
        current = ""
        for ch in word:
            if _is_punctuation(ch):
                if current:
                    words.append(current)
                words.append(ch)
                current = ""
            else:
                current += ch
        if current:
            words.append(current)
    return words


class WordPiece:
    r"""A WordPiece tokenizer over a BERT ``vocab.txt`` (one token per line, id = line number).

    Example:
      >>> import pathlib, tempfile
      >>> path = pathlib.Path(tempfile.mkdtemp()) / "vocab.txt"
      >>> _ = path.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nplay\n##ing\n!\n")
      >>> tok = WordPiece(path)
      >>> tok.tokenize("Playing!")
      ['play', '##ing', '!']
      >>> ids, mask = tok.encode_batch(["Playing!"], max_len=6)
      >>> ids.tolist(), mask.tolist()
      ([[2, 4, 5, 6, 3, 0]], [[1, 1, 1, 1, 1, 0]])
    """

    def __init__(self, vocab_path: str | os.PathLike[str]) -> None:
        """Reads the vocabulary.

        Raises:
          FileNotFoundError: if ``vocab_path`` does not exist.
          ValueError: if a special token ([PAD], [UNK], [CLS], [SEP]) is missing.
        """
        if not os.path.isfile(vocab_path):
            raise FileNotFoundError(f"WordPiece vocabulary {os.fspath(vocab_path)!r} not found")
        with open(vocab_path, encoding="utf-8") as f:
            self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.vocab]
        if missing:
            raise ValueError(f"vocabulary {os.fspath(vocab_path)!r} lacks special tokens {missing}")
        self.pad, self.unk = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls, self.sep = self.vocab["[CLS]"], self.vocab["[SEP]"]

    def _pieces(self, word: str) -> list[str]:
        if len(word) > MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """The WordPiece tokens of ``text`` (no special tokens)."""
        return [p for word in basic_tokens(text) for p in self._pieces(word)]

    def encode(self, text: str, max_len: int) -> list[int]:
        """``[CLS] tokens [SEP]`` ids, the tokens truncated to fit ``max_len``."""
        ids = [self.vocab.get(t, self.unk) for t in self.tokenize(text)][: max_len - 2]
        return [self.cls, *ids, self.sep]

    def encode_batch(self, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Padded ids and attention masks ``[len(texts), max_len]`` (int32)."""
        ids = np.full((len(texts), max_len), self.pad, np.int32)
        mask = np.zeros((len(texts), max_len), np.int32)
        for i, text in enumerate(texts):
            row = self.encode(text, max_len)
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask
