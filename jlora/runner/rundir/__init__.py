"""The run directory: its files and config, the lock that keeps one run in it, its checkpoints.

- :mod:`~jlora.runner.rundir.directory`: the layout, the saved config, ``metrics.jsonl``.
- :mod:`~jlora.runner.rundir.lock`: one process per run directory.
- :mod:`~jlora.runner.rundir.resume`: which checkpoint a run resumes from, and pruning.
"""
