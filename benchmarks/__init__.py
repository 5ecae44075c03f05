"""jlora's benchmarks: each a script; ``python -m benchmarks`` runs them all into one JSON file.

``python -m benchmarks.render`` turns those files into ``docs/performance.md``.
"""
