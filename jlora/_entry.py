"""The ``jlora`` console script: the command, or which extra to install when it cannot run.

``pip install jlora`` installs the library alone. The command (``jlora.cli``: the runner, the
built-in and Hugging Face/GGUF models, tokenizers, logging) needs ``pip install "jlora[cli]"``.
Without it the command would fail wherever it first imports one of that extra's packages, some
only inside a subcommand. So this wrapper looks for every package of the extra first (without
importing any) and, if one is missing, says which extra to install in one line.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

#: A module of each of the cli extra's packages (pyproject.toml) -> the package's name on PyPI.
CLI_EXTRA = {
    "flax": "flax",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "gguf": "gguf",
    "tokenizers": "tokenizers",
    "jinja2": "jinja2",
    "sentencepiece": "sentencepiece",
    "google.protobuf": "protobuf",
    "tensorboardX": "tensorboardX",
}


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it (its parent aside)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``jlora.cli.main`` once every package of the cli extra is installed.

    Args:
      argv: the command's arguments; ``None`` for ``sys.argv[1:]``.

    Returns:
      The command's exit status.

    Raises:
      SystemExit: (status 1, the message on stderr) ``jlora: the command needs the cli extra:
        pip install "jlora[cli]" (missing: PACKAGES)`` when a package of the cli extra is not
        installed.

    Example:
      >>> main(["summary", "no/such.yaml"])
      2
    """
    missing = [package for module, package in CLI_EXTRA.items() if not _installed(module)]
    if missing:
        raise SystemExit(
            'jlora: the command needs the cli extra: pip install "jlora[cli]" '
            f"(missing: {', '.join(missing)})"
        )
    from jlora.cli import main as command  # after the check: it imports the extra's packages

    return command(argv)
