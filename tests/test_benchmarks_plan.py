"""benchmarks/remat.py and benchmarks/planner.py end to end at tiny sizes (no timing asserted)."""

import json

import pytest
from bench_helpers import load_benchmark


def test_remat_measures_every_policy_with_equal_losses(tmp_path, capsys):
    bench = load_benchmark("remat")
    out = bench.main(
        [
            "--seq", "32", "--d", "32", "--layers", "2", "--heads", "2", "--vocab", "64",
            "--rounds", "1", "--json", str(tmp_path / "out.json"),
        ]
    )  # fmt: skip
    assert list(out["rows"]) == ["none", "full", "dots", "offload"]
    assert out["loss_spread"] < 1e-5
    assert out["rows"]["full"]["temp_mb"] < out["rows"]["none"]["temp_mb"]
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["tables"][0]["name"] == "remat"
    assert saved["tables"][0]["title"] in capsys.readouterr().out


@pytest.fixture(scope="module")
def planner():
    return load_benchmark("planner")


def test_the_planner_benchmark_checks_a_run_and_plans_llama(planner, tmp_path, capsys):
    out = planner.main(
        [
            "--batch", "2", "--seq", "16", "--llama-layers", "1", "--llama-seq", "32",
            "--json", str(tmp_path / "out.json"),
        ]
    )  # fmt: skip
    rows = out["check"]["rows"]
    planned, loaded, measured = rows.values()
    assert planned["total"] == loaded["total"] and measured["total"] > 0
    llama = out["llama8b"]["rows"]
    assert llama["QLoRA, NF4 base"]["base"] < llama["LoRA, bf16 base"]["base"]
    assert llama["LoRA, bf16 base"]["torchtune_gib"] == 30.3
    names = [t["name"] for t in json.loads((tmp_path / "out.json").read_text())["tables"]]
    assert names == ["planner_check", "planner_llama8b"]
    assert "| QLoRA, NF4 base" in capsys.readouterr().out


def test_the_llama_config_is_the_published_one(planner):
    c = planner.LLAMA_3_1_8B
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (4096, 14336, 32)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]) == (32, 8, 128256)
    assert c["rope_scaling"]["rope_type"] == "llama3" and c["tie_word_embeddings"] is False
