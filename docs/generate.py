"""Writes the generated parts of the docs and the README, each from its one source.

A generated block sits between two marker lines in a markdown file, so that it reads on GitHub
as committed text and is rewritten in place::

    <!-- generated: NAME [ARG] -->

    ...written by this script...

    <!-- end generated -->

``python docs/generate.py`` rewrites every block in README.md and docs/; ``--check`` writes
nothing and exits 1 naming the stale files (tests/test_docs.py runs the same check). The blocks
and where each comes from:

- ``primitive-rules``: the factorised engine's registry (primitive name -> rule), each rule's
  description taken from its docstring (or the function it wraps);
- ``refusals``: every ``raise Unsupported("...")`` in the modules that define those rules;
- ``config-keys``: every key of the runner's config dataclasses, with type, default and the
  meaning from the class's ``Attributes:`` docstring section;
- ``cli``: the ``--help`` of every ``jlora`` subcommand, from the argparse parser;
- ``api-summary``: the names of the page's own ``::: name`` lines, each with its docstring's
  summary line;
- ``pages``: the site's top-level pages from ``nav`` in mkdocs.yml, with the one-line summaries
  under ``extra.page_summaries`` there;
- ``needs``: what a page's code needs installed, from ``extra.page_needs`` in mkdocs.yml (one
  line at the top of every page);
- ``modules PACKAGE``: the modules and sub-packages of ``PACKAGE`` (e.g. ``jlora.runner``), each
  with its docstring's summary line, read from the source;
- ``imports``: which parts of ``jlora/`` import which at module level, read from the source;
- ``install``: the set-up commands that open README.md;
- ``supported``: the Python, JAX and Flax versions ``pyproject.toml`` accepts;
- ``architectures``: the checkpoint architectures that load, from
  ``jlora.models.decoder.SUPPORTED_ARCHITECTURES``;
- ``headline``: README's headline numbers, from ``benchmarks/results/cpu.json`` (written by
  ``python -m benchmarks``) and the default run's printed output;
- ``run NAME`` / ``run-excerpt NAME``: a run's output as printed (or its summary lines and last
  sample), from ``docs/outputs/NAME.txt``: paste a new run's stdout there and run this script.

An unknown block name, or a start marker without its end, is an error.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import itertools
import json
import os
import pathlib
import pkgutil
import re
import sys
import textwrap
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MKDOCS_YML = ROOT / "mkdocs.yml"
CPU_RESULTS = ROOT / "benchmarks" / "results" / "cpu.json"
OUTPUTS = DOCS / "outputs"  # printed outputs of runs, pasted as printed
PACKAGE = ROOT / "jlora"

_START = re.compile(r"^<!-- generated: ([a-z-]+)(?: ([\w.:,/-]+))? -->$")
_END = "<!-- end generated -->"
_WIDTH = 100  # the line length of the hand-written markdown


def _wrap(line: str) -> str:
    """A paragraph or a ``- `` list item wrapped to the page's line length (words stay whole).

    No line starts with what markdown would read as a new block (``+ x``, ``- x``, ``# x``,
    ``1. x``, ``> x``): the word before moves down with it.
    """
    indent = "  " if line.startswith("- ") else ""
    words = line.split()
    lines: list[list[str]] = [[]]
    for word in words:
        current = lines[-1]
        if (
            current
            and len(" ".join([*current, word])) + (len(indent) if len(lines) > 1 else 0) > _WIDTH
        ):
            lines.append([word])
            while len(lines[-2]) > 1 and re.match(r"^([-+*>]|#+|\d+[.)])$", lines[-1][0]):
                lines[-1].insert(0, lines[-2].pop())
        else:
            current.append(word)
    return "\n".join((indent if i else "") + " ".join(ws) for i, ws in enumerate(lines))


@dataclasses.dataclass(frozen=True)
class Block:
    """One generated block: its name and argument, the file it is in, and that file's text."""

    name: str
    arg: str | None
    path: pathlib.Path
    text: str

    def link(self, target: pathlib.Path) -> str:
        """A relative link from this block's file to ``target``, as markdown writes it."""
        return os.path.relpath(target, self.path.parent).replace(os.sep, "/")


def markdown_files() -> list[pathlib.Path]:
    """Every file that may hold generated blocks: README.md and the pages under docs/."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def blocks(path: pathlib.Path, text: str) -> list[tuple[int, int, str, str | None]]:
    """``(start line, end line, name, arg)`` of each generated block in ``text`` (0-based lines).

    Raises:
        ValueError: a start marker without its end marker, a second start before the end, an
            end marker without a start, or an unknown block name.
    """
    found = []
    open_at: tuple[int, str, str | None] | None = None
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for i, line in enumerate(text.splitlines()):
        start = _START.match(line)
        if start:
            if open_at is not None:
                raise ValueError(
                    f"{where}:{i + 1}: a generated block starts inside the one opened at line "
                    f"{open_at[0] + 1}; close that one with '{_END}' first"
                )
            if start.group(1) not in RENDERERS:
                raise ValueError(
                    f"{where}:{i + 1}: unknown generated block {start.group(1)!r}; "
                    f"known: {sorted(RENDERERS)}"
                )
            open_at = (i, start.group(1), start.group(2))
        elif line == _END:
            if open_at is None:
                raise ValueError(f"{where}:{i + 1}: '{_END}' without a start marker above it")
            found.append((open_at[0], i, open_at[1], open_at[2]))
            open_at = None
    if open_at is not None:
        raise ValueError(
            f"{where}:{open_at[0] + 1}: generated block {open_at[1]!r} has no '{_END}' line"
        )
    return found


def regenerate(path: pathlib.Path, text: str) -> str:
    """``text`` with every generated block rendered afresh; the rest is left as it is."""
    lines = text.splitlines()
    out: list[str] = []
    done = 0
    for start, end, name, arg in blocks(path, text):
        body = RENDERERS[name](Block(name, arg, path, text)).strip("\n")
        out += [*lines[done : start + 1], "", body, "", lines[end]]
        done = end + 1
    out += lines[done:]
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def stale() -> dict[pathlib.Path, str]:
    """``{file: what it should hold}`` for every file whose generated blocks are out of date."""
    result = {}
    for path in markdown_files():
        text = path.read_text(encoding="utf-8")
        fresh = regenerate(path, text)
        if fresh != text:
            result[path] = fresh
    return result


def rule_registry() -> Mapping[str, Callable[..., Any]]:
    """The factorised engine's ``{primitive name: rule}`` table, wherever it lives now.

    The engine is being moved into a package (issue 16), so this tries a public name first,
    then the package, then the flat module the registry lived in before.
    """
    candidates = (
        ("jlora", "RULES"),
        ("jlora._factorised", "RULES"),
        ("jlora._factorised.interpret", "RULES"),
        ("jlora._factorised._interpret", "RULES"),
        ("jlora._factorised.rules", "RULES"),
        ("jlora._factorised._rules", "RULES"),
        ("jlora._interpret", "RULES"),
    )
    try:  # and any submodule of the engine's package that holds a RULES table
        package = importlib.import_module("jlora._factorised")
        names = [m.name for m in pkgutil.iter_modules(getattr(package, "__path__", []))]
        candidates += tuple((f"jlora._factorised.{n}", "RULES") for n in sorted(names))
    except ImportError:
        pass
    for module, name in candidates:
        try:
            table = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(table, Mapping) and table and all(isinstance(k, str) for k in table):
            return table
    raise RuntimeError(
        "docs/hooks.py found no rule table (a dict of primitive name -> rule) in "
        f"{[m + '.' + n for m, n in candidates]}; point rule_registry() at its new home"
    )


# The kind of each rule, from the module that defines it (the engine's package) or, in the flat
# layout the engine had before, from the name of the factory or function that made it.
_MOVES, _CONSUMES, _HIGHER = "moves the kernel", "consumes the kernel", "higher-order"
_KINDS = {
    "moves": _MOVES,
    "consume": _CONSUMES,
    "interpret": _HIGHER,
    **dict.fromkeys(("_move", "_on_w_rule", "_concatenate"), _MOVES),
    "_consume": _CONSUMES,
    **dict.fromkeys(("_inline", "_remat", "_scan", "_while", "_cond", "_shard_map"), _HIGHER),
}


def _first_line(doc: str | None) -> str:
    return inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ") if doc else ""


def _inner_functions(fn: Any) -> list[Any]:
    """Functions a rule delegates to: its closure's callables and the names a lambda calls."""
    found = []
    for cell in getattr(fn, "__closure__", None) or ():
        value = cell.cell_contents
        if callable(value):
            found.append(value)
    code = getattr(fn, "__code__", None)
    if code is not None and fn.__name__ == "<lambda>":
        names = code.co_names
        for first, second in itertools.pairwise(names):
            obj = fn.__globals__.get(first)
            if isinstance(obj, types.ModuleType) and callable(getattr(obj, second, None)):
                found.append(getattr(obj, second))
    return found


def _describe(fn: Any, depth: int = 0) -> tuple[str, str]:
    """``(where, what)``: the documented function a rule comes down to, and its summary."""
    name = getattr(fn, "__qualname__", "")
    if fn.__doc__ and name and "<lambda>" not in name and name.split(".")[0] != "rule":
        module = fn.__module__.removeprefix("jlora.")
        return f"{module}.{name}", _first_line(fn.__doc__)
    if depth < 3:
        for inner in _inner_functions(fn):
            where, what = _describe(inner, depth + 1)
            if what:
                return where, what
    return "", ""


_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj):`~?([^`]+)`")
_CODE = re.compile(r"(``?)(.+?)\1")


def _escape(text: str) -> str:
    """Docstring text as a table cell: Sphinx roles as code, pipes outside code escaped."""
    text = _ROLE.sub(r"`\1`", text)
    parts = _CODE.split(text)  # [text, ticks, code, ticks, code, ..., text]
    out = []
    for i, part in enumerate(parts):
        if i % 3 == 0:
            out.append(part.replace("|", "\\|"))
        elif i % 3 == 2:
            out.append(f"`{part}`")
    return "".join(out)


def render_rules() -> str:
    """The supported-primitives table."""
    lines = ["| primitive | kind of rule | what it does | defined in |", "|---|---|---|---|"]
    for prim, rule in sorted(rule_registry().items()):
        factory = getattr(rule, "__qualname__", "").split(".")[0]
        where, what = _describe(rule)
        module = getattr(inspect.getmodule(rule), "__name__", "").rsplit(".", 1)[-1]
        kind = _KINDS.get(factory) or _KINDS.get(module, "")
        lines.append(f"| `{prim}` | {kind} | {_escape(what)} | {f'`{where}`' if where else ''} |")
    return "\n".join(lines)


def _engine_modules() -> list[types.ModuleType]:
    modules = {}
    registry = rule_registry()
    for rule in registry.values():
        for fn in [rule, *_inner_functions(rule)]:
            module = inspect.getmodule(fn)
            if module is not None and module.__name__.startswith("jlora"):
                modules[module.__name__] = module
    return [modules[k] for k in sorted(modules)]


def _message(node: ast.expr) -> str:
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            # a constant piece as written, a {placeholder} as an ellipsis
            parts.append(str(value.value) if isinstance(value, ast.Constant) else "{…}")
        return "".join(parts)
    return ast.unparse(node)


def render_refusals() -> str:
    """Every ``raise Unsupported(...)`` in the engine's modules, grouped by function."""
    lines = []
    for module in _engine_modules():
        tree = ast.parse(inspect.getsource(module))
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef):
                continue
            messages = []
            for node in ast.walk(func):
                call = node.exc if isinstance(node, ast.Raise) else None
                if (
                    isinstance(call, ast.Call)
                    and ast.unparse(call.func).split(".")[-1] == "Unsupported"
                    and call.args
                ):
                    messages.append(_message(call.args[0]))
            for text in dict.fromkeys(messages):
                short = module.__name__.removeprefix("jlora.")
                lines.append(f"| `{short}.{func.name}` | {_escape(text)} |")
    return "\n".join(["| where | refused |", "|---|---|", *lines])


def _attribute_docs(cls: type) -> dict[str, str]:
    """``{field: meaning}`` from a Google-style ``Attributes:`` section of ``cls``'s docstring."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    match = re.search(r"^Attributes:\n((?:[ \t]+.*\n?|\n)+)", doc, re.MULTILINE)
    if not match:
        return {}
    body = textwrap.dedent(match.group(1))
    meanings: dict[str, str] = {}
    current = None
    for line in body.splitlines():
        head = re.match(r"^(\w+)(?: \(.*?\))?: ?(.*)$", line)
        if head:
            current = head.group(1)
            meanings[current] = head.group(2).strip()
        elif current and line.strip():
            meanings[current] += " " + line.strip()
    return meanings


def _comment_docs(cls: type) -> dict[str, str]:
    """``{field: meaning}`` from ``# comments`` on or above a field line in the class body."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    meanings = {}
    above: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        field = re.match(r"^\s+(\w+): [^=]+(?:=.*)?$", line)
        if field:
            inline = line.split("  # ", 1)[1] if "  # " in line else ""
            text = " ".join([*above, inline]).strip()
            if text:
                meanings[field.group(1)] = text
        above = []
    return meanings


def _type_text(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


# Keys whose meaning the runner's docstrings do not give: listed so that the docs say so.
UNDOCUMENTED: list[str] = []


def render_config() -> str:
    """One table per config section: key, type, default, meaning."""
    from jlora import LoraConfig
    from jlora.runner import config

    choices = getattr(config, "CHOICES", {})
    fallbacks = {"LoraSection": _attribute_docs(LoraConfig)}
    root = config.RunConfig
    out = []
    UNDOCUMENTED.clear()

    def section(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        meanings = {
            **fallbacks.get(cls.__name__, {}),
            **_comment_docs(cls),
            **_attribute_docs(cls),
        }
        rows, nested = [], []
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            tp = hints[field.name]
            if dataclasses.is_dataclass(tp):
                nested.append((tp, f"{prefix}{field.name}."))
                continue
            key = prefix + field.name
            default = (
                field.default
                if field.default is not dataclasses.MISSING
                else field.default_factory()  # type: ignore[misc]
                if field.default_factory is not dataclasses.MISSING
                else "(required)"
            )
            default_text = "null" if default is None else repr(default)
            meaning = meanings.get(field.name, "")
            if key in choices:
                meaning += f" One of: {', '.join(f'`{c}`' for c in choices[key])}."
            if not meanings.get(field.name):
                UNDOCUMENTED.append(key)
            rows.append(
                f"| `{key}` | `{_type_text(tp)}` | `{default_text}` | {_escape(meaning.strip())} |"
            )
        if rows:
            title = prefix.rstrip(".") or "top level"
            summary = _escape(_first_line(cls.__doc__))
            out.append(f"### `{title}`\n\n{summary}\n")
            out.append("| key | type | default | meaning |\n|---|---|---|---|\n" + "\n".join(rows))
            out.append("")
        for tp, pre in nested:
            section(tp, pre)

    section(root, "")
    return "\n".join(out)


def render_cli() -> str:
    """``jlora --help`` and each subcommand's help, as the parser prints them."""
    from jlora import cli

    build = next(
        getattr(cli, name)
        for name in ("build_parser", "parser", "make_parser")
        if hasattr(cli, name)
    )
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; fix it for a stable page
    try:
        parser = build()
        out = [f"```text\n$ jlora --help\n{parser.format_help().rstrip()}\n```\n"]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    help_text = sub.format_help().rstrip()
                    out.append(f"### `jlora {name}`\n")
                    out.append(f"```text\n$ jlora {name} --help\n{help_text}\n```\n")
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(out)


_DIRECTIVE = re.compile(r"^::: ([\w.]+)$", re.MULTILINE)


def _resolve(dotted: str) -> Any:
    """The object a ``::: a.b.c`` line documents: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and module_name.startswith(e.name):
                continue  # not a module: an attribute of a shorter one
            raise
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"docs/generate.py: cannot import {dotted!r} (from a '::: {dotted}' line)")


def render_api_summary(block: Block) -> str:
    """The page's ``::: name`` entries as a list, each with its docstring's summary."""
    lines = []
    where = block.path.relative_to(ROOT) if block.path.is_relative_to(ROOT) else block.path
    for name in _DIRECTIVE.findall(block.text):
        try:
            obj = _resolve(name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{where}: '::: {name}' names nothing importable ({e})") from e
        summary = _first_line(inspect.getdoc(obj))
        if not summary:
            raise ValueError(f"{where}: {name} has no docstring to summarise")
        summary = _ROLE.sub(r"`\1`", summary)
        lines.append(f"- `{name}`: {summary}")
    if not lines:
        raise ValueError(f"{where}: an api-summary block on a page with no '::: name'")
    return "\n".join(lines)


def _mkdocs_config() -> dict[str, Any]:
    import yaml

    class Loader(yaml.SafeLoader):
        """mkdocs.yml as data: Python-name and ``!ENV`` tags read as null."""

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda *_: None)
    Loader.add_multi_constructor("!", lambda *_: None)
    return yaml.load(MKDOCS_YML.read_text(encoding="utf-8"), Loader=Loader)


def _first_page(target: str | list[Any]) -> str:
    """A nav entry's page: the page itself, or the first page of a section."""
    while not isinstance(target, str):
        target = next(iter(target[0].values()))
    return target


def render_pages(block: Block) -> str:
    """The site's top-level pages (mkdocs.yml ``nav``) with their summaries, linked from here."""
    config = _mkdocs_config()
    summaries = (config.get("extra") or {}).get("page_summaries") or {}
    lines, titles = [], []
    for item in config["nav"]:
        ((title, target),) = item.items()
        page = _first_page(target)
        if page == "index.md":  # Home: the README on GitHub, and the page that holds this list
            continue
        titles.append(title)
        if title not in summaries:
            raise ValueError(
                f"mkdocs.yml: nav entry {title!r} has no line under extra.page_summaries; add "
                f"one (README.md and docs/index.md list the pages from there)"
            )
        lines.append(_wrap(f"- [{title}]({block.link(DOCS / page)}): {summaries[title]}"))
    unused = sorted(set(summaries) - set(titles))
    if unused:
        raise ValueError(f"mkdocs.yml: extra.page_summaries names no nav entry: {unused}")
    return "\n".join(lines)


def setup_commands() -> list[str]:
    """The set-up commands that open README.md: its first ``bash`` block, fences included."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("```bash")
    return lines[start : lines.index("```", start + 1) + 1]


def render_architectures(block: Block) -> str:
    """The ``architectures`` a checkpoint's ``config.json`` may name to load as a decoder."""
    from jlora.models.decoder import SUPPORTED_ARCHITECTURES

    names = ", ".join(f"`{name}`" for name in SUPPORTED_ARCHITECTURES)
    return _wrap(f"Architectures that load (`config.json`'s `architectures`): {names}.")


def render_install(block: Block) -> str:
    """README's set-up commands, as they open README.md."""
    return "\n".join(setup_commands())


def render_supported(block: Block) -> str:
    """The Python, JAX and Flax versions that ``pyproject.toml`` accepts (Flax: where it is)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    groups = {"": project.get("dependencies", []), **project.get("optional-dependencies", {})}
    found: dict[str, str] = {}
    for extra, specs in groups.items():
        for spec in specs:
            name = re.match(r"[A-Za-z0-9_.-]+", spec)
            if name and name.group(0).lower() in ("jax", "flax"):
                where = f" (the `{extra}` extra)" if extra else ""
                found.setdefault(name.group(0).lower(), f"`{spec.replace(' ', '')}`{where}")
    python = project["requires-python"].replace(" ", "")
    python = f"{python[2:]} and newer" if re.fullmatch(r">=[\d.]+", python) else f"`{python}`"
    versions = ", ".join(found[name] for name in ("jax", "flax") if name in found)
    return f"Supported: {versions}, Python {python}."


def run_output(name: str) -> str:
    """The printed output of run ``name``, from ``docs/outputs/NAME.txt``."""
    path = OUTPUTS / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.relative_to(ROOT)} does not exist; paste the stdout of the run there "
            f"(as printed) and run python docs/generate.py"
        )
    return path.read_text(encoding="utf-8").rstrip("\n")


def run_facts(name: str) -> dict[str, str]:
    """The headline facts of a printed run: trainable %, eval loss before/after, time taken."""
    text = run_output(name)
    patterns = {
        "trainable": r"^trainable [\d,]+ of [\d,]+ parameters \(([\d.]+)%\)",
        "loss": r"^eval_loss: before ([\d.]+) -> after ([\d.]+)$",
        "took": r"^took (.+)$",
    }
    found = {}
    for key, pattern in patterns.items():
        match = re.search(pattern, text, re.MULTILINE)
        if match is None:
            raise ValueError(
                f"docs/outputs/{name}.txt: no line matching {pattern!r}; docs/generate.py reads "
                f"the headline numbers from it (update run_facts if the report's lines changed)"
            )
        found[key] = match
    before, after = (float(v) for v in found["loss"].groups())
    return {
        "trainable": f"{float(found['trainable'].group(1)):.1f}%",
        "before": f"{before:.2f}",
        "after": f"{after:.2f}",
        "took": found["took"].group(1),
    }


def render_run(block: Block) -> str:
    """A run's output as printed."""
    return f"```text\n{run_output(block.arg or '')}\n```"


def render_run_excerpt(block: Block) -> str:
    """A run's ``before -> after`` lines and its last sample, before and after.

    ``NAME:KEY,KEY`` keeps only the score lines of those keys, in the run's order.
    """
    name, _, keys = (block.arg or "").partition(":")
    lines = run_output(name).splitlines()
    scores = [line for line in lines if re.match(r"^[\w/]+: before .* -> after ", line)]
    if keys:
        scores = [line for line in scores if line.split(":")[0] in keys.split(",")]
    heads = [i for i, line in enumerate(lines) if re.match(r"^sample \d+ before:$", line)]
    sample: list[str] = []
    if heads:
        i = heads[-1]
        sample.append(lines[i])
        for line in lines[i + 1 :]:
            if not (line.startswith("    ") or re.match(r"^sample \d+ after:$", line)):
                break
            sample.append(line)
    if not scores:
        raise ValueError(f"docs/outputs/{name}.txt: no 'NAME: before X -> after Y' line ({keys})")
    return "```text\n" + "\n".join([*scores, *sample]) + "\n```"


def _table(results: Mapping[str, Any], name: str) -> tuple[list[str], dict[str, list[str]]]:
    """A benchmark table as the performance page shows it: its header and rows by first cell."""
    for bench in results["benchmarks"].values():
        for table in bench.get("tables", []):
            if table["name"] == name:
                return table["header"], {row[0]: row for row in table["rows"]}
    raise KeyError(f"{CPU_RESULTS.relative_to(ROOT)} has no table {name!r}")


def _cell(table: tuple[list[str], dict[str, list[str]]], row: str, column: str) -> str:
    header, rows = table
    return rows[row][header.index(column)]


def render_headline(block: Block) -> str:
    """README's headline numbers, from the benchmarks' results and the default run."""
    results = json.loads(CPU_RESULTS.read_text(encoding="utf-8"))
    bench = results["benchmarks"]
    machine, versions = results["machine"], results["versions"]

    step = _table(results, "train_step")
    settings = bench["train_step"]["settings"]
    params = bench["train_step"]["results"]["params"]

    smol = _table(results, "instruction_step")
    smol_rows = bench["instruction_step"]["results"]["rows"]

    def megabytes(row: str) -> str:
        r = smol_rows[row]
        return f"{(r['argument_bytes'] + r['output_bytes'] + r['temp_bytes']) / 2**20:.0f} MB"

    mesh = _table(results, "collectives")
    header, rows = mesh
    widest = list(rows.values())[-1]
    reduce_full = header.index("gradient reduction: full")

    qlora = bench["qlora"]["results"]["rows"]
    nf4 = next(r for r in qlora if r["base"] == "nf4")
    dora = _table(results, "dora_step")
    run = run_facts("default")
    perf = block.link(DOCS / "performance.md")
    started = block.link(DOCS / "getting_started.md")
    paragraphs = [
        f"Measured on {machine['cpu']} ({machine['cpu_count']} cores), jax "
        f"{versions['jax']}, {results['date'][:10]}: ratios side by side in one process "
        f"([Performance]({perf}); `benchmarks/results/cpu.json`).",
        "",
        f"- GPT-style decoder ({params / 1e6:.1f}M parameters, rank {settings['rank']} on "
        f"attention and MLP): the `jlora.lora` train step takes "
        f"**{_cell(step, 'jlora.lora', 'x full FT')}x the time of full fine-tuning** and "
        f"{_cell(step, 'jlora.lora', 'x limit')}x the limit (forward + activation backward, "
        f"no weight gradients); merging `W + s·A·B` inside the step takes "
        f"{_cell(step, 'merge W+sAB in step', 'x full FT')}x.",
        f"- SmolLM2-135M: the `jlora.lora` step takes "
        f"{_cell(smol, 'jlora.lora', 'time x full FT')}x full fine-tuning's time, its "
        f"buffers (arguments, outputs, temporaries) **{megabytes('jlora.lora')} against "
        f"{megabytes('full fine-tune')}** ({megabytes('jlora.lora, remat')} with `remat`).",
        f"- On a {bench['collectives']['settings']['mesh'].replace(',', 'x')} mesh at width "
        f"{widest[0]}, LoRA's gradient reduction moves {widest[reduce_full + 1]} per device "
        f"per step against full fine-tuning's {widest[reduce_full]}.",
        f"- NF4 bases store {nf4['bits']:g} bits per parameter; DoRA's step takes "
        f"{_cell(dora, 'DoRA step', 'x LoRA')}x plain LoRA's.",
        f"- `jlora finetune` (the default run): eval loss {run['before']} "
        f"-> {run['after']} nats/byte training {run['trainable']} of the parameters, in "
        f"{run['took']} ([the run as printed]({started}#the-first-fine-tune)).",
    ]
    return "\n".join(_wrap(p) if p else p for p in paragraphs)


def render_needs(block: Block) -> str:
    """What the page's code needs installed: its entry under ``extra.page_needs`` in mkdocs.yml.

    Keys are page paths under docs/ or globs (``api/*.md``); the first that matches wins.
    """
    import fnmatch

    needs = (_mkdocs_config().get("extra") or {}).get("page_needs") or {}
    page = block.path.relative_to(DOCS).as_posix() if block.path.is_relative_to(DOCS) else ""
    for pattern, text in needs.items():
        if fnmatch.fnmatchcase(page, pattern):
            return _wrap(f"**Needs:** {text}.")
    raise ValueError(
        f"mkdocs.yml: no entry under extra.page_needs matches docs/{page}; add one (what the "
        "page's code needs installed: the library alone, or which extra)"
    )


def _module_summary(path: pathlib.Path) -> str:
    """The summary line of a module's docstring, read with ``ast`` (nothing is imported)."""
    summary = _first_line(ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))))
    if not summary:
        raise ValueError(f"{path.relative_to(ROOT)} has no module docstring to summarise")
    return _ROLE.sub(r"`\1`", summary)


def render_modules(block: Block) -> str:
    """The modules and sub-packages of the package ``block.arg``, each with its summary line."""
    folder = ROOT.joinpath(*(block.arg or "").split("."))
    if not (folder / "__init__.py").is_file():
        raise ValueError(f"'modules {block.arg}': {folder.relative_to(ROOT)} is not a package")
    lines = []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and (entry / "__init__.py").is_file():
            files = sorted(f.name for f in entry.glob("*.py") if f.name != "__init__.py")
            listed = f" ({', '.join(f'`{f}`' for f in files)})" if files else ""
            summary = _module_summary(entry / "__init__.py")
            lines.append(_wrap(f"- `{entry.name}/`{listed}: {summary}"))
        elif entry.suffix == ".py" and entry.name != "__init__.py":
            lines.append(_wrap(f"- `{entry.name}`: {_module_summary(entry)}"))
    return "\n".join(lines)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when a module is imported.

    Those in functions run later, those under ``if TYPE_CHECKING:`` never.
    """
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            test = node.test
            checking = getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"
            found += [] if checking else _module_level_imports(node.body)
            found += _module_level_imports(node.orelse)
        elif isinstance(node, ast.ClassDef | ast.With):
            found += _module_level_imports(node.body)
        elif isinstance(node, ast.Try):
            for part in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                found += _module_level_imports(part)
    return found


def part_of(module: str) -> str:
    """The part of jlora a module belongs to, as the layout map names them.

    ``jlora.cli``, ``jlora._entry``, ``jlora.models``, ``jlora.runner.<module or sub-package>``,
    or ``library`` (``jlora/*.py``, ``_factorised/``, ``peft/``).
    """
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("cli", "_entry", "models", "conftest"):
        return ".".join(parts[:2])
    if len(parts) > 1 and parts[1] == "runner":
        return ".".join(parts[:3])
    return "library"


def import_edges() -> dict[str, set[str]]:
    """``{part: the other parts it imports at module level}``, from the source of ``jlora/``."""
    edges: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _module_level_imports(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, *([base] if base else [])])
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            for target in targets:
                if target == "jlora" or target.startswith("jlora."):
                    a, b = part_of(name), part_of(target)
                    if a != b:
                        edges.setdefault(a, set()).add(b)
    return edges


def render_imports(block: Block) -> str:
    """Each part of jlora with the parts it imports at module level (``library`` last)."""
    edges = import_edges()

    def label(part: str) -> str:
        return "the library" if part == "library" else f"`{part}`"

    lines = []
    for part in sorted(edges, key=lambda p: (p == "library", p)):
        if part == "jlora.conftest":
            continue
        targets = sorted(edges[part], key=lambda p: (p == "library", p))
        lines.append(_wrap(f"- {label(part)} → {', '.join(map(label, targets))}"))
    if "library" not in edges:
        lines.append("- the library → nothing else of jlora")
    return "\n".join(lines)


RENDERERS: dict[str, Callable[[Block], str]] = {
    "primitive-rules": lambda block: render_rules(),
    "refusals": lambda block: render_refusals(),
    "config-keys": lambda block: render_config(),
    "cli": lambda block: render_cli(),
    "api-summary": render_api_summary,
    "pages": render_pages,
    "install": render_install,
    "architectures": render_architectures,
    "supported": render_supported,
    "headline": render_headline,
    "run": render_run,
    "run-excerpt": render_run_excerpt,
    "needs": render_needs,
    "modules": render_modules,
    "imports": render_imports,
}


def main(argv: list[str] | None = None) -> int:
    """Rewrites the stale files (or, with ``--check``, names them and returns 1)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    files = stale()
    for path, text in files.items():
        if not args.check:
            path.write_text(text, encoding="utf-8")
        print(f"{'stale' if args.check else 'wrote'} {path.relative_to(ROOT)}")
    if args.check and files:
        print("run: python docs/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
