"""Tokenizers built torch-free from a Hugging Face directory, a GGUF file or a SentencePiece model.

Every source becomes one ``tokenizers.Tokenizer`` (the Rust library transformers' fast
tokenizers run on) wrapped in :class:`Tokenizer`, which adds what transformers keeps beside
it: the special tokens, ``clean_up_tokenization_spaces`` and the chat template. GGUF
vocabularies are rebuilt the way llama.cpp tokenizes them: byte-level BPE ("gpt2") with the
pre-tokenizer that ``tokenizer.ggml.pre`` names, or SentencePiece-style BPE ("llama") with
byte fallback; a ``tokenizer.model`` goes the same second way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from jlora.models.formats.chat_template import render_chat_template
from jlora.models.formats.hf_dir import read_json

_GPT2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501


def _split_then_bytes(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


#: ``tokenizer.ggml.pre`` -> the pre-tokenizer of the model's own ``tokenizer.json``.
PRE_TOKENIZERS = {
    "default": _GPT2,
    "gpt2": _GPT2,
    # llama.cpp isolates every digit, then applies GPT-2's regex; SmolLM's tokenizer.json says so
    **{
        name: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2])
        for name in ("smollm", "starcoder", "refact", "codeshell")
    },
    "llama-bpe": _split_then_bytes(_SPLIT % "{1,3}"),
    "llama3": _split_then_bytes(_SPLIT % "{1,3}"),
    "qwen2": _split_then_bytes(_SPLIT % ""),
}
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
#: ``tokenizer_class`` (less ``Fast``) -> its default ``add_bos_token``: the transformers
#: classes that rebuild the post-processor from ``add_bos_token``/``add_eos_token``; every
#: other class (``PreTrainedTokenizerFast``, Qwen2's, GPT-2's) keeps ``tokenizer.json``'s.
ADD_BOS_CLASSES = {
    "LlamaTokenizer": True,
    "CodeLlamaTokenizer": True,
    "GemmaTokenizer": True,
    "CohereTokenizer": True,
    "GPTNeoXTokenizer": False,
}


class Tokenizer:
    """Text <-> ids, special tokens and the chat template of one checkpoint.

    Build one with :func:`load_tokenizer` (or the ``from_*`` functions it dispatches to).

    Attributes:
      backend: the ``tokenizers.Tokenizer`` doing the work.
      special_tokens: transformers' ``special_tokens_map``: ``bos_token``, ``eos_token``,
        ``unk_token``, ``pad_token`` (those set) and ``additional_special_tokens``.
      chat_template: the Jinja chat template, or None.
      source: the file it came from, for error messages.
    """

    def __init__(
        self,
        backend: Backend,
        special_tokens: Mapping[str, Any],
        chat_template: str | None = None,
        clean_up_tokenization_spaces: bool = False,
        source: str = "<tokenizer>",
    ):
        self.backend = backend
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.source = source

    def _id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        """Id of ``special_tokens["bos_token"]``, or None."""
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """Id of ``special_tokens["eos_token"]``, or None."""
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        """Id of ``special_tokens["pad_token"]``, or None."""
        return self._id("pad_token")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``; special tokens written in it map to their ids, as in transformers.

        Example:
          >>> tok = from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
          ...     "tokenizer.ggml.tokens": ["a", "b", "ab", "<s>"],
          ...     "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1, 1, 1, 3],
          ...     "tokenizer.ggml.bos_token_id": 3, "tokenizer.ggml.add_bos_token": True})
          >>> tok.encode("abba<s>ab"), tok.encode("ab", add_special_tokens=False)
          ([3, 2, 1, 0, 3, 2], [2])
        """
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``, as ``transformers``' ``decode`` gives it.

        Example:
          >>> tok = from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
          ...     "tokenizer.ggml.tokens": ["a", "b", "ab", "<s>"],
          ...     "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1, 1, 1, 3]})
          >>> tok.decode([3, 2, 1]), tok.decode([3, 2, 1], skip_special_tokens=True)
          ('<s>abb', 'abb')
        """
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for before, after in (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","):
                text = text.replace(before, after)
            for before, after in (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"):
                text = text.replace(before, after)
            for before, after in (" 've", "'ve"), (" 're", "'re"):
                text = text.replace(before, after)
        return str(text)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **variables: Any,
    ) -> str | list[int]:
        """The conversation rendered with :attr:`chat_template`, as text or ids.

        Renders as transformers' ``apply_chat_template`` (special tokens passed as template
        variables), then encodes without adding special tokens, as transformers does.

        Raises:
          ValueError: if the tokenizer has no chat template, or it fails to render.

        Example:
          >>> tok = from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
          ...     "tokenizer.ggml.tokens": ["a", "b", "<s>"], "tokenizer.ggml.merges": [],
          ...     "tokenizer.ggml.token_type": [1, 1, 3], "tokenizer.ggml.bos_token_id": 2,
          ...     "tokenizer.chat_template": "{{ bos_token }}{{ messages[0]['content'] }}"})
          >>> tok.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False)
          '<s>ab'
          >>> tok.apply_chat_template([{"role": "user", "content": "ab"}])
          [2, 0, 1]
        """
        if self.chat_template is None:
            raise ValueError(
                f"tokenizer from {self.source} has no chat template; set `.chat_template` "
                "to a Jinja template string"
            )
        text = render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            source=self.source,
            **{**self.special_tokens, **variables},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _content(token: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts
    return token.get("content") if isinstance(token, dict) else token


def from_hf_dir(directory: str | os.PathLike[str]) -> Tokenizer:
    """A Hugging Face tokenizer directory: ``tokenizer.json`` plus its configs.

    Reads ``tokenizer_config.json`` (special tokens, ``chat_template``,
    ``clean_up_tokenization_spaces``), then ``special_tokens_map.json`` and
    ``chat_template.jinja`` when present (they take precedence, as in transformers).
    ``add_bos_token``/``add_eos_token`` apply as transformers applies them: for a
    ``tokenizer_class`` of :data:`ADD_BOS_CLASSES` (Llama's, Gemma's, ...) encoding puts
    ``bos_token`` first when ``add_bos_token`` is true (that class's default when absent) and
    ``eos_token`` last when ``add_eos_token`` is; other classes keep what ``tokenizer.json``'s
    post-processor adds, as transformers ignores the keys there.

    Raises:
      FileNotFoundError: if ``directory`` has no ``tokenizer.json``.
      ValueError: if a file there does not parse (the message names it), or
        ``add_bos_token``/``add_eos_token`` is true without a ``bos_token``/``eos_token`` in
        the vocabulary.

    Example:
      >>> import tempfile, os, json
      >>> from tokenizers import Tokenizer as T, models
      >>> d = tempfile.mkdtemp()
      >>> T(models.WordLevel({"hi": 0, "<unk>": 1}, unk_token="<unk>")).save(
      ...     os.path.join(d, "tokenizer.json"))
      >>> with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
      ...     json.dump({"unk_token": "<unk>"}, f)
      >>> tok = from_hf_dir(d)
      >>> tok.encode("hi"), tok.special_tokens
      ([0], {'unk_token': '<unk>', 'additional_special_tokens': []})
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory!r} has no tokenizer.json; give a Hugging Face tokenizer directory "
            "(save_pretrained of a fast tokenizer), a .gguf file or a tokenizer.model"
        )
    try:
        backend = Backend.from_file(path)
    except Exception as err:  # the Rust side raises plain Exception for every parse error
        raise ValueError(f"tokenizer file {path!r} does not parse: {err}") from None
    config: dict[str, Any] = {}
    if os.path.isfile(cfg := os.path.join(directory, "tokenizer_config.json")):
        config = read_json(cfg, what="tokenizer file")
    if os.path.isfile(smap := os.path.join(directory, "special_tokens_map.json")):
        config |= read_json(smap, what="tokenizer file")
    special = {k: _content(config[k]) for k in _SPECIAL_KEYS if config.get(k) is not None}
    extra = [_content(t) for t in config.get("additional_special_tokens", [])]
    template = config.get("chat_template")
    source = cfg
    if isinstance(template, list):  # named templates: transformers uses "default"
        template = {t["name"]: t["template"] for t in template}.get("default")
    if os.path.isfile(jinja := os.path.join(directory, "chat_template.jinja")):
        with open(jinja, encoding="utf-8") as f:
            template, source = f.read(), jinja
    klass = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    if klass in ADD_BOS_CLASSES:
        add_bos = bool(config.get("add_bos_token", ADD_BOS_CLASSES[klass]))
        add_eos = bool(config.get("add_eos_token", False))
        for key, wanted in (("bos_token", add_bos), ("eos_token", add_eos)):
            token = special.get(key)
            if wanted and (token is None or backend.token_to_id(token) is None):
                raise ValueError(
                    f"{cfg!r}: add_{key} is true for {klass}, but {key} {token!r} is not a "
                    f"token of tokenizer.json; set {key} to one, or add_{key} to false"
                )
        bos, eos = special.get("bos_token"), special.get("eos_token")
        backend.post_processor = _post_processor(
            bos if add_bos else None, eos if add_eos else None, backend
        )
    return Tokenizer(
        backend,
        special | {"additional_special_tokens": extra},
        template,
        bool(config.get("clean_up_tokenization_spaces", False)),
        source,
    )


def _post_processor(bos: str | None, eos: str | None, backend: Backend) -> processors.PostProcessor:
    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    tokens = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=tokens)


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    # SentencePiece BPE keeps no merge list: every split of a piece into two pieces is a merge,
    # ranked by the piece's score (as transformers' SentencePieceExtractor derives them)
    ids = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores, strict=True):
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        local = sorted(
            (p for p in local if p[0] in ids and p[1] in ids), key=lambda p: (ids[p[0]], ids[p[1]])
        )
        merges += [(score, len(a), len(b), a, b) for a, b in local]
    merges.sort(key=lambda m: m[:3], reverse=True)
    return [(a, b) for *_, a, b in merges]


def from_gguf_metadata(meta: Mapping[str, Any], source: str = "<GGUF metadata>") -> Tokenizer:
    """A tokenizer from a GGUF file's ``tokenizer.ggml.*`` metadata (``GGUFCheckpoint.metadata``).

    ``tokenizer.ggml.model`` "gpt2": byte-level BPE over ``tokens`` and ``merges``, with the
    pre-tokenizer :data:`PRE_TOKENIZERS` maps ``tokenizer.ggml.pre`` to. "llama": SentencePiece
    BPE with byte fallback, merges derived from ``scores`` when the file has none. Control
    tokens (``token_type`` 3) are special tokens; user-defined ones (4) are added tokens.

    Raises:
      ValueError: for another tokenizer model or pre-tokenizer, or a missing key; the message
        names ``source`` and the key.

    Example:
      >>> tok = from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
      ...     "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]})
      >>> tok.encode("abab"), tok.decode([2, 1])
      ([2, 2], 'abb')
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ValueError(
            f"{source}: tokenizer.ggml.model={kind!r}; jlora builds 'gpt2' (byte-level BPE) and "
            "'llama' (SentencePiece BPE) tokenizers. Load the model's Hugging Face tokenizer "
            "directory instead (from_hf_dir)"
        )
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{source}: metadata key 'tokenizer.ggml.tokens' is missing")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    if len(types) != len(tokens):
        raise ValueError(
            f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} "
            "tokens; the file is inconsistent"
        )
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos, unk, pad = token("bos"), token("eos"), token("unknown"), token("padding")
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(
                f"{source}: tokenizer.ggml.pre={pre!r} is a pre-tokenizer jlora does not know "
                f"(known: {sorted(PRE_TOKENIZERS)}); load the model's Hugging Face tokenizer "
                "directory instead (from_hf_dir)"
            )
        backend = Backend(models.BPE(vocab, merges, fuse_unk=False))
        backend.pre_tokenizer = PRE_TOKENIZERS[pre]
        backend.decoder = decoders.ByteLevel()
        default_bos, prefix = False, False
    else:
        scores = list(meta.get("tokenizer.ggml.scores", [0.0] * len(tokens)))
        merges = merges or _spm_merges(tokens, scores)
        backend = Backend(
            models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
        )
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        steps = [normalizers.Prepend("▁")] if prefix else []
        backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        default_bos = True
    control = [t for t, k in zip(tokens, types, strict=True) if k == 3]
    user = [t for t, k in zip(tokens, types, strict=True) if k == 4]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    add_bos = meta.get("tokenizer.ggml.add_bos_token", default_bos) and bos is not None
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False) and eos is not None
    if add_bos or add_eos:
        backend.post_processor = _post_processor(
            bos if add_bos else None, eos if add_eos else None, backend
        )
    special = dict(zip(_SPECIAL_KEYS, (bos, eos, unk, pad), strict=True))
    special = {k: v for k, v in special.items() if v is not None}
    extra = [t for t in control if t not in special.values()]
    return Tokenizer(
        backend,
        special | {"additional_special_tokens": extra},
        meta.get("tokenizer.chat_template"),
        False,
        source,
    )


def from_sentencepiece(path: str | os.PathLike[str]) -> Tokenizer:
    """A SentencePiece BPE ``tokenizer.model`` (Llama 2, Mistral), rebuilt as fast BPE.

    Built as a GGUF "llama" vocabulary (:func:`from_gguf_metadata`): the pieces, scores and
    types, ``add_dummy_prefix`` and the bos/eos/unk/pad ids of the model file.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if it is not a SentencePiece model, or not a BPE one (Unigram models).

    Example:
      >>> import os, tempfile, sentencepiece as spm
      >>> f = os.path.join(tempfile.mkdtemp(), "m")
      >>> spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 50),
      ...     model_prefix=f, vocab_size=280, model_type="bpe", byte_fallback=True,
      ...     minloglevel=2)
      >>> tok = from_sentencepiece(f + ".model")
      >>> tok.decode(tok.encode("hello world!"), skip_special_tokens=True)
      'hello world!'
    """
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf, only here

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SentencePiece model {path!r} does not exist")
    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as err:  # protobuf's DecodeError, or a file that is not one at all
        raise ValueError(f"tokenizer file {path!r} is not a SentencePiece model: {err}") from None
    if not proto.pieces:
        raise ValueError(f"tokenizer file {path!r} is not a SentencePiece model: no pieces")
    if proto.trainer_spec.model_type != 2:  # BPE
        raise ValueError(
            f"SentencePiece model {path!r} is not BPE (model_type "
            f"{proto.trainer_spec.model_type}); jlora rebuilds BPE models only. Use the "
            "checkpoint's tokenizer.json (from_hf_dir)"
        )
    spec = proto.trainer_spec
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
        "tokenizer.ggml.scores": [p.score for p in proto.pieces],
        "tokenizer.ggml.token_type": [int(p.type) for p in proto.pieces],
        "tokenizer.ggml.add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
    }
    for key, i in ("bos", spec.bos_id), ("eos", spec.eos_id), ("unknown", spec.unk_id):
        if i >= 0:
            meta[f"tokenizer.ggml.{key}_token_id"] = i
    if spec.pad_id >= 0:
        meta["tokenizer.ggml.padding_token_id"] = spec.pad_id
    return from_gguf_metadata(meta, source=path)


def byte_level() -> Tokenizer:
    """A tokenizer whose ids are the text's UTF-8 bytes (0..255), no special tokens.

    The built-in model's vocabulary. It is an ordinary byte-level BPE ``tokenizers.Tokenizer``
    with one token per byte and no merges, so it saves as a ``tokenizer.json`` that
    transformers' ``PreTrainedTokenizerFast`` loads; decoding an invalid UTF-8 sequence gives
    U+FFFD.

    Example:
      >>> tok = byte_level()
      >>> tok.encode("hé"), tok.decode([104, 195, 169])
      ([104, 195, 169], 'hé')
    """
    alphabet = {ord(c): c for c in pre_tokenizers.ByteLevel.alphabet()}
    # GPT-2's byte -> printable character map: printable bytes stand for themselves, the other
    # 68 bytes take the characters from U+0100 on, in byte order.
    shifted = iter(sorted(set(map(chr, range(256, 512))) & set(alphabet.values())))
    chars = {b: alphabet[b] if b in alphabet else next(shifted) for b in range(256)}
    backend = Backend(models.BPE(vocab={c: b for b, c in chars.items()}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, {"additional_special_tokens": []}, source="<bytes>")


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a checkpoint: a HF directory, a ``.gguf`` file or a ``tokenizer.model``.

    A directory with ``tokenizer.json`` goes to :func:`from_hf_dir`; one with only a
    ``tokenizer.model`` to :func:`from_sentencepiece`; a GGUF file's metadata to
    :func:`from_gguf_metadata`.

    Raises:
      FileNotFoundError: if ``path`` is none of these.
      ValueError: if the file does not parse (the message names it).

    Example:
      >>> import os, tempfile, gguf
      >>> f = os.path.join(tempfile.mkdtemp(), "t.gguf")
      >>> w = gguf.GGUFWriter(f, "llama")
      >>> w.add_tokenizer_model("gpt2")
      >>> w.add_token_list(["a", "b", "ab"])
      >>> w.add_token_merges(["a b"])
      >>> for write in (w.write_header_to_file, w.write_kv_data_to_file, w.close):
      ...     write()
      >>> load_tokenizer(f).encode("ab")
      [2]
    """
    from jlora.models.formats.gguf import read_gguf_metadata

    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "tokenizer.json")) and os.path.isfile(
            spm := os.path.join(path, "tokenizer.model")
        ):
            return from_sentencepiece(spm)
        return from_hf_dir(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return from_gguf_metadata(read_gguf_metadata(path), source=path)
    if os.path.isfile(path) and path.endswith(".model"):
        return from_sentencepiece(path)
    raise FileNotFoundError(
        f"no tokenizer at {path!r}: give a Hugging Face tokenizer directory (tokenizer.json), "
        "a .gguf file or a SentencePiece tokenizer.model"
    )
