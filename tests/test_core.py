"""The core transform over the whole zoo: init, merge, unmerge, split/combine, optimizer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from zoo import ZOO_NAMES, model

import jlora
from jlora._resolve import resolve_sites


def reference_delta(a, b, roles, scale):
    """``scale * A·B`` in the kernel's layout, computed by transposing to (stack, in, out)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    stack = [i for i, r in enumerate(roles) if r == "stack"]
    ins = [i for i, r in enumerate(roles) if r == "in"]
    outs = [i for i, r in enumerate(roles) if r == "out"]
    s_shape = a.shape[: len(stack)]
    i_shape = a.shape[len(stack) : -1]
    o_shape = b.shape[len(stack) + 1 :]
    r = a.shape[-1]
    a3 = a.reshape(math.prod(s_shape), math.prod(i_shape), r)
    b3 = b.reshape(math.prod(s_shape), r, math.prod(o_shape))
    d = np.einsum("sir,sro->sio", a3, b3).reshape(s_shape + i_shape + o_shape)
    return scale * np.transpose(d, np.argsort(stack + ins + outs))


def randomize_b(p, key):
    """Gives every B (and zero A of embeddings) random values so the adapters do something."""

    def fill(path, x):
        name = jlora.path_str(path)
        if name.endswith(("_lora_a", "_lora_b")):
            return jax.random.normal(jax.random.fold_in(key, hash(name) % 1000), x.shape, x.dtype)
        return x

    return jax.tree.map_with_path(fill, p)


@pytest.fixture(params=ZOO_NAMES)
def zoo_model(request):
    return model(request.param)


def test_init_adds_siblings_and_keeps_kernels(zoo_model, maybe_jit):
    m = zoo_model
    p = maybe_jit(lambda k, t: jlora.init_lora(k, t, m.config))(jax.random.key(0), m.params)
    base_paths = {jlora.path_str(q) for q, _ in jax.tree.flatten_with_path(m.params)[0]}
    new_paths = {jlora.path_str(q) for q, _ in jax.tree.flatten_with_path(p)[0]} - base_paths
    sites = resolve_sites(p, m.config)
    assert sites
    assert new_paths == {s.site.name + sfx for s in sites for sfx in ("_lora_a", "_lora_b")}
    for s in sites:
        assert s.site.a.dtype == jnp.float32 and s.site.b.dtype == jnp.float32
    _, base = jlora.split(p)
    chex_equal(base, m.params)


def chex_equal(x, y):
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_identity_at_init_is_exact(zoo_model, maybe_jit):
    m = zoo_model
    p = jlora.init_lora(jax.random.key(0), m.params, m.config)
    merged = maybe_jit(lambda t: jlora.merge_params(t, m.config))(p)
    chex_equal(merged, m.params)
    np.testing.assert_array_equal(m.apply(merged, m.x), m.apply(m.params, m.x))


def test_merge_is_w_plus_scaled_ab(zoo_model, maybe_jit):
    m = zoo_model
    p = randomize_b(jlora.init_lora(jax.random.key(0), m.params, m.config), jax.random.key(1))
    merged = maybe_jit(lambda t: jlora.merge_params(t, m.config))(p)
    assert jax.tree.structure(merged) == jax.tree.structure(m.params)
    flat = {jlora.path_str(q): x for q, x in jax.tree.flatten_with_path(merged)[0]}
    for s in resolve_sites(p, m.config):
        want = np.asarray(s.site.kernel) + reference_delta(s.site.a, s.site.b, s.roles, s.scale)
        np.testing.assert_allclose(flat[s.site.name], want, rtol=1e-5, atol=1e-5)
        assert not np.allclose(flat[s.site.name], s.site.kernel)  # the adapter did something
    # the adapted model computes something else than the base
    assert not np.allclose(m.apply(merged, m.x), m.apply(m.params, m.x))


def test_unmerge_recovers_the_base(zoo_model):
    m = zoo_model
    p = randomize_b(jlora.init_lora(jax.random.key(0), m.params, m.config), jax.random.key(1))
    lora, _ = jlora.split(p)
    back = jlora.unmerge_params(jlora.merge_params(p, m.config), lora, m.config)
    assert jax.tree.structure(back) == jax.tree.structure(p)
    for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(p), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)


def test_split_combine_round_trip(zoo_model, maybe_jit):
    m = zoo_model
    p = jlora.init_lora(jax.random.key(0), m.params, m.config)
    lora, base = maybe_jit(jlora.split)(p)
    assert all(jlora.is_adapter_path(q) for q, _ in jax.tree.flatten_with_path(lora)[0])
    chex_equal(maybe_jit(jlora.combine)(lora, base), p)


def test_optimizer_trains_only_adapters(zoo_model):
    m = zoo_model
    p = jlora.init_lora(jax.random.key(0), m.params, m.config)
    tx = jlora.lora_optimizer(optax.adam(1e-2), p)
    state = tx.init(p)
    state_leaves = jax.tree.leaves(state)
    n_adapter = len(jax.tree.leaves(jlora.split(p)[0]))
    # adam: mu and nu per adapter leaf, plus the step count; nothing for frozen leaves
    assert len(state_leaves) == 2 * n_adapter + 1

    def loss(t):
        y = m.apply(jlora.merge_params(t, m.config), m.x)
        return jnp.mean(jnp.square(y.astype(jnp.float32) - 1.0))

    @jax.jit
    def step(t, s):
        g = jax.grad(loss)(t)
        u, s = tx.update(g, s, t)
        return optax.apply_updates(t, u), s

    q = p
    for _ in range(3):
        q, state = step(q, state)
    _, base_before = jlora.split(p)
    lora_after, base_after = jlora.split(q)
    chex_equal(base_after, base_before)  # bitwise frozen
    changed = [
        not np.array_equal(u, v)
        for u, v in zip(
            jax.tree.leaves(lora_after), jax.tree.leaves(jlora.split(p)[0]), strict=True
        )
    ]
    assert all(changed)


def test_lean_path_gives_identical_updates():
    m = model("linen_mlp")
    p = randomize_b(jlora.init_lora(jax.random.key(0), m.params, m.config), jax.random.key(1))

    def loss(t):
        return jnp.mean(jnp.square(m.apply(jlora.merge_params(t, m.config), m.x)))

    tx_full = jlora.lora_optimizer(optax.adam(1e-2), p)
    g_full = jax.grad(loss)(p)
    u_full, _ = tx_full.update(g_full, tx_full.init(p), p)

    lora, base = jlora.split(p)
    g_lean = jax.grad(lambda lo: loss(jlora.combine(lo, base)))(lora)
    u_lean, _ = optax.adam(1e-2).update(g_lean, optax.adam(1e-2).init(lora), lora)
    chex_equal(jlora.split(u_full)[0], u_lean)


def test_short_training_run_loss_falls_and_only_adapters_change():
    m = model("linen_mlp")
    target = jnp.sin(m.x.sum(-1, keepdims=True) + jnp.arange(8.0))
    p = jlora.init_lora(jax.random.key(0), m.params, m.config)
    lora, base = jlora.split(p)
    tx = optax.adam(3e-2)
    state = tx.init(lora)

    def loss(lo):
        y = m.apply(jlora.merge_params(jlora.combine(lo, base), m.config), m.x)
        return jnp.mean(jnp.square(y - target))

    @jax.jit
    def step(lo, s):
        value, g = jax.value_and_grad(loss)(lo)
        u, s = tx.update(g, s, lo)
        return optax.apply_updates(lo, u), s, value

    losses = []
    for _ in range(30):
        lora, state, value = step(lora, state)
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0]
    _, base_after = jlora.split(jlora.combine(lora, base))
    chex_equal(base_after, m.params)


def test_seed_article_example_1000x10000_rank_10():
    params = {"layer": {"kernel": jax.ShapeDtypeStruct((1000, 10000), jnp.float32)}}
    p = jax.eval_shape(
        lambda: jlora.init_lora(jax.random.key(0), params, jlora.LoraConfig(rank=10))
    )
    lora, _ = jlora.split(p)
    trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(lora))
    assert trainable == 110_000
    text = jlora.summary(p)
    assert "trainable 110,000 of 10,110,000 parameters (1.088%)" in text
    assert "layer/kernel" in text


def test_eval_shape_on_a_7b_shaped_tree_allocates_nothing():
    layer = {
        "attn": {n: {"kernel": jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)} for n in "qkvo"},
        "mlp": {
            n: {"kernel": jax.ShapeDtypeStruct(s, jnp.bfloat16)}
            for n, s in (("gate", (4096, 11008)), ("up", (4096, 11008)), ("down", (11008, 4096)))
        },
    }
    params = {"layers": {str(i): layer for i in range(32)}}
    cfg = jlora.LoraConfig(rank=16)
    p = jax.eval_shape(lambda: jlora.init_lora(jax.random.key(0), params, cfg))
    merged = jax.eval_shape(lambda t: jlora.merge_params(t, cfg), p)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(merged))
    assert "trainable" in jlora.summary(p)


def test_frozen_dict_params_keep_their_container():
    from flax.core import FrozenDict

    m = model("linen_mlp")
    params = FrozenDict(m.params)
    p = jlora.init_lora(jax.random.key(0), params, m.config)
    assert isinstance(p, FrozenDict) and isinstance(p["params"]["Dense_0"], FrozenDict)
    assert isinstance(jlora.merge_params(p, m.config), FrozenDict)
    lora, base = jlora.split(p)
    assert isinstance(base, FrozenDict)
    chex_equal(jlora.combine(lora, base), p)


def test_nnx_round_trip_through_functional_api():
    from flax import nnx

    m = model("nnx_mlp")
    p = randomize_b(jlora.init_lora(jax.random.key(0), m.params, m.config), jax.random.key(1))
    merged = jlora.merge_params(p, m.config)
    y = m.apply(merged, m.x)  # replace_by_pure_dict accepts the merged tree: same structure
    assert y.shape == (4, 5)
    assert isinstance(nnx.State, type)


def test_lists_above_the_kernels_are_fine():
    params = {"layers": [{"kernel": jnp.ones((3, 4))}, {"kernel": jnp.ones((4, 2))}]}
    cfg = jlora.LoraConfig(rank=1)
    p = jlora.init_lora(jax.random.key(0), params, cfg)
    assert set(p["layers"][1]) == {"kernel", "kernel_lora_a", "kernel_lora_b"}
    lora, base = jlora.split(p)
    chex_equal(base, params)
    chex_equal(jlora.combine(lora, base), p)
    chex_equal(jlora.merge_params(p, cfg), params)


def test_per_path_keys_do_not_depend_on_other_targets():
    m = model("linen_mlp")
    one = jlora.LoraConfig(rank=4, targets=r".*/Dense_1/kernel")
    both = jlora.LoraConfig(rank=4)
    p1 = jlora.init_lora(jax.random.key(0), m.params, one)
    p2 = jlora.init_lora(jax.random.key(0), m.params, both)
    a1 = p1["params"]["Dense_1"]["kernel_lora_a"]
    np.testing.assert_array_equal(a1, p2["params"]["Dense_1"]["kernel_lora_a"])
    assert not np.array_equal(p2["params"]["Dense_0"]["kernel_lora_a"][:16], a1[:16])


def test_init_distributions_and_scales():
    w = {"big": {"kernel": jnp.zeros((4096, 64))}, "tok": {"embedding": jnp.zeros((300, 64))}}
    cfg = jlora.LoraConfig(rank=8, targets=r".*/(kernel|embedding)")
    p = jlora.init_lora(jax.random.key(0), w, cfg)
    a = np.asarray(p["big"]["kernel_lora_a"])
    bound = 1 / math.sqrt(4096)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    np.testing.assert_allclose(a.std(), bound / math.sqrt(3), rtol=0.05)  # uniform std
    assert not p["big"]["kernel_lora_b"].any()
    assert not p["tok"]["embedding_lora_a"].any()  # embeddings: A zero, B normal
    np.testing.assert_allclose(np.asarray(p["tok"]["embedding_lora_b"]).std(), 1.0, rtol=0.1)
    g = jlora.init_lora(jax.random.key(0), w, jlora.LoraConfig(rank=8, init="gaussian"))
    np.testing.assert_allclose(np.asarray(g["big"]["kernel_lora_a"]).std(), 1 / 8, rtol=0.05)


def test_rank_and_alpha_patterns_and_rslora():
    params = {"q": {"kernel": jnp.ones((16, 16))}, "v": {"kernel": jnp.ones((16, 16))}}
    cfg = jlora.LoraConfig(
        rank=8, alpha=16.0, rank_pattern={"q/.*": 2}, alpha_pattern={"v/.*": 4.0}
    )
    p = jlora.init_lora(jax.random.key(0), params, cfg)
    assert p["q"]["kernel_lora_a"].shape == (16, 2)
    assert p["v"]["kernel_lora_a"].shape == (16, 8)
    scales = {s.site.name: s.scale for s in resolve_sites(p, cfg)}
    assert scales == {"q/kernel": 8.0, "v/kernel": 0.5}
    rs = jlora.LoraConfig(rank=4, alpha=8.0, use_rslora=True)
    assert rs.scale_for("x") == 4.0


def test_merge_keeps_dtype_and_input_untouched():
    params = {"d": {"kernel": jnp.ones((8, 8), jnp.bfloat16)}}
    cfg = jlora.LoraConfig(rank=2)
    p = randomize_b(jlora.init_lora(jax.random.key(0), params, cfg), jax.random.key(3))
    before = jax.tree.map(np.array, p)
    merged = jlora.merge_params(p, cfg)
    assert merged["d"]["kernel"].dtype == jnp.bfloat16
    chex_equal(p, before)
    assert not p["d"]["kernel"].is_deleted()


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_merge_keeps_named_sharding(axis_type):
    kind = getattr(jax.sharding.AxisType, axis_type)
    mesh = jax.make_mesh((1,), ("x",), axis_types=(kind,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))
    params = {"d": {"kernel": jax.device_put(jnp.ones((8, 8)), sharding)}}
    cfg = jlora.LoraConfig(rank=2)
    merged = jlora.merge_params(jlora.init_lora(jax.random.key(0), params, cfg), cfg)
    assert merged["d"]["kernel"].sharding == sharding


def test_summary_lists_every_adapted_kernel(zoo_model):
    m = zoo_model
    p = jlora.init_lora(jax.random.key(0), m.params, m.config)
    text = jlora.summary(p)
    sites = resolve_sites(p, m.config)
    for s in sites:
        assert s.site.name in text
    lora, _ = jlora.split(p)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(lora))
    assert f"trainable {n:,} of" in text.splitlines()[-1]


def test_labels_mark_exactly_the_adapters(zoo_model):
    p = jlora.init_lora(jax.random.key(0), zoo_model.params, zoo_model.config)
    labels = jax.tree.leaves(jlora.lora_labels(p))
    assert labels.count("lora") == len(jax.tree.leaves(jlora.split(p)[0]))
    assert labels.count("frozen") == len(jax.tree.leaves(zoo_model.params))
