"""Shared settings for the runner tests: the default config, a tiny Llama base and checkpoint."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from jlora.models.decoder import Decoder, DecoderConfig
from jlora.models.formats.tokenizer import byte_level
from jlora.models.pretrained import save_pretrained
from jlora.runner.data.text import load_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "configs", "default.yaml")
# The built-in model's shape, smaller: a byte-level Llama.
TINY = DecoderConfig(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
)


def run_on_devices(script, tmp_path, devices=4):
    """Runs ``script`` in a fresh Python with ``devices`` CPU devices; its last line as JSON.

    The script gets ``sys.argv[1] = tmp_path`` and ``sys.argv[2]`` = the tests directory (to
    import test modules and these helpers from); a device count is fixed at JAX's start, hence
    the new process.
    """
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), tests],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_tiny_weights(path):
    """A random TINY decoder with the byte-level tokenizer, as a Hugging Face directory."""
    params = Decoder(TINY).init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    save_pretrained(path, (TINY, params, byte_level()))
    return str(path)


def tiny_overrides(run_dir, weights, steps=4, **extra):
    kv = {
        "run_dir": run_dir,
        "model.path": weights,
        "data.seq_len": 32,
        "train.steps": steps,
        "train.batch_size": 4,
        "train.eval_every": 2,
        "train.eval_batches": 1,
        "train.checkpoint_every": 2,
        "train.log_every": 1,
        "train.progress": False,
        "generate.max_new_tokens": 8,
        **extra,
    }
    return [f"{k}={v}" for k, v in kv.items()]


CHAT = "{% for m in messages %}<|endoftext|>{{ m['content'] }}{% endfor %}"
CHAT += "{% if add_generation_prompt %}:{% endif %}"


def hf_config(vocab):
    return {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def write_checkpoint(path, tokenizer=True, chat_template=CHAT):
    """A random 2-layer Llama with a 300-token byte-level BPE trained on the sonnets."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([load_text("sonnets")[:20000]], trainer)
    config = DecoderConfig.from_hf(hf_config(backend.get_vocab_size()))
    params = Decoder(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    save_pretrained(path, (config, params, None))
    if tokenizer:
        backend.save(str(path / "tokenizer.json"))
        special = {"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}
        (path / "tokenizer_config.json").write_text(
            json.dumps(special | {"chat_template": chat_template})
        )
    return path
