"""An imported model's own chat template: Jinja rendering as Transformers does it, then token ids and the SFT mask.

Rendering follows Transformers' ``apply_chat_template``: a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now``, a ``tojson`` that does
not escape HTML, the ``{% generation %}`` tag, and the source's token strings (``bos_token``, ``eos_token``, ...)
as variables. The rendered text is tokenized without adding anything (the template writes its own BOS), its
added tokens (``<|im_start|>``, ``<|eot_id|>``, ...) becoming their ids.

One difference, on purpose: an added token's text inside a message's content stays ordinary text. Transformers
would turn a user's "<|im_end|>" into the control id and let the user forge a turn; here only the template's own
text produces added tokens. To know which characters came from the messages, the template is rendered a second
time with each content replaced by a marker; when that rendering, markers put back, equals the real one, the
markers give exact spans (otherwise, for a template that rewrites contents, each content is looked up in order).

SFT mask (``render_chat(..., with_mask=True)``): the characters of the template's ``{% generation %}`` blocks when
it has them (Transformers' assistant mask); otherwise each assistant content and the end-of-turn token (one of
the source's EOS ids) that directly follows it. A token is trained when any of its characters is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from llm.data.tokenizer import Tokenizer

_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters that mark contents in the probe rendering
_GEN_OPEN, _GEN_CLOSE = "\ue002", "\ue003"  # around each {% generation %} block's output
_MARKERS = re.compile("[\ue000-\ue003]")


class ChatTemplateError(ValueError):
    """A chat template cannot be compiled or rendered; the message names the template's line."""


@lru_cache(maxsize=8)
def _compile(template: str, track: bool):
    """The template compiled in a sandbox like Transformers'; ``track`` marks {% generation %} output."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller) -> str:
            return f"{_GEN_OPEN}{caller()}{_GEN_CLOSE}" if track else caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"chat template, line {err.lineno}: {err.message}") from None


def _template_line(err: BaseException) -> str:
    """' line N' of the template where rendering failed, from the traceback Jinja rewrites, or ''."""
    tb, line = err.__traceback__, ""
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = f", line {tb.tb_lineno}"
        tb = tb.tb_next
    return line


def _render(template: str, messages: list[dict], add_generation_prompt: bool, tokens: Mapping[str, str],
            track: bool = False) -> str:
    import jinja2

    compiled = _compile(template, track)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"chat template{_template_line(err)}: {err}") from None
    except Exception as err:  # a template's own bug: a missing key, a wrong type
        raise ChatTemplateError(f"chat template{_template_line(err)}: {type(err).__name__}: {err}") from None


def _content_spans(template: str, messages: list[dict], add_generation_prompt: bool, tokens: Mapping[str, str],
                   text: str) -> list[tuple[int, int] | None]:
    """The character span of each message's content in ``text`` (the real rendering), None where not found."""
    contents = [m.get("content") if isinstance(m.get("content"), str) else None for m in messages]
    if not any(_MARKERS.search(c or "") for c in contents):
        probe = [dict(m, content=f"{_OPEN}{i}{_CLOSE}") if contents[i] is not None else m
                 for i, m in enumerate(messages)]
        marked = _render(template, probe, add_generation_prompt, tokens)
        spans, out, pos = [None] * len(messages), [], 0
        for match in re.finditer(f"{_OPEN}(\\d+){_CLOSE}", marked):
            out.append(marked[pos:match.start()])
            start = sum(map(len, out))
            i = int(match.group(1))
            out.append(contents[i])
            spans[i] = (start, start + len(contents[i]))
            pos = match.end()
        out.append(marked[pos:])
        if "".join(out) == text and marked.count(_OPEN) == sum(c is not None for c in contents):
            return spans
    spans, cursor = [], 0  # the template rewrites contents: find each one in order
    for content in contents:
        at = text.find(content, cursor) if content else -1
        spans.append((at, at + len(content)) if at >= 0 else None)
        cursor = at + len(content) if at >= 0 else cursor
    return spans


def _split_added(text: str, added: Mapping[str, int], protected: Sequence[tuple[int, int]]):
    """Yield ``(start, end, id or None)`` pieces of ``text``: an added token's text outside ``protected`` spans
    (leftmost, longest first, as ``tokenizers`` matches them) becomes its id, the rest plain text."""
    if not added:
        yield 0, len(text), None
        return
    pattern = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
    pos = 0
    for match in pattern.finditer(text):
        if any(s < match.end() and match.start() < e for s, e in protected):
            continue
        if match.start() > pos:
            yield pos, match.start(), None
        yield match.start(), match.end(), added[match.group()]
        pos = match.end()
    if pos < len(text):
        yield pos, len(text), None


def _encode_with_offsets(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    encode = getattr(tokenizer, "encode_with_offsets", None)
    if encode is not None:
        return encode(text)
    ids = tokenizer.encode(text)  # no offsets: spread the characters over the ids (only the mask needs them)
    return ids, [(len(text) * i // max(len(ids), 1), len(text) * (i + 1) // max(len(ids), 1)) for i in range(len(ids))]


def _trained_spans(template, messages, add_generation_prompt, tokens, text, spans, eos_text) -> list[tuple[int, int]]:
    """Character spans that carry the SFT loss (see the module docstring)."""
    if "generation" in template and not any(_MARKERS.search(str(m.get("content", ""))) for m in messages):
        marked = _render(template, messages, add_generation_prompt, tokens, track=True)
        if _MARKERS.sub("", marked) == text and _GEN_OPEN in marked:
            out, removed = [], 0
            for match in re.finditer(f"{_GEN_OPEN}(.*?){_GEN_CLOSE}", marked, flags=re.S):
                start = match.start() - removed
                out.append((start, start + len(match.group(1))))
                removed += 2
            return out
    trained = []
    for message, span in zip(messages, spans):
        if message.get("role") != "assistant" or span is None:
            continue
        end = span[1]
        closing = next((t for t in sorted(eos_text, key=len, reverse=True) if text.startswith(t, end)), None)
        trained.append((span[0], end + len(closing) if closing else end))
    return trained


def render_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                with_mask: bool = False) -> tuple[list[int], list[int] | None]:
    """``(ids, mask)`` of ``messages`` in the source's chat template of ``tokenizer`` (``tokenizer.source``); the
    mask (1: an SFT target) only ``with_mask``, else None. Raises ChatTemplateError naming the template's line
    when it fails to render (its ``raise_exception`` included)."""
    source = tokenizer.source
    if source is None or source.chat_template is None:
        raise ValueError("render_chat needs a tokenizer whose source model has a chat template")
    messages = [dict(m) for m in messages]
    tokens = source.template_tokens
    text = _render(source.chat_template, messages, add_generation_prompt, tokens)
    spans = _content_spans(source.chat_template, messages, add_generation_prompt, tokens, text)
    protected = [s for s in spans if s is not None]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for start, end, token_id in _split_added(text, source.special_tokens, protected):
        if token_id is not None:
            ids.append(token_id)
            offsets.append((start, end))
            continue
        piece_ids, piece_offsets = _encode_with_offsets(tokenizer, text[start:end])
        ids.extend(piece_ids)
        offsets.extend((start + s, start + e) for s, e in piece_offsets)
    if not with_mask:
        return ids, None
    eos_text = [t for t, i in source.special_tokens.items() if i in source.eos_ids]
    trained = _trained_spans(source.chat_template, messages, add_generation_prompt, tokens, text, spans, eos_text)
    mask = [int(any(s < te and ts < e for ts, te in trained)) for s, e in offsets]
    return ids, mask
