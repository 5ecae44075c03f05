"""jlora._preference: each loss and metric by hand in numpy, ln 2 at init through a real decoder,
gradients only to the adapters, the reference off the gradient, jit, and every refusal.

The comparison with TRL's own code is tests/test_peft_trl_preference.py (PEFT group).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.models.decoder import DECODER_AXIS_RULES, DECODER_TARGETS, Decoder, DecoderConfig

TOL = 1e-5
LN2 = np.float32(np.log(2.0))


# ---- numpy references, written from the formulas (float64) ----


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_log1mexp(x):
    return np.log(-np.expm1(x))


def np_sequence_logps(logits, targets, mask, average=False):
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    total = (picked * mask).sum(-1)
    return total / np.maximum(mask.sum(-1), 1) if average else total


def np_metrics(chosen_reward, rejected_reward, c, r):
    return {
        "rewards/chosen": chosen_reward.mean(),
        "rewards/rejected": rejected_reward.mean(),
        "rewards/accuracies": (chosen_reward > rejected_reward).mean(),
        "rewards/margins": (chosen_reward - rejected_reward).mean(),
        "logps/chosen": c.mean(),
        "logps/rejected": r.mean(),
    }


def np_loss(
    loss_type,
    c,
    r,
    c0=None,
    r0=None,
    *,
    beta=0.1,
    eps=0.0,
    gamma=0.5,
    nll=None,
    len_c=None,
    len_r=None,
):
    c, r = np.float64(c), np.float64(r)
    extra = {}
    if loss_type == "sigmoid":
        d = (c - c0) - (r - r0)
        losses = -(1 - eps) * np_log_sigmoid(beta * d) - eps * np_log_sigmoid(-beta * d)
        rc, rr = beta * (c - c0), beta * (r - r0)
    elif loss_type == "robust":
        d = (c - c0) - (r - r0)
        clean = -(1 - eps) * np_log_sigmoid(beta * d)
        losses = (clean + eps * np_log_sigmoid(-beta * d)) / (1 - 2 * eps)
        rc, rr = beta * (c - c0), beta * (r - r0)
    elif loss_type == "ipo":
        d = (c - c0) / np.maximum(len_c, 1) - (r - r0) / np.maximum(len_r, 1)
        losses = (d - 1 / (2 * beta)) ** 2
        rc, rr = beta * (c - c0), beta * (r - r0)
    elif loss_type == "simpo":
        z = beta * (c - r) - gamma
        losses = -(1 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z)
        rc, rr = beta * c, beta * r
    else:
        log_odds = (c - r) - (np_log1mexp(c) - np_log1mexp(r))
        ratio = np_log_sigmoid(log_odds)
        losses = nll - beta * ratio
        rc, rr = beta * c, beta * r
        extra = {
            "nll_loss": nll,
            "log_odds_ratio": ratio.mean(),
            "log_odds_chosen": log_odds.mean(),
        }
    return losses.mean(), {**np_metrics(rc, rr, c, r), **extra}


def assert_close(got, want, tol=TOL):
    loss, metrics = got
    want_loss, want_metrics = want
    np.testing.assert_allclose(float(loss), want_loss, rtol=tol, atol=tol)
    assert sorted(metrics) == sorted(want_metrics)
    for k, v in want_metrics.items():
        assert metrics[k].shape == () and metrics[k].dtype == jnp.float32, k
        np.testing.assert_allclose(float(metrics[k]), v, rtol=tol, atol=tol, err_msg=k)


@pytest.fixture(scope="module")
def logps():
    rng = np.random.default_rng(0)
    summed = -rng.uniform(5.0, 30.0, (4, 5)).astype(np.float32)  # c, r, c0, r0 and lengths
    lengths = rng.integers(1, 12, (2, 5)).astype(np.float32)
    # both sides of -ln 2, where log(1 - e^x) changes branch
    averaged = np.array(
        [[-0.1, -0.5, -1.2, -2.5, -0.05], [-0.3, -2.0, -0.6, -0.2, -3.0]], np.float32
    )
    return summed, lengths, averaged


# ---- sequence_logps ----


def test_sequence_logps_sums_and_averages_the_masked_tokens(maybe_jit):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, (3, 5))
    mask = np.array([[0, 1, 1, 1, 0], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]], bool)
    for average in (False, True):
        fn = maybe_jit(functools.partial(jlora.sequence_logps, average=average))
        got = fn(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
        assert got.shape == (3,) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, np_sequence_logps(logits, targets, mask, average), rtol=TOL)
        assert float(got[2]) == 0.0  # no completion token: 0, not nan


def test_sequence_logps_computes_in_float32_from_bfloat16_logits():
    logits = jnp.linspace(-3, 3, 2 * 4 * 5).reshape(2, 4, 5).astype(jnp.bfloat16)
    got = jlora.sequence_logps(logits, jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4), bool))
    assert got.dtype == jnp.float32


# ---- preference_loss, each loss by hand ----


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_sigmoid_is_dpo_and_conservative_dpo(logps, maybe_jit, eps):
    c, r, c0, r0 = logps[0]
    fn = maybe_jit(functools.partial(jlora.preference_loss, beta=0.3, label_smoothing=eps))
    assert_close(fn(c, r, c0, r0), np_loss("sigmoid", c, r, c0, r0, beta=0.3, eps=eps))


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_robust_is_rdpo(logps, maybe_jit, eps):
    c, r, c0, r0 = logps[0]
    fn = maybe_jit(
        functools.partial(jlora.preference_loss, loss_type="robust", beta=0.3, label_smoothing=eps)
    )
    assert_close(fn(c, r, c0, r0), np_loss("robust", c, r, c0, r0, beta=0.3, eps=eps))
    if eps == 0.0:  # without flips, rDPO is DPO
        np.testing.assert_allclose(
            fn(c, r, c0, r0)[0], jlora.preference_loss(c, r, c0, r0, beta=0.3)[0]
        )


def test_label_smoothing_changes_the_loss_but_not_ln2_at_equal_margins(logps):
    c, r, c0, r0 = logps[0]
    plain, _ = jlora.preference_loss(c, r, c0, r0, beta=0.3)
    smooth, _ = jlora.preference_loss(c, r, c0, r0, beta=0.3, label_smoothing=0.1)
    assert abs(float(plain) - float(smooth)) > 1e-3
    for eps in (0.0, 0.1, 0.4):
        loss, _ = jlora.preference_loss(c, r, c, r, label_smoothing=eps)
        assert float(loss) == LN2
        loss, _ = jlora.preference_loss(c, r, c, r, loss_type="robust", label_smoothing=eps)
        np.testing.assert_allclose(float(loss), LN2, rtol=1e-6)


def test_label_smoothing_bounds_the_gradient_away_from_zero():
    # cDPO: with ε > 0 a pair already far apart is pushed back (the loss has a finite minimum)
    def grad(eps):
        return jax.grad(
            lambda c: jlora.preference_loss(
                c, jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), beta=1.0, label_smoothing=eps
            )[0]
        )(jnp.full(1, 20.0))

    assert float(grad(0.0)[0]) <= 0 and abs(float(grad(0.0)[0])) < 1e-8
    np.testing.assert_allclose(grad(0.1), [0.1 * 1.0 - 2e-9], atol=1e-6)


def test_ipo_averages_the_log_ratios_per_token_but_rewards_use_the_sums(logps, maybe_jit):
    (c, r, c0, r0), (len_c, len_r), _ = logps
    fn = maybe_jit(functools.partial(jlora.preference_loss, loss_type="ipo", beta=0.2))
    got = fn(c, r, c0, r0, chosen_lengths=len_c, rejected_lengths=len_r)
    assert_close(got, np_loss("ipo", c, r, c0, r0, beta=0.2, len_c=len_c, len_r=len_r))
    np.testing.assert_allclose(float(got[1]["rewards/chosen"]), 0.2 * np.mean(c - c0), rtol=TOL)


@pytest.mark.parametrize(("eps", "gamma"), [(0.0, None), (0.15, 1.3)])
def test_simpo(logps, maybe_jit, eps, gamma):
    _, _, (c, r) = logps
    fn = maybe_jit(
        functools.partial(
            jlora.preference_loss, loss_type="simpo", beta=2.0, label_smoothing=eps, gamma=gamma
        )
    )
    want = np_loss("simpo", c, r, beta=2.0, eps=eps, gamma=0.5 if gamma is None else gamma)
    assert_close(fn(c, r), want)


def test_orpo(logps, maybe_jit):
    _, _, (c, r) = logps
    assert (c < -np.log(2)).any() and (c > -np.log(2)).any()  # both branches of log(1 - e^x)
    fn = maybe_jit(functools.partial(jlora.preference_loss, loss_type="orpo", beta=0.25))
    got = fn(c, r, chosen_nll=jnp.float32(1.7))
    assert_close(got, np_loss("orpo", c, r, beta=0.25, nll=1.7))


def test_orpo_gradient_is_finite_on_both_branches():
    grads = jax.grad(
        lambda c: jlora.preference_loss(
            c, jnp.array([-0.1, -3.0]), loss_type="orpo", chosen_nll=jnp.float32(0.0)
        )[0]
    )(jnp.array([-3.0, -0.1]))
    assert np.isfinite(grads).all() and (np.abs(grads) > 0).all()


def test_metrics_carry_no_gradient(logps):
    c, r, c0, r0 = logps[0]

    def margins(c):
        return jlora.preference_loss(c, r, c0, r0)[1]["rewards/margins"]

    assert float(jnp.abs(jax.grad(margins)(jnp.asarray(c))).sum()) == 0.0


# ---- preference_loss refusals ----


def test_unknown_loss_type_names_the_choices(logps):
    c, r, c0, r0 = logps[0]
    with pytest.raises(ValueError, match=r"unknown loss_type 'dpo'.*'sigmoid', 'robust', 'ipo'"):
        jlora.preference_loss(c, r, c0, r0, loss_type="dpo")


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo"])
def test_reference_based_losses_need_the_reference(logps, loss_type):
    c, r, c0, _ = logps[0]
    with pytest.raises(ValueError, match=r"compares with a reference model: give both"):
        jlora.preference_loss(c, r, c0, loss_type=loss_type)


def test_ipo_needs_lengths_and_orpo_the_nll(logps):
    c, r, c0, r0 = logps[0]
    with pytest.raises(ValueError, match=r"give chosen_lengths and rejected_lengths"):
        jlora.preference_loss(c, r, c0, r0, loss_type="ipo", chosen_lengths=np.ones(5))
    with pytest.raises(ValueError, match=r"give chosen_nll"):
        jlora.preference_loss(c, r, loss_type="orpo")


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "match"),
    [
        ("simpo", {"ref": True}, r"'simpo' does not use: reference log-probabilities"),
        ("orpo", {"ref": True, "chosen_nll": 1.0}, r"'orpo' does not use: reference"),
        (
            "ipo",
            {"ref": True, "label_smoothing": 0.1, "chosen_lengths": 1, "rejected_lengths": 1},
            r"does not use: label_smoothing=0.1",
        ),
        ("orpo", {"label_smoothing": 0.1, "chosen_nll": 1.0}, r"does not use: label_smoothing"),
        ("sigmoid", {"ref": True, "gamma": 1.0}, r"does not use: gamma=1.0"),
        ("sigmoid", {"ref": True, "chosen_nll": 1.0}, r"does not use: chosen_nll"),
        ("sigmoid", {"ref": True, "chosen_lengths": 1}, r"does not use: chosen_lengths"),
    ],
)
def test_an_argument_the_loss_ignores_is_refused(logps, loss_type, kwargs, match):
    c, r, c0, r0 = logps[0]
    refs = (c0, r0) if kwargs.pop("ref", False) else ()
    kwargs = {k: (np.ones(5) if "lengths" in k else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        jlora.preference_loss(c, r, *refs, loss_type=loss_type, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 0.0}, r"beta must be > 0; got 0.0"),
        ({"label_smoothing": 0.5}, r"must lie in \[0, 0.5\); got 0.5"),
        ({"label_smoothing": -0.1}, r"must lie in \[0, 0.5\); got -0.1"),
    ],
)
def test_out_of_range_options_are_refused(logps, kwargs, match):
    c, r, c0, r0 = logps[0]
    with pytest.raises(ValueError, match=match):
        jlora.preference_loss(c, r, c0, r0, **kwargs)


def test_mismatched_shapes_are_refused(logps):
    c, r, c0, r0 = logps[0]
    with pytest.raises(ValueError, match=r"expected \[batch\] arrays of one shape.*'r.*\(4,\)"):
        jlora.preference_loss(c, r[:4], c0, r0)
    with pytest.raises(ValueError, match=r"expected \[batch\] arrays"):
        jlora.preference_loss(c[None], r[None], c0[None], r0[None])
    with pytest.raises(ValueError, match=r"chosen_nll must be a scalar; got shape \(5,\)"):
        jlora.preference_loss(c, r, loss_type="orpo", chosen_nll=np.ones(5))


def test_sequence_logps_refuses_bad_shapes():
    with pytest.raises(
        ValueError, match=r"logits must be \[batch, seq, vocab\]; got shape \(2, 3\)"
    ):
        jlora.sequence_logps(jnp.zeros((2, 3)), jnp.zeros((2, 3), int), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"mask must be \[batch, seq\] = \(2, 3\).*\(2, 4\)"):
        jlora.sequence_logps(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), int), jnp.ones((2, 4)))


# ---- dpo_loss through a real decoder ----

CONFIG = DecoderConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
MODEL = Decoder(CONFIG)
LORA = jlora.LoraConfig(rank=4, alpha=8.0, targets=DECODER_TARGETS, axis_rules=DECODER_AXIS_RULES)


def apply_fn(params, tokens, **kwargs):
    return MODEL.apply({"params": params}, tokens, **kwargs)


@pytest.fixture(scope="module")
def model():
    tokens = jnp.zeros((1, 4), jnp.int32)
    base = MODEL.init(jax.random.key(0), tokens)["params"]
    at_init = jlora.init_lora(jax.random.key(1), base, LORA)
    lora, _ = jlora.split(at_init)
    # trained-looking adapters: B != 0 everywhere
    keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(lora))))
    moved = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), lora)
    return base, at_init, jlora.combine(moved, base)


def pairs_batch(pairs=3, t=9, seed=3):
    """B pairs: a shared prompt per pair, completions of different lengths, right padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CONFIG.vocab_size, (2 * pairs, t))
    mask = np.zeros((2 * pairs, t), bool)
    for i in range(pairs):
        prompt = int(rng.integers(2, 4))
        tokens[i + pairs, :prompt] = tokens[i, :prompt]
        for row in (i, i + pairs):
            end = prompt + int(rng.integers(2, t - prompt))
            mask[row, prompt - 1 : end - 1] = True  # targets[t] = tokens[t + 1]
            tokens[row, end:] = 0
    targets = np.concatenate([tokens[:, 1:], np.zeros((2 * pairs, 1), int)], axis=1)
    return {
        "tokens": jnp.asarray(tokens),
        "targets": jnp.asarray(targets),
        "loss_mask": jnp.asarray(mask),
    }


def by_hand(loss_type, params, batch, **options):
    """The same objective from merged weights, sequence_logps and preference_loss."""
    pairs = batch["tokens"].shape[0] // 2
    kw = {k: batch[k] for k in ("positions", "segment_ids") if k in batch}
    logits = apply_fn(jlora.merge_params(params, LORA), batch["tokens"], **kw)
    base_logits = apply_fn(jlora.split(params)[1], batch["tokens"], **kw)
    mask = batch["loss_mask"]
    average = loss_type in ("simpo", "orpo")
    logps = jlora.sequence_logps(logits, batch["targets"], mask, average=average)
    args = [logps[:pairs], logps[pairs:]]
    if loss_type in ("sigmoid", "robust", "ipo"):
        ref = jlora.sequence_logps(base_logits, batch["targets"], mask)
        args += [ref[:pairs], ref[pairs:]]
    if loss_type == "ipo":
        lengths = jnp.sum(mask, axis=1)
        options |= {"chosen_lengths": lengths[:pairs], "rejected_lengths": lengths[pairs:]}
    if loss_type == "orpo":
        nll_mask = batch.get("nll_mask", mask)[:pairs]
        per_row = jlora.sequence_logps(logits[:pairs], batch["targets"][:pairs], nll_mask)
        options["chosen_nll"] = -jnp.sum(per_row) / jnp.sum(nll_mask)
    return jlora.preference_loss(*args, loss_type=loss_type, **options)


def test_dpo_loss_is_exactly_ln2_at_init(model, maybe_jit):
    _, at_init, _ = model
    batch = pairs_batch()
    loss, metrics = maybe_jit(lambda p, b: jlora.dpo_loss(apply_fn, p, LORA, b))(at_init, batch)
    assert float(loss) == LN2
    assert float(metrics["rewards/margins"]) == 0.0 and float(metrics["rewards/chosen"]) == 0.0
    assert float(metrics["rewards/accuracies"]) == 0.0  # ties are not counted as correct


@pytest.mark.parametrize(
    ("loss_type", "options"),
    [
        ("sigmoid", {"beta": 0.5}),
        ("sigmoid", {"beta": 0.5, "label_smoothing": 0.1}),
        ("robust", {"beta": 0.5, "label_smoothing": 0.1}),
        ("ipo", {"beta": 0.5}),
        ("simpo", {"beta": 2.0, "gamma": 0.3, "label_smoothing": 0.05}),
        ("orpo", {"beta": 0.2}),
    ],
)
def test_dpo_loss_equals_the_objective_from_merged_weights(model, maybe_jit, loss_type, options):
    _, _, trained = model
    batch = pairs_batch()
    got = maybe_jit(
        lambda p, b: jlora.dpo_loss(apply_fn, p, LORA, b, loss_type=loss_type, **options)
    )(trained, batch)
    want_loss, want_metrics = by_hand(loss_type, trained, batch, **options)
    assert_close(got, (float(want_loss), {k: float(v) for k, v in want_metrics.items()}), 2e-5)


def test_orpo_nll_mask_counts_the_tokens_it_marks(model):
    _, _, trained = model
    batch = pairs_batch()
    full = {**batch, "nll_mask": batch["targets"] != 0}  # prompt and answer, as TRL's ORPO
    got = jlora.dpo_loss(apply_fn, trained, LORA, full, loss_type="orpo")
    want = by_hand("orpo", trained, full)
    np.testing.assert_allclose(float(got[1]["nll_loss"]), float(want[1]["nll_loss"]), rtol=TOL)
    answers_only = jlora.dpo_loss(apply_fn, trained, LORA, batch, loss_type="orpo")
    want = by_hand("orpo", trained, batch)
    np.testing.assert_allclose(
        float(answers_only[1]["nll_loss"]), float(want[1]["nll_loss"]), rtol=TOL
    )
    assert float(answers_only[1]["nll_loss"]) != float(got[1]["nll_loss"])


def test_positions_and_segment_ids_reach_apply_fn(model):
    _, _, trained = model
    batch = pairs_batch(pairs=2, t=8)
    shape = batch["tokens"].shape
    packed = {
        **batch,
        "positions": jnp.broadcast_to(jnp.arange(8) % 5, shape),
        "segment_ids": jnp.broadcast_to((jnp.arange(8) >= 5).astype(jnp.int32), shape),
    }
    got = jlora.dpo_loss(apply_fn, trained, LORA, packed, beta=0.5)
    want = by_hand("sigmoid", trained, packed, beta=0.5)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=2e-5)
    plain = jlora.dpo_loss(apply_fn, trained, LORA, batch, beta=0.5)
    assert abs(float(plain[0]) - float(got[0])) > 1e-5


def test_precomputed_reference_logps_give_the_same_loss(model, maybe_jit):
    _, _, trained = model
    batch = pairs_batch()
    base_logits = apply_fn(jlora.split(trained)[1], batch["tokens"])
    ref = jlora.sequence_logps(base_logits, batch["targets"], batch["loss_mask"])
    step = maybe_jit(lambda p, b, r: jlora.dpo_loss(apply_fn, p, LORA, b, reference_logps=r))
    got = step(trained, batch, (ref[:3], ref[3:]))
    want = jlora.dpo_loss(apply_fn, trained, LORA, batch)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=TOL)


def test_gradients_reach_only_the_adapters_and_not_through_the_reference(model, maybe_jit):
    _, at_init, trained = model
    batch = pairs_batch()
    for params in (at_init, trained):
        lora, frozen = jlora.split(params)

        def of_adapters(lora, ref, frozen=frozen):
            return jlora.dpo_loss(
                apply_fn, jlora.combine(lora, frozen), LORA, batch, reference_logps=ref
            )[0]

        def of_adapters_in_step(lora, frozen=frozen):
            return jlora.dpo_loss(apply_fn, jlora.combine(lora, frozen), LORA, batch)

        _, grads = maybe_jit(jax.value_and_grad(of_adapters_in_step, has_aux=True))(lora)
        assert jax.tree.structure(grads) == jax.tree.structure(lora)
        b_grads = [
            g for p, g in jax.tree.leaves_with_path(grads) if "lora_b" in jax.tree_util.keystr(p)
        ]
        assert all(float(jnp.abs(g).max()) > 0 for g in b_grads)  # even at init (B = 0)
        # the reference is a constant: gradients equal those with it precomputed, and none
        # flows into the precomputed values
        logits = apply_fn(frozen, batch["tokens"])
        ref = jlora.sequence_logps(logits, batch["targets"], batch["loss_mask"])
        ref = (ref[:3], ref[3:])
        g_lora, g_ref = jax.grad(of_adapters, argnums=(0, 1))(lora, ref)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_lora), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
        assert all(float(jnp.abs(g).max()) == 0.0 for g in g_ref)


def test_reference_free_losses_skip_the_reference_forward(model):
    _, _, trained = model
    calls = []

    def counting(params, tokens, **kw):
        calls.append(
            any("lora" in jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(params))
        )
        return apply_fn(params, tokens, **kw)

    for loss_type, n in (("simpo", 1), ("orpo", 1), ("sigmoid", 2)):
        calls.clear()
        jax.jit(lambda p, b, lt=loss_type: jlora.dpo_loss(counting, p, LORA, b, loss_type=lt))(
            trained, pairs_batch()
        )
        assert len(calls) == n, loss_type


# ---- dpo_loss refusals ----


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda b: [b], TypeError, r"batch must be a dict of arrays; got list"),
        (
            lambda b: {k: v for k, v in b.items() if k != "targets"},
            ValueError,
            r"missing \['targets'\], unknown \[\]",
        ),
        (lambda b: {**b, "labels": b["targets"]}, ValueError, r"unknown \['labels'\].*optionally"),
        (
            lambda b: {k: v[:5] for k, v in b.items()},
            ValueError,
            r"\[2B, T\].*got shape \(5, 9\) \(an odd or zero row count",
        ),
        (lambda b: {k: v[:0] for k, v in b.items()}, ValueError, r"got shape \(0, 9\)"),
        (lambda b: {**b, "tokens": b["tokens"][0]}, ValueError, r"got shape \(9,\)"),
        (
            lambda b: {**b, "loss_mask": b["loss_mask"][:, :8]},
            ValueError,
            r"batch\['loss_mask'\] must have the tokens' shape \(6, 9\); got \(6, 8\)",
        ),
        (
            lambda b: {**b, "nll_mask": b["loss_mask"]},
            ValueError,
            r"'sigmoid' does not use: chosen_nll / nll_mask",
        ),
    ],
)
def test_dpo_loss_refuses_a_bad_batch(model, change, error, match):
    _, _, trained = model
    with pytest.raises(error, match=match):
        jlora.dpo_loss(apply_fn, trained, LORA, change(pairs_batch()))


def test_dpo_loss_refuses_bad_options(model):
    base, _, trained = model
    batch = pairs_batch()
    with pytest.raises(ValueError, match=r"unknown loss_type 'kto'; choose one of"):
        jlora.dpo_loss(apply_fn, trained, LORA, batch, loss_type="kto")
    with pytest.raises(
        ValueError,
        match=r"reference_logps must be \(chosen, rejected\), each of "
        r"shape \(3,\); got \[\(4,\), \(3,\)\]",
    ):
        jlora.dpo_loss(apply_fn, trained, LORA, batch, reference_logps=(jnp.zeros(4), jnp.zeros(3)))
    with pytest.raises(ValueError, match=r"'simpo' does not use: reference"):
        jlora.dpo_loss(
            apply_fn,
            trained,
            LORA,
            batch,
            loss_type="simpo",
            reference_logps=(jnp.zeros(3), jnp.zeros(3)),
        )
    with pytest.raises(ValueError, match=r"params holds no LoRA adapters.*jlora.init_lora"):
        jlora.dpo_loss(apply_fn, base, LORA, batch)
