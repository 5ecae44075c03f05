"""Chat templates: a conversation rendered to text exactly as ``transformers`` renders it.

Same Jinja environment as ``transformers.utils.chat_template_utils``: a sandboxed, immutable
environment with ``trim_blocks`` and ``lstrip_blocks``, loop controls, the ``raise_exception``
and ``strftime_now`` globals, and a ``tojson`` filter that does not HTML-escape. Templates see
``messages``, ``add_generation_prompt``, ``tools`` and ``documents`` (None unless given) and
whatever else the caller passes (a tokenizer passes ``bos_token``, ``eos_token``, ...).

``{% generation %}...{% endgeneration %}`` marks assistant text, as in transformers; the
character spans it covers come back from :func:`render_chat_template_spans` so that loss
masks can be derived from them. Unlike transformers, the spans are collected through the
render context, not state kept on the (shared, cached) environment.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import traceback
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

_SPANS = "__jlora_generation_spans__"


@dataclasses.dataclass
class _Tracker:
    rendered: int = 0  # characters yielded so far by the template's generator
    spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)


class _GenerationBlocks(jinja2.ext.Extension):
    """``{% generation %}`` blocks: render their body and record where it landed."""

    tags = {"generation"}  # noqa: RUF012 (jinja's own class attribute)

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_track", [nodes.ContextReference()])
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _track(self, context: jinja2.runtime.Context, caller: Any) -> str:
        text: str = caller()
        tracker = context.get(_SPANS)
        if isinstance(tracker, _Tracker):
            tracker.spans.append((tracker.rendered, tracker.rendered + len(text)))
        return text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' override: Jinja's own tojson HTML-escapes, which would change the text
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str, source: str = "<chat template>") -> jinja2.Template:
    """Compiles ``template`` in transformers' chat-template environment (cached).

    Args:
      template: the Jinja source, e.g. ``tokenizer_config.json``'s ``chat_template``.
      source: where it came from, for error messages (a file name).

    Raises:
      ValueError: if the template does not parse; the message names ``source`` and the line.

    Example:
      >>> compile_chat_template("{{ messages[0]['content'] | tojson }}").render(
      ...     messages=[{"content": "<b>é</b>"}])
      '"<b>é</b>"'
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlocks, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(
            f"chat template from {source} does not parse: line {err.lineno}: {err.message}; "
            "fix the Jinja syntax there"
        ) from None


def _render(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    source: str,
    variables: Mapping[str, Any],
    tracker: _Tracker | None,
) -> str:
    compiled = compile_chat_template(template, source)
    context = {"tools": None, "documents": None, **variables}
    context |= {"messages": messages, "add_generation_prompt": add_generation_prompt}
    if tracker is not None:
        context[_SPANS] = tracker
    pieces = []
    try:
        for piece in compiled.generate(**context):
            pieces.append(piece)
            if tracker is not None:
                tracker.rendered += len(piece)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as err:
        # Jinja rewrites tracebacks so that template frames carry template line numbers
        lines = [
            f.lineno for f in traceback.extract_tb(err.__traceback__) if f.filename == "<template>"
        ]
        where = f" at line {lines[-1]}" if lines else ""
        raise ValueError(
            f"chat template from {source} failed to render{where}: {type(err).__name__}: {err}"
        ) from None
    return "".join(pieces)


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    source: str = "<chat template>",
    **variables: Any,
) -> str:
    r"""Renders a conversation as ``tokenizer.apply_chat_template(..., tokenize=False)`` does.

    Args:
      template: the Jinja chat template.
      messages: ``[{"role": ..., "content": ...}, ...]``.
      add_generation_prompt: append the header that opens an assistant turn.
      source: where the template came from, for error messages.
      **variables: more template variables (``bos_token``, ``eos_token``, ``tools``, ...).

    Raises:
      ValueError: if the template does not parse or fails while rendering (including its own
        ``raise_exception``); the message names ``source``.

    Example:
      >>> chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
      ...           "<|im_end|>\n{% endfor %}"
      ...           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
      >>> render_chat_template(chatml, [{"role": "user", "content": "Hi"}],
      ...                      add_generation_prompt=True)
      '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n'
    """
    return _render(template, messages, add_generation_prompt, source, variables, None)


def render_chat_template_spans(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    source: str = "<chat template>",
    **variables: Any,
) -> tuple[str, list[tuple[int, int]]]:
    r"""Renders like :func:`render_chat_template` and returns the ``{% generation %}`` spans.

    Each span is ``(start, end)``: ``text[start:end]`` is one block's output, in order. They
    equal the character indices transformers computes for ``return_assistant_tokens_mask``.

    Raises:
      ValueError: as :func:`render_chat_template`.

    Example:
      >>> t = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}"
      ...      "{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}"
      ...      "{{ m['content'] }}{% endif %}\n{% endfor %}")
      >>> text, spans = render_chat_template_spans(
      ...     t, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
      >>> spans, [text[a:b] for a, b in spans]
      ([(21, 22)], ['4'])
    """
    tracker = _Tracker()
    text = _render(template, messages, add_generation_prompt, source, variables, tracker)
    return text, tracker.spans
