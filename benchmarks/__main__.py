"""Every benchmark in one command, each in its own process, into one JSON file.

    python -m benchmarks                      # CPU sizes (under 5 minutes on 2 cores)
    python -m benchmarks --device gpu         # llama_step on one 80 GB GPU (under 10 minutes)
    python -m benchmarks --device gpu --all   # and every other benchmark at its GPU sizes
    python -m benchmarks --device gpu --quick --platform cpu   # the GPU run's paths, tiny, on CPU
    python -m benchmarks --only train_step,dora_step --out results.json
    python -m benchmarks --quick              # smallest sizes: a smoke test, not a measurement
    python -m benchmarks --render             # then python -m benchmarks.render

Each benchmark runs as ``python benchmarks/NAME.py ARGS --json TMP`` in a fresh process (so no
compile cache, allocator state or XLA flag leaks from one into the next). Its ``--json`` output
(``settings``, ``platform``, markdown ``tables``, and its raw numbers as ``results``) goes into
the results file under its name, with the ``command`` line and the ``seconds`` it took, beside
a description of the machine, the package versions and the date. With ``--only`` and an
existing results file, the named entries are replaced and the others kept. The file is
rewritten after every benchmark, so an interrupted run keeps what it measured. A benchmark
that fails is recorded with its error and the run goes on; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FORCE_8_DEVICES = "--xla_force_host_platform_device_count=8"


# name -> sizes per device ("cpu": what `python -m benchmarks` runs, "gpu": --device gpu,
# "smoke": --quick); None: not run on that device, with the reason in SKIP.
BENCHMARKS: dict[str, dict[str, list[str] | None]] = {
    "train_step": {
        "cpu": ["--quick"],
        "gpu": [
            *("--d-model", "1024", "--layers", "8", "--heads", "16", "--seq", "512"),
            *("--batch", "16", "--vocab", "32000", "--rounds", "20"),
        ],
        "smoke": [
            *("--quick", "--d-model", "64", "--layers", "1", "--heads", "2", "--seq", "16"),
            *("--batch", "2", "--vocab", "64", "--rounds", "1"),
        ],
    },
    "collectives": {
        "cpu": ["--quick"],
        "gpu": [],  # compiled for 8 host CPU devices either way (one GPU has no mesh)
        "smoke": ["--quick", "--widths", "32"],
    },
    "dora_step": {
        "cpu": ["--quick"],
        "gpu": ["--tokens", "16384", "--seq", "1024", "--d", "1024", "--layers", "8"],
        "smoke": ["--quick", "--tokens", "64", "--seq", "32", "--d", "32", "--reps", "1"],
    },
    "experts_step": {
        "cpu": ["--quick"],
        "gpu": ["--tokens", "2048", "--d", "1024", "--rounds", "30"],
        "smoke": ["--quick", "--experts", "2", "--tokens", "16", "--d", "32", "--rounds", "1"],
    },
    "moe_step": {
        "cpu": ["--quick"],
        "gpu": [
            *("--experts", "64", "--top-k", "8", "--d", "1024", "--layers", "4"),
            *("--vocab", "32000", "--batch", "4", "--seq", "512", "--rounds", "20"),
        ],
        "smoke": [
            *("--quick", "--experts", "4", "--top-k", "2", "--d", "32", "--layers", "1"),
            *("--vocab", "64", "--batch", "1", "--seq", "16", "--rounds", "1"),
        ],
    },
    "mixed_batch": {
        "cpu": ["--quick"],
        "gpu": ["--rows", "32", "--seq", "512", "--d", "1024", "--layers", "8"],
        "smoke": ["--quick", "--rows", "4", "--seq", "8", "--d", "32", "--reps", "1"],
    },
    "op_profile": {
        "cpu": ["--quick"],
        "gpu": None,
        "smoke": [
            *("--quick", "--d-model", "64", "--layers", "1", "--heads", "2", "--seq", "16"),
            *("--batch", "2", "--vocab", "64", "--reps", "1"),
        ],
    },
    "qlora": {
        "cpu": ["--quick"],
        "gpu": ["--d", "4096", "--layers", "8", "--tokens", "4096"],
        "smoke": ["--quick", "--d", "64", "--layers", "2", "--tokens", "16", "--reps", "1"],
    },
    "real_model": {
        "cpu": ["--quick"],
        "gpu": [
            *("--batch", "8", "--seq", "512", "--decode-batches", "1,8"),
            *("--prompt", "128", "--new", "128"),
        ],
        "smoke": ["--quick", "--parts", "decode", "--new", "2", "--decode-rounds", "1"],
    },
    "instruction_step": {
        "cpu": ["--quick"],
        "gpu": ["--batch", "16", "--seq", "512", "--pack-seq", "512", "--rounds", "10"],
        "smoke": [
            *("--quick", "--batch", "1", "--seq", "16", "--pack-seq", "32"),
            *("--min-len", "4", "--max-len", "16", "--rounds", "1"),
        ],
    },
    "gemma_step": {
        "cpu": ["--quick"],
        "gpu": ["--batch", "8", "--seq", "512", "--rounds", "10", "--load-rounds", "3"],
        "smoke": ["--quick", "--parts", "step", "--seq", "8", "--rounds", "1"],
    },
    "preference_step": {
        "cpu": ["--quick"],
        "gpu": ["--pairs", "8", "--seq", "512", "--rounds", "10"],
        "smoke": ["--quick", "--seq", "16", "--rounds", "1"],
    },
    "sampling": {
        "cpu": ["--quick", "--batches", "1,8,32", "--rounds", "7"],
        "gpu": ["--batches", "1,8,32", "--prompt", "128", "--new", "128", "--rounds", "10"],
        "smoke": ["--quick", "--batches", "1", "--prompt", "8", "--new", "2", "--rounds", "1"],
    },
    "grpo_step": {
        "cpu": ["--quick"],
        "gpu": [
            *("--prompts", "8", "--generations", "8", "--prompt-len", "128", "--new", "128"),
            *("--rounds", "10"),
        ],
        "smoke": [
            *("--quick", "--prompts", "1", "--generations", "2", "--prompt-len", "8"),
            *("--new", "2", "--rounds", "1"),
        ],
    },
    "import_time": {"cpu": ["--quick"], "gpu": ["--quick"], "smoke": ["--rounds", "1"]},
    "remat": {
        "cpu": ["--rounds", "3"],  # the default 1 x 2,048 tokens: long enough for memory to matter
        "gpu": [
            *("--batch", "4", "--seq", "4096", "--d", "1024", "--layers", "8"),
            *("--heads", "16", "--vocab", "32000", "--rounds", "10"),
        ],
        "smoke": [
            *("--quick", "--seq", "32", "--d", "32", "--layers", "1", "--heads", "2"),
            *("--vocab", "64", "--rounds", "1"),
        ],
    },
    "planner": {
        "cpu": ["--quick"],
        "gpu": [],
        "smoke": [
            *("--quick", "--batch", "2", "--seq", "16"),
            *("--llama-layers", "1", "--llama-seq", "32"),
        ],
    },
    "llama_step": {"cpu": None, "gpu": [], "smoke": ["--quick"]},
    "attention": {
        "cpu": ["--seqs", "1024,4096,16384", "--rounds", "3"],
        "gpu": ["--seqs", "1024,4096,16384", "--dtype", "bfloat16", "--rounds", "10"],
        "smoke": ["--quick", "--seqs", "64,128", "--block", "32", "--rounds", "1"],
    },
    "long_loss": {
        "cpu": ["--batch", "4", "--seq", "1024", "--time-batch", "1", "--rounds", "3"],
        "gpu": ["--batch", "4", "--seq", "1024", "--time-batch", "4", "--rounds", "10"],
        "smoke": ["--quick", "--seq", "16", "--layers", "1", "--vocab", "4096", "--rounds", "1"],
    },
}
SKIP = {
    "op_profile": "XLA:CPU op names and trace events only",
    "llama_step": "1B and 8B models, sized for one 80 GB accelerator (--device gpu)",
}
#: What ``--device gpu`` runs without ``--only`` or ``--all``: what fits ten minutes on an H100.
DEFAULT = {"cpu": list(BENCHMARKS), "gpu": ["llama_step"]}
PLATFORMS = {"cpu": "cpu", "gpu": "cuda"}  # jax's platform for each device, unless --platform


def environment(name: str, device: str, platform_name: str | None = None) -> dict[str, str]:
    """The benchmark's environment: its XLA flags, and the platform it must run on."""
    env = dict(os.environ)
    if name == "collectives":
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FORCE_8_DEVICES}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    else:  # no silent fallback
        env["JAX_PLATFORMS"] = platform_name or PLATFORMS[device]
    return env


def command_line(name: str, args: list[str], env: dict[str, str]) -> str:
    """How to run it by hand: the command recorded in the results and on the page."""
    prefix = f"XLA_FLAGS={FORCE_8_DEVICES} " if name == "collectives" else ""
    return prefix + shlex.join(["python", f"benchmarks/{name}.py", *args])


def machine(device: str, platform_name: str | None = None) -> dict[str, Any]:
    """What the numbers were measured on, read without importing jax in this process."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out: dict[str, Any] = {
        "device": device,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "system": platform.platform(),
        "python": platform.python_version(),
    }
    if platform_name:  # another platform than the device's: a test of its paths
        out["platform"] = platform_name
    elif device == "gpu":
        out["gpu"] = gpu_names()
    out["load_average_start"] = load_average()  # other jobs on the machine: noisier numbers
    return out


def load_average() -> float | None:
    """The 1-minute load average (runnable processes), where the system reports one."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for package in ("jax", "jaxlib", "flax", "optax"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def gpu_names() -> list[str]:
    """The GPUs jax sees, asked in a child process (this one never allocates on them).

    Raises:
      SystemExit: when jax sees no GPU, with what it said.
    """
    probe = "import jax; print('\\n'.join(d.device_kind for d in jax.devices('gpu')))"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # jax says what it found
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    if got.returncode or not got.stdout.strip():
        last = (got.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(
            f"--device gpu: jax finds no GPU here ({last}). Install jax with CUDA support "
            '(pip install -U "jax[cuda12]") on a machine with an NVIDIA GPU, or run the CPU '
            "benchmarks without --device."
        )
    return got.stdout.splitlines()


def run_one(
    name: str, args: list[str], device: str, platform_name: str | None = None
) -> dict[str, Any]:
    """Runs one benchmark in a child process; its ``--json`` output plus how it was run."""
    env = environment(name, device, platform_name)
    entry: dict[str, Any] = {"command": command_line(name, args, env), "args": args}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        argv = [sys.executable, str(HERE / f"{name}.py"), *args, "--json", str(out)]
        print(f"\n$ {entry['command']}", flush=True)
        start = time.perf_counter()
        got = subprocess.run(argv, env=env, cwd=HERE.parent, capture_output=True, text=True)
        entry["seconds"] = round(time.perf_counter() - start, 1)
        print(got.stdout, end="", flush=True)
        if got.returncode or not out.exists():
            print(got.stderr[-3000:], file=sys.stderr, flush=True)
            tail = got.stderr.strip().splitlines()[-20:]
            return entry | {"returncode": got.returncode, "error": "\n".join(tail)}
        result = json.loads(out.read_text())
    print(f"({name}: {entry['seconds']:.0f} s)", flush=True)
    shown = {key: result.pop(key) for key in ("settings", "platform", "tables")}
    return entry | {"returncode": 0} | shown | {"results": result}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--only", help="comma-separated: " + ",".join(BENCHMARKS))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smallest sizes: a smoke test, not a measurement",
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="every benchmark (--device gpu alone runs " + ",".join(DEFAULT["gpu"]) + ")",
    )
    parser.add_argument(
        "--platform",
        help="run on this jax platform instead of the device's (e.g. --device gpu --quick "
        "--platform cpu: the GPU run's code paths on a machine without one; default results "
        "file benchmarks/results/DEVICE-on-PLATFORM.json, which the page does not read)",
    )
    parser.add_argument("--out", help="results file (default benchmarks/results/DEVICE.json)")
    parser.add_argument(
        "--render", action="store_true", help="then render docs/performance.md from the results"
    )
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else DEFAULT[args.device]
    names = list(BENCHMARKS) if args.all else names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {','.join(BENCHMARKS)}")
    args.names = names
    if args.render and args.platform:
        parser.error("--render publishes the results; a --platform run tests paths, not speed")
    stem = f"{args.device}-on-{args.platform}" if args.platform else args.device
    args.out = Path(args.out) if args.out else RESULTS / f"{stem}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = "smoke" if args.quick else args.device
    results: dict[str, Any] = {
        "machine": machine(args.device, args.platform),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "sizes": sizes,
        "benchmarks": {},
    }
    if args.only and args.out.exists():  # replace the named entries, keep the others
        old = json.loads(args.out.read_text())
        results["benchmarks"] = old.get("benchmarks", {})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    begin, failed = time.perf_counter(), []
    for name in args.names:
        settings = BENCHMARKS[name][sizes]
        if settings is None:
            results["benchmarks"][name] = {"skipped": f"not on {args.device}: {SKIP[name]}"}
            print(f"\n({name}: skipped on {args.device}: {SKIP[name]})")
        else:
            entry = run_one(name, settings, args.device, args.platform)
            entry["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            results["benchmarks"][name] = entry
            if entry["returncode"]:
                failed.append(name)
        results["seconds"] = round(time.perf_counter() - begin, 1)
        results["machine"]["load_average_end"] = load_average()
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{len(args.names)} benchmarks in {results['seconds']:.0f} s -> {args.out}")
    if failed:
        print(f"failed: {', '.join(failed)} (their errors are in {args.out})", file=sys.stderr)
    if args.render:
        from benchmarks import render

        render.main([f"--{args.device}", str(args.out)])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
