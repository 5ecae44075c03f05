"""Defaults that fit the model and the data: a run config's auto keys, resolved.

Design note: the keys in :data:`jlora.runner.config.AUTO` are "auto". :func:`resolve`
gives each one that the config file and its overrides leave out a value, once, where the
config is loaded (before any weight is read or the run directory is touched), and says why;
a value given is never changed. The run directory saves the resolved config, and resolving
is deterministic (the model's config and tokenizer, the data and the seed decide it), so the
same command resumes its run.

- The built-in model (``model.path`` unset or ``builtin:llama_pydoc``) and ``bert`` runs keep
  the dataclass defaults, the built-in run's values (:data:`BUILTIN_VALUES`): the default run
  is what it always was.
- A checkpoint gets the usual LoRA settings for a real model: ``data.seq_len`` from the data
  (the :data:`SEQ_PERCENTILE`-th percentile of the training examples' token lengths, or of
  the preference pairs' prompt plus longer answer, rounded
  up to a multiple of :data:`SEQ_MULTIPLE`, capped by the model's positions), learning rate
  2e-4 (1e-4 from 20B parameters on), batch 8, one epoch of steps (at least
  :data:`MIN_STEPS`) and 3% of them warm-up.
- Sample prompts come from the held-out data unless the data is the sonnets, and ``run_dir``
  is ``runs/<model>-<data>`` unless the run is the built-in one (``runs/default``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Collection
from typing import Any, cast

import numpy as np

from jlora.runner.config import AUTO, BUILTIN_MODEL, RunConfig, get_dotted
from jlora.runner.data.profile import DataProfile, Lengths

#: The built-in run's values of the auto keys: the dataclass defaults, which the built-in
#: model (and a ``bert`` run) keeps.
BUILTIN_VALUES: dict[str, Any] = {key: get_dotted(RunConfig(), key) for key in AUTO}
#: The run directory of the built-in run (the built-in model on the sonnets).
DEFAULT_RUN_DIR = BUILTIN_VALUES["run_dir"]
#: A checkpoint's ``data.seq_len`` on instruction data: this percentile of the training
#: examples' token lengths (numpy's ``inverted_cdf``: the smallest length that at least this
#: share of the examples fit in) ...
SEQ_PERCENTILE = 95
#: ... rounded up to a multiple of this, then capped by ``max_position_embeddings``.
SEQ_MULTIPLE = 64
#: A checkpoint's ``data.seq_len`` on a text (windows cut from one long token stream).
TEXT_SEQ_LEN = 512
#: A checkpoint's ``train.batch_size``: rows (or windows) of ``data.seq_len`` a step.
CHECKPOINT_BATCH_SIZE = 8
#: A checkpoint's learning rate: QLoRA's fine-tuning scripts use 2e-4 for 7B and 13B models
#: and 1e-4 for 33B and 65B; TRL's LoRA example (``trl/scripts/sft.py``) uses 2e-4.
LORA_LEARNING_RATE = 2e-4
LARGE_MODEL_LEARNING_RATE = 1e-4
LARGE_MODEL_PARAMS = 20e9
#: A checkpoint's ``train.steps``: one epoch (TRL's LoRA example trains one packed epoch),
#: but at least this many, so that a small data set is seen often enough to change the model.
MIN_STEPS = 100
#: A checkpoint's warm-up: this share of ``train.steps``, rounded up (QLoRA's warmup_ratio).
WARMUP_FRACTION = 0.03
#: Sample prompts taken from the held-out data, and words taken from a line of text.
SAMPLE_PROMPTS = 2
PROMPT_WORDS = 6
# A data file with one of these stems is named after its folder (data/support/train.jsonl).
_GENERIC_STEMS = {"train", "training", "data"}


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A config with its auto keys resolved, and why each got its value.

    Attributes:
      config: the resolved :class:`~jlora.runner.config.RunConfig`.
      reasons: dotted key -> why it got its value, for each auto key the config did not give
        (keys given are not listed), in :data:`~jlora.runner.config.AUTO` order.
      builtin: the keys among ``reasons`` that got the built-in run's value.
      profile: the data measured with the model's tokenizer, if it was (a decoder run whose
        defaults needed it, or ``measure_data=True``).
    """

    config: RunConfig
    reasons: dict[str, str]
    builtin: frozenset[str] = frozenset()
    profile: DataProfile | None = None

    def lines(self, *, all_keys: bool = True) -> list[str]:
        """``"KEY VALUE: why"`` per resolved key; ``all_keys=False`` leaves out built-in values.

        Example:
          >>> r = resolve(RunConfig())
          >>> r.lines()[1]
          'data.seq_len 128: the built-in run'
          >>> r.lines(all_keys=False)
          []
        """
        return [
            f"{key} {show_value(get_dotted(self.config, key))}: {why}"
            for key, why in self.reasons.items()
            if all_keys or key not in self.builtin
        ]


def show_value(value: Any) -> str:
    """A config value as the resolution log shows it.

    Example:
      >>> show_value(0.0002), show_value(1204), show_value(("a ", "b"))
      ('0.0002', '1204', "['a ', 'b']")
    """
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return repr(list(value))
    return str(value)


def is_builtin_model(config: RunConfig) -> bool:
    """Whether ``config`` adapts the built-in decoder or is a ``bert`` run: built-in defaults.

    Example:
      >>> is_builtin_model(RunConfig())
      True
    """
    return config.model.kind == "bert" or config.model.path in (None, BUILTIN_MODEL)


def is_default_data(config: RunConfig) -> bool:
    """Whether a decoder run trains on the sonnets, the built-in run's data.

    Example:
      >>> is_default_data(RunConfig())
      True
    """
    return config.data.train is None and config.data.source == "sonnets"


def source_name(spec: str, *, data: bool = False) -> str:
    """A short name for a model or data source, as ``runs/<model>-<data>`` uses it.

    ``builtin:NAME[/FILE]`` and ``package:NAME`` give NAME; a Hugging Face cache snapshot
    (``.../models--ORG--NAME/snapshots/HASH``) gives NAME; otherwise the file's stem or the
    directory's name. A data file named ``train``, ``training`` or ``data`` is named after its
    folder. Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``.

    Example:
      >>> source_name("/models/SmolLM2-135M-Instruct"), source_name("q4.gguf")
      ('SmolLM2-135M-Instruct', 'q4')
      >>> source_name("data/support/train.jsonl", data=True)
      'support'
      >>> source_name("builtin:stdlib_modules/train.jsonl", data=True)
      'stdlib_modules'
    """
    if spec.startswith(("builtin:", "package:")):
        name = spec.split(":", 1)[1].split("/")[0]
    else:
        path = os.path.normpath(spec)
        parts = path.split(os.sep)
        if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
            name = parts[-3].split("--")[-1]
        else:
            base = os.path.basename(path)
            # a file's extension is letters only: Qwen2-0.5B stays whole, q4.gguf is q4
            name = base if os.path.isdir(path) else re.sub(r"\.[A-Za-z]+$", "", base)
            parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
            if data and name.lower() in _GENERIC_STEMS and parent:
                name = parent
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def run_dir_name(config: RunConfig) -> str:
    """The run directory a config gets when it names none.

    Example:
      >>> run_dir_name(RunConfig())
      'runs/default'
      >>> from jlora.runner.config import DataSection, ModelSection
      >>> run_dir_name(RunConfig(model=ModelSection(path="/m/Qwen2-0.5B"),
      ...                        data=DataSection(train="chats.jsonl")))
      'runs/Qwen2-0.5B-chats'
    """
    if config.model.kind == "bert":
        model, data = config.model.weights, config.data.source
    else:
        if config.model.path in (None, BUILTIN_MODEL) and is_default_data(config):
            return DEFAULT_RUN_DIR
        model = config.model.decoder
        data = config.data.train if config.data.train is not None else config.data.source
    return os.path.join("runs", f"{source_name(model)}-{source_name(data, data=True)}")


def _short_count(n: int) -> str:
    """``135M``, ``6.7B``: a parameter count in a few characters."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _opening(text: str) -> str:
    """The first :data:`PROMPT_WORDS` words of ``text``, then a space to continue from."""
    return " ".join(text.split()[:PROMPT_WORDS]) + " "


def held_out_prompts(profile: DataProfile) -> tuple[tuple[str, ...], str]:
    r"""Sample prompts from the held-out data, and where they come from.

    Instruction data: the first :data:`SAMPLE_PROMPTS` held-out questions (a conversation's
    user turn before its last answer, a record's prompt), else the opening words of held-out
    ``text`` records. A text: the opening words of its first whole held-out lines.

    Example:
      >>> p = DataProfile(held_text="ng line\nThe quick brown fox\nA second line here\n")
      >>> held_out_prompts(p)[0]
      ('The quick brown fox ', 'A second line here ')
    """
    held = profile.held_records
    if held is not None:
        asked: list[str] = []
        for record in held.records:
            if "messages" in record:
                messages = record["messages"]
                last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
                users = [m["content"] for m in messages[:last] if m["role"] == "user"]
                asked += users[-1:]
            elif "prompt" in record:
                asked.append(record["prompt"])
        if asked:
            n = min(SAMPLE_PROMPTS, len(asked))
            return tuple(asked[:n]), f"the first {n} held-out question(s), asked as in training"
        texts = [_opening(r["text"]) for r in held.records if "text" in r][:SAMPLE_PROMPTS]
        return tuple(texts), f"the opening words of the first {len(texts)} held-out text(s)"
    lines = profile.held_text.split("\n")
    whole = [line for line in lines[1:] if line.strip()] if len(lines) > 1 else lines
    prompts = tuple(_opening(line) for line in whole[:SAMPLE_PROMPTS] if line.strip())
    return prompts, f"the opening words of the first {len(prompts)} line(s) of the held-out text"


class _Model:
    """What resolving needs of a decoder checkpoint, read on first use: config and tokenizer."""

    def __init__(self, config: RunConfig) -> None:
        self.run = config
        self._decoder: Any = None
        self._tokenizer: Any = None

    @property
    def decoder(self) -> Any:
        if self._decoder is None:
            from jlora.runner.tasks.causal_lm import checkpoint_config  # jax, on first use

            self._decoder = checkpoint_config(self.run.model)[0]
        return self._decoder

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from jlora.runner.tasks.causal_lm import checkpoint_tokenizer

            self._tokenizer = checkpoint_tokenizer(self.run.model)
        return self._tokenizer

    def parameters(self) -> int:
        from jlora.models.decoder_weights import param_layout

        return sum(math.prod(e.shape) for e in param_layout(self.decoder))


def measure(config: RunConfig, tokenizer: Any) -> DataProfile:
    """A decoder run's data, read, split and tokenized as its task will, with ``tokenizer``.

    Raises:
      FileNotFoundError, ValueError: for missing or bad data, as the task would (named).

    Example:
      >>> from jlora.runner.tasks.causal_lm import checkpoint_tokenizer
      >>> measure(RunConfig(), checkpoint_tokenizer(RunConfig().model)).train_tokens
      86155
    """
    from jlora.runner.data.chat_batches import read_instruction_data
    from jlora.runner.data.preferences import read_preference_data
    from jlora.runner.data.profile import (
        instruction_profile,
        preference_profile,
        prompt_profile,
        text_profile,
    )
    from jlora.runner.data.prompts import read_prompt_data
    from jlora.runner.data.text import load_text

    data = config.data
    if config.train.objective == "grpo":
        prompts = read_prompt_data(data, config.train.seed)
        return prompt_profile(*prompts, tokenizer, config.train.max_new_tokens)
    if config.train.objective != "sft":
        pairs = read_preference_data(data, config.train.seed)
        return preference_profile(*pairs, tokenizer)
    if data.train is not None:
        train, held = read_instruction_data(data, config.train.seed)
        return instruction_profile(train, held, tokenizer)
    return text_profile(load_text(data.source), tokenizer, data.val_fraction)


def _seq_len(
    config: RunConfig, model: _Model, profile: Callable[[], DataProfile]
) -> tuple[int, str]:
    limit = model.decoder.max_position_embeddings
    cap = f", capped by the model's {limit:,} positions"
    if config.data.train is None:
        value = min(TEXT_SEQ_LEN, limit)
        why = f"windows of {TEXT_SEQ_LEN} tokens of the text for a checkpoint"
        return value, why + (cap if value < TEXT_SEQ_LEN else "")
    measured = profile()
    lengths = cast(Lengths, measured.train).lengths  # instruction data: always measured
    longest, n = int(lengths.max()), len(lengths)
    examples = {
        "pairs": "pairs (prompt and longer answer)",
        "prompts": "prompts (plus train.max_new_tokens)",
    }.get(measured.unit, "examples")
    if config.data.overflow == "error":
        chosen = longest
        what = (
            f"the longest of {n:,} training {examples} is {longest:,} tokens (data.overflow=error)"
        )
    else:
        chosen = int(np.percentile(lengths, SEQ_PERCENTILE, method="inverted_cdf"))
        what = (
            f"the {SEQ_PERCENTILE}th percentile of {n:,} training {examples}' token lengths is "
            f"{chosen:,} (longest {longest:,})"
        )
    rounded = max(SEQ_MULTIPLE, -(-chosen // SEQ_MULTIPLE) * SEQ_MULTIPLE)
    value = min(rounded, limit)
    why = f"{what}, rounded up to a multiple of {SEQ_MULTIPLE}"
    return value, why + (cap if value < rounded else "")


def _steps(config: RunConfig, profile: DataProfile) -> tuple[int, str]:
    seq, batch, accum = config.data.seq_len, config.train.batch_size, config.train.grad_accum
    rows = profile.epoch_rows(seq, config.train.seed, packed=config.data.pack)
    per_step = batch * accum
    epoch = math.ceil(rows / per_step)
    kind = "windows" if profile.train is None else ("packed rows" if config.data.pack else "rows")
    if profile.unit:
        kind = profile.unit
    shape = f"{batch} x {accum}" if accum > 1 else f"{batch}"
    what = f"one epoch is {epoch:,} step(s) ({rows:,} {kind} of {seq} tokens, {shape} a step)"
    if epoch >= MIN_STEPS:
        return epoch, what
    epochs = MIN_STEPS * per_step / max(rows, 1)
    return MIN_STEPS, f"{what}, raised to the minimum of {MIN_STEPS} ({epochs:.3g} epochs)"


def resolve(
    config: RunConfig,
    given: Collection[str] = (),
    log: Callable[[str], Any] | None = None,
    *,
    measure_data: bool = False,
) -> Resolved:
    """Resolves the auto keys of ``config`` that are not ``given``, for the model and data.

    The built-in model and ``bert`` runs keep :data:`BUILTIN_VALUES`; a checkpoint's values
    come from its config, its tokenizer and the data (see the module's note). Nothing is
    compiled and no weight is read.

    Args:
      config: a validated config (:func:`jlora.runner.config.read_config`).
      given: the dotted keys the config file and overrides set; they are kept as they are.
      log: called once per resolved value that is not the built-in run's own,
        ``"auto KEY VALUE: why"``.
      measure_data: measure a decoder run's data even if no default needs it (the dry run
        prints its statistics).

    Returns:
      The :class:`Resolved` config, reasons and data profile.

    Raises:
      FileNotFoundError, ValueError: a checkpoint without config or tokenizer, or missing or
        bad data, named as the task would name them.

    Example:
      >>> r = resolve(RunConfig(), given={"train.steps"})
      >>> r.config.train.steps, r.config.train.learning_rate, "train.steps" in r.reasons
      (300, 0.003, False)
    """
    builtin = is_builtin_model(config)
    decoder_run = config.model.kind != "bert"
    model = _Model(config)
    profiled: list[DataProfile] = []

    def profile() -> DataProfile:
        if not profiled:
            profiled.append(measure(config, model.tokenizer))
        return profiled[0]

    reasons: dict[str, str] = {}
    from_builtin: set[str] = set()
    current = config

    def set_value(key: str, value: Any, why: str, *, is_builtin: bool = False) -> None:
        nonlocal current
        section, _, field = key.rpartition(".")
        if section:
            part = dataclasses.replace(getattr(current, section), **{field: value})
            current = dataclasses.replace(current, **{section: part})
        else:
            current = dataclasses.replace(current, **{field: value})
        reasons[key] = why
        if is_builtin:
            from_builtin.add(key)

    def auto(key: str) -> bool:
        return key not in given

    def keep_builtin(key: str, why: str = "the built-in run") -> None:
        set_value(key, BUILTIN_VALUES[key], why, is_builtin=True)

    if auto("run_dir"):
        name = run_dir_name(current)
        if name == DEFAULT_RUN_DIR:
            keep_builtin("run_dir")
        else:
            what = "model.weights and data.source" if not decoder_run else "the model and data"
            set_value("run_dir", name, f"named after {what}")
    numbers = ("data.seq_len", "train.batch_size", "train.steps", "train.warmup_steps")
    if builtin:
        why = "the built-in run" if decoder_run else "the built-in run's value (a bert run)"
        for key in (*numbers, "train.learning_rate"):
            if auto(key):
                keep_builtin(key, why)
    else:
        if auto("train.batch_size"):
            set_value(
                "train.batch_size",
                CHECKPOINT_BATCH_SIZE,
                "rows a step for a checkpoint; train.grad_accum multiplies it in the same memory",
            )
        if auto("data.seq_len"):
            set_value("data.seq_len", *_seq_len(current, model, profile))
        if auto("train.steps"):
            set_value("train.steps", *_steps(current, profile()))
        if auto("train.warmup_steps"):
            steps = current.train.steps
            set_value(
                "train.warmup_steps",
                math.ceil(WARMUP_FRACTION * steps),
                f"{WARMUP_FRACTION:.0%} of train.steps {steps}, rounded up (QLoRA's warmup_ratio)",
            )
        if auto("train.learning_rate"):
            n = model.parameters()
            large = n >= LARGE_MODEL_PARAMS
            set_value(
                "train.learning_rate",
                LARGE_MODEL_LEARNING_RATE if large else LORA_LEARNING_RATE,
                f"LoRA's usual rate for a {_short_count(n)}-parameter model (QLoRA: 2e-4 for "
                "7B and 13B, 1e-4 for 33B and 65B; TRL's LoRA example: 2e-4)",
            )
    if auto("generate.prompts"):
        if not decoder_run:
            keep_builtin("generate.prompts", "the built-in run's value (unused by bert)")
        elif is_default_data(current):
            keep_builtin("generate.prompts", "the built-in run's, for the sonnets")
        else:
            set_value("generate.prompts", *held_out_prompts(profile()))
    if measure_data and decoder_run and current.train.objective == "sft":
        profile()
    ordered = {key: reasons[key] for key in AUTO if key in reasons}
    out = Resolved(current, ordered, frozenset(from_builtin), profiled[0] if profiled else None)
    if log is not None:
        for line in out.lines(all_keys=False):
            log(f"auto {line}")
    return out
