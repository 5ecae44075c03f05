"""benchmarks/moe_step.py end to end at a tiny size (no timing asserted)."""

import json

import jax
import jax.numpy as jnp
import pytest
from bench_helpers import load_benchmark

import jlora


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("moe_step")


TINY = ["--experts", "4", "--top-k", "2", "--d", "32", "--layers", "1", "--vocab", "64"]


def test_every_row_at_a_tiny_size(bench, tmp_path, capsys):
    out = bench.main(
        [*TINY, "--batch", "1", "--seq", "8", "--rounds", "1", "--json", str(tmp_path / "o.json")]
    )
    printed = capsys.readouterr().out
    (table,) = json.loads((tmp_path / "o.json").read_text())["tables"]
    assert table["name"] == "moe_step" and table["title"] in printed
    rows = out["rows"]
    assert set(rows) == {
        "jlora.lora",
        "merge W+sAB in step",
        "full fine-tune",
        "limit (no weight grads)",
    }
    assert rows["limit (no weight grads)"]["x_limit"] == 1.0
    assert rows["merge W+sAB in step"]["temp_x_merge"] == 1.0
    assert out["config"]["experts"] == 4 and out["config"]["top_k"] == 2


def test_the_merged_path_has_the_factorised_paths_loss_and_gradient(bench):
    """The merged row trains the same adapters on the same loss as the jlora.lora row."""
    args = bench.parse_args([*TINY, "--batch", "1", "--seq", "8", "--rank", "2"])
    model = bench.Decoder(bench.config(args))
    tokens = jax.random.randint(jax.random.key(0), (1, 8), 0, 64)
    params = jax.jit(model.init)(jax.random.key(2), tokens)["params"]
    cfg = bench.lora_config(2)
    a, base = bench.split_adapted(params, cfg)

    def loss(p, toks):
        return bench.token_loss(lambda q, t: model.apply({"params": q}, t), p, toks)

    value, grads = jax.jit(jlora.value_and_grad(loss, cfg))(jlora.combine(a, base), tokens)
    merged_value, merged_grads = jax.jit(jax.value_and_grad(bench.merged_loss(model, cfg)))(
        a, base, tokens
    )
    assert float(value) == pytest.approx(float(merged_value), rel=1e-5)
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(merged_grads), strict=True):
        assert jnp.allclose(x, y, rtol=1e-4, atol=1e-6)
    down = a["model"]["layers"]["mlp"]["experts"]["down_proj"]
    assert down["kernel_lora_a"].shape == (1, 4, 12, 2)  # [L, E, in, r]: one adapter per expert
