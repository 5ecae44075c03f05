"""benchmarks/real_model.py runs end to end on a tiny random checkpoint (no timing asserted)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from bench_helpers import load_benchmark, tiny_checkpoint

from jlora.models.decoder import Decoder, DecoderConfig


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("real_model")


def test_every_part_on_a_tiny_checkpoint(bench, tmp_path, capsys):
    tiny_checkpoint(tmp_path / "tiny")
    out = bench.main(
        [
            "--source", str(tmp_path / "tiny"), "--json", str(tmp_path / "out.json"),
            "--load-rounds", "1", "--decode-batches", "2", "--prompt", "4", "--new", "3",
            "--decode-rounds", "1", "--batch", "2", "--seq", "8", "--rank", "2", "--rounds", "1",
            "--no-remat", "--compile-run-rounds", "0",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    for title in ("### Load", "### Decode", "### Train step", "### Compile"):
        assert title in printed
    assert json.loads((tmp_path / "out.json").read_text())["config"]["parts"] == list(bench.PARTS)
    assert set(out["load"]["rows"]) == {"HF dir bf16", "HF dir f32"}
    for row in out["load"]["rows"].values():
        assert row["seconds"] > 0 and row["peak_extra_bytes"] >= 0
    assert all(r["same_tokens"] == 1.0 for r in out["decode"]["rows"].values())
    steps = out["step"]["rows"]
    assert set(steps) == {"full fine-tune", "jlora.lora", "limit"}
    assert steps["full fine-tune"]["x_full"] == 1.0 and steps["limit"]["x_limit"] == 1.0
    assert len(out["compile"]["rows"]) == 2


def test_limit_is_the_gradient_at_the_embedding_output(bench):
    """The limit's interceptor perturbs the lookup, not the tied head's ``attend``."""
    config = DecoderConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    tokens = jnp.arange(6, dtype=jnp.int32)[None]  # distinct: one table row per position
    params = jax.jit(Decoder(config).init)(jax.random.key(0), tokens)["params"]
    steps = bench.steps(Decoder(config), bench.lora_config(2), bench.optax.adam(1e-3))
    got = steps["limit"](params, tokens)
    # the same function untied: the head's copy of the table is constant, so the table's
    # gradient holds only the lookup's part, row tokens[t] = d loss / d (lookup output)[t]
    untied = dataclasses.replace(config, tie_word_embeddings=False)
    table = params["model"]["embed_tokens"]["embedding"]
    flat = {**params, "lm_head": {"kernel": table.T}}

    def loss(p):
        return bench.xent(Decoder(untied).apply({"params": p}, tokens), tokens)

    want = jax.jit(jax.grad(loss))(flat)["model"]["embed_tokens"]["embedding"][tokens[0]]
    assert got.shape == (1, 6, 8)
    assert jnp.allclose(got[0], want, atol=1e-6)
    assert float(jnp.abs(want).max()) > 0
