"""benchmarks/preference_step.py end to end on a tiny random checkpoint (no timing asserted)."""

import json
import math

import jax
import pytest
from bench_helpers import load_benchmark, tiny_checkpoint

from jlora.models.pretrained import load_pretrained


def test_every_row_on_a_tiny_checkpoint(tmp_path, capsys):
    bench = load_benchmark("preference_step")
    tiny_checkpoint(tmp_path / "tiny")
    rows = bench.main(
        [
            "--source", str(tmp_path / "tiny"), "--json", str(tmp_path / "out.json"),
            "--pairs", "2", "--seq", "8", "--rank", "2", "--rounds", "1",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert [t["name"] for t in saved["tables"]] == ["preference_step"]
    assert saved["tables"][0]["title"] in printed
    assert [r[0] for r in saved["tables"][0]["rows"]] == list(rows)
    dpo = [rows[name]["loss"] for name in (bench.IN_STEP, bench.PRECOMPUTED, bench.COPY)]
    assert dpo == pytest.approx([dpo[0]] * 3, rel=1e-5)  # one loss, three references
    assert math.isfinite(rows[bench.SFT]["loss"])
    # A second copy of the weights is an argument of its step; the adapters-off one is not.
    weights = sum(x.nbytes for x in jax.tree.leaves(load_pretrained(tmp_path / "tiny").params))
    extra = rows[bench.COPY]["argument_bytes"] - rows[bench.IN_STEP]["argument_bytes"]
    assert extra == weights
