"""Instruction data: JSONL records, assistant-only masks, packing that keeps losses, order."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models.test_chat_template import CHATML_GEN, MISTRAL
from models.test_tokenizer import CHATML, SPECIALS, corpus
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from jlora.models.decoder import Decoder, DecoderConfig
from jlora.models.formats.tokenizer import Tokenizer
from jlora.runner.data.chats import epoch_order, pack, read_records, tokenize_record

SPECIAL_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
CONVERSATIONS = [
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "What is 2+2? 😀"},
        {"role": "assistant", "content": "4.  "},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "Six, naïvely."},
    ],
    [
        {"role": "user", "content": "Call the tool."},
        {"role": "assistant", "content": "calling"},
        {"role": "tool", "content": '{"x": 1}'},
        {"role": "assistant", "content": "x is 1"},
        {"role": "user", "content": "thanks"},
    ],
]


@pytest.fixture(scope="module")
def backend():
    """A tiny byte-level BPE vocabulary with ChatML's special tokens."""
    b = Backend(models.BPE())
    b.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    b.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    b.train_from_iterator(corpus()[:20], trainer)
    return b


def tokenizer(backend, template):
    return Tokenizer(backend, SPECIAL_TOKENS, chat_template=template, source="tiny")


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------- reading


def test_read_file_and_directory(tmp_path):
    write(tmp_path / "b.jsonl", [json.dumps({"messages": CONVERSATIONS[0]}), ""])
    write(
        tmp_path / "a.jsonl",
        [
            json.dumps({"prompt": "p", "completion": "c"}),
            json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
            json.dumps({"text": "plain"}),
        ],
    )
    (tmp_path / "notes.txt").write_text("ignored")
    r = read_records(tmp_path)
    assert r.records == [
        {"prompt": "p", "completion": "c"},
        {"text": "plain"},
        {"messages": CONVERSATIONS[0]},
    ]
    assert [s.rsplit("/", 1)[1] for s in r.sources] == ["a.jsonl:1", "a.jsonl:3", "b.jsonl:1"]
    assert r.skipped == 1
    assert read_records(tmp_path / "b.jsonl").records == [{"messages": CONVERSATIONS[0]}]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"text": "a"', r"x\.jsonl:2: malformed JSON"),
        ("[1, 2]", r"x\.jsonl:2: a record must be a JSON object; got list"),
        ('{"other": 1}', r"x\.jsonl:2: .*exactly one of.*found none"),
        ('{"text": "a", "prompt": "b", "completion": "c"}', r"found prompt and text"),
        ('{"prompt": "a"}', r'"completion" must be a string'),
        ('{"text": 3}', r'"text" must be a string; got int'),
        ('{"messages": []}', r'"messages" must be a non-empty list'),
        ('{"messages": [{"role": "robot", "content": "x"}]}', r"role 'robot'; allowed"),
        ('{"messages": [{"role": "user", "content": null}]}', r"content NoneType; content must"),
        ('{"messages": [{"role": "user", "content": "x"}]}', r"x\.jsonl:2: .*no assistant turn"),
    ],
)
def test_read_errors_name_file_and_line(tmp_path, line, match):
    write(tmp_path / "x.jsonl", ['{"text": "fine"}', line])
    with pytest.raises(ValueError, match=match):
        read_records(tmp_path / "x.jsonl", no_assistant="error")


def test_read_errors_for_files(tmp_path):
    with pytest.raises(ValueError, match=r"without \*\.jsonl files"):
        read_records(tmp_path)
    with pytest.raises(ValueError, match=r"does not exist"):
        read_records(tmp_path / "missing.jsonl")
    write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=r"empty\.jsonl holds no records"):
        read_records(tmp_path)
    with pytest.raises(ValueError, match=r'no_assistant must be "skip" or "error"'):
        read_records(tmp_path, no_assistant="drop")


# ---------------------------------------------------------------- tokenizing


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_prefix_mask_equals_generation_mask(backend, messages):
    prefix = tokenize_record({"messages": messages}, tokenizer(backend, CHATML))
    spans = tokenize_record({"messages": messages}, tokenizer(backend, CHATML_GEN))
    np.testing.assert_array_equal(prefix[0], spans[0])
    np.testing.assert_array_equal(prefix[1], spans[1])
    ids, mask = prefix
    learned = backend.decode(ids[mask].tolist(), skip_special_tokens=False)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert learned == "".join(a + "<|im_end|>" for a in answers)
    assert ids.dtype == np.int32 and mask.dtype == bool


@pytest.mark.peft
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_generation_mask_equals_transformers(backend, messages):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=CHATML_GEN, **SPECIAL_TOKENS
    )
    out = hf.apply_chat_template(
        messages, tokenize=True, return_assistant_tokens_mask=True, return_dict=True
    )
    ids, mask = tokenize_record({"messages": messages}, tokenizer(backend, CHATML_GEN))
    assert ids.tolist() == out["input_ids"]
    assert mask.astype(int).tolist() == out["assistant_masks"]


def test_prompt_completion_and_text(backend):
    eos = backend.token_to_id("<|im_end|>")
    chat = tokenize_record({"prompt": "Q?", "completion": "A."}, tokenizer(backend, CHATML))
    as_messages = tokenize_record(
        {
            "messages": [
                {"role": "user", "content": "Q?"},
                {"role": "assistant", "content": "A."},
            ]
        },
        tokenizer(backend, CHATML),
    )
    np.testing.assert_array_equal(chat[0], as_messages[0])
    np.testing.assert_array_equal(chat[1], as_messages[1])

    ids, mask = tokenize_record(
        {"prompt": "Say hi: ", "completion": "hello"}, tokenizer(backend, None)
    )
    assert ids[-1] == eos
    assert backend.decode(ids[mask].tolist(), skip_special_tokens=False) == "hello<|im_end|>"
    assert backend.decode(ids[~mask].tolist()) == "Say hi: "

    ids, mask = tokenize_record({"text": "plain text"}, tokenizer(backend, None))
    assert mask.all() and ids[-1] == eos
    assert backend.decode(ids[:-1].tolist()) == "plain text"


def test_tokenize_errors_name_the_record(backend):
    messages = {"messages": CONVERSATIONS[0]}
    with pytest.raises(ValueError, match=r"f\.jsonl:7: a conversation needs a chat template"):
        tokenize_record(messages, tokenizer(backend, None), where="f.jsonl:7")
    with pytest.raises(ValueError, match=r"f\.jsonl:7: chat template from tiny failed to render"):
        tokenize_record(messages, tokenizer(backend, MISTRAL), where="f.jsonl:7")
    # the generation prompt opens a turn the rendered turn does not start with
    odd = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>bot\n'")
    assert odd != CHATML
    with pytest.raises(ValueError, match=r"f\.jsonl:7: .*does not render prefix-consistently"):
        tokenize_record(messages, tokenizer(backend, odd), where="f.jsonl:7")
    with pytest.raises(ValueError, match=r"f\.jsonl:7: a record must be a JSON object"):
        tokenize_record([1], tokenizer(backend, CHATML), where="f.jsonl:7")


# ---------------------------------------------------------------- packing


def examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, 50, n).astype(np.int32), rng.random(n) < 0.6) for n in lengths]


def test_pack_invariants():
    exs = examples([5, 3, 7, 2, 8, 1, 4])
    p = pack(exs, 10)
    assert p.truncated == 0
    for a in (p.tokens, p.targets, p.segment_ids, p.positions):
        assert a.dtype == np.int32 and a.shape == p.loss_mask.shape == (p.tokens.shape[0], 10)
    seen = []
    for r in range(p.tokens.shape[0]):
        seg = p.segment_ids[r]
        # segments numbered 1, 2, ... from the left, padding only at the end
        assert (np.diff(seg[seg > 0]) >= 0).all() and not (np.diff((seg > 0).astype(int)) > 0).any()
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            ids = p.tokens[r, where]
            seen.append(ids.tolist())
            assert p.positions[r, where].tolist() == list(range(len(where)))
            assert p.targets[r, where[:-1]].tolist() == ids[1:].tolist()
            assert not p.loss_mask[r, where[-1]]
        assert not p.loss_mask[r, seg == 0].any() and (p.tokens[r, seg == 0] == 0).all()
    assert seen == [e[0].tolist() for e in exs]  # every example, in order, whole
    want = sum(int(m[1:].sum()) for _, m in exs)
    assert p.loss_mask.sum() == want


def test_pack_overflow():
    exs = examples([3, 12, 4])
    p = pack(exs, 8, overflow="truncate")
    assert p.truncated == 4
    assert p.tokens.shape == (3, 8)  # 3 | 8 (cut from 12) | 4: none fit together
    np.testing.assert_array_equal(p.tokens[1], exs[1][0][:8])
    with pytest.raises(ValueError, match=r"example 1 has 12 tokens, more than seq_len=8"):
        pack(exs, 8, overflow="error")
    with pytest.raises(ValueError, match=r'overflow must be "truncate" or "error"'):
        pack(exs, 8, overflow="drop")
    with pytest.raises(ValueError, match=r"seq_len must be at least 2"):
        pack(exs, 1)
    with pytest.raises(ValueError, match=r"example 0: ids and loss_mask must be equal-length"):
        pack([(np.array([1, 2]), np.array([True]))], 8)


def test_packed_losses_equal_losses_alone(backend):
    tok = tokenizer(backend, CHATML)
    records = [
        {"messages": CONVERSATIONS[0]},
        {"prompt": "Name a colour.", "completion": "Blue."},
        {"messages": CONVERSATIONS[1]},
        {"text": "Some plain text to learn."},
        {"prompt": "1+1?", "completion": "2"},
    ]
    exs = [tokenize_record(r, tok) for r in records]
    seq_len = max(len(ids) for ids, _ in exs) + 12
    p = pack(exs, seq_len)
    assert p.tokens.shape[0] < len(exs)  # several examples share a row

    config = DecoderConfig(
        vocab_size=backend.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Decoder(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    apply = jax.jit(lambda t, pos, seg: model.apply({"params": params}, t, pos, segment_ids=seg))
    logits = apply(p.tokens, p.positions, p.segment_ids)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), p.targets[..., None], -1)[..., 0]
    packed = []
    for r in range(p.tokens.shape[0]):
        for s in range(1, int(p.segment_ids[r].max()) + 1):
            m = (p.segment_ids[r] == s) & p.loss_mask[r]
            packed.append(float(jnp.sum(nll[r] * m) / m.sum()))
    # each example alone in its own row; trailing padding is invisible to a causal model, so
    # one compiled call serves every length
    rows = np.zeros((len(exs), seq_len), np.int32)
    for i, (ids, _) in enumerate(exs):
        rows[i, : len(ids)] = ids
    lg = jax.jit(lambda t: model.apply({"params": params}, t))(rows)
    alone = []
    for i, (ids, mask) in enumerate(exs):
        n = len(ids)
        nll1 = -jnp.take_along_axis(jax.nn.log_softmax(lg[i, : n - 1]), ids[1:, None], -1)[:, 0]
        alone.append(float(jnp.sum(nll1 * mask[1:]) / mask[1:].sum()))
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- order


def test_epoch_order():
    a = epoch_order(100, 0, seed=7)
    np.testing.assert_array_equal(a, epoch_order(100, 0, seed=7))
    assert sorted(a.tolist()) == list(range(100))
    assert not np.array_equal(a, epoch_order(100, 1, seed=7))
    assert not np.array_equal(a, epoch_order(100, 0, seed=8))
    with pytest.raises(ValueError, match=r"non-negative integers; got 3, -1, 0"):
        epoch_order(3, -1, 0)
