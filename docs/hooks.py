"""mkdocs hook: the site's view of files that live outside docs/, and a check of generated blocks.

The generated tables and lists are committed text, written by ``python docs/generate.py`` (see
its docstring); tests/test_docs.py fails when they are stale. The build only checks that every
``<!-- generated: NAME -->`` block is well formed (a known name, closed by its end line), so a
typo fails ``mkdocs build --strict`` without the build importing jlora.

Pages link the runnable examples as ``../examples/NAME.py``, which works on GitHub; the site has
no such directory, so ``on_files`` adds ``examples/*.py`` to it and ``on_page_markdown`` points
those links at the copies.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import sys
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files, InclusionLevel
from mkdocs.structure.pages import Page

_HERE = pathlib.Path(__file__).resolve().parent
ROOT = _HERE.parent
EXAMPLES = ROOT / "examples"
_FENCE = re.compile(r"(^```.*?^```)", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"(\]\()([^)\s#]+)([^)]*\))")


def _generate() -> Any:
    """docs/generate.py as a module (docs/ is not a package)."""
    name = "jlora_docs_generate"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _HERE / "generate.py")
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {_HERE / 'generate.py'} (docs/hooks.py needs it)")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    return sys.modules[name]


def on_files(files: Files, config: MkDocsConfig, **kwargs: Any) -> Files:
    """The mkdocs event: adds ``examples/*.py`` to the site, so pages can link them."""
    for path in sorted(EXAMPLES.glob("*.py")):
        # INCLUDED: exclude_docs leaves out *.py (docs/'s own scripts), but not these
        example = File.generated(
            config,
            f"examples/{path.name}",
            abs_src_path=str(path),
            inclusion=InclusionLevel.INCLUDED,
        )
        files.append(example)
    return files


def on_page_markdown(markdown: str, page: Page, **kwargs: Any) -> str:
    """The mkdocs event: checks the generated blocks and points example links at the site."""
    source = pathlib.Path(page.file.abs_src_path or "")
    _generate().blocks(source, markdown)  # raises on a malformed or unknown block

    def relink(match: re.Match[str]) -> str:
        target = (source.parent / match.group(2)).resolve()
        if target.parent != EXAMPLES or not target.is_file():
            return match.group(0)
        site_copy = ROOT / "docs" / "examples" / target.name  # where on_files put it
        link = os.path.relpath(site_copy, source.parent).replace(os.sep, "/")
        return f"{match.group(1)}{link}{match.group(3)}"

    parts = _FENCE.split(markdown)  # [text, fence, text, ...]: links in code stay as written
    return "".join(p if i % 2 else _LINK.sub(relink, p) for i, p in enumerate(parts))
