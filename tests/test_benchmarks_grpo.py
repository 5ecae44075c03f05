"""benchmarks/grpo_step.py end to end on a tiny random checkpoint (no timing asserted)."""

import json
import math

import jax
import pytest
from bench_helpers import load_benchmark, tiny_checkpoint

from jlora.models.pretrained import load_pretrained


def test_every_part_on_a_tiny_checkpoint(tmp_path, capsys):
    bench = load_benchmark("grpo_step")
    tiny_checkpoint(tmp_path / "tiny")
    res = bench.main(
        [
            "--source", str(tmp_path / "tiny"), "--json", str(tmp_path / "out.json"),
            "--prompts", "2", "--generations", "3", "--prompt-len", "5", "--new", "4",
            "--rank", "2", "--rounds", "1",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "out.json").read_text())
    names = [t["name"] for t in saved["tables"]]
    assert names == ["grpo_step", "grpo_step_sampling", "grpo_step_memory"]
    for t in saved["tables"]:
        assert t["title"] in printed
    split, sampling, memory = saved["tables"]
    parts = [bench.SAMPLE, bench.REFERENCE, bench.UPDATE_KL, bench.UPDATE]
    assert [r[0] for r in split["rows"]][:4] == parts == list(res["split"])
    assert [r[0] for r in sampling["rows"]] == list(res["sampling"])
    assert [r[0] for r in memory["rows"]][1] == "a merged copy (peers)"
    for name in parts:
        assert res["split"][name]["ms"] > 0, name
    # A step is sampling plus one update: the shares of its parts sum to 1 in each column.
    s = res["split"]
    assert s[bench.SAMPLE]["share_kl"] + s[bench.UPDATE_KL]["share_kl"] == pytest.approx(1.0)
    assert s[bench.SAMPLE]["share"] + s[bench.UPDATE]["share"] == pytest.approx(1.0)
    assert 0 < s[bench.REFERENCE]["share_kl"] < 1
    shares = [float(r[2]) for r in split["rows"] if r[0] in (bench.SAMPLE, bench.UPDATE_KL)]
    assert sum(shares) == pytest.approx(1.0, abs=0.011)  # as printed, two decimals each
    merged = res["sampling"]["merge + sampling merged"]["ms"]
    parts_ms = res["sampling"][bench.MERGE]["ms"] + res["sampling"][bench.SAMPLE_MERGED]["ms"]
    assert merged == pytest.approx(parts_ms)
    # Same key, same sampler: the merged copy draws the live adapters' tokens.
    assert res["same_tokens_fraction"] == 1.0
    assert all(math.isfinite(v) for v in res["losses"].values())
    # The merged copy a sampler would hold is the base's f32 weights, no more, no less.
    weights = sum(x.nbytes for x in jax.tree.leaves(load_pretrained(tmp_path / "tiny").params))
    m = res["memory"]
    assert m["merged_copy_bytes"] == weights
    assert m["with_merged_copy_bytes"] - m["live_bytes"] == weights
    # The beta > 0 update holds the base as an argument, and the merged copy is on top of it.
    assert s[bench.UPDATE_KL]["argument_bytes"] > weights


def test_a_zero_beta_is_refused(capsys):
    bench = load_benchmark("grpo_step")
    with pytest.raises(SystemExit):
        bench.main(["--beta", "0"])
    assert "--beta must be > 0" in capsys.readouterr().err
