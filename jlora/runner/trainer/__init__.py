"""The training loop and what runs around it: hooks, metric sinks, Ctrl-C handling.

The loop (:mod:`~jlora.runner.trainer.loop`) knows nothing of what is trained: it steps a
jitted update over a task's batches, stops on a non-finite loss or Ctrl-C, and calls hooks.
"""
