"""A labelled text source every Python install has: standard-library docstrings by module family.

Each example is the first paragraph of the docstring of a public function, class or method of a
CPython standard-library module, whitespace-collapsed; its label is the family of modules it comes
from (``"text"``, ``"files"``, ``"network"``, ``"math"``, ``"concurrency"``, ``"data"``). Only
the modules listed in :data:`FAMILIES` are imported (none with side effects on import), and a
module that does not import on this platform is skipped. Objects re-exported from another
family's module are left out, and a text found in two families is dropped from both, so no
example carries two labels. The result is sorted, hence the same on every run of one Python
version; docstrings differ a little between versions.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

# Module families, after the sections of the Python library reference. Each gives >= 200 texts
# of >= MIN_CHARS characters on CPython 3.11.
FAMILIES: dict[str, tuple[str, ...]] = {
    "text": (
        "string", "re", "textwrap", "difflib", "unicodedata", "stringprep", "codecs", "locale",
        "gettext", "shlex", "fnmatch", "html", "html.parser", "xml.etree.ElementTree",
        "xml.dom.minidom", "xml.sax", "xml.sax.saxutils", "xml.parsers.expat",
    ),
    "files": (
        "os", "os.path", "shutil", "pathlib", "glob", "tempfile", "filecmp", "stat", "fileinput",
        "io",
    ),
    "network": (
        "socket", "ssl", "select", "selectors", "socketserver", "ipaddress", "http.client",
        "http.server", "http.cookies", "http.cookiejar", "urllib.request", "urllib.parse",
        "urllib.robotparser", "email.message", "email.utils", "email.parser", "email.header",
        "smtplib", "imaplib", "poplib", "ftplib", "xmlrpc.client", "xmlrpc.server", "mimetypes",
        "wsgiref.simple_server",
    ),
    "math": (
        "math", "cmath", "statistics", "fractions", "decimal", "random", "numbers", "bisect",
        "heapq",
    ),
    "concurrency": (
        "threading", "multiprocessing", "multiprocessing.pool", "multiprocessing.managers",
        "multiprocessing.shared_memory", "asyncio", "concurrent.futures", "queue", "sched",
        "subprocess", "signal", "contextvars",
    ),
    "data": (
        "json", "csv", "pickle", "shelve", "dbm", "sqlite3", "zlib", "gzip", "bz2", "lzma",
        "zipfile", "tarfile", "base64", "binascii", "struct", "configparser", "plistlib",
        "hashlib", "hmac", "marshal", "array",
    ),
}  # fmt: skip
# Where a family's objects may be defined besides its own top-level modules (os.path is posixpath
# or ntpath). A leading underscore is ignored: _socket counts as socket, _io as io.
_ALSO_DEFINED_IN = {"files": ("posixpath", "ntpath")}
# A first paragraph that is only a call signature, as some C functions' docstrings begin.
_SIGNATURE = re.compile(r"[\w.]+\(.*\)(\s*->.*)?", re.S)
MIN_CHARS = 20


def first_paragraph(doc: object) -> str | None:
    r"""The first paragraph of ``doc`` that is not a bare signature, on one line; None if none.

    Example:
      >>> first_paragraph("f(x, y)\n\n  Add x\n  to y.\n\n  More.")
      'Add x to y.'
    """
    if not isinstance(doc, str):
        return None
    for par in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        text = " ".join(par.split())
        if text and not _SIGNATURE.fullmatch(text):
            return text
    return None


def _public_objects(module: Any) -> Iterator[Any]:
    """Public functions and classes of ``module`` and the public methods of those classes."""
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        yield obj
        if inspect.isclass(obj):
            for attr, value in sorted(vars(obj).items()):
                if not attr.startswith("_") and (
                    inspect.isroutine(value) or isinstance(value, (property, classmethod))
                ):
                    yield value


def _defined_in(obj: Any) -> str:
    """The top-level module that defines ``obj`` (the class's, for a method), underscores off."""
    owner = getattr(obj, "__module__", None) or getattr(
        getattr(obj, "__objclass__", None), "__module__", ""
    )
    return str(owner or "").lstrip("_").split(".")[0]


def _family_texts(family: str, min_chars: int) -> set[str]:
    modules = FAMILIES[family]
    homes = {m.split(".")[0] for m in modules} | set(_ALSO_DEFINED_IN.get(family, ()))
    texts = set()
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. sqlite3 or ssl built without their C library
            continue
        for obj in _public_objects(module):
            if _defined_in(obj) not in homes:
                continue  # re-exported from another family's module
            text = first_paragraph(getattr(obj, "__doc__", None))
            if text is not None and len(text) >= min_chars:
                texts.add(text)
    return texts


def stdlib_docstrings(
    families: Sequence[str] = tuple(FAMILIES), min_chars: int = MIN_CHARS
) -> dict[str, list[str]]:
    """``{family: sorted texts}``: first docstring paragraphs of each family's modules.

    Args:
      families: keys of :data:`FAMILIES`, the labels.
      min_chars: shorter texts are left out.

    Returns:
      For each family, its distinct texts in sorted order; a text that two of the requested
      families share is in neither.

    Raises:
      ValueError: for a family that is not in :data:`FAMILIES`.

    Example:
      >>> data = stdlib_docstrings(["math", "files"])
      >>> sorted(data), len(data["math"]) >= 150
      (['files', 'math'], True)
      >>> "Return the square root of x." in data["math"]
      True
    """
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(
            f"stdlib families {unknown} are unknown; for data.source='stdlib' choose "
            f"data.categories among {sorted(FAMILIES)}"
        )
    with warnings.catch_warnings():  # a deprecation warning on import is not the user's concern
        warnings.simplefilter("ignore")
        found = {f: _family_texts(f, min_chars) for f in dict.fromkeys(families)}
    shared = {t for f, ts in found.items() for g, us in found.items() if f < g for t in ts & us}
    return {f: sorted(ts - shared) for f, ts in found.items()}
