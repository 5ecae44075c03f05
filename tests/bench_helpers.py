"""What the benchmark tests share: loading a benchmark script, and a tiny random checkpoint."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp

from jlora.models.decoder import Decoder, DecoderConfig
from jlora.models.pretrained import save_pretrained

BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
TINY = DecoderConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


def load_benchmark(name):
    """``benchmarks/NAME.py`` as a module (benchmarks/ is not a package the tests import).

    ``benchmarks/`` goes on ``sys.path`` first, as it is for ``python benchmarks/NAME.py``, so
    the script's ``from _common import ...`` finds its siblings.
    """
    if os.path.abspath(BENCHMARKS) not in map(os.path.abspath, sys.path):
        sys.path.insert(0, os.path.abspath(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"{name}_bench", f"{BENCHMARKS}/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_checkpoint(path, config=TINY):
    """A random 2-layer decoder written as a Hugging Face directory at ``path``."""
    init = jax.jit(lambda: Decoder(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    save_pretrained(path, (config, init()["params"], None))
    return path
