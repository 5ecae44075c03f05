"""How long ``import jlora`` takes beside ``import jax, optax``, measured in a fresh process.

    python benchmarks/import_time.py             # median of 5 fresh interpreters
    python benchmarks/import_time.py --rounds 1 [--json out.json]

Each round starts a new interpreter (nothing cached in ``sys.modules``) that times
``import jax, optax`` and then ``import jlora`` on top of them; the ratio is jlora's own import
time over that of its two main dependencies. A ratio well above 0.1 means something heavy
(flax, the models, orbax) is imported again: ``import jlora`` once loaded Flax, the models and
their file formats.
"""

import argparse
import json
import statistics
import subprocess
import sys

from _common import report, write_json

# Packages of the cli extra (and orbax) that a light `import jlora` must not load.
HEAVY = {"flax", "orbax", "tokenizers", "jinja2", "gguf", "yaml", "matplotlib", "tensorboardX"}

# Run in the fresh interpreter; prints one JSON line.
CHILD = """
import json, sys, time
t0 = time.perf_counter()
import jax, optax
t1 = time.perf_counter()
import jlora
t2 = time.perf_counter()
print(json.dumps({"jax_optax_s": t1 - t0, "jlora_s": t2 - t1, "modules": sorted(sys.modules)}))
"""


def measure(python: str = sys.executable) -> dict:
    """One fresh interpreter's ``{"jax_optax_s", "jlora_s", "modules"}`` (modules after both)."""
    out = subprocess.run([python, "-c", CHILD], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="fresh interpreters (median)")
    parser.add_argument("--quick", action="store_true", help="the suite's size (3 rounds)")
    parser.add_argument("--json", help="write settings, the table and the numbers here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 3
    runs = [measure() for _ in range(args.rounds)]
    base = statistics.median(r["jax_optax_s"] for r in runs)
    own = statistics.median(r["jlora_s"] for r in runs)
    heavy = sorted({m.split(".")[0] for r in runs for m in r["modules"]} & HEAVY)
    tables: list = []
    header = ["import", "seconds", "vs `import jax, optax`"]
    rows = [
        ["`import jax, optax` (fresh interpreter)", f"{base:.2f}", "1.00x"],
        ["`import jlora` after them", f"{own:.2f}", f"{own / base:.2f}x"],
    ]
    note = "Heavy packages loaded: " + (", ".join(heavy) if heavy else "none") + "."
    report(tables, "import_time", f"Median of {args.rounds} fresh interpreters", header, rows, note)
    write_json(args.json, args, tables, jax_optax_s=base, jlora_s=own, heavy=heavy)


if __name__ == "__main__":
    main()
