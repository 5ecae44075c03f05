"""The built-in Llama-style decoder and its shipped pretrained base."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from jlora.models.llama import Llama, LlamaConfig, init_params, lm_loss, rotary
from jlora.models.weights import load_params, save_params
from jlora.runner.lm import weights_path
from jlora.runner.text import decode, encode, eval_windows, load_text, split_tokens

SMALL = LlamaConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_len=32)


def test_decoder_is_causal():
    params = init_params(SMALL)
    x = jnp.arange(10, dtype=jnp.int32)[None]
    y = x.at[0, 7].set(99)
    apply = jax.jit(Llama(SMALL).apply)
    a, b = (apply({"params": params}, t) for t in (x, y))
    np.testing.assert_array_equal(a[0, :7], b[0, :7])
    assert not np.allclose(a[0, 7:], b[0, 7:])


def test_rotary_keeps_position_zero_and_norms():
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
    r = jax.jit(rotary, static_argnums=1)(x, 10000.0)
    np.testing.assert_allclose(r[:, 0], x[:, 0], rtol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(r, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_weights_round_trip(tmp_path):
    params = init_params(SMALL)
    save_params(tmp_path / "w.safetensors", params, {"k": "v"})
    back, meta = load_params(tmp_path / "w.safetensors")
    assert meta == {"k": "v"}
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_shipped_base_learned_pydoc_text():
    params, meta = load_params(weights_path("builtin:llama_pydoc"))
    config = LlamaConfig(**json.loads(meta["config"]))
    assert config == LlamaConfig()  # the defaults are the shipped model
    _, val = split_tokens(encode(load_text("pydoc")), 0.05)
    x = jnp.asarray(eval_windows(val, 128, 8))
    logits = jax.jit(Llama(config).apply)({"params": params}, x[:, :-1])
    loss = float(lm_loss(logits, x[:, 1:]))
    assert loss < 1.5  # nats per byte on held-out pydoc text; an untrained model is at ~5.5
    assert float(meta["val_loss"]) < 1.5


def test_byte_codec_round_trips_unicode():
    assert decode(encode("naïve ≠ 中文")) == "naïve ≠ 中文"
