"""benchmarks/instruction_step.py end to end on a tiny random checkpoint (no timing asserted)."""

import json

import numpy as np
import pytest
from bench_helpers import load_benchmark, tiny_checkpoint


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("instruction_step")


def test_every_table_on_a_tiny_checkpoint(bench, tmp_path, capsys):
    tiny_checkpoint(tmp_path / "tiny")
    out = bench.main(
        [
            "--source", str(tmp_path / "tiny"), "--json", str(tmp_path / "out.json"),
            "--batch", "2", "--seq", "8", "--pack-seq", "16", "--min-len", "2", "--max-len", "8",
            "--rank", "2", "--rounds", "1",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "out.json").read_text())
    names = [t["name"] for t in saved["tables"]]
    assert names == ["instruction_step", "instruction_bf16", "instruction_packing"]
    for table in saved["tables"]:
        assert table["title"] in printed
    rows = out["rows"]
    assert set(rows) == {
        "full fine-tune",
        "jlora.lora",
        "jlora.lora, remat",
        "limit",
        "jlora.lora, bf16 compute",
        "packed",
        "padded",
    }
    assert rows["packed"]["real_tokens"] > rows["padded"]["real_tokens"]
    assert abs(rows["jlora.lora, bf16 compute"]["loss"] - rows["jlora.lora"]["loss"]) < 0.1
    assert rows["jlora.lora, remat"]["loss"] == pytest.approx(rows["jlora.lora"]["loss"], 1e-5)


def test_packed_rows_hold_more_examples_than_padded_ones(bench):
    batches = bench.packed_and_padded(vocab=50, rows=3, seq=32, low=4, high=12)
    packed, padded = batches["packed"], batches["padded"]
    assert packed["tokens"].shape == padded["tokens"].shape == (3, 32)
    assert np.asarray(padded["segment_ids"]).max() == 1  # one example per row
    assert np.asarray(packed["segment_ids"]).max(axis=1).min() >= 2
    assert int((packed["segment_ids"] > 0).sum()) > int((padded["segment_ids"] > 0).sum())


def test_an_example_longer_than_a_row_is_refused(bench):
    with pytest.raises(ValueError, match="--max-len 40 does not fit --pack-seq 32"):
        bench.packed_and_padded(vocab=50, rows=1, seq=32, low=4, high=40)
