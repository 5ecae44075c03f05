"""The runner on instruction data: data.train/data.eval JSONL, exact match, sinks, bad input."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from runner_helpers import DEFAULT, write_checkpoint
from test_cli import one_error_line

import jlora
from jlora.cli import main
from jlora.runner.config import load_config
from jlora.runner.finetune import finetune
from jlora.runner.rundir.directory import read_metrics
from jlora.runner.tasks.causal_lm import CausalLMTask

TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
# Prefix-consistent, and the end-of-turn token closes each turn, so the model learns to stop.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)
QA = [
    ("the sum of two and two", "four"),
    ("a colour of the sky", "blue"),
    ("the opposite of night", "day"),
    ("thee and thou", "thy"),
    ("a season of the year", "summer"),
    ("what the rose is called", "sweet"),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "chat", chat_template=TEMPLATE)


def chat(question, answer, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    train = [chat(q, a) for q, a in QA] + [{"prompt": "say yes", "completion": "yes"}]
    train.append({"text": "Shall I compare thee to a summer's day?"})
    return write_jsonl(root / "train.jsonl", train), write_jsonl(root / "eval.jsonl", train[:3])


def overrides(run_dir, checkpoint, train, held=None, steps=4, **extra):
    kv = {
        "run_dir": run_dir,
        "model.path": checkpoint,
        "data.train": train,
        "lora.targets": f"['{TARGETS}']",
        "data.seq_len": 48,
        "train.steps": steps,
        "train.batch_size": 2,
        "train.eval_every": 2,
        "train.checkpoint_every": 2,
        "train.log_every": 1,
        "train.progress": False,
        "generate.max_new_tokens": 4,
        **({"data.eval": held} if held else {}),
        **extra,
    }
    return [f"{k}={v}" for k, v in kv.items()]


def test_a_memorised_answer_scores_exact_match_one(checkpoint, tmp_path):
    """Trained on its eval questions, the model answers them exactly; the base does not.

    (The tiny random model's logits stay nearly flat, so the loss falls only a little while
    the argmax, which greedy decoding follows, becomes the answer.)
    """
    records = [chat(q, a) for q, a in QA[:2]]
    train = write_jsonl(tmp_path / "qa.jsonl", records)
    over = overrides(tmp_path / "r", checkpoint, train, train, steps=60)
    over += ["train.learning_rate=2e-2", "train.eval_every=60", "train.eval_exact_match=2"]
    results = finetune(load_config(DEFAULT, over), log=lambda _: 0)
    assert results["before"]["exact_match"] == 0.0
    assert results["after"]["exact_match"] == 1.0
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]
    metrics = read_metrics(tmp_path / "r")
    assert [m["exact_match"] for m in metrics if "exact_match" in m] == [0.0, 1.0]


def test_instruction_run_reports_its_data_and_writes_tensorboard(checkpoint, data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = []
    run_dir = tmp_path / "r"
    over = overrides(run_dir, checkpoint, data[0], data[1], **{"train.eval_exact_match": 2})
    results = finetune(load_config(DEFAULT, over), log=logs.append)
    assert logs[0].startswith("train: 8 examples") and "eval: 3 examples" in logs[0]
    assert results["data"]["train_examples"] == 8 and results["data"]["eval_examples"] == 3
    assert 0.0 <= results["after"]["exact_match"] <= 1.0
    assert len(results["after"]["samples"]) == 2
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"train_loss", "eval_loss", "exact_match", "tok_per_s"} <= set(events.Tags()["scalars"])
    jsonl = {m["step"]: m["train_loss"] for m in read_metrics(run_dir) if "train_loss" in m}
    got = {e.step: e.value for e in events.Scalars("train_loss")}
    assert got == pytest.approx(jsonl)

    # Resumed from step 2: TensorBoard drops the events after it, so no step appears twice.
    shutil.rmtree(run_dir / "checkpoints" / "4")
    os.remove(run_dir / "results.json")
    finetune(load_config(DEFAULT, over), log=lambda _: 0)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train_loss")]
    assert steps == [1, 2, 3, 4]


def test_accumulated_micro_batches_weigh_their_tokens(checkpoint, data, tmp_path):
    """k micro-batches of uneven token counts update as one batch k times the size (1e-6)."""

    def adapters(name, **extra):
        over = overrides(tmp_path / name, checkpoint, data[0], data[1], steps=1, **extra)
        over += ["train.warmup_steps=0", "train.schedule=constant", "train.clip_norm=null"]
        finetune(load_config(DEFAULT, over), log=lambda _: 0)
        base = CausalLMTask(load_config(DEFAULT, over)).base
        return jlora.split(jlora.load_adapter(tmp_path / name / "adapter", base)[0])[0]

    one = adapters("one", **{"train.batch_size": 4, "data.pack": "false"})
    two = adapters("two", **{"train.batch_size": 2, "train.grad_accum": 2, "data.pack": "false"})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), one, two)


def test_packed_batches_hold_several_examples_per_row(checkpoint, data):
    over = overrides("unused", checkpoint, data[0], data[1], **{"data.seq_len": 128})
    packed = CausalLMTask(load_config(DEFAULT, over)).train_batch(0)
    assert packed["segment_ids"].max() > 1
    padded = CausalLMTask(load_config(DEFAULT, [*over, "data.pack=false"])).train_batch(0)
    assert padded["segment_ids"].max() == 1
    # what is learned is the answers: far fewer tokens than the rows hold
    assert 0 < packed["loss_mask"].sum() < (packed["segment_ids"] > 0).sum() / 2


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}, ', "train.jsonl:2: malformed JSON"),
        ('{"question": "hi"}', 'train.jsonl:2: a record needs exactly one of "messages"'),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "train.jsonl:2: message 0 has role"),
        ('{"prompt": "hi", "completion": 3}', 'train.jsonl:2: "completion" must be a string'),
    ],
)
def test_bad_records_stop_the_run_before_anything_is_written(
    checkpoint, tmp_path, capsys, line, expected
):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(chat("q", "a")) + "\n" + line + "\n")
    assert main(["finetune", DEFAULT, *overrides(tmp_path / "r", checkpoint, train)]) == 2
    one_error_line(capsys, expected)
    assert not (tmp_path / "r").exists()


def test_conversations_without_an_answer_are_skipped_or_refused(checkpoint, data, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    asked = {"messages": [{"role": "user", "content": "hello?"}]}
    write_jsonl(train, [asked, *[chat(q, a) for q, a in QA]])
    logs = []
    over = overrides(tmp_path / "skip", checkpoint, train, data[1], steps=1)
    assert finetune(load_config(DEFAULT, over), log=logs.append)["data"]["skipped"] == 1
    assert "skipped 1 without an assistant turn" in logs[0]
    refuse = [*overrides(tmp_path / "r", checkpoint, train, steps=1), "data.no_assistant=error"]
    assert main(["finetune", DEFAULT, *refuse]) == 2
    one_error_line(capsys, "train.jsonl:1: conversation has no assistant turn")


def test_long_records_are_truncated_and_counted_or_refused(checkpoint, data, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    long = chat("a question " * 40, "an answer")
    write_jsonl(train, [*[chat(q, a) for q, a in QA], long])
    refuse = [*overrides(tmp_path / "r", checkpoint, train, data[1]), "data.overflow=error"]
    assert main(["finetune", DEFAULT, *refuse]) == 2
    one_error_line(capsys, "train.jsonl:7: the record is", "more than data.seq_len=48")
    assert not (tmp_path / "r").exists()
    config = load_config(DEFAULT, overrides(tmp_path / "t", checkpoint, train, data[1]))
    stats = CausalLMTask(config).data_stats
    # The cut-off record's answer fell past seq_len: nothing left to learn, so it is dropped.
    assert stats["train_truncated_examples"] == 1 and stats["train_truncated_tokens"] > 0
    assert stats["train_no_loss_examples"] == 1 and stats["train_examples"] == 6


def test_a_template_that_cannot_render_names_the_record(tmp_path, data, capsys):
    broken = "{% for m in messages %}{{ m['content'] | nosuchfilter }}{% endfor %}"
    path = write_checkpoint(tmp_path / "broken", chat_template=broken)
    assert main(["finetune", DEFAULT, *overrides(tmp_path / "r", path, data[0])]) == 2
    one_error_line(capsys, "train.jsonl:1:")
    assert not (tmp_path / "r").exists()


def test_empty_and_missing_data_files(checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["finetune", DEFAULT, *overrides(tmp_path / "r", checkpoint, empty)]) == 2
    one_error_line(capsys, "empty.jsonl holds no records")
    missing = tmp_path / "nope.jsonl"
    assert main(["finetune", DEFAULT, *overrides(tmp_path / "r", checkpoint, missing)]) == 2
    one_error_line(capsys, "data.train", "nope.jsonl", "does not exist")
    unknown = "builtin:nosuch/train.jsonl"
    assert main(["finetune", DEFAULT, *overrides(tmp_path / "r", checkpoint, unknown)]) == 2
    one_error_line(capsys, "not a data set shipped with jlora", "builtin:stdlib_modules")


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        (["model.kind=bert", "data.train=x.jsonl"], "config data.train is instruction data for a"),
        (["data.eval=x.jsonl"], "config data.eval='x.jsonl' applies to instruction data only"),
        (["train.eval_exact_match=5"], "train.eval_exact_match=5 applies to instruction data"),
        (["data.overflow=drop"], "config data.overflow: expected one of"),
    ],
)
def test_instruction_keys_without_instruction_data_are_refused(capsys, tmp_path, over, expected):
    assert main(["finetune", DEFAULT, f"run_dir={tmp_path / 'r'}", *over]) == 2
    one_error_line(capsys, expected)


def test_exact_match_without_questions_is_refused(checkpoint, tmp_path, capsys):
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "Shall I compare thee"}] * 4)
    over = [*overrides(tmp_path / "r", checkpoint, text, text), "train.eval_exact_match=2"]
    assert main(["finetune", DEFAULT, *over]) == 2
    one_error_line(capsys, "no held-out record has an answer to match")


def test_wandb_offline_run_is_written_and_resumed_with_one_id(checkpoint, data, tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "r"
    over = overrides(run_dir, checkpoint, data[0], data[1], steps=2)
    over += ["log.wandb=true", "log.wandb_mode=offline", "log.tensorboard=false"]
    finetune(load_config(DEFAULT, over), log=lambda _: 0)
    run_id = (run_dir / "wandb" / "run_id").read_text()
    runs = list((run_dir / "wandb" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert not (run_dir / "tensorboard").exists()


def test_wandb_asked_for_but_missing_is_refused_before_the_run(
    checkpoint, data, tmp_path, capsys, monkeypatch
):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    over = [*overrides(tmp_path / "r", checkpoint, data[0]), "log.wandb=true"]
    assert main(["finetune", DEFAULT, *over]) == 2
    one_error_line(capsys, "wandb is not installed", "pip install wandb")
    assert not (tmp_path / "r").exists()


def test_chat_samples_carry_the_configured_system_turn(checkpoint, data, monkeypatch):
    over = overrides("unused", checkpoint, data[0], data[1], **{"generate.system": "Be brief."})
    task = CausalLMTask(load_config(DEFAULT, over))
    asked = []
    monkeypatch.setattr(task, "_generate_ids", lambda p, rows, *a: asked.extend(rows) or [[]])
    task.show(task.base, {})
    text = task.tokenizer.decode(asked[0])
    assert text.startswith("system:\nBe brief.<|endoftext|>user:\n") and text.endswith(
        "assistant:\n"
    )
