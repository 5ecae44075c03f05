"""How long ``import jlora`` takes beside ``import jax, optax``, measured in a fresh process.

    python benchmarks/import_time.py             # median of 5 fresh interpreters
    python benchmarks/import_time.py --rounds 1

Each round starts a new interpreter (nothing cached in ``sys.modules``) that times
``import jax, optax`` and then ``import jlora`` on top of them; the ratio is jlora's own import
time over that of its two main dependencies: about 0.07 on 2 CPU cores, against 0.37 when
``import jlora`` still loaded Flax, the models and their file formats. A ratio well above 0.1
means something heavy (flax, the models, orbax) is imported again.
"""

import argparse
import json
import statistics
import subprocess
import sys

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="fresh interpreters (median)")
    args = parser.parse_args()
    runs = [measure() for _ in range(args.rounds)]
    base = statistics.median(r["jax_optax_s"] for r in runs)
    own = statistics.median(r["jlora_s"] for r in runs)
    print(f"import jax, optax: {base:.2f} s")
    print(f"import jlora (after them): {own:.2f} s")
    print(f"ratio: {own / base:.2f}")


if __name__ == "__main__":
    main()
