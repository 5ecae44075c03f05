"""benchmarks/gemma_step.py end to end on a tiny random Gemma 3 checkpoint (no timing asserted)."""

import json

import pytest
from bench_helpers import load_benchmark, tiny_checkpoint

from jlora.models.decoder import DecoderConfig

TINY_GEMMA3 = DecoderConfig.from_hf(
    {
        "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": 97,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 64,
    }
)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("gemma_step")


def test_load_and_step_on_a_tiny_gemma3_checkpoint(bench, tmp_path, capsys):
    tiny_checkpoint(tmp_path / "tiny", TINY_GEMMA3)
    out = bench.main(
        [
            "--source", str(tmp_path / "tiny"), "--json", str(tmp_path / "out.json"),
            "--load-rounds", "1", "--batch", "1", "--seq", "8", "--rank", "2", "--rounds", "2",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert [t["name"] for t in saved["tables"]] == ["gemma_load", "gemma_step"]
    for table in saved["tables"]:
        assert table["title"] in printed
    (load,) = out["load"]["rows"].values()
    assert load["seconds"] > 0 and load["peak_extra_bytes"] >= 0
    rows = out["step"]["rows"]
    assert set(rows) == {"full fine-tune", "jlora.lora", "limit"}
    assert rows["full fine-tune"]["x_full"] == 1.0 and rows["limit"]["x_limit"] == 1.0
    assert out["step"]["head_params"] == 97 * 32


def test_a_donated_step_feeds_its_outputs_back(bench):
    calls = []

    def exe(p, s, x):
        calls.append((p, s))
        return p + x, s + 1, "loss"

    call = bench.carried(exe, (0, 0), (2,))
    call(), call()
    assert calls == [(0, 0), (2, 1)]
