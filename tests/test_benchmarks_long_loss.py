"""benchmarks/long_loss.py end to end at a tiny size (no timing asserted)."""

import json

from bench_helpers import load_benchmark


def test_the_chunked_loss_holds_less_than_the_full_logits(tmp_path, capsys):
    bench = load_benchmark("long_loss")
    out = bench.main(
        [
            "--batch", "2", "--seq", "64", "--time-batch", "1", "--layers", "1",
            "--vocab", "8192", "--chunk", "16", "--rounds", "1",
            "--json", str(tmp_path / "out.json"),
        ]
    )  # fmt: skip
    saved = json.loads((tmp_path / "out.json").read_text())
    (table,) = saved["tables"]
    assert table["name"] == "long_loss" and table["title"] in capsys.readouterr().out
    rows = out["rows"]
    assert list(rows) == ["full logits", "chunked", "chunked, answers only"]
    assert rows["full logits"]["x_temp"] == 1.0 and rows["full logits"]["x_time"] == 1.0
    # the float32 logits of 2 x 64 tokens are 4 MiB; a chunk's are 16 x 8192 x 4 = 0.5 MiB
    saved_bytes = rows["full logits"]["temp_bytes"] - rows["chunked"]["temp_bytes"]
    assert saved_bytes >= out["logits_bytes"]
    assert out["chunk"] == 16 and all(r["s"] > 0 for r in rows.values())
