"""DoRA: magnitude per output unit, detached norm; merge path == factorised path, errors."""

import functools
import tempfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zoo import zoo

import jlora
from jlora._dora_norm import dense_norm, factorised_norm

ZOO = ("linen_attention", "linen_scan", "linen_conv", "linen_embed", "plain_dict")


@functools.cache
def models():
    return {m.name: m for m in zoo()}


def close(got, want, tol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


def randomize(p, seed=7, scale=0.3):
    def fill(path, x):
        key = path[-1].key if hasattr(path[-1], "key") else ""
        if not jlora.is_adapter_path(path):
            return x
        k = jax.random.fold_in(jax.random.key(seed), zlib.crc32(jlora.path_str(path).encode()))
        noise = jax.random.normal(k, x.shape, x.dtype) * scale
        return x * (1 + noise) if key.endswith("_lora_m") else noise

    return jax.tree.map_with_path(fill, p)


@pytest.mark.parametrize("name", ZOO)
def test_unchanged_at_init_and_merge_equals_factorised_with_grads(name):
    m = models()[name]
    p0 = jlora.init_dora(jax.random.key(0), m.params, m.config)
    want = m.apply(m.params, m.x)
    close(m.apply(jlora.merge_params(p0, m.config), m.x), want, 1e-6)
    close(jlora.lora(m.apply, m.config)(p0, m.x), want, 1e-6)

    p = randomize(p0)
    merged_out = m.apply(jlora.merge_params(p, m.config), m.x)
    close(jax.jit(jlora.lora(m.apply, m.config))(p, m.x), merged_out)
    assert not np.allclose(merged_out, want, atol=1e-3)

    lora, base = jlora.split(p)
    assert any(k.endswith("_lora_m") for k in map(jlora.path_str, _paths(lora)))

    def merged_loss(a):
        return jnp.sum(jnp.sin(m.apply(jlora.merge_params(jlora.combine(a, base), m.config), m.x)))

    def loss(q, x):
        return jnp.sum(jnp.sin(m.apply(q, x)))

    v1, g1 = jax.jit(jlora.value_and_grad(loss, m.config))(p, m.x)
    v2, g2 = jax.value_and_grad(merged_loss)(lora)
    close(v1, v2)
    jax.tree.map(close, g1, g2)
    # The magnitude gets gradients.
    for path, g in jax.tree.leaves_with_path(g1):
        if jlora.path_str(path).endswith("_lora_m"):
            assert np.abs(np.asarray(g)).max() > 0


def _paths(tree):
    return [p for p, _ in jax.tree.leaves_with_path(tree)]


def test_matches_the_paper_formula_with_detached_norm():
    k = jax.random.split(jax.random.key(1), 4)
    w, a, b = (
        jax.random.normal(k[0], (6, 5)),
        jax.random.normal(k[1], (6, 2)),
        jax.random.normal(k[2], (2, 5)),
    )
    mag = jnp.abs(jax.random.normal(k[3], (5,))) + 1
    cfg = jlora.LoraConfig(rank=2, alpha=3.0, targets="w")
    p = {"w": w, "w_lora_a": a, "w_lora_b": b, "w_lora_m": mag}
    x = jax.random.normal(jax.random.key(2), (4, 6))
    summed = np.asarray(w) + 1.5 * np.asarray(a) @ np.asarray(b)
    want = x @ (np.asarray(mag) * summed / np.linalg.norm(summed, axis=0))
    close(jlora.lora(lambda q, x: x @ q["w"], cfg)(p, x), want)
    close(
        jlora.merge_params(p, cfg)["w"], np.asarray(mag) * summed / np.linalg.norm(summed, axis=0)
    )

    # Detached: d/dA only through the numerator (the paper's / PEFT's choice).
    def f(a_):
        q = {**p, "w_lora_a": a_}
        return jnp.sum(jlora.lora(lambda q, x: x @ q["w"], cfg)(q, x))

    def ref(a_):
        s = w + 1.5 * a_ @ b
        return jnp.sum(x @ (mag * s / jax.lax.stop_gradient(jnp.linalg.norm(s, axis=0))))

    close(jax.grad(f)(a), jax.grad(ref)(a), 1e-5)


@pytest.mark.parametrize(
    "shape, roles",
    [
        ((6, 5), ("in", "out")),
        ((6, 2, 3), ("in", "out", "out")),
        ((2, 3, 4), ("in", "in", "out")),
        ((3, 6, 5), ("stack", "in", "out")),
        ((4, 2, 3, 5), ("stack", "in", "out", "out")),
    ],
)
def test_factorised_norm_equals_the_dense_norm(shape, roles):
    from jlora._layout import adapter_shapes, delta

    a_shape, b_shape = adapter_shapes(shape, roles, 2)
    k = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(k[0], shape)
    a, b = jax.random.normal(k[1], a_shape), jax.random.normal(k[2], b_shape)
    close(factorised_norm(w, a, b, roles, 0.7), dense_norm(w + delta(a, b, roles, 0.7), roles))


def test_magnitude_is_trained_and_in_the_loraplus_b_group():
    m = models()["plain_dict"]
    p = jlora.init_dora(jax.random.key(0), m.params, m.config)
    assert jlora.lora_labels(p)["mlp"]["w_in_lora_m"] == "lora"
    assert jlora.loraplus_labels(p)["mlp"]["w_in_lora_m"] == "lora_b"
    tx = jlora.lora_optimizer(optax.sgd(0.1), p)
    g = jax.grad(lambda q: jnp.sum(m.apply(jlora.merge_params(q, m.config), m.x) ** 2))(p)
    u, _ = tx.update(g, tx.init(p), p)
    assert np.abs(np.asarray(u["mlp"]["w_in_lora_m"])).max() > 0
    assert not np.any(u["mlp"]["w_in"])


def test_errors():
    m = models()["plain_dict"]
    p = jlora.init_dora(jax.random.key(0), m.params, m.config)
    with pytest.raises(ValueError, match=r"'mlp/w_in' already has a magnitude"):
        jlora.add_magnitudes(p, m.config)
    lora, _ = jlora.split(p)
    with pytest.raises(ValueError, match=r"unmerge_params: \['mlp/w_in', 'mlp/w_out'\] are DoRA"):
        jlora.unmerge_params(jlora.merge_params(p, m.config), lora, m.config)
    bad = {**p, "mlp": {**p["mlp"], "w_in_lora_m": jnp.ones(3)}}
    with pytest.raises(
        ValueError, match=r"magnitude of 'mlp/w_in' has shape \(3,\).*needs \(20,\)"
    ):
        jlora.merge_params(bad, m.config)
    half = {**p, "mlp": {k: v for k, v in p["mlp"].items() if k != "w_out_lora_m"}}
    with pytest.raises(ValueError, match=r"\['mlp/w_in'\] are DoRA kernels but \['mlp/w_out'\]"):
        jlora.export_peft(tempfile.mkdtemp(), half, m.config, jlora.peft.LLAMA)
    joined = lambda q, x: x @ jnp.concatenate([q["mlp"]["w_in"], q["mlp"]["w_in"]], 1)  # noqa: E731
    with pytest.raises(ValueError, match=r"'concatenate'.*concatenation of DoRA kernels"):
        jlora.lora(joined, m.config)(p, jnp.ones((2, 10)))
    # GPT-2's PyTorch modules hold (out, in) kernels: with jlora's default (in, out) roles the
    # norm runs over what PEFT calls the output axis, so there is no PEFT magnitude to write.
    gpt2 = {"h": {"0": {"mlp": {"c_fc": {"kernel": jnp.ones((6, 4))}}}}}
    cfg = jlora.LoraConfig(rank=2)
    with pytest.raises(ValueError, match=r"'h/0/mlp/c_fc/kernel' is a DoRA kernel.*axis_rules"):
        jlora.export_peft(
            tempfile.mkdtemp(), jlora.init_dora(jax.random.key(0), gpt2, cfg), cfg, jlora.peft.GPT2
        )


CONSTRUCT_CFG = jlora.LoraConfig(
    rank=2, targets="w|s", axis_rules=[("s", ("stack", "in", "out", "out"))]
)
CONSTRUCTS = {
    "kernel_on_the_left": lambda q, x: jax.lax.dot_general(q["w"], x, (((0,), (1,)), ((), ()))),
    "stacked_batched_einsum": lambda q, x: jnp.einsum(
        "sbi,sihd->sbhd", jnp.broadcast_to(x, (3, *x.shape)), q["s"]
    ),
    "stacked_on_the_left": lambda q, x: jax.lax.dot_general(
        q["s"], jnp.broadcast_to(x, (3, *x.shape)), (((1,), (2,)), ((0,), (0,)))
    ),
    "scan_over_layers": lambda q, x: jax.lax.scan(
        lambda c, w: (c, jnp.einsum("bi,ihd->bhd", x, w)), 0.0, q["s"]
    )[1],
    "reshape_then_slice": lambda q, x: x @ q["s"].reshape(3, 6, 8)[1],
    "double_transpose": lambda q, x: x @ q["w"].T.T,
    # DoRA's per-out-unit scale when the out axes are contracted (tied embeddings' attend)...
    "out_axes_contracted": lambda q, x: (x @ q["w"]) @ q["w"].T,
    "stacked_out_axes_contracted": lambda q, x: jnp.einsum(
        "sbhd,sihd->sbi",
        jnp.einsum("sbi,sihd->sbhd", jnp.broadcast_to(x, (3, *x.shape)), q["s"]),
        q["s"],
    ),
    # ...and in a lookup: the rows of a table, then the same table attended.
    "lookup_then_attend": lambda q, x: q["w"][jnp.argmax(x, -1)] @ q["w"].T,
}


@pytest.mark.parametrize("name", CONSTRUCTS)
def test_factorised_constructs_move_the_magnitude_with_the_kernel(name):
    k = jax.random.split(jax.random.key(0), 3)
    base = {"w": jax.random.normal(k[0], (6, 5)), "s": jax.random.normal(k[1], (3, 6, 2, 4))}
    p = randomize(jlora.init_dora(jax.random.key(1), base, CONSTRUCT_CFG))
    x = jax.random.normal(k[2], (7, 6))
    f = CONSTRUCTS[name]
    close(jlora.lora(f, CONSTRUCT_CFG)(p, x), f(jlora.merge_params(p, CONSTRUCT_CFG), x))


@settings(max_examples=6, deadline=None)
@given(
    stack=st.integers(0, 2),
    fan_in=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    fan_out=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    rank=st.integers(1, 3),
    scale=st.floats(0.1, 4.0),
    seed=st.integers(0, 2**16),
)
def test_factorised_norm_property(stack, fan_in, fan_out, rank, scale, seed):
    from jlora._layout import adapter_shapes, delta

    shape = (2,) * stack + tuple(fan_in) + tuple(fan_out)
    roles = ("stack",) * stack + ("in",) * len(fan_in) + ("out",) * len(fan_out)
    a_shape, b_shape = adapter_shapes(shape, roles, rank)
    k = jax.random.split(jax.random.key(seed), 3)
    w = jax.random.normal(k[0], shape)
    a, b = jax.random.normal(k[1], a_shape), jax.random.normal(k[2], b_shape)
    close(
        factorised_norm(w, a, b, roles, scale),
        dense_norm(w + delta(a, b, roles, scale), roles),
        1e-4,
    )


def test_save_and_load_keep_the_magnitude():
    m = models()["linen_scan"]
    p = randomize(jlora.init_dora(jax.random.key(0), m.params, m.config))
    path = tempfile.mkdtemp()
    jlora.save_adapter(path, p, m.config)
    loaded, cfg = jlora.load_adapter(path, m.params)
    assert jax.tree.structure(loaded) == jax.tree.structure(p)
    jax.tree.map(np.testing.assert_array_equal, loaded, p)
    close(jlora.lora(m.apply, cfg)(loaded, m.x), m.apply(jlora.merge_params(p, m.config), m.x))


@pytest.mark.peft
def test_exported_dora_adapter_loads_into_real_peft():
    """PEFT's DoRA (use_dora, lora_magnitude_vector) computes what jlora computes, embeddings
    (one magnitude per feature, the norm over the vocabulary) included."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.fc = torch.nn.Linear(8, 6, bias=False)
            self.proj = torch.nn.Linear(6, 4, bias=False)

        def forward(self, ids):
            return self.proj(torch.tanh(self.fc(self.emb(ids))))

    def jax_base(net, weight=lambda module: module.weight):
        return {
            "emb": {"embedding": jnp.asarray(weight(net.emb).detach().numpy())},
            "fc": {"kernel": jnp.asarray(weight(net.fc).detach().numpy().T)},
            "proj": {"kernel": jnp.asarray(weight(net.proj).detach().numpy().T)},
        }

    def f(q, ids):
        x = q["emb"]["embedding"][ids]
        return jnp.tanh(x @ q["fc"]["kernel"]) @ q["proj"]["kernel"]

    torch.manual_seed(0)
    net = Net()
    base = jax_base(net)
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*/(kernel|embedding)")
    p = randomize(jlora.init_dora(jax.random.key(0), base, cfg))
    ids = np.array([[0, 3, 9, 3, 5]])
    want = np.asarray(jlora.lora(f, cfg)(p, jnp.asarray(ids)))
    close(want, f(jlora.merge_params(p, cfg), ids))
    path = tempfile.mkdtemp()
    assert jlora.export_peft(path, p, cfg, jlora.peft.LLAMA) == ["emb", "fc", "proj"]
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(net, path)(torch.from_numpy(ids)).numpy()
    close(got, want)
    assert np.abs(want - np.asarray(f(base, jnp.asarray(ids)))).max() > 1e-2  # it does something
    # And back: PEFT's own DoRA adapter (trained-looking factors and magnitudes) imports.
    torch.manual_seed(1)
    model = peft.get_peft_model(
        Net(),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "fc", "proj"], use_dora=True),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.3 * torch.randn_like(param))
        want = model(torch.from_numpy(ids)).numpy()
    model.save_pretrained(path)
    torch_base = jax_base(model.base_model.model, lambda module: module.base_layer.weight)
    loaded, loaded_cfg = jlora.import_peft(path, torch_base, jlora.peft.LLAMA)
    assert "kernel_lora_m" in loaded["fc"] and "embedding_lora_m" in loaded["emb"]
    close(jlora.lora(f, loaded_cfg)(loaded, jnp.asarray(ids)), want)
