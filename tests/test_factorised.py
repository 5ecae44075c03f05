"""``jlora.lora`` / ``jlora.value_and_grad``: factorised execution equals the merge path."""

import dataclasses
import functools
import re
import zlib
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TOLERANCE
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P
from zoo import ZOO_NAMES, model

import jlora
from jlora._factorised import consume

F32 = jnp.dtype("float32")


def randomize(p, seed=7, scale=0.1):
    """Random A and B (B = 0 at init would hide the adapters); numpy, so nothing compiles."""

    def fill(path, x):
        if not jlora.is_adapter_path(path):
            return x
        rng = np.random.default_rng([seed, zlib.crc32(jlora.path_str(path).encode())])
        return jnp.asarray(rng.normal(size=x.shape) * scale, jnp.dtype(x.dtype))

    return jax.tree.map_with_path(fill, p)


def normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def adapted(params, cfg):
    """``init_lora``'s tree with random adapters, built without running (compiling) its init."""
    shapes = jax.eval_shape(lambda: jlora.init_lora(jax.random.key(0), params, cfg))
    return jlora.combine(randomize(jlora.split(shapes)[0]), params)


def close(got, want, dtype=F32, rtol=None):
    """Relative closeness, measured against the largest magnitude of ``want``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    tol = TOLERANCE[jnp.dtype(dtype)] if rtol is None else rtol
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


# Gradients as outputs: f32 1e-5 relative to the largest magnitude (measured: at most 8.4e-7
# between the two paths on the zoo, each within 6.1e-7 of a float64 reference); bf16 looser.
GRAD_RTOL = {F32: 1e-5, jnp.dtype("bfloat16"): 5e-2}


def check_against_merge(fn, p, cfg, *args, dtype=F32, grads=True):
    """Output and adapter gradients of the factorised path equal those of the merge path."""
    out_tol = 5e-2 if jnp.dtype(dtype) == jnp.bfloat16 else None  # bf16: ~3 bits per layer
    got = jax.jit(jlora.lora(fn, cfg))(p, *args)
    close(got, jax.jit(fn)(jlora.merge_params(p, cfg), *args), dtype, out_tol)
    if not grads:
        return
    lora_half, base = jlora.split(p)

    def merged_loss(a):
        out = fn(jlora.merge_params(jlora.combine(a, base), cfg), *args)
        return jnp.sum(jnp.sin(out.astype(jnp.float32)))

    def loss(q, *xs):
        return jnp.sum(jnp.sin(fn(q, *xs).astype(jnp.float32)))

    v1, g1 = jax.jit(jlora.value_and_grad(loss, cfg))(p, *args)
    v2, g2 = jax.jit(jax.value_and_grad(merged_loss))(lora_half)
    rtol = GRAD_RTOL[jnp.dtype(dtype)]
    close(v1, v2, dtype, rtol)
    jax.tree.map(lambda a, b: close(a, b, dtype, rtol), g1, g2)


# ---- the zoo ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_output_and_grads_equal_merge_path(name):
    m = model(name)
    check_against_merge(m.apply, adapted(m.params, m.config), m.config, m.x)


def test_zoo_under_jit():
    m = model("linen_attention")
    p = adapted(m.params, m.config)
    got = jax.jit(jlora.lora(m.apply, m.config))(p, m.x)
    close(got, m.apply(jlora.merge_params(p, m.config), m.x))


# ---- plain functions and every construct ------------------------------------------------------

CFG = jlora.LoraConfig(
    rank=3, alpha=6.0, targets=r"w|w2|stack", axis_rules=[("stack", ("stack", "in", "out"))]
)
X = normal(0, (2, 5, 8))


@functools.cache
def plain_params():
    params = {
        "w": normal(1, (8, 6), 1 / 3),
        "w2": normal(2, (6, 8), 1 / 3),
        "stack": normal(3, (4, 8, 8), 1 / 3),
    }
    return adapted(params, CFG)


@jax.custom_jvp
def _cjvp_matmul(x, w):
    return x @ w


_cjvp_matmul.defjvp(lambda p, t: (_cjvp_matmul(*p), t[0] @ p[1] + p[0] @ t[1]))


@jax.custom_vjp
def _cvjp_matmul(x, w):
    return x @ w


_cvjp_matmul.defvjp(
    lambda x, w: (x @ w, (x, w)),
    lambda res, g: (g @ res[1].T, jnp.einsum("...i,...o->io", res[0], g)),
)


def _mlp(p, x):
    return jnp.tanh(x @ p["w"]) @ p["w2"]


def _scan_layers(p, x):
    def layer(h, w):
        return jnp.tanh(h @ w), None

    return jax.lax.scan(layer, x, p["stack"])[0]


def _per_layer(x):
    return jnp.concatenate([x, x[::-1]])  # (4, 5, 8): one input per stacked layer / expert


def _python_loop(p, x):
    for i in range(p["stack"].shape[0]):
        x = jnp.tanh(x @ p["stack"][i])
    return x


def _traced_index(p, x):
    return x @ p["stack"][jnp.argmax(jnp.array([0, 0, 1, 0]))]


def _while(p, x):
    def body(c):
        i, h = c
        return i + 1, jnp.tanh(h @ p["w"] @ p["w2"])

    return jax.lax.while_loop(lambda c: c[0] < jnp.int32(3), body, (jnp.int32(0), x))[1]


def _shard_map(p, x):
    mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    by_out = jax.shard_map(
        lambda w, h: h @ w, mesh=mesh, in_specs=(P(None, "d"), P()), out_specs=P(None, None, "d")
    )
    by_in = jax.shard_map(
        lambda w, h: jax.lax.psum(h @ w, "d"),
        mesh=mesh,
        in_specs=(P("d", None), P(None, None, "d")),
        out_specs=P(),
    )
    return by_out(p["w"], x) + by_in(p["w"], x)


CONSTRUCTS = {
    "matmul": _mlp,
    "dot": lambda p, x: jnp.dot(x, p["w"]),
    "einsum": lambda p, x: jnp.einsum("bti,io->bto", x, p["w"]),
    "kernel_on_left": lambda p, x: jnp.einsum("io,bti->obt", p["w"], x),
    "transposed_twice": lambda p, x: x @ p["w"].T.T,
    "tied_transpose": lambda p, x: (x @ p["w"]) @ p["w"].T,
    "reshape_out": lambda p, x: x @ p["w"].reshape(8, 2, 3).reshape(8, 6),
    "expand_dims": lambda p, x: jnp.matmul(x[:, None], p["w"][None]),
    "nested_jit": lambda p, x: jax.jit(_mlp)(p, x),
    "remat": lambda p, x: jax.checkpoint(_mlp)(p, x),
    "remat_policy": lambda p, x: jax.checkpoint(
        _mlp, policy=jax.checkpoint_policies.nothing_saveable
    )(p, x),
    "lax_scan_stack": _scan_layers,
    "stack_as_batch": lambda p, x: jnp.einsum("sti,sio->sto", _per_layer(x), p["stack"]),
    "stack_as_batch_left": lambda p, x: jnp.einsum("sio,sti->sot", p["stack"], _per_layer(x)),
    "python_loop_slices": _python_loop,
    "traced_index": _traced_index,
    "cond": lambda p, x: jax.lax.cond(x.sum() > 0, _mlp, lambda q, h: -_mlp(q, h), p, x),
    "switch": lambda p, x: jax.lax.switch(1, [_mlp, lambda q, h: h @ q["w"] @ q["w2"]], p, x),
    "while": _while,
    "custom_jvp": lambda p, x: _cjvp_matmul(x, p["w"]),
    "custom_vjp": lambda p, x: _cvjp_matmul(x, p["w"]),
    "shard_map": _shard_map,
    "bf16_compute": lambda p, x: x.astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16),
    # Kernels joined on the fly (a fused qkv from separate kernels), with a plain one too.
    "concat_out_axes": lambda p, x: x @ jnp.concatenate([p["w"], p["stack"][1], p["w"]], 1),
    "concat_in_axes": lambda p, x: (
        jnp.concatenate([x, x], -1) @ jnp.concatenate([p["w"], p["w"]], 0)
    ),
    "concat_with_plain": lambda p, x: x @ jnp.concatenate([p["w"], jnp.ones((8, 2))], 1),
    "concat_stack": lambda p, x: _scan_layers(
        {"stack": jnp.concatenate([p["stack"], p["stack"][:1]], 0)}, x
    ),
}


@pytest.mark.parametrize("name", sorted(CONSTRUCTS))
def test_construct_equals_merge_path(name):
    dtype = jnp.bfloat16 if name.startswith("bf16") else F32
    grads = name != "while"  # reverse-mode through while_loop is not defined by JAX either
    check_against_merge(CONSTRUCTS[name], plain_params(), CFG, X, dtype=dtype, grads=grads)


def test_gemma_style_einsum_kernels():
    heads, embed, head_dim = 2, 8, 4
    params = {
        "q_einsum": {"w": normal(4, (heads, embed, head_dim), 1 / 3)},
        "attn_vec_einsum": {"w": normal(5, (heads, head_dim, embed), 1 / 3)},
    }
    cfg = jlora.LoraConfig(
        rank=2,
        targets=r".*/w",
        axis_rules=[
            (r"q_einsum/w", ("out", "in", "out")),
            (r"attn_vec_einsum/w", ("in", "in", "out")),
        ],
    )

    def fn(p, x):
        q = jnp.einsum("BTD,NDH->BTNH", x, p["q_einsum"]["w"])
        return jnp.einsum("BTNH,NHD->BTD", q, p["attn_vec_einsum"]["w"])

    check_against_merge(fn, adapted(params, cfg), cfg, X)


def test_linen_constructs_bf16_nn_jit_nn_remat():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.jit(nn.Dense)(16, name="jitted")(x)
            x = nn.remat(nn.Dense)(16, name="remat")(nn.gelu(x))
            x = nn.DenseGeneral((2, 4), name="general")(x)
            return nn.Dense(8, dtype=jnp.bfloat16, name="half")(x.reshape(*x.shape[:-2], 8))

    m = Model()
    params = m.init(jax.random.key(0), X)
    cfg = jlora.LoraConfig(rank=2, axis_rules=[(r".*/general/kernel", ("in", "out", "out"))])
    check_against_merge(m.apply, adapted(params, cfg), cfg, X, dtype=jnp.bfloat16)


def test_tied_embedding_lookup_and_attend():
    class Tied(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            embed = nn.Embed(20, 8)
            return embed.attend(jnp.tanh(embed(tokens)))

    m = Tied()
    tokens = jax.random.randint(jax.random.key(0), (2, 5), 0, 20)
    params = m.init(jax.random.key(0), tokens)
    cfg = jlora.LoraConfig(rank=2, targets=r".*/embedding")
    check_against_merge(m.apply, adapted(params, cfg), cfg, tokens)


def test_untouched_arguments_and_functions_pass_through():
    p = plain_params()
    out = jlora.lora(lambda q, x, y: (x @ q["w"], y * 2), CFG)(p, X, 3.0)
    close(out[1], 6.0)
    plain = {"w": jnp.ones((8, 6))}
    close(
        jlora.lora(_mlp, CFG)({**plain, "w2": jnp.ones((6, 8))}, X),
        _mlp({**plain, "w2": jnp.ones((6, 8))}, X),
    )


def test_closure_over_outer_jit_tracers():
    p = plain_params()

    @jax.jit
    def step(q, x, y):
        return jlora.value_and_grad(lambda r: jnp.mean((_mlp(r, x) - y) ** 2), CFG)(q)[0]

    want = jnp.mean((_mlp(jlora.merge_params(p, CFG), X) - 1.0) ** 2)
    close(step(p, X, jnp.ones_like(X)), want)


# ---- errors and the merge fallback ------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda p, x: x * jnp.sum(p["w"]), r"kernel 'w' .*'reduce_sum': found no factorised form"),
        (lambda p, x: x @ p["w"].reshape(6, 8).T, r"'reshape'.*mixes the kernel"),
        (
            lambda p, x: x @ jnp.concatenate([p["w"], p["w2"].T], 1),
            r"'concatenate'.*different axis roles \('in', 'out'\) and \('out', 'in'\)",
        ),
        (lambda p, x: x[..., :4] @ p["w"][:4], r"'slice'.*'in' axis"),
        (lambda p, x: p["w"] @ p["w2"], r"'dot_general'.*product of two adapted kernels"),
        (lambda p, x: x @ p["w"].T[:, :, None].sum(-1).T, r"'reduce_sum'"),
        (
            lambda p, x: jnp.einsum("bti,sio->bsto", x, p["stack"]),
            r"batch axes \(\) of the kernel are not its stack axes",
        ),
        (
            lambda p, x: jax.lax.scan(lambda c, w: (c, c @ w), x, p["w"].T)[1],
            r"'scan'.*scan over axis 0 of a kernel with roles \('out', 'in'\)",
        ),
        (
            lambda p, x: jax.lax.fori_loop(0, 2, lambda i, w: w * 1.0, p["w"]),
            r"'scan'.*kernel in a scan carry",
        ),
        (lambda p, x: p["w"], r"'output'.*the kernel itself as a result"),
        (lambda p, x: jnp.take(p["w"], jnp.array([0, 1]), axis=1), r"'gather'.*'out' axis"),
        (
            lambda p, x: jax.lax.conv_general_dilated(
                p["w"][None, None], x[:1, None, :, :6], (1, 1), "SAME"
            ),
            r"'conv_general_dilated'.*input \(lhs\) of a convolution",
        ),
    ],
)
def test_unsupported_use_raises_naming_primitive_and_path(fn, match):
    with pytest.raises(ValueError, match=match):
        jlora.lora(fn, CFG)(plain_params(), X)


def test_unsupported_messages_say_how_to_fix():
    with pytest.raises(ValueError, match=r"on_unsupported='merge'.*at that use"):
        jlora.lora(lambda p, x: x * jnp.sum(p["w"]), CFG)(plain_params(), X)


def test_merge_fallback_merges_that_use_and_says_so():
    p = plain_params()

    def fn(q, x):
        return (x @ q["w"]) * jnp.sum(q["w"])

    with pytest.warns(UserWarning, match=r"merged kernel 'w' .* at primitive 'reduce_sum'"):
        got = jlora.lora(fn, CFG, on_unsupported="merge")(p, X)
    close(got, fn(jlora.merge_params(p, CFG), X))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"on_unsupported": "ignore"}, ValueError, r"on_unsupported must be one of"),
        ({"deterministic": 0}, TypeError, r"deterministic must be a Python bool"),
        ({"deterministic": False}, ValueError, r"no dropout_rng was given"),
    ],
)
def test_options_are_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        jlora.lora(_mlp, jlora.LoraConfig(dropout=0.1), **kwargs)


def test_config_type_is_checked():
    with pytest.raises(TypeError, match=r"expects a LoraConfig; got dict"):
        jlora.lora(_mlp, {"rank": 2})


def test_value_and_grad_refuses_trees_without_adapters():
    with pytest.raises(ValueError, match=r"holds no LoRA adapters"):
        jlora.value_and_grad(lambda p, x: jnp.sum(_mlp(p, x)), CFG)(
            {"w": jnp.ones((8, 6)), "w2": jnp.ones((6, 8))}, X
        )


def test_adapters_that_do_not_fit_config_are_refused():
    with pytest.raises(ValueError, match=r"do not fit this config"):
        jlora.lora(_mlp, dataclasses.replace(CFG, rank=5))(plain_params(), X)


# ---- dropout ------------------------------------------------------------------------------------


def test_dropout_only_in_train_mode_and_deterministic_given_rng():
    cfg = jlora.LoraConfig(
        rank=3, alpha=6.0, targets=r"w|w2|stack", dropout=0.5, axis_rules=CFG.axis_rules
    )
    p = plain_params()
    ref = _mlp(jlora.merge_params(p, cfg), X)
    close(jlora.lora(_mlp, cfg)(p, X), ref)  # eval by default, even with a key
    close(jlora.lora(_mlp, cfg, dropout_rng=jax.random.key(1))(p, X), ref)
    train = partial(jlora.lora, _mlp, cfg, deterministic=False)
    y1 = train(dropout_rng=jax.random.key(1))(p, X)
    y2 = train(dropout_rng=jax.random.key(1))(p, X)
    y3 = train(dropout_rng=jax.random.key(2))(p, X)
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y1, ref) and not np.allclose(y1, y3)


def test_dropout_touches_only_the_adapter_input_and_varies_per_layer():
    cfg = jlora.LoraConfig(rank=3, targets=r"stack", dropout=0.5, axis_rules=CFG.axis_rules)
    p = jlora.init_lora(jax.random.key(0), {"stack": plain_params()["stack"]}, cfg)  # B = 0
    train = jlora.lora(_scan_layers, cfg, dropout_rng=jax.random.key(0), deterministic=False)
    close(train(p, X), _scan_layers(p, X))  # with B = 0 only the base path remains
    seen = []

    def spy(q, x):
        def layer(h, w):
            return h, h @ w

        return jax.lax.scan(layer, x, q["stack"])[1]

    q = randomize(p)
    ys = jlora.lora(spy, cfg, dropout_rng=jax.random.key(0), deterministic=False)(q, X)
    base = jax.vmap(lambda w: X @ w)(q["stack"])
    seen = [np.asarray(ys[i] - base[i]) for i in range(2)]
    assert not np.allclose(seen[0] / np.abs(seen[0]).max(), seen[1] / np.abs(seen[1]).max())

    # Each iteration of a while loop draws its own masks too: the same input and kernel in two
    # iterations gives two different adapter outputs.
    def twice(q, x):
        def body(c):
            i, out = c
            return i + 1, out.at[i].set(x @ q["stack"][0])

        return jax.lax.while_loop(lambda c: c[0] < 2, body, (0, jnp.zeros((2, *x.shape))))[1]

    ys = jlora.lora(twice, cfg, dropout_rng=jax.random.key(0), deterministic=False)(q, X)
    assert not np.allclose(ys[0], ys[1])
    close(jlora.lora(twice, cfg)(q, X)[0], jlora.lora(twice, cfg)(q, X)[1])  # eval: no dropout


# ---- training -----------------------------------------------------------------------------------


def test_three_train_steps_match_merge_path():
    m = model("linen_attention")
    p0 = adapted(m.params, m.config)
    tx = optax.adam(1e-2)
    target = jnp.ones_like(m.apply(m.params, m.x))

    def loss(p, x):
        return jnp.mean((m.apply(p, x) - target) ** 2)

    @jax.jit
    def factorised_step(lora_half, base, state, x):
        value, grads = jlora.value_and_grad(loss, m.config)(jlora.combine(lora_half, base), x)
        updates, state = tx.update(grads, state, lora_half)
        return optax.apply_updates(lora_half, updates), state, value

    @jax.jit
    def merge_step(lora_half, base, state, x):
        def merged(a):
            return loss(jlora.merge_params(jlora.combine(a, base), m.config), x)

        value, grads = jax.value_and_grad(merged)(lora_half)
        updates, state = tx.update(grads, state, lora_half)
        return optax.apply_updates(lora_half, updates), state, value

    losses = []
    for step in (factorised_step, merge_step):
        lora_half, base = jlora.split(p0)
        state = tx.init(lora_half)
        run = []
        for _ in range(3):
            lora_half, state, value = step(lora_half, base, state, m.x)
            run.append(float(value))
        losses.append(run)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert losses[0][2] < losses[0][0]


def _dot_shapes(jaxpr):
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes += _dot_shapes(sub)
    return shapes


def test_grad_has_no_kernel_sized_weight_gradient():
    p = plain_params()
    lora_half, base = jlora.split(p)
    x = normal(6, (3, 7, 8))

    def loss(q):
        return jnp.sum(_scan_layers(q, x @ q["w"] @ q["w2"]) ** 2)

    vg = jlora.value_and_grad(loss, CFG)
    shapes = _dot_shapes(jax.make_jaxpr(vg)(p).jaxpr)
    assert shapes  # the forward and backward products are there...
    kernel_shapes = {(8, 6), (6, 8), (8, 8), (4, 8, 8)}
    assert not kernel_shapes & set(shapes), shapes  # ...but none is a W-sized product
    # The merge path does form them, so the check can see them.
    merged = jax.make_jaxpr(
        jax.grad(lambda a: loss(jlora.merge_params(jlora.combine(a, base), CFG)))
    )(lora_half)
    assert kernel_shapes & set(_dot_shapes(merged.jaxpr))


def test_value_and_grad_with_aux_and_the_whole_tree_form():
    p = plain_params()

    def loss(q, x):
        y = _mlp(q, x)
        return jnp.mean(y**2), y.shape

    (_, shape), grads = jlora.value_and_grad(loss, CFG, has_aux=True)(p, X)
    assert shape == (2, 5, 8) and sorted(grads) == [
        "stack_lora_a",
        "stack_lora_b",
        "w2_lora_a",
        "w2_lora_b",
        "w_lora_a",
        "w_lora_b",
    ]
    # Documented alternative: a whole-tree gradient with lora_optimizer freezing the base.
    tx = jlora.lora_optimizer(optax.sgd(0.1), p)
    full = jax.grad(lambda q: jlora.lora(loss, CFG)(q, X)[0])(p)
    updates, _ = tx.update(full, tx.init(p), p)
    new = optax.apply_updates(p, updates)
    np.testing.assert_array_equal(new["w"], p["w"])
    close(new["w_lora_a"], p["w_lora_a"] - 0.1 * grads["w_lora_a"])


XCFG = jlora.LoraConfig(
    rank=2,
    targets=r"w|stack|w3|c",
    axis_rules=[
        ("stack", ("stack", "in", "out")),
        ("w3", ("in", "out", "out")),
        ("c", ("in", "in", "out")),
    ],
)


def _conv(c, h, groups=1, spec=("NWC", "WIO", "NWC")):
    return jax.lax.conv_general_dilated(
        h, c, (1,), "SAME", dimension_numbers=spec, feature_group_count=groups
    )


def _gather_rows(x, w):
    dnums = jax.lax.GatherDimensionNumbers(
        offset_dims=(2,), collapsed_slice_dims=(0,), start_index_map=(0,)
    )
    indices = w.astype(jnp.int32)[..., None]
    return jax.lax.gather(x.reshape(-1, 8), indices, dnums, (1, 8))


@pytest.mark.parametrize("groups, shape", [(2, (3, 4, 6)), (8, (3, 1, 16))])
def test_grouped_and_depthwise_convolutions_equal_merge_path(groups, shape):
    p = adapted({"c": normal(8, shape)}, XCFG)
    check_against_merge(lambda q, x: _conv(q["c"], x, groups=groups), p, XCFG, X)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (
            lambda p, x: jnp.einsum("io,io->", p["w"], jnp.ones((8, 6))),
            r"neither all its 'in' axes",
        ),
        (
            lambda p, x: jax.lax.while_loop(lambda c: c[0, 0] > 1e9, lambda c: c, p["w"]),
            r"'while'.*kernel in a while-loop carry",
        ),
        (lambda p, x: jnp.broadcast_to(p["w"], (2, 8, 6)), r"'broadcast_in_dim'.*broadcasting"),
        (
            lambda p, x: x[..., :2] @ p["w3"].transpose(1, 0, 2).reshape(2, 24),
            r"'reshape'.*\(2, 8, 3\) -> \(2, 24\) that mixes the kernel's \('out', 'in', 'out'\)",
        ),
        (
            lambda p, x: jax.lax.conv_general_dilated(
                x[..., :4],
                p["c"],
                (1,),
                "SAME",
                dimension_numbers=("NWC", "WIO", "NWC"),
                batch_group_count=2,
            ),
            r"'conv_general_dilated'.*batch_group_count > 1",
        ),
        (
            lambda p, x: _conv(p["c"], x[..., :6], spec=("NWC", "WOI", "NWC")),
            r"roles \('in', 'in', 'out'\) do not match the convolution",
        ),
        (lambda p, x: _gather_rows(x, p["w"]), r"'gather'.*used as gather indices"),
        (
            lambda p, x: jnp.take(p["stack"], jnp.array([0, 1]), axis=1),
            r"'gather'.*one 'out' axis needed",
        ),
    ],
)
def test_more_unsupported_uses_raise(fn, match):
    params = {
        "w": normal(1, (8, 6)),
        "stack": normal(3, (4, 8, 8)),
        "w3": normal(7, (8, 2, 3)),
        "c": normal(8, (3, 4, 6)),
    }
    with pytest.raises(ValueError, match=match):
        jlora.lora(fn, XCFG)(adapted(params, XCFG), X)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    perm=st.permutations([0, 1, 2]),
    on_left=st.booleans(),
    reshape=st.booleans(),
)
def test_property_any_axis_order_of_the_kernel_equals_merge_path(perm, on_left, reshape):
    """Permuting, reshaping and placing the kernel on either side never changes the result."""
    names = "ihd"  # roles in, out, out
    cfg = jlora.LoraConfig(rank=2, targets="w3", axis_rules=[("w3", ("in", "out", "out"))])
    p = adapted({"w3": normal(9, (8, 2, 3))}, cfg)
    k = "".join(names[a] for a in perm)
    out = "bt" + "".join(c for c in k if c != "i")

    def fn(q, x):
        w = q["w3"].transpose(perm)
        if reshape:  # split and re-merge the in axis: a group-preserving round trip
            shape = w.shape
            w = w.reshape(*shape[: perm.index(0)], 2, 4, *shape[perm.index(0) + 1 :]).reshape(shape)
        spec = f"{k},bti->{out}" if on_left else f"bti,{k}->{out}"
        return jnp.einsum(spec, *((w, x) if on_left else (x, w)))

    close(jlora.lora(fn, cfg)(p, X), fn(jlora.merge_params(p, cfg), X))


def test_eager_calls_compile_once_per_argument_structure():
    traced = []

    def fn(p, x, label):
        traced.append(label)  # a Python side effect: runs only while fn is traced
        return x @ p["w"]

    p = plain_params()
    f = jlora.lora(fn, CFG)
    want = X @ jlora.merge_params(p, CFG)["w"]
    for _ in range(3):
        close(f(p, X, "a"), want)
    assert traced == ["a"]
    f(p, X[:1], "a")  # new shapes: compiles again
    f(p, X, "b")  # a new static (non-array) leaf: compiles again
    f(p, X, {"unhashable"})  # an unhashable static leaf: runs uncompiled, every time
    f(p, X, {"unhashable"})
    assert traced == ["a", "a", "b", {"unhashable"}, {"unhashable"}]
    grad = jlora.value_and_grad(lambda q, x: jnp.sum(fn(q, x, "g")), CFG)
    for _ in range(2):
        grad(p, X)
    assert traced[5:] == ["g"]
    # Under a transformation the wrapper is traced with its caller, as any JAX function.
    jax.jit(lambda q: f(q, X, "jit"))(p)
    jax.vmap(lambda x: f(p, x, "vmap"))(X)
    assert traced[6:] == ["jit", "vmap"]


# ---- the second low-rank product: fused at small rank, a matmul above -----------------------


@pytest.mark.parametrize("rank", [consume.FUSED_MAX_RANK, consume.FUSED_MAX_RANK + 1])
def test_both_forms_of_the_low_rank_product_equal_merge_path(rank):
    cfg = jlora.LoraConfig(
        rank=rank,
        alpha=2.0 * rank,
        targets=r"w|emb|conv",
        axis_rules=[("conv", ("in", "in", "out"))],
    )
    params = {
        "w": normal(1, (16, 12), 1 / 4),
        "emb": normal(2, (10, 16)),
        "conv": normal(4, (3, 12, 12), 0.2),
    }
    p = adapted(params, cfg)
    x, ids = normal(3, (2, 3, 16)), jnp.array([[1, 4, 9], [0, 0, 3]])

    def fn(q, x, ids):
        h = jnp.tanh(x @ q["w"]) + jnp.take(q["emb"], ids, axis=0) @ q["w"]
        return _conv(q["conv"], h)

    check_against_merge(fn, p, cfg, x, ids)
    # Two uses of w: x·W and x·A each. The second products (h·B, for both uses, the lookup and
    # the convolution) are elementwise up to FUSED_MAX_RANK, and matmuls above it.
    dots = _dot_shapes(jax.make_jaxpr(jlora.lora(fn, cfg))(p, x, ids).jaxpr)
    assert len(dots) == (4 if rank <= consume.FUSED_MAX_RANK else 8), dots


def test_forward_mode_and_hessian_vector_products_equal_merge_path():
    p = plain_params()
    lora_half, base = jlora.split(p)
    tangent = jax.tree.map(lambda a: jnp.ones_like(a) * 0.1, lora_half)

    def fn(q, x):
        return _mlp(q, x)

    def factorised(a, x):
        return jlora.lora(fn, CFG)(jlora.combine(a, base), x)

    def merged(a, x):
        return fn(jlora.merge_params(jlora.combine(a, base), CFG), x)

    out, jvp_out = jax.jvp(lambda a: factorised(a, X), (lora_half,), (tangent,))
    want, want_jvp = jax.jvp(lambda a: merged(a, X), (lora_half,), (tangent,))
    close(out, want)
    close(jvp_out, want_jvp)
    # A tangent in x alone (the adapter tangents are symbolic zeros).
    x_jvp = jax.jvp(lambda x: factorised(lora_half, x), (X,), (jnp.ones_like(X),))[1]
    close(x_jvp, jax.jvp(lambda x: merged(lora_half, x), (X,), (jnp.ones_like(X),))[1])

    def hvp(f):
        loss = lambda a: jnp.sum(jnp.sin(f(a, X)))  # noqa: E731
        return jax.jvp(jax.grad(loss), (lora_half,), (tangent,))[1]

    jax.tree.map(lambda a, b: close(a, b, rtol=GRAD_RTOL[F32]), hvp(factorised), hvp(merged))


def _innermost_axes_of_dots(hlo: str, sizes: set[int]) -> list[int]:
    """For every dot in compiled HLO whose result's dims are exactly ``sizes`` plus leading
    axes, the size of the result's physically innermost axis (first in XLA's minor-to-major)."""
    found = []
    for dims, layout in re.findall(r"= f32\[([\d,]+)\]\{([\d,]+)\} dot\(", hlo):
        dims_, layout_ = [int(d) for d in dims.split(",")], [int(d) for d in layout.split(",")]
        if set(dims_[-2:]) == sizes:
            found.append(dims_[layout_[0]])
    return found


def test_a_gradient_is_the_wide_product_also_per_stack_entry():
    # Plain autodiff of x·A gives A's gradient as xᵀ·dh, an [in, r] product over the tokens,
    # which XLA:CPU ran up to 20x slower than the wide (dhᵀ·x)ᵀ: an [r, in] result, in laid
    # out innermost. jlora.lora keeps the wide form, for 2-D and for stacked (per-expert) uses.
    cfg = jlora.LoraConfig(
        rank=3, alpha=6.0, targets=r"w|experts", axis_rules=[("experts", ("stack", "in", "out"))]
    )
    p = adapted({"w": normal(1, (8, 6), 1 / 3), "experts": normal(2, (4, 8, 6), 1 / 3)}, cfg)
    xs = normal(7, (4, 5, 8))

    def fn(q, x, xs):
        return jnp.sin(x @ q["w"]), jnp.einsum("sti,sio->sto", xs, q["experts"])

    def loss(q):
        return sum(jnp.sum(jnp.sin(y)) for y in fn(q, X, xs))

    check_against_merge(lambda q, x, xs: fn(q, x, xs)[1], p, cfg, X, xs)
    if jax.default_backend() != "cpu":
        pytest.skip("the layout checked below is what XLA:CPU assigns")
    hlo = jax.jit(jlora.value_and_grad(loss, cfg)).lower(p).compile().as_text()
    innermost = _innermost_axes_of_dots(hlo, {8, 3})  # A's gradients: in 8, rank 3
    assert len(innermost) == 2 and set(innermost) == {8}, innermost
