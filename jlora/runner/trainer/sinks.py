"""Where a run's metrics go: ``metrics.jsonl`` always, TensorBoard and W&B when asked for.

``metrics.jsonl`` is the record the runner resumes from and plots; TensorBoard event files
(tensorboardX) and Weights & Biases get the same records as scalars by step. A resumed run
rewinds each of them to its checkpoint's step: the JSONL lines after it are dropped,
TensorBoard is told to purge the events after it, and W&B continues the same run id.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, cast

from jlora.runner.config import RunConfig, to_dict
from jlora.runner.rundir import directory as rundir

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
_WANDB_ID_FILE = "run_id"


def check_sinks(config: RunConfig) -> None:
    """Refuses a sink that cannot be opened, before the run starts.

    Raises:
      ModuleNotFoundError: ``log.wandb`` without the ``wandb`` package, or ``log.tensorboard``
        without ``tensorboardX``, with the command that installs it.

    Example:
      >>> check_sinks(RunConfig())  # tensorboardX is a dependency of jlora
    """
    needed = [
        (config.log.tensorboard, "tensorboardX", "log.tensorboard=false"),
        (config.log.wandb, "wandb", "log.wandb=false"),
    ]
    for wanted, module, off in needed:
        if not wanted:
            continue
        try:
            __import__(module)
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                f"config asks for {module} logging, but {module} is not installed; "
                f"`pip install {module}` or set {off}"
            ) from None


class MetricSinks:
    """Appends metric records to every sink of a run; a context manager that closes them.

    Args:
      config: the run's config (``run_dir`` and the ``log`` section).
      resume_step: the step a resumed run restarts after (events after it are replaced), or
        ``None`` for a fresh run.

    Example:
      >>> import tempfile
      >>> d = tempfile.mkdtemp()
      >>> with MetricSinks(RunConfig(run_dir=d), None) as sinks:
      ...     sinks.append({"step": 1, "train_loss": 2.5})
      >>> rundir.read_metrics(d)
      [{'step': 1, 'train_loss': 2.5}]
      >>> sorted(os.listdir(d))
      ['metrics.jsonl', 'tensorboard']
    """

    def __init__(self, config: RunConfig, resume_step: int | None) -> None:
        """Opens the sinks the config asks for."""
        self.run_dir = config.run_dir
        self._tb: Any = None
        self._wandb: Any = None
        if config.log.tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(
                os.path.join(self.run_dir, TENSORBOARD_DIR),
                purge_step=None if resume_step is None else resume_step + 1,
            )
        if config.log.wandb:
            self._wandb = _open_wandb(config, resumed=resume_step is not None)

    def append(self, record: dict[str, Any]) -> None:
        """Writes ``record`` (it has a ``"step"``) to ``metrics.jsonl`` and the other sinks.

        Only numbers go to TensorBoard and W&B; other values (a config change) stay in JSONL.
        """
        rundir.append_metrics(self.run_dir, record)
        step = int(record["step"])
        scalars = {
            k: float(v)
            for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
        }
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flushes and closes every sink (the W&B run is finished)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricSinks:
        """The sinks, closed on leaving the block."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Closes the sinks."""
        self.close()


def _open_wandb(config: RunConfig, resumed: bool) -> Any:
    """A W&B run in ``run_dir/wandb``, the same run id across resumes."""
    import wandb

    folder = os.path.join(config.run_dir, WANDB_DIR)
    os.makedirs(folder, exist_ok=True)
    id_file = os.path.join(folder, _WANDB_ID_FILE)
    if resumed and os.path.isfile(id_file):
        with open(id_file, encoding="utf-8") as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with open(id_file, "w", encoding="utf-8") as f:
            f.write(run_id)
    return wandb.init(
        project=config.log.wandb_project,
        name=os.path.basename(os.path.normpath(config.run_dir)),
        id=run_id,
        resume="allow",
        dir=folder,
        mode=cast(Any, config.log.wandb_mode),
        config=to_dict(config),
    )
