"""benchmarks/sampling.py end to end on a tiny random checkpoint (no timing asserted)."""

import json

import pytest
from bench_helpers import load_benchmark, tiny_checkpoint


def test_every_batch_and_way_on_a_tiny_checkpoint(tmp_path, capsys):
    bench = load_benchmark("sampling")
    tiny_checkpoint(tmp_path / "tiny")
    res = bench.main(
        [
            "--source", str(tmp_path / "tiny"), "--json", str(tmp_path / "out.json"),
            "--batches", "1,3", "--prompt", "4", "--new", "3", "--rank", "2", "--rounds", "1",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "out.json").read_text())
    (table,) = saved["tables"]
    assert table["name"] == "sampling" and table["title"] in printed
    assert "live / merged time per token" in table["header"]
    assert "1.33-1.39x" in table["note"]
    assert [row[0] for row in table["rows"]] == ["batch 1", "batch 3"] == list(res["rows"])
    assert [row[-1] for row in table["rows"]] == ["yes, yes"] * 2
    for name, row in res["rows"].items():
        for way in (bench.LIVE, bench.PER_ROW):
            assert row[way]["same_tokens"] is True, (name, way)
            assert row[way]["x_merged"] > 0
        for way in bench.WAYS:
            assert row[way]["decode_tok_s"] > 0 and row[way]["total_s"] > 0


def test_one_new_token_is_refused(capsys):
    bench = load_benchmark("sampling")
    with pytest.raises(SystemExit):
        bench.main(["--new", "1"])
    assert "--new must be >= 2" in capsys.readouterr().err
