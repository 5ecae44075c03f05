"""The ``jlora`` command: LoRA-fine-tune a model from a config, then use the run.

Run ``jlora finetune`` for the built-in default; ``key=value`` arguments override config
fields by their dotted names, e.g. ``jlora finetune train.steps=50 lora.rank=4``. A config is a
YAML file or the name of one shipped with jlora (``default``, ``minilm_stdlib``, ...), so
``jlora finetune minilm_stdlib`` works from any directory.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jlora
from jlora.runner.config import RunConfig, load_config, read_config, shipped_configs
from jlora.runner.dryrun import dry_run
from jlora.runner.host_memory import keep_freed_memory
from jlora.runner.report import format_results
from jlora.runner.rundir import directory as rundir
from jlora.runner.variants import dense_model, prepare_base

# Errors that are the user's input, printed as one clear message instead of a traceback.
# ModuleNotFoundError: an optional package a config asks for (log.wandb) is not installed.
USER_ERRORS = (
    KeyError,
    TypeError,
    ValueError,
    FileNotFoundError,
    FloatingPointError,
    ModuleNotFoundError,
)


def _split_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return None, list(args)


def cmd_finetune(args: argparse.Namespace) -> None:
    """Trains (or resumes) a run and prints what LoRA did."""
    from jlora.runner.finetune import finetune

    path, overrides = _split_args(args.args)
    if args.dry_run:
        print(dry_run(*read_config(path, overrides)))
        return
    config = load_config(path, overrides, log=print)  # says what each auto value became
    if config.train.keep_freed_memory:
        keep_freed_memory()  # before the first computation, so XLA's threads share the heap
    tic = time.perf_counter()
    results = finetune(config)
    print(format_results(results, config.run_dir, time.perf_counter() - tic))


def _restore(run_dir: str) -> tuple[RunConfig, Any, Any, jlora.LoraConfig]:
    from jlora.runner.tasks import make_task

    config = rundir.load_run_config(run_dir)
    task = make_task(config)
    base = prepare_base(config, task.base)  # the base the adapter was trained on
    params, cfg = jlora.load_adapter(os.path.join(run_dir, "adapter"), base)
    return config, task, params, cfg


def _merge_hf(run_dir: str) -> None:
    """``merge --format hf``: the merged model as a Hugging Face directory, ``merged_hf/``."""
    from jlora.models.formats.stored_dtype import float_dtype, stored_dtype
    from jlora.models.pretrained import export_merged_hf, load_pretrained, resolve_source

    config = rundir.load_run_config(run_dir)
    if config.model.kind != "llama":  # refused before any weight is read
        raise ValueError(
            "--format hf writes a decoder as a Hugging Face model directory; this run uses "
            f"model.kind={config.model.kind}. Use --format safetensors (the default)"
        )
    held: dict[str, Any] = {}  # the base in the dtype the run held it (model.base_dtype)
    if hasattr(config, "lora"):
        from jlora.runner.tasks.causal_lm import checkpoint_config

        held["param_dtype"] = checkpoint_config(config.model)[0].param_dtype
    base = load_pretrained(config.model.decoder, **held)
    written = float_dtype(stored_dtype(resolve_source(config.model.decoder)))
    # A QLoRA run's adapter belongs to the quantised base; export_merged_hf merges it in float.
    # (Stand-ins for a run config, as some tests use, may carry only the model section.)
    base_params = prepare_base(config, base.params) if hasattr(config, "lora") else base.params
    params, cfg = jlora.load_adapter(os.path.join(run_dir, "adapter"), base_params)
    out = os.path.join(run_dir, "merged_hf")
    export_merged_hf(out, base, params, cfg, dtype=written)  # the checkpoint's own dtype
    print(
        f"wrote {out}: a Hugging Face model directory with the adapter folded in (W + s·A·B), "
        f"in {written} as the checkpoint"
    )


def cmd_merge(args: argparse.Namespace) -> None:
    """Folds a run's adapter into the base and saves the merged weights."""
    from jlora.models.formats.weights import save_params

    if args.format == "hf":
        _merge_hf(args.run_dir)
        return
    config, task, params, cfg = _restore(args.run_dir)
    merged = dense_model(params, cfg)
    out = os.path.join(args.run_dir, "merged.safetensors")
    meta = {"model": config.model.kind, "merged_from": os.path.abspath(args.run_dir)}
    meta.update(getattr(task, "weights_metadata", {}))
    save_params(out, merged, meta)
    print(f"wrote {out}: the base with the adapter folded in (W + s·A·B), no adapters left")


def cmd_export_peft(args: argparse.Namespace) -> None:
    """Writes a run's adapter as a PEFT LoRA adapter directory, ``RUN_DIR/peft/``.

    A decoder run records its base so that
    ``peft.AutoPeftModelForCausalLM.from_pretrained(RUN_DIR/peft)`` loads it alone: a Hugging
    Face directory (the built-in model's included) is named as it is; a GGUF file or package
    is first written as one, ``RUN_DIR/base_hf/``. A ``bert`` run writes the adapter for the
    ``BertModel`` of all-MiniLM-L6-v2, without a base path.
    """
    from jlora.models.bert import PEFT_MAPPING as BERT_MAPPING
    from jlora.models.decoder import PEFT_MAPPING as DECODER_MAPPING
    from jlora.models.pretrained import load_pretrained, resolve_source, save_pretrained

    config = rundir.load_run_config(args.run_dir)
    out = os.path.join(args.run_dir, "peft")
    if config.model.kind == "bert":
        _, _, params, cfg = _restore(args.run_dir)
        jlora.export_peft(out, params, cfg, BERT_MAPPING)
        print(f"wrote {out}: a PEFT LoRA adapter (load it onto the matching PyTorch model)")
        return
    source = resolve_source(config.model.decoder)
    base = load_pretrained(config.model.decoder)
    base_dir = os.path.abspath(source)
    if not os.path.isdir(source):  # PEFT loads its base from a Hugging Face directory
        base_dir = os.path.abspath(os.path.join(args.run_dir, "base_hf"))
        save_pretrained(base_dir, base)
    params, cfg = jlora.load_adapter(
        os.path.join(args.run_dir, "adapter"), prepare_base(config, base.params)
    )
    jlora.export_peft(
        out,
        params,
        cfg,
        DECODER_MAPPING,
        base_model_name_or_path=base_dir,
        task_type="CAUSAL_LM",
    )
    print(
        f"wrote {out}: a PEFT LoRA adapter on {base_dir}; serve it with "
        f"peft.AutoPeftModelForCausalLM.from_pretrained({out!r})"
    )


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluates the base and the adapted model of a run."""
    _, task, params, cfg = _restore(args.run_dir)
    extra = task.load_extra(args.run_dir)
    base = task.evaluate(jlora.dequantize(jlora.split(params)[1]), extra)
    adapted = task.evaluate(dense_model(params, cfg), extra)
    for key in adapted:
        print(f"{key}: base {base[key]:.4f}  adapted {adapted[key]:.4f}")


def cmd_generate(args: argparse.Namespace) -> None:
    """Samples from a run's adapted language model (merged: ``W + s·A·B`` folded in)."""
    config = rundir.load_run_config(args.run_dir)  # refusals before any weight is read
    if config.model.kind != "llama":
        raise ValueError(
            f"generate needs a language-model run; {args.run_dir!r} is a {config.model.kind} run"
        )
    given = [f for f, v in (("--top-k", args.top_k), ("--top-p", args.top_p)) if v is not None]
    given += ["--chat"] if args.chat else []
    if args.system is not None and not args.chat:
        raise ValueError("--system is the system turn of a chat; add --chat")
    config, task, params, cfg = _restore(args.run_dir)
    merged = dense_model(params, cfg)
    options = {"top_k": args.top_k, "top_p": args.top_p, "chat": args.chat, "system": args.system}
    print(
        task.generate(
            merged, args.prompt, args.max_new_tokens, args.temperature, args.seed, **options
        )
    )


def cmd_summary(args: argparse.Namespace) -> None:
    """What a config would do, without training: ``jlora finetune --dry-run``'s report.

    For a decoder only its config and tokenizer are read: the parameter shapes come from
    ``jax.eval_shape`` over the decoder, so a 7B model is summarised without its weights.
    """
    path, overrides = _split_args(args.args)
    print(dry_run(*read_config(path, overrides)))


def cmd_plan(args: argparse.Namespace) -> None:
    """The memory a config's train step needs per device, from abstract shapes (no weights).

    A mesh of N devices is compiled on N CPU devices when the default backend has fewer, so
    the CPU backend is asked for them before JAX starts.
    """
    from jlora.runner.plan import format_plan, plan_run

    path, overrides = _split_args(args.args)
    config, given = read_config(path, overrides)
    devices = config.mesh.data * config.mesh.fsdp * config.mesh.tensor
    if devices > 1:
        import jax

        try:  # only possible before the first JAX computation of this process
            jax.config.update("jax_num_cpu_devices", devices)
        except RuntimeError:
            pass  # already started: plan_run says how many devices it needs
    print(format_plan(plan_run(config, given), args.device_memory))


def _memory_size(text: str) -> int:
    from jlora.models.formats.hf_dir import parse_size

    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a memory size such as 80GiB, 24GB or 16G, found {text!r}"
        ) from None


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, found {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], found {text}")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, found {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, found {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, found {value}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, found {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(
            f"must be a finite number >= 0, found {text} (0 is greedy decoding)"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``jlora`` command.

    Example:
      >>> build_parser().parse_args(["generate", "runs/default", "Hi"]).temperature
      0.7
      >>> build_parser().description.split("; ")[1].split(" (")[0]
      'subcommands: finetune, merge, export-peft, eval, generate, summary, plan'
    """
    parser = argparse.ArgumentParser(prog="jlora")
    sub = parser.add_subparsers(dest="command", required=True)
    config_help = (
        "a YAML config file, or the name of a config shipped with jlora: "
        f"{', '.join(shipped_configs())} (none given: default), followed by dotted key=value "
        "overrides, e.g. train.steps=50 lora.rank=4"
    )
    p = sub.add_parser("finetune", help="LoRA-fine-tune from a config (resumes if interrupted)")
    p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]", help=config_help)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print what the run would do and stop: the auto values resolved for the model "
        "and data (and why), the data statistics, what will be trained and the memory it "
        "takes; nothing is compiled, no weight read, no run directory created",
    )
    p.set_defaults(fn=cmd_finetune)
    p = sub.add_parser("merge", help="fold a run's adapter into the base and save it")
    p.add_argument("run_dir")
    p.add_argument(
        "--format",
        choices=("safetensors", "hf"),
        default="safetensors",
        help="safetensors: RUN_DIR/merged.safetensors (jlora's parameter tree); hf: "
        "RUN_DIR/merged_hf/, a Hugging Face model directory (decoder runs)",
    )
    p.set_defaults(fn=cmd_merge)
    p = sub.add_parser(
        "export-peft",
        help="write a run's adapter as a PEFT adapter directory, RUN_DIR/peft/",
        description="Writes RUN_DIR/peft/ (adapter_model.safetensors, adapter_config.json). A "
        "run of a checkpoint names its base there, so that "
        "peft.AutoPeftModelForCausalLM.from_pretrained('RUN_DIR/peft') loads base and adapter; "
        "a GGUF or package base is written first as the Hugging Face directory RUN_DIR/base_hf/.",
    )
    p.add_argument("run_dir", help="a run directory written by jlora finetune")
    p.set_defaults(fn=cmd_export_peft)
    p = sub.add_parser("eval", help="evaluate the base and the adapted model of a run")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("generate", help="sample from a run's adapted language model")
    p.add_argument("run_dir")
    p.add_argument("prompt")
    p.add_argument(
        "--max-new-tokens",
        type=_count,
        default=200,
        help="tokens to sample (>= 0; bytes for the built-in model); sampling stops at EOS",
    )
    p.add_argument(
        "--temperature", type=_temperature, default=0.7, help="softmax temperature; 0 is greedy"
    )
    p.add_argument(
        "--top-k", type=_positive, default=None, help="sample among the K most likely tokens"
    )
    p.add_argument(
        "--top-p", type=_probability, default=None, help="sample from the nucleus of mass P"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--chat",
        action="store_true",
        help="send PROMPT as a user message through the model's chat template; print the answer",
    )
    p.add_argument(
        "--system",
        metavar="TEXT",
        help="with --chat: a system message before PROMPT (e.g. the one the run trained with)",
    )
    p.set_defaults(fn=cmd_generate)
    # argparse %-formats help strings: a literal percent sign is written %%.
    p = sub.add_parser(
        "summary",
        help="what a config would do, as jlora finetune --dry-run: resolved values, data, "
        "adapted kernels (shapes, counts, %% trainable), memory",
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]", help=config_help)
    p.set_defaults(fn=cmd_summary)
    p = sub.add_parser(
        "plan",
        help="the memory a config's train step needs per device (base, adapters, optimizer "
        "state, temporaries) and whether it fits, compiled from abstract shapes: no weight, "
        "tokenizer or data read (a directory with config.json alone will do)",
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]", help=config_help)
    p.add_argument(
        "--device-memory",
        type=_memory_size,
        metavar="SIZE",
        help="a device's memory, e.g. 80GiB or 24GB: say whether the run fits in it",
    )
    p.set_defaults(fn=cmd_plan)
    # From the parser itself, so a new subcommand is listed without anyone remembering to.
    parser.description = (
        f"LoRA fine-tuning for JAX; subcommands: {', '.join(sub.choices)} "
        "(jlora SUBCOMMAND --help for each)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jlora`` console script; returns the exit status.

    Example:
      >>> main(["summary", "no/such.yaml"])
      2
    """
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except KeyboardInterrupt:
        # The training loop has already said where the run resumes from; no traceback.
        print(f"jlora {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"jlora {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only or full file system, a directory where a file was
        where = f" {err.filename!r}" if err.filename else ""
        print(f"jlora {args.command}: error:{where} {err.strerror or err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
