"""The fine-tuning runner behind ``jlora finetune``.

- ``config.py``: the typed run config; ``tasks/``: what is trained (a model and its data);
  ``data/``: the data readers; ``trainer/``: the loop, its hooks and sinks; ``rundir/``: the
  run directory and its checkpoints; ``variants.py`` and ``mesh.py``: the adapted model and
  its layout; ``report.py`` and ``plots.py``: what a run shows.
- Imports go one way: ``cli`` -> ``trainer`` -> ``tasks`` -> ``data`` -> ``jlora.models`` ->
  the library (``jlora``), and ``config`` is read by all; nothing here is imported by the
  library.
"""
