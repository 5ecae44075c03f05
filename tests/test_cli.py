"""The ``jlora`` command as a new user meets it: help, shipped configs, and one clear line per
mistake (exit 2, no traceback)."""

import argparse
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runner_helpers import DEFAULT, ROOT, tiny_overrides, write_tiny_weights
from safetensors.numpy import save_file

from jlora.cli import build_parser, main
from jlora.models.bert import Bert, BertConfig, _hf_name
from jlora.runner.config import load_config, shipped_configs
from jlora.runner.tasks import make_task


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("w") / "tiny")


def one_error_line(capsys, *needles):
    """The command's stderr is one line that names every needle, and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("jlora "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# --- help -------------------------------------------------------------------------------------


def subcommands():
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(sub.choices)


def test_every_subcommand_is_covered():
    assert {"finetune", "merge", "eval", "generate", "summary"} <= set(subcommands())


@pytest.mark.parametrize("argv", [[], *[[name] for name in subcommands()]])
def test_help_exits_0_and_prints_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: jlora {' '.join(argv)}".rstrip())


def test_finetune_help_names_the_shipped_configs(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in shipped_configs())


# --- shipped configs --------------------------------------------------------------------------


def test_the_repository_configs_are_the_shipped_ones():
    repo = pathlib.Path(ROOT, "configs")
    shipped = shipped_configs()
    assert sorted(p.stem for p in repo.glob("*.yaml")) == sorted(shipped)
    for name, path in shipped.items():
        assert (repo / f"{name}.yaml").read_bytes() == pathlib.Path(path).read_bytes(), name


def test_default_config_loads_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(None) == load_config(DEFAULT)
    assert load_config("minilm_stdlib").data.source == "stdlib"
    assert load_config("minilm_stdlib.yaml", ["lora.rank=4"]).lora.rank == 4


def test_a_local_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").write_text("lora: {rank: 3}\n")
    assert load_config("default").lora.rank == 3


def test_an_unknown_config_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'nope' is neither a file .* minilm_stdlib"):
        load_config("nope")


def test_summary_runs_from_outside_the_repository(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "jlora.cli", "summary", "lora.rank=2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "model/layers/self_attn/q_proj/kernel" in proc.stdout


# --- YAML files -------------------------------------------------------------------------------


def test_duplicate_key_in_a_config_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 5\n  steps: 6\n")
    assert main(["summary", str(path)]) == 2
    one_error_line(capsys, f"{path}:3:3", "duplicate key 'steps' (first on line 2)")


def test_syntax_error_in_a_config_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: [5\n")
    assert main(["finetune", str(path)]) == 2
    one_error_line(capsys, str(path), "invalid YAML")


def test_broken_config_yaml_in_a_run_dir(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("lora: {rank: 4, rank: 8}\n")
    assert main(["eval", str(tmp_path)]) == 2
    one_error_line(capsys, f"{tmp_path / 'config.yaml'}:1:", "duplicate key 'rank'")
    (tmp_path / "config.yaml").write_text("lora: {rank: 4\n")
    assert main(["merge", str(tmp_path)]) == 2
    one_error_line(capsys, str(tmp_path / "config.yaml"), "invalid YAML")


# --- bad inputs, each one line naming the file ------------------------------------------------


def test_a_model_path_that_is_no_checkpoint(tmp_path, capsys):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\x00\x01 definitely not a checkpoint")
    assert main(["summary", f"model.path={bad}"]) == 2
    one_error_line(capsys, str(bad), "is not a readable GGUF file")
    assert main(["summary", f"model.path={tmp_path}"]) == 2
    one_error_line(capsys, str(tmp_path), "has no config.json")


def test_model_keys_of_the_other_kind_are_refused(tmp_path, capsys):
    assert main(["summary", f"model.weights={tmp_path}"]) == 2
    one_error_line(capsys, "model.weights", "names the encoder of a kind=bert run")
    assert main(["summary", "model.kind=bert", "model.remat=true"]) == 2
    one_error_line(capsys, "model.remat describes a decoder", "model.kind is 'bert'")


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"", "is empty"), (b"\xff\xfe\x00binary\x00", "not UTF-8 text")],
)
def test_empty_or_binary_text_source(tmp_path, tiny_weights, capsys, content, expected):
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    over = tiny_overrides(tmp_path / "r", tiny_weights, **{"data.source": data})
    assert main(["finetune", DEFAULT, *over]) == 2
    one_error_line(capsys, str(data), expected)
    assert not (tmp_path / "r").exists()


def test_text_source_too_short_names_the_file(tmp_path, tiny_weights, capsys):
    data = tmp_path / "data.txt"
    data.write_text("just a few words\n")
    assert (
        main(
            [
                "finetune",
                DEFAULT,
                *tiny_overrides(tmp_path / "r", tiny_weights, **{"data.source": data}),
            ]
        )
        == 2
    )
    one_error_line(capsys, str(data), "fewer than batch_size")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "apple", "wheel"]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = {
        "vocab_size": len(vocab),
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 16,
        "max_position_embeddings": 16,
    }
    (root / "config.json").write_text(json.dumps(cfg))
    ids = jnp.zeros((1, 2), jnp.int32)
    tree = Bert(BertConfig.from_hf(cfg)).init(jax.random.key(0), ids, ids)["params"]
    flat = {
        _hf_name(tuple(k.key for k in path)): np.asarray(x.T if path[-1].key == "kernel" else x)
        for path, x in jax.tree.flatten_with_path(tree)[0]
    }
    save_file(flat, str(root / "model.safetensors"))
    return root


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"text": "apple", "label": "a"}\n{"text": "wheel", "label": \n', ":2: line 2 is not"),
        (b'{"text": "apple", "label": "a"}\n["wheel", "b"]\n', ":2: expected a JSON object"),
        (b"\xff\xfe\x00\x01binary", "not UTF-8 text"),
        (b"", "has 0 label(s)"),
    ],
)
def test_malformed_jsonl_data(tmp_path, tiny_bert, capsys, content, expected):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    over = [
        f"run_dir={tmp_path / 'r'}",
        "model.kind=bert",
        f"model.weights={tiny_bert}",
        f"data.source={data}",
        "data.seq_len=8",
        "lora.targets=['layer_\\d+/attention/(query|value)/kernel']",
        "train.steps=2",
        "train.batch_size=2",
        "train.progress=false",
    ]
    assert main(["finetune", DEFAULT, *over]) == 2
    one_error_line(capsys, str(data), expected)
    assert not (tmp_path / "r").exists()


def test_blank_lines_in_jsonl_data_are_skipped(tmp_path):
    from jlora.runner.config import DataSection
    from jlora.runner.tasks.classification import load_examples

    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "apple", "label": "a"}\n\n{"text": "wheel", "label": "b"}\n\n')
    texts, labels, names = load_examples(DataSection(source=str(data)), 0)
    assert sorted(zip(texts, labels, strict=True)) == [("apple", 0), ("wheel", 1)]
    assert names == ["a", "b"]


# --- generate ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--max-new-tokens=-5", "--max-new-tokens: must be >= 0, found -5"),
        ("--temperature=-1", "--temperature: must be a finite number >= 0, found -1"),
        ("--temperature=nan", "--temperature: must be a finite number >= 0, found nan"),
    ],
)
def test_generate_refuses_negative_settings(tmp_path, capsys, flag, expected):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(tmp_path), "Hi", flag])
    assert exit_.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.fixture(scope="module")
def lm_task(tmp_path_factory, tiny_weights):
    run = tmp_path_factory.mktemp("lm") / "r"
    return make_task(load_config(DEFAULT, tiny_overrides(run, tiny_weights)))


def greedy_by_hand(task, prompt, n):
    tokens = list(prompt.encode())
    for _ in range(n):
        logits = task.model.apply({"params": task.base}, jnp.asarray([tokens]))[0, -1]
        tokens.append(int(jnp.argmax(logits)))
    return bytes(tokens).decode("utf-8", errors="replace")


def test_temperature_0_is_greedy_decoding(lm_task):
    out = lm_task.generate(lm_task.base, "Shall ", 6, 0.0, seed=0)
    assert out == lm_task.generate(lm_task.base, "Shall ", 6, 0.0, seed=7)
    assert out == greedy_by_hand(lm_task, "Shall ", 6)


def test_a_tiny_temperature_is_greedy_too_and_never_nan(lm_task):
    greedy = lm_task.generate(lm_task.base, "Shall ", 6, 0.0, seed=0)
    for temperature in (1e-30, 1e-45):
        assert lm_task.generate(lm_task.base, "Shall ", 6, temperature, seed=3) == greedy


def test_generate_refuses_bad_settings_in_the_library(lm_task):
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 0, found -1"):
        lm_task.generate(lm_task.base, "Hi", -1, 1.0, 0)
    with pytest.raises(
        ValueError, match=r"temperature must be a finite number >= 0 \(0 is greedy\), found inf"
    ):
        lm_task.generate(lm_task.base, "Hi", 4, float("inf"), 0)
    assert lm_task.generate(lm_task.base, "Hi", 0, 1.0, 0) == "Hi"
