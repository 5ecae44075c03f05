"""benchmarks/attention.py end to end at a tiny size (no timing asserted)."""

import json

from bench_helpers import load_benchmark


def test_every_implementation_is_compiled_measured_and_agrees(tmp_path, capsys):
    bench = load_benchmark("attention")
    out = bench.main(
        [
            "--seqs", "64,96", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
            "--block", "16", "--rounds", "1", "--json", str(tmp_path / "out.json"),
        ]
    )  # fmt: skip
    saved = json.loads((tmp_path / "out.json").read_text())
    (table,) = saved["tables"]
    assert table["name"] == "attention" and table["title"] in capsys.readouterr().out
    assert [row[:2] for row in table["rows"]] == [
        [n, impl] for n in ("64", "96") for impl in ("einsum", "fused", "blockwise")
    ]
    for rows in out["rows"].values():
        assert rows["einsum"]["x_temp"] == 1.0 and rows["einsum"]["x_time"] == 1.0
        assert all(r["ran"] and r["ms"] > 0 and r["max_grad_diff"] < 1e-4 for r in rows.values())


def test_a_program_over_the_limit_is_compiled_not_run(tmp_path):
    bench = load_benchmark("attention")
    out = bench.main(["--seqs", "32", "--head-dim", "8", "--rounds", "1", "--run-limit-gib", "0"])
    rows = out["rows"]["32"]
    assert not any(r["ran"] for r in rows.values())
    assert all(r["temp_mib"] > 0 and r["ms"] is None for r in rows.values())
