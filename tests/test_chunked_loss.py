"""The chunked LM head and loss against the full-logit path, which is the oracle."""

import jax
import jax.numpy as jnp
import pytest

import jlora
from jlora.models.decoder import DECODER_AXIS_RULES, Decoder, DecoderConfig, causal_lm_loss
from jlora.models.lm_head import decoder_head, decoder_scores, mean_nll

B, T, H, V = 2, 7, 8, 37
MASKS = ("none", "all", "empty", "partial")


def _mask(kind):
    if kind == "none":
        return None
    if kind == "all":
        return jnp.ones((B, T), bool)
    if kind == "empty":
        return jnp.zeros((B, T), bool)
    return jnp.array([[0, 0, 1, 1, 1, 0, 1], [0, 0, 0, 0, 1, 1, 0]], bool)


def _inputs(dtype=jnp.float32, tied=False):
    k = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k[0], (B, T, H), dtype)
    head = jax.random.normal(k[1], (V, H) if tied else (H, V), dtype) * 0.5
    return hidden, head, jax.random.randint(k[2], (B, T), 0, V)


def _full(hidden, head, targets, mask, tied=False, softcap=None, temperature=1.0, dtype=None):
    """The full-logit path as the decoder and jlora.token_logps compute it."""
    dtype = dtype or jnp.result_type(hidden, head)
    h, w = hidden.astype(dtype), head.astype(dtype)
    logits = (jnp.dot(h, w.T) if tied else h @ w).astype(jnp.float32)
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    logps = jlora.token_logps(logits, targets, temperature=temperature)
    return logps if mask is None else jnp.where(mask, logps, 0.0)


def _close(a, b, dtype=jnp.float32):
    tol = {jnp.dtype("float32"): 2e-5, jnp.dtype("bfloat16"): 3e-2}[jnp.dtype(dtype)]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
        scale = float(jnp.max(jnp.abs(y))) + 1.0
        assert float(jnp.max(jnp.abs(x - y))) <= tol * scale, (x, y)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize(
    ("tied", "softcap", "temperature"), [(False, None, 1.0), (True, 2.5, 0.7), (False, 3.0, 1.3)]
)
def test_logps_and_gradients_equal_the_full_logits(
    maybe_jit, mask_kind, chunk, tied, softcap, temperature
):
    hidden, head, targets = _inputs(tied=tied)
    mask = _mask(mask_kind)
    kw = {"tied": tied, "softcap": softcap, "temperature": temperature}
    cot = jax.random.normal(jax.random.key(5), (B, T))

    def chunked(h, w):
        return jlora.chunked_token_logps(h, w, targets, mask, chunk_size=chunk, **kw)

    def full(h, w):
        return _full(h, w, targets, mask, **kw)

    _close(maybe_jit(chunked)(hidden, head), full(hidden, head))
    for argnums in (0, (0, 1)):  # hidden alone (a frozen head), and the head trained too
        got = maybe_jit(jax.grad(lambda h, w: jnp.sum(chunked(h, w) * cot), argnums))
        want = jax.grad(lambda h, w: jnp.sum(full(h, w) * cot), argnums)
        _close(got(hidden, head), want(hidden, head))


@pytest.mark.parametrize("mask_kind", MASKS)
def test_cross_entropy_equals_causal_lm_loss_in_bfloat16(maybe_jit, mask_kind):
    hidden, head, targets = _inputs(jnp.bfloat16)
    mask = _mask(mask_kind)

    def chunked(h, w):
        return jlora.chunked_cross_entropy(h, w, targets, mask, chunk_size=4, softcap=2.0)

    def full(h, w):
        logits = jnp.tanh((h @ w).astype(jnp.float32) / 2.0) * 2.0
        return causal_lm_loss(logits, targets, mask)

    _close(maybe_jit(chunked)(hidden, head), full(hidden, head), jnp.bfloat16)
    for argnums in (0, (0, 1)):
        got = maybe_jit(jax.grad(chunked, argnums))(hidden, head)
        _close(got, jax.grad(full, argnums)(hidden, head), jnp.bfloat16)
        assert jax.tree.leaves(got)[0].dtype == jnp.bfloat16


def test_f32_compute_dtype_of_bf16_inputs_is_the_dtype_asked_for():
    hidden, head, targets = _inputs(jnp.bfloat16)
    got = jlora.chunked_token_logps(hidden, head, targets, dtype=jnp.float32, chunk_size=5)
    _close(got, _full(hidden, head, targets, None, dtype=jnp.float32))


def test_entropy_equals_the_full_distribution_and_has_no_gradient(maybe_jit):
    hidden, head, targets = _inputs()
    mask = _mask("partial")
    fn = maybe_jit(
        lambda h: jlora.chunked_logps_and_entropy(
            h, head, targets, mask, chunk_size=2, temperature=0.5
        )
    )
    logps, entropy = fn(hidden)
    logp = jax.nn.log_softmax((hidden @ head) / 0.5, axis=-1)
    want = jnp.where(mask, -jnp.sum(jnp.exp(logp) * logp, axis=-1), 0.0)
    _close(entropy, want)
    _close(logps, _full(hidden, head, targets, mask, temperature=0.5))
    grad = jax.grad(lambda h: jnp.sum(fn(h)[1]))(hidden)
    assert float(jnp.max(jnp.abs(grad))) == 0.0


def test_no_token_by_vocab_array_is_formed_forward_or_backward():
    n, vocab, chunk = 64, 1000, 8
    hidden = jnp.ones((1, n, H))
    head = jnp.ones((H, vocab))
    targets = jnp.zeros((1, n), jnp.int32)
    mask = jnp.arange(n)[None] % 2 == 0

    def loss(h, w):
        return jlora.chunked_cross_entropy(h, w, targets, mask, chunk_size=chunk)

    sizes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            sizes.extend(v.aval.size for v in eqn.outvars if hasattr(v.aval, "size"))
            for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else []:
                walk(sub)
            for value in eqn.params.values():
                for inner in value if isinstance(value, tuple | list) else (value,):
                    if hasattr(inner, "jaxpr") and hasattr(inner.jaxpr, "eqns"):
                        walk(inner.jaxpr)
                    elif hasattr(inner, "eqns"):
                        walk(inner)

    for argnums in (0, (0, 1)):
        walk(jax.make_jaxpr(jax.grad(loss, argnums))(hidden, head).jaxpr)
    assert max(sizes) == chunk * vocab  # one chunk's logits; never n·vocab
    assert not any(s >= n * vocab // 2 for s in sizes)


def _decoder(tied, softcap=None, dtype=jnp.float32):
    return DecoderConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        tie_word_embeddings=tied,
        final_logit_softcapping=softcap,
        dtype=dtype,
    )


def _random_b(params):
    """B factors made non-zero, so the adapted head changes the logits and gradients."""

    def fill(path, x):
        if "lora_b" in jax.tree_util.keystr(path):
            key = jax.random.fold_in(jax.random.key(3), x.size)
            return jax.random.normal(key, x.shape, x.dtype) * 0.3
        return x

    return jax.tree.map_with_path(fill, params)


@pytest.mark.parametrize(
    ("tied", "targets_re"),
    [
        (False, r"lm_head/kernel|.*q_proj/kernel"),
        (True, r".*embed_tokens/embedding"),
        (False, r".*q_proj/kernel"),  # a frozen head: the custom backward runs under jlora.lora
    ],
)
def test_adapted_head_through_jlora_lora_matches_the_merged_full_logit_loss(tied, targets_re):
    config = _decoder(tied, softcap=4.0)
    model = Decoder(config)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    base = model.init(jax.random.key(0), tokens)["params"]
    cfg = jlora.LoraConfig(rank=2, targets=targets_re, axis_rules=DECODER_AXIS_RULES)
    params = _random_b(jlora.init_lora(jax.random.key(2), base, cfg))
    mask = _mask("partial")
    adapters, frozen = jlora.split(params)

    def chunked(p):
        scores = decoder_scores(model, p, tokens, tokens, mask, chunk_size=3)
        return mean_nll(scores, mask)

    def of_adapters(a):
        return jlora.lora(chunked, cfg)(jlora.combine(a, frozen))

    def merged(a):
        p = jlora.merge_params(jlora.combine(a, frozen), cfg)
        return causal_lm_loss(model.apply({"params": p}, tokens), tokens, mask)

    loss, grads = jax.jit(jax.value_and_grad(of_adapters))(adapters)
    want_loss, want = jax.value_and_grad(merged)(adapters)
    _close(loss, want_loss)
    _close(grads, want)
    assert float(jnp.max(jnp.abs(jax.tree.leaves(grads)[0]))) > 0


@pytest.mark.parametrize("tied", [False, True])
def test_decoder_scores_equal_the_full_path_with_intermediates(tied):
    config = _decoder(tied, dtype=jnp.bfloat16)
    model = Decoder(config)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    params = model.init(jax.random.key(0), tokens)["params"]
    mask = _mask("partial")

    def scores(p, chunk):
        return decoder_scores(
            model, p, tokens, tokens, mask, chunk_size=chunk, entropy=True, intermediates=True
        )

    chunked, full = scores(params, 4), scores(params, 0)
    _close(chunked.logps, full.logps, jnp.bfloat16)
    _close(chunked.entropy, full.entropy, jnp.bfloat16)
    assert chunked.intermediates == full.intermediates == {}
    weight, kw = decoder_head(params, config)
    assert kw == {"tied": tied, "softcap": None, "dtype": jnp.bfloat16}
    assert weight.shape == ((V, 16) if tied else (16, V))


def test_auto_chunk_size_bounds_a_chunk_of_logits():
    for vocab in (1000, 32000, 128256, 262144):
        size = jlora.auto_chunk_size(vocab)
        assert 64 <= size <= 4096 and size & (size - 1) == 0
        assert size * vocab <= jlora.CHUNK_LOGITS or size == 64
    hidden, head, targets = _inputs()
    _close(jlora.chunked_token_logps(hidden, head, targets), _full(hidden, head, targets, None))


def test_errors_say_what_and_how():
    hidden, head, targets = _inputs()
    f = jlora.chunked_token_logps
    with pytest.raises(ValueError, match=r"hidden must be \[batch, seq, hidden\]; got shape \(2,"):
        f(hidden[..., 0], head, targets)
    with pytest.raises(ValueError, match=r"must be a kernel \[hidden, vocab\].*pass tied=True"):
        f(hidden, head.T, targets)
    with pytest.raises(ValueError, match=r"head must be an embedding table \[vocab, hidden\]"):
        f(hidden, head, targets, tied=True)
    with pytest.raises(ValueError, match=r"targets must be \[batch, seq\] = \(2, 7\)"):
        f(hidden, head, targets[:, :3])
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int.*got 0"):
        f(hidden, head, targets, chunk_size=0)
    with pytest.raises(ValueError, match=r"chunked_logps_and_entropy: temperature must be"):
        jlora.chunked_logps_and_entropy(hidden, head, targets, temperature=0.0)


def _pair_setup():
    config = _decoder(False, softcap=4.0)
    model = Decoder(config)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    base = model.init(jax.random.key(0), tokens)["params"]
    cfg = jlora.LoraConfig(
        rank=2, targets=r"lm_head/kernel|.*v_proj/kernel", axis_rules=DECODER_AXIS_RULES
    )
    params = _random_b(jlora.init_lora(jax.random.key(2), base, cfg))
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "loss_mask": _mask("partial")}

    def apply_fn(p, t, **kw):
        return model.apply({"params": p}, t, **kw)

    def logps_fn(p, t, targets, mask, *, temperature=None, **kw):
        scores = decoder_scores(
            model,
            p,
            t,
            targets,
            mask,
            chunk_size=3,
            entropy=temperature is not None,
            temperature=temperature or 1.0,
            **kw,
        )
        return scores.logps if temperature is None else (scores.logps, scores.entropy)

    return cfg, params, batch, apply_fn, logps_fn


def test_dpo_and_grpo_losses_with_logps_fn_equal_the_logit_path():
    cfg, params, batch, apply_fn, logps_fn = _pair_setup()
    adapters, base = jlora.split(params)

    def dpo(a, chunked):
        return jlora.dpo_loss(
            None if chunked else apply_fn,
            jlora.combine(a, base),
            cfg,
            batch,
            logps_fn=logps_fn if chunked else None,
            loss_type="orpo",
        )

    grpo_batch = {**batch, "advantages": jnp.array([1.0, -1.0])}

    def grpo(a, chunked):
        return jlora.grpo_policy_loss(
            None if chunked else apply_fn,
            jlora.combine(a, base),
            cfg,
            grpo_batch,
            logps_fn=logps_fn if chunked else None,
            beta=0.1,
            temperature=0.7,
        )

    for fn in (dpo, grpo):
        (loss, metrics), grads = jax.value_and_grad(fn, has_aux=True)(adapters, True)
        (want_loss, want_metrics), want = jax.value_and_grad(fn, has_aux=True)(adapters, False)
        _close((loss, metrics, grads), (want_loss, want_metrics, want))
    ref_dpo = jlora.dpo_loss(None, params, cfg, batch, logps_fn=logps_fn)
    _close(ref_dpo, jlora.dpo_loss(apply_fn, params, cfg, batch))


def test_logps_fn_errors():
    cfg, params, batch, apply_fn, logps_fn = _pair_setup()
    with pytest.raises(ValueError, match=r"dpo_loss: give apply_fn .* or logps_fn .*exactly one"):
        jlora.dpo_loss(apply_fn, params, cfg, batch, logps_fn=logps_fn)
    with pytest.raises(ValueError, match=r"dpo_loss: logps_fn must give \[2B, T\] = \(2, 7\)"):
        jlora.dpo_loss(None, params, cfg, batch, logps_fn=lambda p, t, y, m: t[:, :2] * 1.0)
    grpo_batch = {**batch, "advantages": jnp.array([1.0, -1.0])}
    with pytest.raises(ValueError, match=r"grpo_policy_loss: give apply_fn .* exactly one"):
        jlora.grpo_policy_loss(None, params, cfg, grpo_batch)
    with pytest.raises(ValueError, match=r"logps_fn must give \(logps, entropy\), each \[B, T\]"):
        jlora.grpo_policy_loss(
            None, params, cfg, grpo_batch, logps_fn=lambda p, t, y, m, **kw: t * 1.0
        )


def test_the_runner_task_loss_and_gradient_are_the_same_chunked_or_not(tmp_path):
    from runner_helpers import DEFAULT, write_checkpoint

    from jlora.runner.config import load_config
    from jlora.runner.tasks.causal_lm import CausalLMTask

    checkpoint = write_checkpoint(tmp_path / "tiny")

    def task(chunk):
        keys = {"run_dir": tmp_path / "r", "model.path": checkpoint, "data.seq_len": 16}
        keys |= {"train.batch_size": 2, "train.loss_chunk": chunk}
        return CausalLMTask(load_config(DEFAULT, [f"{k}={v}" for k, v in keys.items()]))

    full, chunked = task(0), task(5)
    batch = {k: jnp.asarray(v) for k, v in full.train_batch(0).items()}
    batch["loss_mask"] = batch["loss_mask"].at[:, :4].set(False)  # a prompt
    want = jax.value_and_grad(full.loss)(full.base, {}, batch)
    _close(jax.value_and_grad(chunked.loss)(chunked.base, {}, batch), want)
    assert chunked.evaluate(chunked.base, {})["eval_loss"] == pytest.approx(
        full.evaluate(full.base, {})["eval_loss"], rel=1e-5
    )


def test_train_loss_chunk_is_validated():
    from jlora.runner.config import TrainSection

    assert TrainSection().loss_chunk is None and TrainSection(loss_chunk=0).loss_chunk == 0
    with pytest.raises(ValueError, match=r"config train.loss_chunk: must be tokens per chunk >= 1"):
        TrainSection(loss_chunk=-1)
