"""``jlora finetune`` on a tiny random Qwen3-MoE checkpoint: expert adapters and the aux loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runner_helpers import DEFAULT, tiny_overrides

import jlora
from jlora.models.decoder import Decoder, DecoderConfig, causal_lm_loss
from jlora.models.formats.tokenizer import byte_level
from jlora.models.moe import MoeConfig, load_balancing_loss, router_logits
from jlora.models.pretrained import save_pretrained
from jlora.runner.config import load_config
from jlora.runner.finetune import finetune
from jlora.runner.rundir.directory import read_metrics
from jlora.runner.tasks.causal_lm import CausalLMTask

MOE = DecoderConfig(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=64,
    architecture="Qwen3MoeForCausalLM",
    qk_norm=True,
    moe=MoeConfig("Qwen3MoeForCausalLM", 4, 2, 16, router_aux_loss_coef=0.5),
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    params = jax.jit(Decoder(MOE).init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    path = tmp_path_factory.mktemp("moe") / "tiny_qwen3_moe"
    save_pretrained(path, (MOE, params, byte_level()))
    return str(path)


def test_finetune_two_steps_adapts_every_expert(tmp_path, checkpoint):
    run_dir = tmp_path / "run"
    finetune(load_config(DEFAULT, tiny_overrides(run_dir, checkpoint, 2)), log=lambda _: 0)
    losses = [r["train_loss"] for r in read_metrics(str(run_dir)) if "train_loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    task = CausalLMTask(load_config(DEFAULT, tiny_overrides(run_dir, checkpoint, 2)))
    params, cfg = jlora.load_adapter(run_dir / "adapter", task.base)
    experts = params["model"]["layers"]["mlp"]["experts"]
    assert experts["down_proj"]["kernel_lora_b"].shape == (2, 4, cfg.rank, 32)
    assert "kernel_lora_a" not in params["model"]["layers"]["mlp"]["gate"]  # router frozen
    trained = np.asarray(experts["up_proj"]["kernel_lora_b"])
    assert np.any(trained != 0)  # the experts' adapters moved from B = 0


def test_training_loss_adds_the_router_aux_loss(tmp_path, checkpoint):
    task = CausalLMTask(load_config(DEFAULT, tiny_overrides(tmp_path / "r", checkpoint, 2)))
    batch = {k: jnp.asarray(v) for k, v in task.train_batch(0).items()}
    logits, state = task.model.apply(
        {"params": task.base}, batch["tokens"], mutable=["intermediates"]
    )
    lm = causal_lm_loss(logits, batch["targets"], batch["loss_mask"])
    aux = load_balancing_loss(router_logits(state), 2)
    got = task.loss(task.base, task.extra, batch)
    np.testing.assert_allclose(got, lm + 0.5 * aux, rtol=1e-5)
    np.testing.assert_allclose(task._eval_loss(task.base, task.extra, batch), lm, rtol=1e-5)


def test_finetune_runs_on_a_tiny_mixtral(tmp_path):
    # Mixtral's config.json has one MLP width, the experts': saved as moe.expert_size (16)
    fields = {**MOE.__dict__, "qk_norm": False, "architecture": "MixtralForCausalLM"}
    mixtral = DecoderConfig(**fields | {"moe": MoeConfig("MixtralForCausalLM", 4, 2, 16)})
    params = jax.jit(Decoder(mixtral).init)(jax.random.key(2), jnp.zeros((1, 4), jnp.int32))
    save_pretrained(tmp_path / "mixtral", (mixtral, params["params"], byte_level()))
    run_dir = tmp_path / "run"
    finetune(load_config(DEFAULT, tiny_overrides(run_dir, tmp_path / "mixtral", 2)), log=print)
    losses = [r["train_loss"] for r in read_metrics(str(run_dir)) if "train_loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
