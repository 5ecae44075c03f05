"""The human-readable summary a run prints: parameters, scores before and after, samples."""

from __future__ import annotations

from typing import Any

from jlora.runner.rundir.directory import listing


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines() or [""])


def format_results(results: dict[str, Any], run_dir: str, seconds: float | None = None) -> str:
    """What LoRA did, from a run's ``results.json`` content.

    A line lists what the run directory holds (``RUN_FILES`` of
    :mod:`jlora.runner.rundir.directory` says what each entry is).

    Example:
      >>> r = {"before": {"eval_loss": 2.0}, "after": {"eval_loss": 1.5},
      ...      "trainable_params": 10, "adapter_params": 10, "total_params": 1000}
      >>> print(format_results(r, "runs/x").splitlines()[1])
      trainable 10 of 1,000 parameters (1.000%); adapter files hold 10
    """
    before, after = results["before"], results["after"]
    share = 100.0 * results["trainable_params"] / results["total_params"]
    lines = [
        f"== what LoRA did ({run_dir}) ==",
        f"trainable {results['trainable_params']:,} of {results['total_params']:,} parameters "
        f"({share:.3f}%); adapter files hold {results['adapter_params']:,}",
    ]
    for key in sorted(k for k in after if isinstance(after[k], float)):
        lines.append(f"{key}: before {before[key]:.4f} -> after {after[key]:.4f}")
    if "accuracy" in before:
        lines.append("(before: a head trained alone on the frozen encoder; after: LoRA + head)")
    for i, (b, a) in enumerate(
        zip(before.get("samples", []), after.get("samples", []), strict=False)
    ):
        lines += [f"sample {i + 1} before:", _indent(b), f"sample {i + 1} after:", _indent(a)]
    lines.append(f"run dir {run_dir}: {', '.join(listing(run_dir)) or '(empty)'}")
    if seconds is not None:
        lines.append(f"took {seconds:.0f} s")
    return "\n".join(lines)
