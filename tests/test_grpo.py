"""jlora._grpo: advantages and each loss aggregation by hand in numpy, the policy gradient at
init, clipping's zero gradients, the k3 KL, masking, a real decoder, jit, and every refusal.

The comparison with TRL's own GRPOTrainer is tests/test_peft_trl_grpo.py (PEFT group).
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


# ---- numpy references, written from the formulas (float64) ----


def np_group_advantages(rewards, n, scale="group"):
    r = np.asarray(rewards, np.float64)
    groups = r.reshape(-1, n)
    out = np.zeros_like(r)
    for g, row in enumerate(groups):
        seen = row[~np.isnan(row)]
        mean = seen.mean() if len(seen) else np.nan
        std = np.std(seen, ddof=1) if len(seen) > 1 else (0.0 if n == 1 else np.nan)
        if scale == "batch":
            everything = r[~np.isnan(r)]
            std = np.std(everything, ddof=1) if len(r) > 1 else 0.0
        adv = row - mean
        if scale != "none":
            adv = adv / (std + 1e-4)
        out[g * n : (g + 1) * n] = np.nan_to_num(adv, nan=0.0)
    return out


def np_grpo_loss(
    logp,
    old,
    ref,
    adv,
    mask,
    *,
    loss_type="dapo",
    beta=0.0,
    eps_low=0.2,
    eps_high=None,
    level="token",
    delta=None,
    bias_correction=True,
    max_len=None,
    num_items=None,
):
    logp, old, adv = (np.asarray(x, np.float64) for x in (logp, old, adv))
    m = np.asarray(mask, np.float64)
    eps_high = eps_low if eps_high is None else eps_high
    adv = adv[:, None] if adv.ndim == 1 else adv
    log_ratio = logp - old
    if level == "sequence":
        log_ratio = (log_ratio * m).sum(-1, keepdims=True) / np.maximum(m.sum(-1, keepdims=True), 1)
    ratio = np.exp(log_ratio)
    capped = ratio if delta is None else np.minimum(ratio, delta)
    per_token = -np.minimum(capped * adv, np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv)
    per_token = np.broadcast_to(per_token, logp.shape)
    if ref is not None:
        gap = np.asarray(ref, np.float64) - logp
        kl = np.exp(gap) - gap - 1
        if bias_correction:
            kl = kl * ratio
        per_token = per_token + beta * kl
    total = (per_token * m).sum()
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / np.maximum(m.sum(-1), 1)).mean()
    if loss_type == "bnpo":
        return total / max(m.sum(), 1)
    if loss_type == "dr_grpo":
        return total / (logp.shape[0] * max_len)
    return total / max(m.sum() if num_items is None else num_items, 1)


@pytest.fixture(scope="module")
def rollout():
    """Per-token log-probs of 6 completions (3 prompts x 2), ragged masks, one empty row."""
    rng = np.random.default_rng(0)
    shape = (6, 7)
    logp = -rng.uniform(0.1, 4.0, shape).astype(np.float32)
    old = (logp + rng.choice([-0.6, -0.1, 0.1, 0.6], shape)).astype(np.float32)
    ref = (logp + rng.normal(0, 0.5, shape)).astype(np.float32)
    lengths = np.array([7, 3, 5, 1, 0, 6])
    mask = np.arange(7)[None, :] < lengths[:, None]
    adv = np.array([1.0, -1.0, 0.5, -0.5, 2.0, -2.0], np.float32)
    return logp, old, ref, adv, mask


# ---- group_advantages ----


def test_group_advantages_on_a_hand_example():
    rewards = jnp.array([1.0, 0.0, 1.0, 1.0, 3.0, 1.0])
    out = jlora.group_advantages(rewards, 2)
    # group 1: mean 0.5, std sqrt(0.5) (Bessel); group 2: all equal; group 3: mean 2, std sqrt 2
    s1, s3 = np.sqrt(0.5) + 1e-4, np.sqrt(2.0) + 1e-4
    want = [0.5 / s1, -0.5 / s1, 0.0, 0.0, 1.0 / s3, -1.0 / s3]
    np.testing.assert_allclose(out.advantages, want, rtol=TOL)
    assert out.nonzero_std.tolist() == [True, False, True]
    none = jlora.group_advantages(rewards, 2, scale_rewards="none").advantages
    np.testing.assert_allclose(none, [0.5, -0.5, 0.0, 0.0, 1.0, -1.0], rtol=TOL)
    batch = jlora.group_advantages(rewards, 2, scale_rewards="batch").advantages
    std = np.std([1.0, 0.0, 1.0, 1.0, 3.0, 1.0], ddof=1) + 1e-4
    np.testing.assert_allclose(batch, np.array([0.5, -0.5, 0, 0, 1, -1]) / std, rtol=TOL)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("n", [1, 3, 4])
def test_group_advantages_match_numpy(maybe_jit, scale, n):
    rng = np.random.default_rng(n)
    rewards = rng.integers(0, 3, 12).astype(np.float32)
    rewards[5] = np.nan  # unscorable: left out of its group, advantage 0
    fn = maybe_jit(
        functools.partial(jlora.group_advantages, num_generations=n, scale_rewards=scale)
    )
    out = fn(rewards)
    np.testing.assert_allclose(out.advantages, np_group_advantages(rewards, n, scale), atol=1e-5)
    assert float(out.advantages[5]) == 0.0
    assert out.advantages.shape == (12,) and out.nonzero_std.shape == (12 // n,)
    if n == 1:  # a group of one teaches nothing
        assert not out.nonzero_std.any() and not out.advantages.any()


def test_group_advantages_sum_to_zero_in_each_group():
    rewards = jax.random.uniform(jax.random.key(0), (16,))
    adv = jlora.group_advantages(rewards, 4).advantages.reshape(4, 4)
    np.testing.assert_allclose(adv.sum(1), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.std(adv, axis=1, ddof=1), 1.0, rtol=1e-3)


# ---- grpo_loss ----


CASES = [
    {"loss_type": "grpo"},
    {"loss_type": "bnpo"},
    {"loss_type": "dr_grpo", "max_len": 9},
    {"loss_type": "dapo"},
    {"loss_type": "dapo", "num_items": 40.0},
    {"loss_type": "dapo", "eps_high": 0.28, "beta": 0.04},
    {"loss_type": "grpo", "beta": 0.1, "delta": 1.5},
    {"loss_type": "grpo", "beta": 0.1, "bias_correction": False},
    {"loss_type": "grpo", "level": "sequence", "beta": 0.1},
    {"loss_type": "bnpo", "level": "sequence"},
]
NAMES = {
    "eps_high": "epsilon_high",
    "level": "importance_sampling_level",
    "bias_correction": "use_bias_correction_kl",
    "max_len": "max_completion_length",
    "num_items": "num_items_in_batch",
}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_grpo_loss_matches_numpy(rollout, maybe_jit, case):
    logp, old, ref, adv, mask = rollout
    options = {NAMES.get(k, k): v for k, v in case.items()}
    refs = ref if case.get("beta") else None
    fn = maybe_jit(functools.partial(jlora.grpo_loss, **options))
    loss, metrics = fn(logp, old, refs, adv, mask)
    want = np_grpo_loss(logp, old, refs, adv, mask, **case)
    np.testing.assert_allclose(float(loss), want, rtol=TOL)
    assert ("kl" in metrics) == (refs is not None)


def test_advantages_per_token_equal_broadcast_ones(rollout):
    logp, old, _, adv, mask = rollout
    per_row = jlora.grpo_loss(logp, old, None, adv, mask, loss_type="grpo")
    per_token = jlora.grpo_loss(
        logp, old, None, np.repeat(adv[:, None], 7, 1), mask, loss_type="grpo"
    )
    assert float(per_row[0]) == float(per_token[0])
    assert per_row[1] == per_token[1]


@pytest.mark.parametrize(
    ("loss_type", "extra"),
    [("grpo", {}), ("bnpo", {}), ("dapo", {}), ("dr_grpo", {"max_completion_length": 10})],
)
def test_at_init_the_loss_is_minus_the_weighted_mean_advantage(rollout, loss_type, extra):
    """On-policy (old = None) with beta = 0 the ratio is 1: the loss is -Σ A·weight."""
    logp, _, _, adv, mask = rollout
    options = {"loss_type": loss_type, **extra}
    loss, metrics = jlora.grpo_loss(logp, None, None, adv, mask, **options)
    n = mask.sum(1)
    want = {
        "grpo": -np.mean(np.where(n > 0, adv, 0.0)),  # each row's mean, rows averaged
        "bnpo": -np.sum(adv * n) / n.sum(),
        "dapo": -np.sum(adv * n) / n.sum(),
        "dr_grpo": -np.sum(adv * n) / (6 * 10),
    }[loss_type]
    np.testing.assert_allclose(float(loss), want, rtol=TOL)
    assert float(metrics["clip_ratio/region_mean"]) == 0.0
    # and its gradient is the policy gradient: -A times the token's weight
    grad = jax.grad(lambda lp: jlora.grpo_loss(lp, None, None, adv, mask, **options)[0])(logp)
    weight = {
        "grpo": 1.0 / (6 * np.maximum(n, 1))[:, None],
        "bnpo": 1.0 / n.sum(),
        "dapo": 1.0 / n.sum(),
        "dr_grpo": 1.0 / 60,
    }[loss_type]
    np.testing.assert_allclose(grad, -adv[:, None] * weight * mask, rtol=TOL, atol=1e-8)


@pytest.mark.parametrize(
    ("log_ratio", "advantage", "clipped"),
    [
        (0.5, 1.0, True),  # ρ = 1.65 > 1.2 with A > 0: no incentive to grow further
        (-0.5, -1.0, True),  # ρ = 0.61 < 0.8 with A < 0: no incentive to shrink further
        (0.5, -1.0, False),  # the pessimistic bound keeps the unclipped term
        (-0.5, 1.0, False),
        (0.1, 1.0, False),  # inside [0.8, 1.2]
        (0.22, 1.0, True),  # ρ = 1.246 > 1.2, but with clip-higher 0.28 it is inside
    ],
)
def test_a_clipped_token_has_zero_gradient(log_ratio, advantage, clipped):
    logp = jnp.array([[-1.0, -2.0]])
    old = logp - jnp.array([[log_ratio, 0.0]])
    mask = jnp.ones((1, 2), bool)
    adv = jnp.array([advantage])

    def loss(lp, **kw):
        return jlora.grpo_loss(lp, old, None, adv, mask, **kw)[0]

    grad = jax.grad(loss)(logp)
    assert (float(grad[0, 0]) == 0.0) == clipped
    assert float(grad[0, 1]) != 0.0  # the other token is on-policy
    _, metrics = jlora.grpo_loss(logp, old, None, adv, mask)
    assert float(metrics["clip_ratio/region_mean"]) == (0.5 if clipped else 0.0)
    side = "high" if advantage > 0 else "low"
    assert float(metrics[f"clip_ratio/{side}_mean"]) == (0.5 if clipped else 0.0)
    if log_ratio == 0.22:
        assert float(jax.grad(functools.partial(loss, epsilon_high=0.28))(logp)[0, 0]) != 0.0


def test_delta_caps_the_ratio_of_a_negative_advantage():
    logp = jnp.array([[-1.0]])
    old, mask, adv = logp - 1.0, jnp.ones((1, 1), bool), jnp.array([-1.0])  # ρ = e, A < 0
    loss, _ = jlora.grpo_loss(logp, old, None, adv, mask, delta=2.0)
    assert float(loss) == pytest.approx(2.0)  # -min(min(e, 2)·(-1), 1.2·(-1)) = 2
    grad = jax.grad(lambda lp: jlora.grpo_loss(lp, old, None, adv, mask, delta=2.0)[0])(logp)
    assert float(grad[0, 0]) == 0.0
    unbounded = jlora.grpo_loss(logp, old, None, adv, mask)[0]
    assert float(unbounded) == pytest.approx(np.e)


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere(rollout):
    logp, _, ref, adv, mask = rollout
    same = jlora.grpo_loss(logp, None, logp, adv, mask, beta=0.5)
    plain = jlora.grpo_loss(logp, None, None, adv, mask)
    assert float(same[1]["kl"]) == 0.0
    assert float(same[0]) == float(plain[0])
    off = jlora.grpo_loss(logp, None, ref, adv, mask, beta=0.5)
    assert float(off[1]["kl"]) > 0
    gap = ref - logp
    want = np.sum((np.exp(gap) - gap - 1) * mask) / mask.sum()
    np.testing.assert_allclose(float(off[1]["kl"]), want, rtol=TOL)
    np.testing.assert_allclose(float(off[0] - plain[0]), 0.5 * want, rtol=TOL)  # dapo: same count


def test_bias_correction_changes_the_gradient_but_not_the_value_on_policy(rollout):
    logp, _, ref, adv, mask = rollout

    def loss(lp, correct):
        return jlora.grpo_loss(lp, None, ref, adv, mask, beta=0.5, use_bias_correction_kl=correct)

    (a, _), ga = jax.value_and_grad(loss, has_aux=True)(logp, True)
    (b, _), gb = jax.value_and_grad(loss, has_aux=True)(logp, False)
    assert float(a) == float(b)
    assert float(jnp.abs(ga - gb).max()) > 1e-3
    # the difference is β·kl·dρ/dlogp = β·kl per token, over the token count
    gap = ref - logp
    np.testing.assert_allclose(
        ga - gb, 0.5 * (np.exp(gap) - gap - 1) * mask / mask.sum(), rtol=1e-4, atol=1e-7
    )


def test_entries_outside_the_mask_are_ignored_even_when_not_finite(rollout):
    logp, old, ref, adv, mask = rollout
    dirty = [np.where(mask, x, v) for x, v in ((logp, np.nan), (old, -np.inf), (ref, np.inf))]

    def loss(lp, o, r):
        return jlora.grpo_loss(lp, o, r, adv, mask, beta=0.1, loss_type="grpo")[0]

    clean = jax.value_and_grad(loss)(logp, old, ref)
    got = jax.value_and_grad(loss)(*dirty)
    assert float(got[0]) == float(clean[0])
    assert np.isfinite(got[1]).all()
    np.testing.assert_array_equal(got[1], clean[1])


def test_old_none_is_the_policy_under_stop_gradient(rollout):
    logp, _, _, adv, mask = rollout
    a = jax.grad(lambda lp: jlora.grpo_loss(lp, None, None, adv, mask)[0])(logp)
    b = jax.grad(lambda lp: jlora.grpo_loss(lp, jax.lax.stop_gradient(lp), None, adv, mask)[0])(
        logp
    )
    np.testing.assert_array_equal(a, b)
    # a given old_per_token_logps carries no gradient either
    g_old = jax.grad(lambda o: jlora.grpo_loss(logp, o, None, adv, mask)[0])(logp + 0.1)
    assert float(jnp.abs(g_old).max()) == 0.0


def test_clip_metrics_by_hand():
    logp = jnp.zeros((2, 3))
    old = jnp.array([[-0.5, 0.0, 0.5], [-0.5, 0.5, 0.0]])  # ρ = e^.5, 1, e^-.5 | e^.5, e^-.5, 1
    mask = jnp.array([[True, True, True], [True, True, False]])
    _, m = jlora.grpo_loss(logp, old, None, jnp.array([1.0, -1.0]), mask)
    assert float(m["clip_ratio/high_mean"]) == pytest.approx(1 / 5)  # row 0, token 0
    assert float(m["clip_ratio/low_mean"]) == pytest.approx(1 / 5)  # row 1, token 1
    assert float(m["clip_ratio/region_mean"]) == pytest.approx(2 / 5)
    assert float(m["clip_ratio/high_max"]) == pytest.approx(1 / 3)  # row 0: 1 of 3
    assert float(m["clip_ratio/low_min"]) == 0.0  # row 0 has none
    empty = jlora.grpo_loss(logp, old, None, jnp.ones(2), jnp.zeros((2, 3), bool))
    assert float(empty[0]) == 0.0 and np.isnan(float(empty[1]["clip_ratio/low_min"]))


def test_metrics_carry_no_gradient(rollout):
    logp, old, ref, adv, mask = rollout
    grad = jax.grad(lambda lp: jlora.grpo_loss(lp, old, ref, adv, mask, beta=0.1)[1]["kl"])(logp)
    assert float(jnp.abs(grad).max()) == 0.0


def test_traced_beta_is_trusted(rollout):
    logp, old, ref, adv, mask = rollout
    fn = jax.jit(lambda beta: jlora.grpo_loss(logp, old, ref, adv, mask, beta=beta)[0])
    np.testing.assert_allclose(
        float(fn(0.3)), np_grpo_loss(logp, old, ref, adv, mask, beta=0.3), rtol=TOL
    )


# ---- grpo_loss refusals ----


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "ppo"}, r"unknown loss_type 'ppo'.*'grpo', 'bnpo', 'dr_grpo', 'dapo'"),
        ({"importance_sampling_level": "row"}, r"unknown importance_sampling_level 'row'.*GSPO"),
        ({"epsilon_low": 1.0}, r"epsilon_low .* must lie in \(0, 1\); got 1.0"),
        ({"epsilon_low": 0.0}, r"epsilon_low .* must lie in \(0, 1\); got 0.0"),
        ({"epsilon_high": -0.1}, r"epsilon_high .* must be > 0; got -0.1 .*0.28"),
        ({"delta": 1.1}, r"delta .* must be > 1 \+ epsilon_high = 1.2; got 1.1"),
        ({"beta": -0.1, "ref": True}, r"beta .* must be >= 0; got -0.1"),
        ({"beta": 0.1}, r"beta=0.1 adds a KL penalty .* give the reference"),
        ({"ref": True}, r"beta=0 has no KL term.*drop them, or set beta > 0"),
        ({"loss_type": "dr_grpo"}, r"'dr_grpo' divides .* give max_completion_length"),
        (
            {"loss_type": "dr_grpo", "max_completion_length": 0},
            r"max_completion_length must be a positive int; got 0",
        ),
        ({"max_completion_length": 8}, r"'dapo' does not use max_completion_length .*drop it"),
        (
            {"loss_type": "grpo", "num_items_in_batch": 3.0},
            r"'grpo' does not use num_items_in_batch \(dapo's normaliser\)",
        ),
    ],
)
def test_bad_options_are_refused(rollout, kwargs, match):
    logp, old, ref, adv, mask = rollout
    refs = ref if kwargs.pop("ref", False) else None
    with pytest.raises(ValueError, match=match):
        jlora.grpo_loss(logp, old, refs, adv, mask, **kwargs)


def test_a_traced_beta_needs_the_reference(rollout):
    logp, old, _, adv, mask = rollout
    with pytest.raises(ValueError, match=r"a traced beta always adds the KL term"):
        jax.jit(lambda b: jlora.grpo_loss(logp, old, None, adv, mask, beta=b))(0.1)


def test_bad_shapes_are_refused(rollout):
    logp, old, ref, adv, mask = rollout
    with pytest.raises(ValueError, match=r"per_token_logps must be \[batch, completion tokens\]"):
        jlora.grpo_loss(logp[0], None, None, adv, mask)
    with pytest.raises(
        ValueError, match=r"old_per_token_logps must have .* \(6, 7\); got \(6, 6\)"
    ):
        jlora.grpo_loss(logp, old[:, :6], None, adv, mask)
    with pytest.raises(ValueError, match=r"ref_per_token_logps must have .*; got \(5, 7\)"):
        jlora.grpo_loss(logp, old, ref[:5], adv, mask, beta=0.1)
    with pytest.raises(ValueError, match=r"loss_mask must have .*; got \(7,\)"):
        jlora.grpo_loss(logp, old, None, adv, mask[0])
    with pytest.raises(ValueError, match=r"advantages must be \[B\] = \(6,\) .* got \(3,\)"):
        jlora.grpo_loss(logp, old, None, adv[:3], mask)
    with pytest.raises(ValueError, match=r"num_items_in_batch must be a scalar; got shape \(2,\)"):
        jlora.grpo_loss(logp, old, None, adv, mask, num_items_in_batch=np.ones(2))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((np.ones(4), 2), {"scale_rewards": "std"}, r"unknown scale_rewards 'std'.*'group'"),
        ((np.ones((4, 2)), 2), {}, r"rewards must be \[B\].* got shape \(4, 2\)"),
        ((np.ones(4), 2.0), {}, r"num_generations must be a positive int.*got 2.0"),
        ((np.ones(4), True), {}, r"num_generations must be a positive int.*got True"),
        ((np.ones(6), 4), {}, r"6 rewards do not split into groups of num_generations=4"),
        ((np.ones(4), 0), {}, r"do not split into groups of num_generations=0"),
    ],
)
def test_group_advantages_refusals(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        jlora.group_advantages(*args, **kwargs)


def test_token_logps_refusals():
    with pytest.raises(
        ValueError, match=r"logits must be \[batch, seq, vocab\]; got shape \(2, 3\)"
    ):
        jlora.token_logps(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"targets must be \[batch, seq\] = \(2, 3\)"):
        jlora.token_logps(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"temperature must be a number > 0 .*got 0"):
        jlora.token_logps(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32), temperature=0)


def test_token_logps_divides_by_the_temperature():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5)) * 3
    targets = jnp.array([[0, 1, 2], [3, 4, 0]])
    got = jlora.token_logps(logits, targets, temperature=0.5)
    want = jax.nn.log_softmax(logits * 2.0)
    want = jnp.take_along_axis(want, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=TOL)


# ---- grpo_policy_loss through a real decoder ----

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
    keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(lora))))
    moved = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), lora)
    return base, at_init, jlora.combine(moved, base)


def rollout_batch(prompts=2, generations=3, t=9, seed=3):
    """Each prompt's completions consecutive, of different lengths, right padded."""
    rng = np.random.default_rng(seed)
    rows = prompts * generations
    tokens = rng.integers(1, CONFIG.vocab_size, (rows, t))
    mask = np.zeros((rows, t), bool)
    for p in range(prompts):
        length = int(rng.integers(2, 4))
        group = slice(p * generations, (p + 1) * generations)
        tokens[group, :length] = tokens[p * generations, :length]
        for row in range(p * generations, (p + 1) * generations):
            end = length + int(rng.integers(1, t - length))
            mask[row, length - 1 : end - 1] = True  # targets[t] = tokens[t + 1]
            tokens[row, end:] = 0
    targets = np.concatenate([tokens[:, 1:], np.zeros((rows, 1), int)], axis=1)
    rewards = rng.integers(0, 3, rows).astype(np.float32)
    return {
        "tokens": jnp.asarray(tokens),
        "targets": jnp.asarray(targets),
        "loss_mask": jnp.asarray(mask),
        "advantages": jlora.group_advantages(rewards, generations).advantages,
    }


def by_hand(params, batch, temperature=1.0, **options):
    """The same loss from merged weights, token_logps and grpo_loss."""
    kw = {k: batch[k] for k in ("positions", "segment_ids") if k in batch}
    logits = apply_fn(jlora.merge_params(params, LORA), batch["tokens"], **kw)
    logp = jlora.token_logps(logits, batch["targets"], temperature=temperature)
    ref = None
    if options.get("beta"):
        base_logits = apply_fn(jlora.split(params)[1], batch["tokens"], **kw)
        ref = jlora.token_logps(base_logits, batch["targets"], temperature=temperature)
    old = options.pop("old", None)
    return jlora.grpo_loss(logp, old, ref, batch["advantages"], batch["loss_mask"], **options)


def test_at_init_the_policy_is_the_reference(model, maybe_jit):
    _, at_init, _ = model
    batch = rollout_batch()
    step = maybe_jit(lambda p, b: jlora.grpo_policy_loss(apply_fn, p, LORA, b, beta=0.1))
    loss, metrics = step(at_init, batch)
    assert float(metrics["kl"]) == 0.0
    n = batch["loss_mask"].sum(1)
    want = -float(jnp.sum(batch["advantages"] * n) / n.sum())  # dapo, ratio 1
    np.testing.assert_allclose(float(loss), want, rtol=TOL, atol=1e-7)
    assert sorted(metrics) == [
        "clip_ratio/high_max",
        "clip_ratio/high_mean",
        "clip_ratio/low_mean",
        "clip_ratio/low_min",
        "clip_ratio/region_mean",
        "entropy",
        "kl",
    ]


@pytest.mark.parametrize(
    "options",
    [
        {"beta": 0.1},
        {"loss_type": "grpo", "beta": 0.04, "temperature": 0.7},
        {"loss_type": "dr_grpo", "max_completion_length": 8, "epsilon_high": 0.28},
        {"importance_sampling_level": "sequence", "beta": 0.1},
    ],
)
def test_grpo_policy_loss_equals_the_loss_from_merged_weights(model, maybe_jit, options):
    _, _, trained = model
    batch = rollout_batch()
    old = jnp.where(batch["loss_mask"], -2.0, 0.0)  # some ratios far from 1
    got = maybe_jit(
        lambda p, b, o: jlora.grpo_policy_loss(apply_fn, p, LORA, b, old_logps=o, **options)
    )(trained, batch, old)
    want = by_hand(trained, batch, old=old, **options)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=2e-5)
    for k, v in want[1].items():
        np.testing.assert_allclose(float(got[1][k]), float(v), rtol=2e-5, err_msg=k)


def test_entropy_is_the_policys_mean_per_completion_token(model):
    _, _, trained = model
    batch = rollout_batch()
    _, metrics = jlora.grpo_policy_loss(apply_fn, trained, LORA, batch, temperature=0.5)
    logits = apply_fn(jlora.merge_params(trained, LORA), batch["tokens"]) / 0.5
    p = jax.nn.softmax(logits)
    entropy = -jnp.sum(p * jnp.log(p), -1)
    mask = batch["loss_mask"]
    want = jnp.sum(entropy * mask) / mask.sum()
    np.testing.assert_allclose(float(metrics["entropy"]), float(want), rtol=1e-4)


def test_gradients_reach_only_the_adapters_and_not_through_the_reference(model, maybe_jit):
    _, at_init, trained = model
    batch = rollout_batch()
    for params in (at_init, trained):
        lora, frozen = jlora.split(params)

        def of_adapters(lora, ref, frozen=frozen):
            return jlora.grpo_policy_loss(
                apply_fn, jlora.combine(lora, frozen), LORA, batch, beta=0.1, ref_logps=ref
            )[0]

        def in_step(lora, frozen=frozen):
            return jlora.grpo_policy_loss(
                apply_fn, jlora.combine(lora, frozen), LORA, batch, beta=0.1
            )

        _, grads = maybe_jit(jax.value_and_grad(in_step, has_aux=True))(lora)
        assert jax.tree.structure(grads) == jax.tree.structure(lora)
        b_grads = [
            g for p, g in jax.tree.leaves_with_path(grads) if "lora_b" in jax.tree_util.keystr(p)
        ]
        assert all(float(jnp.abs(g).max()) > 0 for g in b_grads)  # even at init (B = 0)
        ref = jlora.token_logps(apply_fn(frozen, batch["tokens"]), batch["targets"])
        g_lora, g_ref = jax.grad(of_adapters, argnums=(0, 1))(lora, ref)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_lora), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
        assert float(jnp.abs(g_ref).max()) == 0.0


def test_the_reference_forward_runs_only_with_beta(model):
    _, _, trained = model
    calls = []

    def counting(params, tokens, **kw):
        calls.append(1)
        return apply_fn(params, tokens, **kw)

    batch = rollout_batch()
    ref = jnp.zeros(batch["tokens"].shape)
    for options, want in (({}, 1), ({"beta": 0.1}, 2), ({"beta": 0.1, "ref_logps": ref}, 1)):
        calls.clear()
        jax.jit(lambda p, b, o=options: jlora.grpo_policy_loss(counting, p, LORA, b, **o))(
            trained, batch
        )
        assert len(calls) == want, options


def test_positions_and_segment_ids_reach_apply_fn(model):
    _, _, trained = model
    batch = rollout_batch(t=8)
    shape = batch["tokens"].shape
    packed = {
        **batch,
        "positions": jnp.broadcast_to(jnp.arange(8) % 5, shape),
        "segment_ids": jnp.broadcast_to((jnp.arange(8) >= 5).astype(jnp.int32), shape),
    }
    got = jlora.grpo_policy_loss(apply_fn, trained, LORA, packed, beta=0.5)
    want = by_hand(trained, packed, beta=0.5)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=2e-5)
    plain = jlora.grpo_policy_loss(apply_fn, trained, LORA, batch, beta=0.5)
    assert abs(float(plain[1]["kl"]) - float(got[1]["kl"])) > 1e-5


# ---- grpo_policy_loss refusals ----


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda b: [b], TypeError, r"batch must be a dict of arrays; got list"),
        (
            lambda b: {k: v for k, v in b.items() if k != "advantages"},
            ValueError,
            r"missing \['advantages'\], unknown \[\]",
        ),
        (
            lambda b: {**b, "completion_mask": b["loss_mask"]},
            ValueError,
            r"missing \[\], unknown \['completion_mask'\]",
        ),
        (
            lambda b: {**b, "tokens": b["tokens"][0]},
            ValueError,
            r"tokens must be \[B, T\] with B >= 1 .* got shape \(9,\)",
        ),
        (
            lambda b: {**b, "loss_mask": b["loss_mask"][:, :4]},
            ValueError,
            r"batch\['loss_mask'\] must have the tokens' shape \(6, 9\); got \(6, 4\)",
        ),
        (
            lambda b: {**b, "advantages": b["advantages"][:2]},
            ValueError,
            r"batch\['advantages'\] must be \[B\] = \(6,\) .* got \(2,\)",
        ),
    ],
)
def test_bad_batches_are_refused(model, change, error, match):
    _, _, trained = model
    with pytest.raises(error, match=match):
        jlora.grpo_policy_loss(apply_fn, trained, LORA, change(rollout_batch()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"old_logps": jnp.zeros((6, 8))}, r"old_logps must be \[B, T\] = \(6, 9\) .*\(6, 8\)"),
        (
            {"beta": 0.1, "ref_logps": jnp.zeros(6)},
            r"ref_logps must be \[B, T\] = \(6, 9\) .*\(6,\)",
        ),
        ({"ref_logps": jnp.zeros((6, 9))}, r"beta=0 has no KL term"),
        ({"temperature": -1.0}, r"temperature must be a number > 0"),
        ({"loss_type": "dr_grpo"}, r"give max_completion_length"),
    ],
)
def test_bad_options_of_the_policy_loss_are_refused(model, kwargs, match):
    _, _, trained = model
    with pytest.raises(ValueError, match=match):
        jlora.grpo_policy_loss(apply_fn, trained, LORA, rollout_batch(), **kwargs)


def test_params_without_adapters_are_refused(model):
    base, _, _ = model
    with pytest.raises(ValueError, match=r"params holds no LoRA adapters.*init_lora"):
        jlora.grpo_policy_loss(apply_fn, base, LORA, rollout_batch())
