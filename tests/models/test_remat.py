"""Remat policies: every policy gives today's logits and gradients; bad names are refused."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.models import remat
from jlora.models.decoder import DECODER_AXIS_RULES, Decoder, DecoderConfig, causal_lm_loss

SMALL = dict(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
TOKENS = np.random.default_rng(0).integers(0, 101, (2, 9)).astype(np.int32)
CFG = jlora.LoraConfig(rank=4, alpha=8.0, targets=r".*_proj/kernel", axis_rules=DECODER_AXIS_RULES)


@functools.cache
def adapted():
    c = DecoderConfig(**SMALL)
    params = Decoder(c).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    p = jlora.init_lora(jax.random.key(1), params, CFG)
    # B away from zero, so the adapters' gradients (A's too) are not trivially zero
    return jax.tree.map_with_path(
        lambda k, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(k) else x, p
    )


def lora_value_and_grad(policy, scan_layers=True):
    model = Decoder(DecoderConfig(**SMALL, remat=policy, scan_layers=scan_layers))

    def loss(p):
        logits = model.apply(p, TOKENS)
        return causal_lm_loss(logits[:, :-1], TOKENS[:, 1:])

    lora, base = jlora.split(adapted())
    return jax.jit(jlora.value_and_grad(lambda p: loss(p), CFG))(jlora.combine(lora, base))


@pytest.mark.parametrize("policy", ["full", "dots", "offload", True])
def test_every_policy_gives_the_same_loss_and_adapter_grads(policy):
    expected = lora_value_and_grad("none")
    got = lora_value_and_grad(policy)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7), got, expected)
    assert np.abs(np.asarray(jax.tree.leaves(got[1])[0])).max() > 0


def test_unrolled_layers_take_the_policy_too():
    np.testing.assert_allclose(
        lora_value_and_grad("dots", scan_layers=False)[0], lora_value_and_grad("none")[0], 1e-6
    )


def test_policies_change_what_the_backward_pass_keeps():
    """Each policy saves less than none; full keeps the least."""

    def temp(policy):
        model = Decoder(DecoderConfig(**{**SMALL, "num_hidden_layers": 4}, remat=policy))
        tokens = jnp.zeros((4, 64), jnp.int32)
        params = jax.eval_shape(model.init, jax.random.key(0), tokens)

        def loss(p):
            return jnp.mean(model.apply(p, tokens))

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    none, dots, full = temp("none"), temp("dots"), temp("full")
    assert full < dots < none, (full, dots, none)


def test_the_config_stores_the_policy_name():
    assert DecoderConfig(**SMALL, remat=True).remat == "full"
    assert DecoderConfig(**SMALL).remat == "none"
    assert DecoderConfig.from_hf({"architectures": ["LlamaForCausalLM"]}, remat="dots").remat == (
        "dots"
    )


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match=r"remat 'some' is not a rematerialisation policy"):
        DecoderConfig(**SMALL, remat="some")


def test_none_has_no_checkpoint_policy():
    with pytest.raises(ValueError, match=r"'none' has no checkpoint policy"):
        remat.checkpoint_policy("none")


def test_offload_is_refused_without_pinned_host_memory(monkeypatch):
    class Memory:
        kind = "device"

    class Device:
        platform = "fake"

        def addressable_memories(self):
            return [Memory()]

    monkeypatch.setattr(remat.jax, "devices", lambda backend=None: [Device()])
    with pytest.raises(ValueError, match=r"remat='offload' needs a device with pinned host"):
        remat.checkpoint_policy("offload")
