"""mkdocs hook: pages that are generated from the code at build time, so they cannot drift.

A page holds a placeholder line such as ``<!-- generated: config-keys -->``; ``on_page_markdown``
replaces it with markdown rendered from jlora itself:

- ``primitive-rules``: the factorised engine's registry (primitive name -> rule), each rule's
  description taken from its docstring (or the function it wraps);
- ``refusals``: every ``raise Unsupported("...")`` in the modules that define those rules;
- ``config-keys``: every key of the runner's config dataclasses, with type, default and the
  meaning from the class's ``Attributes:`` docstring section;
- ``cli``: the ``--help`` of every ``jlora`` subcommand, from the argparse parser.

An unknown placeholder is an error, so a typo fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import itertools
import os
import pkgutil
import re
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

_PLACEHOLDER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)


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

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; fix it for a stable page
    build = next(
        getattr(cli, name)
        for name in ("build_parser", "parser", "make_parser")
        if hasattr(cli, name)
    )
    parser = build()
    out = [f"```text\n$ jlora --help\n{parser.format_help().rstrip()}\n```\n"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append(f"### `jlora {name}`\n")
                out.append(f"```text\n$ jlora {name} --help\n{sub.format_help().rstrip()}\n```\n")
    return "\n".join(out)


RENDERERS: dict[str, Callable[[], str]] = {
    "primitive-rules": render_rules,
    "refusals": render_refusals,
    "config-keys": render_config,
    "cli": render_cli,
}


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """The mkdocs event: replaces each ``<!-- generated: NAME -->`` line with its rendering."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in RENDERERS:
            raise KeyError(f"docs/hooks.py: unknown placeholder {name!r}; known: {list(RENDERERS)}")
        return RENDERERS[name]()

    return _PLACEHOLDER.sub(replace, markdown)
