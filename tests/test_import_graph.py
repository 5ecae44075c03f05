"""The import graph of ``jlora/``: no circle, and the library never imports the application.

Built from the source with ``ast``, not by importing: an edge ``a -> b`` for each module-level
``import b`` / ``from b import x`` of module ``a`` (relative ones resolved) whose target is a
module under ``jlora/``. ``from p import x`` points at ``p.x`` when that is a module, else at
``p``. Imports inside functions and under ``if TYPE_CHECKING:`` are left out (they run later or
never); class bodies and ``try`` / ``if`` / ``with`` blocks count, since they run on import. The
parent packages Python initialises on the way to a module are not edges, or every module would
point at ``jlora/__init__.py``.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jlora"

# The application: the library may not import these at module level.
APPLICATION = ("jlora.models", "jlora.runner", "jlora.cli")


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules():
    """``{dotted name: path}`` of every module under ``jlora/``."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_type_checking(test):
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def module_level_imports(body):
    """The ``Import`` / ``ImportFrom`` nodes that run when the module is imported."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        elif isinstance(node, ast.If):
            if not is_type_checking(node.test):
                yield from module_level_imports(node.body)
            yield from module_level_imports(node.orelse)
        elif isinstance(node, ast.ClassDef | ast.With):
            yield from module_level_imports(node.body)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from module_level_imports(block)
            for handler in node.handlers:
                yield from module_level_imports(handler.body)


def targets(name, path, node, known):
    """The modules under ``jlora/`` that one import statement of module ``name`` names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    base = node.module or ""
    if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([base] if base else [])])
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in known else base)
    return [t for t in out if t in known]


def import_graph():
    known = modules()
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = set()
        for node in module_level_imports(tree.body):
            edges.update(targets(name, path, node, known))
        edges.discard(name)  # a package's __init__ importing from itself
        graph[name] = edges
    return graph


def circles(graph):
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def one_cycle(graph, component):
    """A path ``a -> b -> ... -> a`` inside a strongly connected ``component``."""
    inside = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in inside)
        back = [w for w in nxt if w in seen]
        if back:
            return " -> ".join([*path[path.index(back[0]) :], back[0]])
        step = next(w for w in nxt if w not in seen)
        path.append(step)
        seen.add(step)


def is_library(name, path):
    """The library: ``jlora/*.py`` (less the command), ``jlora/_factorised``, ``jlora/peft``."""
    if name == "jlora.cli":
        return False
    parts = path.relative_to(PACKAGE).parts
    return len(parts) == 1 or parts[0] in ("_factorised", "peft")


def test_the_graph_sees_known_edges():
    graph = import_graph()
    assert "jlora._factorised.value" in graph["jlora._factorised"]  # __init__ -> own submodule
    assert "jlora._dora_norm" in graph["jlora._merge"]
    assert "jlora.peft._mapping" in graph["jlora.peft"]
    assert "jlora.peft" in graph["jlora.models.decoder"]
    assert "jlora._factorised.value" in graph["jlora._factorised.dora"]


def test_no_import_circle():
    graph = import_graph()
    found = circles(graph)
    described = "\n".join(f"{c}: {one_cycle(graph, c)}" for c in found)
    assert not found, f"import circles among jlora's modules:\n{described}"


def test_the_library_does_not_import_the_application():
    graph, known = import_graph(), modules()
    library = [name for name, path in known.items() if is_library(name, path)]
    assert {"jlora", "jlora._merge", "jlora._factorised.value", "jlora.peft"} <= set(library)
    assert not {"jlora.cli", "jlora.models", "jlora.runner"} & set(library)
    bad = {name: sorted(t for t in graph[name] if t.startswith(APPLICATION)) for name in library}
    bad = {name: t for name, t in bad.items() if t}
    assert not bad, f"library modules importing {APPLICATION} at module level: {bad}"


def test_circles_are_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert one_cycle(graph, ["a", "b", "c"]) == "a -> b -> c -> a"
