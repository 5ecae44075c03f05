"""QLoRA: int8 / NF4 blockwise bases, training adapters on them, merging into them, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_factorised import CFG, CONSTRUCTS, X, adapted, close, plain_params, randomize
from zoo import ZOO_NAMES, zoo

import jlora
from jlora._quantized import NF4


@functools.cache
def models():
    return {m.name: m for m in zoo()}


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def test_nf4_picks_the_nearest_level_and_int8_rounds():
    w = jax.random.normal(jax.random.key(0), (3, 8, 16))  # a stacked kernel
    q = jlora.quantize({"w": w}, "w", kind="nf4", block_size=32)["w"]
    blocks = np.asarray(w).reshape(-1, 32)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    nearest = NF4[np.abs((blocks / absmax)[..., None] - NF4).argmin(-1)] * absmax
    np.testing.assert_allclose(q.dequantize(), nearest.reshape(w.shape), rtol=1e-6, atol=1e-7)
    assert q.dequantize().shape == w.shape and q.dequantize().dtype == w.dtype
    i8 = jlora.quantize({"w": w}, "w", kind="int8", block_size=32)["w"]
    want = np.round(blocks / absmax * 127) / 127 * absmax
    np.testing.assert_allclose(i8.dequantize(), want.reshape(w.shape), rtol=1e-6, atol=1e-7)
    assert q.bits_per_parameter == 4 + 32 / 32 and i8.bits_per_parameter == 8 + 32 / 32


@pytest.mark.parametrize("kind, bound", [("int8", 0.02), ("nf4", 0.2)])
@pytest.mark.parametrize("name", ["linen_attention", "linen_scan"])
def test_output_error_against_the_float_base_is_small(name, kind, bound):
    m = models()[name]
    q = jlora.quantize(m.params, m.config, kind=kind, block_size=16)
    kernels = [x for x in jax.tree.leaves(q, is_leaf=lambda x: hasattr(x, "codes"))]
    assert any(hasattr(x, "codes") for x in kernels)
    err = rel_err(m.apply(jlora.dequantize(q), m.x), m.apply(m.params, m.x))
    assert 0 < err < bound, err


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_train_adapters_on_a_quantised_base_through_the_factorised_path(kind):
    m = models()["linen_scan"]  # stacked N-d attention kernels and stacked Dense kernels
    p = jlora.init_lora(jax.random.key(0), m.params, m.config)
    q = jlora.quantize(p, m.config, kind=kind, block_size=16)
    target = jnp.sin(m.apply(m.params, m.x))
    tx = optax.adam(1e-2)

    def loss(params, x):
        return jnp.mean((m.apply(params, x) - target) ** 2)

    grad = jlora.value_and_grad(loss, m.config)

    @jax.jit
    def step(q, state):
        value, g = grad(q, m.x)  # each kernel is dequantised where it is used
        lora, base = jlora.split(q)
        updates, state = tx.update(g, state, lora)
        return jlora.combine(optax.apply_updates(lora, updates), base), state, value

    state = tx.init(jlora.split(q)[0])
    start = q
    losses = []
    for _ in range(5):
        q, state, value = step(q, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    # The quantised base never changed; only adapters did.
    before, after = jlora.split(start)[1], jlora.split(q)[1]
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    # Factorised on the quantised base == merge path on the dequantised base.
    deq = jlora.dequantize(q)
    got = jlora.lora(m.apply, m.config)(q, m.x)
    want = m.apply(jlora.merge_params(deq, m.config), m.x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_merging_into_a_quantised_base_dequantises_adds_and_stores_as_asked():
    m = models()["plain_dict"]
    cfg = jlora.LoraConfig(rank=2, targets="mlp/w_in")
    p = jlora.init_lora(jax.random.key(0), m.params, cfg)
    p["mlp"]["w_in_lora_b"] = jnp.full_like(p["mlp"]["w_in_lora_b"], 0.1)
    q = jlora.quantize(p, r"mlp/w_(in|out)", kind="int8", block_size=20)
    as_float = jlora.merge_quantized(q, cfg, store="float")
    want = jlora.merge_params(jlora.dequantize(q), cfg)
    np.testing.assert_array_equal(as_float["mlp"]["w_in"], want["mlp"]["w_in"])
    assert as_float["mlp"]["w_out"] is q["mlp"]["w_out"]  # not adapted: kept quantised
    again = jlora.merge_quantized(q, cfg, store="requantize")
    assert again["mlp"]["w_in"].kind == "int8" and again["mlp"]["w_in"].block_size == 20
    assert rel_err(again["mlp"]["w_in"].dequantize(), want["mlp"]["w_in"]) < 1e-2
    with pytest.raises(ValueError, match=r"say how the merged kernels are stored.*got store=None"):
        jlora.merge_quantized(q, cfg)
    with pytest.raises(
        ValueError, match=r"kernel 'mlp/w_in' is quantised \(int8\).*merge_quantized"
    ):
        jlora.merge_params(q, cfg)


# ---- dequantisation at use: the quantised base through every construct of the factorised path --


def check_equals_dequantised(fn, q, cfg, *args, grads=True):
    """On a quantised base, output and adapter gradients equal the same path on the base
    dequantised up front (itself equal to the merge path: see test_factorised)."""
    deq = jlora.dequantize(q)
    run = jax.jit(jlora.lora(fn, cfg))
    close(run(q, *args), run(deq, *args))
    if grads:

        def loss(p, *xs):
            return jnp.sum(jnp.sin(fn(p, *xs).astype(jnp.float32)))

        vg = jax.jit(jlora.value_and_grad(loss, cfg))
        (v1, g1), (v2, g2) = vg(q, *args), vg(deq, *args)
        close(v1, v2)
        jax.tree.map(close, g1, g2)


@pytest.mark.parametrize("name", sorted(CONSTRUCTS))
def test_every_construct_on_a_quantised_base(name):
    q = jlora.quantize(plain_params(), CFG, kind="int8", block_size=16)
    assert all(isinstance(q[k], jlora.Quantized) for k in ("w", "w2", "stack"))
    check_equals_dequantised(CONSTRUCTS[name], q, CFG, X, grads=name != "while")


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_on_a_quantised_base(name):
    m = models()[name]
    q = jlora.quantize(adapted(m.params, m.config), m.config, kind="nf4", block_size=8)
    check_equals_dequantised(m.apply, q, m.config, m.x)


def _kept_for_backward(fn, p, cfg):
    """Shapes of the float arrays the backward pass keeps (the residuals of ``jax.vjp``)."""
    lora, base = jlora.split(p)
    factorised = jlora.lora(fn, cfg)
    _, backward = jax.vjp(lambda a: factorised(jlora.combine(a, base), X), lora)
    floats = [x for x in jax.tree.leaves(backward) if jnp.issubdtype(x.dtype, jnp.floating)]
    return {tuple(x.shape) for x in floats}


@pytest.mark.parametrize("name", ["matmul", "lax_scan_stack"])
def test_the_backward_pass_keeps_codes_not_dequantised_kernels(name):
    kernels = {(8, 6), (6, 8), (8, 8), (4, 8, 8)}
    q = jlora.quantize(plain_params(), CFG, kind="int8", block_size=16)
    assert not kernels & _kept_for_backward(CONSTRUCTS[name], q, CFG)
    # Dequantised up front (what jlora did before), the dense kernels are kept: the check sees.
    assert kernels & _kept_for_backward(CONSTRUCTS[name], jlora.dequantize(q), CFG)


def _float_shapes(jaxpr):
    """Shapes of the float values that ``jaxpr`` computes, nested jaxprs included."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [
            tuple(v.aval.shape)
            for v in eqn.outvars
            if jnp.issubdtype(getattr(v.aval, "dtype", jnp.int32), jnp.floating)
        ]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes += _float_shapes(sub)
    return shapes


def test_a_scanned_stack_is_dequantised_one_layer_at_a_time():
    q = jlora.quantize(plain_params(), CFG, kind="int8", block_size=16)
    loss = lambda p, x: jnp.sum(CONSTRUCTS["lax_scan_stack"](p, x) ** 2)  # noqa: E731
    step = _float_shapes(jax.make_jaxpr(jlora.value_and_grad(loss, CFG))(q, X).jaxpr)
    assert (8, 8) in step and (4, 8, 8) not in step  # one layer's dense kernel, never the stack
    # A stack whose layers do not fill whole blocks is dequantised whole before the scan.
    coarse = jlora.quantize(plain_params(), "stack", kind="int8", block_size=128)
    whole = jax.make_jaxpr(jlora.lora(CONSTRUCTS["lax_scan_stack"], CFG))(coarse, X).jaxpr
    assert (4, 8, 8) in _float_shapes(whole)
    check_equals_dequantised(CONSTRUCTS["lax_scan_stack"], coarse, CFG, X)


def test_dora_and_unadapted_kernels_on_a_quantised_base():
    dora = jlora.init_dora(jax.random.key(0), {"w": plain_params()["w"]}, CFG)
    dora = randomize(dora)
    q = jlora.quantize(dora, CFG, kind="int8", block_size=16)
    check_equals_dequantised(lambda p, x: jnp.tanh(x @ p["w"]), q, CFG, X)
    # A quantised kernel without adapters is used dense; the adapted one stays factorised.
    cfg = jlora.LoraConfig(rank=3, targets="w")
    p = jlora.combine(
        randomize(
            jlora.split(
                jlora.init_lora(
                    jax.random.key(0), {"w": plain_params()["w"], "w2": plain_params()["w2"]}, cfg
                )
            )[0]
        ),
        {"w": plain_params()["w"], "w2": plain_params()["w2"]},
    )
    q = jlora.quantize(p, r"w|w2", kind="int8", block_size=16)
    assert isinstance(q["w2"], jlora.Quantized) and "w2_lora_a" not in q
    check_equals_dequantised(CONSTRUCTS["matmul"], q, cfg, X)


def test_merge_fallback_on_a_quantised_base_merges_the_dequantised_kernel():
    q = jlora.quantize(plain_params(), CFG, kind="int8", block_size=16)
    fn = lambda p, x: x @ p["w"] + jnp.sum(p["w"])  # noqa: E731  (a reduction: not a product)
    with pytest.warns(UserWarning, match=r"merged kernel 'w'.*reduce_sum"):
        got = jlora.lora(fn, CFG, on_unsupported="merge")(q, X)
    close(got, fn(jlora.merge_params(jlora.dequantize(q), CFG), X))


@pytest.mark.parametrize("traced", [False, True])
def test_mixed_batch_on_a_quantised_base(traced):
    lora, base = jlora.split(plain_params())
    bank = jlora.add_adapter({}, "a", lora, CFG)
    bank = jlora.add_adapter(bank, "b", jax.tree.map(lambda x: -2 * x, lora), CFG)
    q = jlora.quantize(base, CFG, kind="int8", block_size=16)
    fn, x = CONSTRUCTS["matmul"], X.reshape(10, 8)[:3]  # three rows of 8 features
    rows = ["b", None, "a"]
    if traced:
        got = jax.jit(lambda i: jlora.mixed_batch(fn, q, bank, i, x))(jnp.array([1, -1, 0]))
    else:
        got = jlora.mixed_batch(fn, q, bank, rows, x)
    deq = jlora.dequantize(q)
    for i, name in enumerate(rows):
        params, cfg = jlora.select_adapter(deq, bank, name)
        want = fn(params if cfg is None else jlora.merge_params(params, cfg), x[i : i + 1])
        close(got[i : i + 1], want)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="int4"), r"kind must be one of \('int8', 'nf4'\); got 'int4'"),
        (dict(block_size=1), r"block_size must be an int >= 2; got 1"),
        (dict(block_size=7, kind="nf4"), r"NF4 packs two 4-bit codes per byte.*got 7"),
        (
            dict(block_size=64),
            r"kernel 'mlp/w_in' of shape \(10, 20\) has 200 values, not a multiple of "
            r"block_size=64; pick a block size that divides it \(e.g. block_size=8\)",
        ),
    ],
)
def test_errors(kwargs, match):
    m = models()["plain_dict"]
    with pytest.raises(ValueError, match=match):
        jlora.quantize(m.params, m.config, **kwargs)


def test_the_qlora_order_quantise_first_then_add_adapters():
    """QLoRA's usual order: a quantised base first, adapters (plain or DoRA) added to it."""
    m = models()["linen_scan"]
    q = jlora.quantize(m.params, m.config, kind="nf4", block_size=16)
    p = jlora.init_lora(jax.random.key(0), q, m.config)
    quantised = lambda x: isinstance(x, jlora.Quantized)  # noqa: E731
    kernels = [x for x in jax.tree.leaves(p, is_leaf=quantised) if quantised(x)]
    assert len(kernels) == len(jax.tree.leaves(jlora.split(p)[0])) // 2  # each has A and B
    close(jlora.lora(m.apply, m.config)(p, m.x), m.apply(jlora.dequantize(q), m.x))  # B = 0
    dora = randomize(jlora.init_dora(jax.random.key(0), q, m.config))
    check_equals_dequantised(m.apply, dora, m.config, m.x)
    # The summary counts a quantised kernel by its logical size, like the float one.
    total = jlora.summary(p).splitlines()[-1]
    assert total == jlora.summary(jlora.dequantize(p)).splitlines()[-1]
    assert "nf4 (float32)" in jlora.summary(p)
    # DoRA magnitudes are trainable and counted as such (one per output unit of each kernel).
    with_m, without = jlora.summary(dora).splitlines()[-1], total
    magnitudes = sum(x.size for p_, x in jax.tree.leaves_with_path(dora) if "_lora_m" in str(p_))
    assert f"trainable {int(without.split()[1].replace(',', '')) + magnitudes:,}" in with_m
    # What cannot be done on a quantised base says what to do instead.
    with pytest.raises(ValueError, match=r"'params/layers/Dense_0/kernel' is already quantised"):
        jlora.quantize(q, m.config, kind="int8")
    with pytest.raises(ValueError, match=r"init_pissa: kernel .* is quantised.*then"):
        jlora.init_pissa(q, m.config)


def test_variants_trace_on_a_7b_shaped_tree_without_allocating():
    big = {
        f"layer{i}": {
            "q": {"kernel": jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)},
            "up": {"kernel": jax.ShapeDtypeStruct((4096, 11008), jnp.bfloat16)},
        }
        for i in range(32)
    }
    cfg = jlora.LoraConfig(rank=16)
    dora = jax.eval_shape(lambda p: jlora.init_dora(jax.random.key(0), p, cfg), big)
    assert dora["layer3"]["up"]["kernel_lora_m"].shape == (11008,)
    pissa = jax.eval_shape(lambda p: jlora.init_pissa(p, cfg), big)
    assert pissa["layer3"]["up"]["kernel"].dtype == jnp.bfloat16
    q = jax.eval_shape(lambda p: jlora.quantize(p, cfg, kind="nf4"), big)
    assert q["layer3"]["up"]["kernel"].codes.shape == (4096 * 11008 // 64, 32)


@settings(max_examples=6, deadline=None)
@given(
    blocks=st.integers(1, 6),
    block=st.sampled_from([2, 4, 16, 64]),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_int8_error_is_at_most_half_a_step_per_block(blocks, block, scale, seed):
    w = jax.random.normal(jax.random.key(seed), (blocks, block)) * scale
    q = jlora.quantize({"w": w}, "w", kind="int8", block_size=block)["w"]
    step = np.abs(np.asarray(w)).max(axis=1, keepdims=True) / 127
    err = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
    assert (err <= step / 2 * (1 + 1e-5) + 1e-30).all()


# ---- LoftQ: adapters that start by carrying the quantisation error ------------------------------


def _weight_error(p, cfg, base):
    """||W' - W|| / ||W|| over all kernels, W' the model ``p`` stands for at step 0."""
    got = jlora.merge_quantized(p, cfg, store="float") if jlora.split(p)[0] else p
    got = jlora.dequantize(got)
    num = sum(np.sum((np.asarray(g) - np.asarray(w)) ** 2) for g, w in _kernels(got, base))
    den = sum(np.sum(np.asarray(w) ** 2) for _, w in _kernels(got, base))
    return float(np.sqrt(num / den))


def _kernels(got, base):
    flat = dict(jax.tree.leaves_with_path(base))
    return [(x, flat[p]) for p, x in jax.tree.leaves_with_path(got) if p in flat and x.ndim >= 2]


@pytest.mark.parametrize("name", ["linen_scan", "linen_conv", "plain_dict"])
def test_loftq_starts_closer_to_the_float_model_than_the_quantised_base(name):
    m = models()[name]
    plain = _weight_error(
        jlora.quantize(m.params, m.config, kind="nf4", block_size=8), m.config, m.params
    )
    errors = [
        _weight_error(
            jlora.init_loftq(m.params, m.config, kind="nf4", block_size=8, iterations=n),
            m.config,
            m.params,
        )
        for n in (1, 3)
    ]
    assert errors[0] < 0.9 * plain, (errors, plain)
    assert errors[1] <= errors[0] * 1.01  # more rounds do not lose ground
    # It trains as any QLoRA tree: the quantised base stays, the adapters move.
    p = jlora.init_loftq(m.params, m.config, kind="int8", block_size=8)
    is_q = lambda x: isinstance(x, jlora.Quantized)  # noqa: E731
    kernels = [x for x in jax.tree.leaves(p, is_leaf=is_q) if is_q(x)]
    assert len(kernels) == len(jax.tree.leaves(jlora.split(p)[0])) // 2  # each with A and B
    check_equals_dequantised(m.apply, p, m.config, m.x)


def test_loftq_errors():
    m = models()["plain_dict"]
    with pytest.raises(ValueError, match=r"iterations must be an int >= 1; got 0"):
        jlora.init_loftq(m.params, m.config, iterations=0)
    with pytest.raises(ValueError, match=r"init_loftq: kind must be one of"):
        jlora.init_loftq(m.params, m.config, kind="int4")
    q = jlora.quantize(m.params, m.config, kind="int8", block_size=20)
    match = r"init_loftq: kernel 'mlp/w_in' is quantised; LoftQ quantises the float kernel"
    with pytest.raises(ValueError, match=match):
        jlora.init_loftq(q, m.config, block_size=20)
    lora = jlora.init_lora(jax.random.key(0), m.params, m.config)
    with pytest.raises(ValueError, match=r"init_loftq: kernel 'mlp/w_in' already has LoRA"):
        jlora.init_loftq(lora, m.config, block_size=20)
