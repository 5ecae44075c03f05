"""The loss-curve PNG of a run: training loss per logged step and evaluation loss."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window

import matplotlib.pyplot as plt


def plot_losses(records: list[dict[str, Any]], path: str, title: str) -> None:
    """Draws ``train_loss`` and ``eval_loss`` records against their steps into ``path``.

    Example:
      >>> import os, tempfile
      >>> f = os.path.join(tempfile.mkdtemp(), "c.png")
      >>> plot_losses([{"step": 1, "train_loss": 2.0}, {"step": 1, "eval_loss": 1.5}], f, "t")
      >>> os.path.getsize(f) > 0
      True
    """
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, style in (("train_loss", "-"), ("eval_loss", "o-")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, style, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
