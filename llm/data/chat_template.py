"""The chat template: how a conversation becomes token ids, and which of them carry the SFT loss.

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": str}`` messages::

    <|bos|> <|system|> You are JULIET. <|end|> <|user|> Romeo! <|end|> <|assistant|> My lord? <|end|>

Role and ``<|end|>`` markers are inserted as control-token ids; only the contents go through
``tokenizer.encode``, which never produces a control id, so a message that spells "<|assistant|>" stays
ordinary text and cannot forge a turn. With ``add_generation_prompt`` the ids end with ``<|assistant|>``:
the model's answer follows, and ends when it produces ``<|end|>``.

Loss mask: a token is *trained* (mask 1) when it is part of an assistant's content or the ``<|end|>`` that
closes an assistant message. Role markers, ``<|bos|>`` and every system/user token are context only (0).
The mask is aligned with the ids: ``mask[i]`` says whether ``ids[i]`` is a target to predict (from
``ids[:i]``); after the usual shift (inputs ``ids[:-1]``, targets ``ids[1:]``) the target mask is
``mask[1:]``.

An imported model with a chat template of its own (``tokenizer.source.chat_template``, ``llm.data.conventions``)
is written in that template instead (``llm.data.source_template``), with the same guarantee: only the template's
text produces its special tokens. ``prompt_ids`` and ``generation_stop_ids`` likewise follow the model's source.

Fitting a context (``fit_chat``, shared by SFT batching and the chat REPL): a conversation longer than
``max_tokens`` loses whole exchanges from its start (everything before a later user message), keeping
its leading system messages; if the last exchange alone is still too long, the start of its user message
is cut (the end is what the answer responds to); if that cannot make room, the conversation does not fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llm.data.source_template import render_chat
from llm.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")

Message = Mapping[str, str]


def _role_id(tokenizer: Tokenizer, role: str) -> int:
    if role not in ROLES:
        raise ValueError(f"unknown chat role {role!r}; expected one of {', '.join(ROLES)}")
    return tokenizer.special_id(f"<|{role}|>")


def encode_chat_with_mask(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    content_ids: Mapping[int, list[int]] | None = None,
) -> tuple[list[int], list[int]]:
    """``(ids, mask)`` of equal length in the chat template (see the module docstring): ``mask[i]`` is 1 where
    ``ids[i]`` is an assistant content token or the ``<|end|>`` closing an assistant message, else 0.
    ``content_ids`` replaces the encoded content of the messages at those indices (how ``fit_chat`` cuts a message
    by tokens). What ``encode_chat`` and ``fit_chat`` (SFT batching, the chat REPL) encode with.

    Raises ValueError for a role other than system, user or assistant.
    """
    if tokenizer.source is not None and tokenizer.source.chat_template is not None:
        messages = [dict(m, content=tokenizer.decode(content_ids[i])) if content_ids and i in content_ids else m
                    for i, m in enumerate(messages)]
        for message in messages:
            if message.get("role") not in ROLES:
                raise ValueError(f"unknown chat role {message.get('role')!r}; expected one of {', '.join(ROLES)}")
        ids, mask = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt, with_mask=True)
        return ids, mask
    ids, mask = [tokenizer.bos_id], [0]
    for i, message in enumerate(messages):
        role = message["role"]
        content = content_ids[i] if content_ids and i in content_ids else tokenizer.encode(message["content"])
        trained = int(role == "assistant")
        ids.append(_role_id(tokenizer, role))
        mask.append(0)
        ids.extend(content)
        mask.extend([trained] * len(content))
        ids.append(tokenizer.end_id)
        mask.append(trained)
    if add_generation_prompt:
        ids.append(tokenizer.assistant_id)
        mask.append(0)
    return ids, mask


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` in the chat template (see the module docstring): ``encode_chat_with_mask``'s ids.

    Raises ValueError for a role other than system, user or assistant.
    """
    return encode_chat_with_mask(tokenizer, messages, add_generation_prompt=add_generation_prompt)[0]


@dataclass
class FittedChat:
    """A conversation encoded to fit a token budget, and what was removed to make it fit."""

    ids: list[int]
    mask: list[int]
    messages: list[dict[str, str]]  # the messages kept (the cut user message holds its full text)
    dropped_messages: int = 0  # whole messages removed from the start (after the system messages)
    cut_tokens: int = 0  # tokens removed from the start of the last user message


def fit_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    max_tokens: int,
    *,
    add_generation_prompt: bool = False,
) -> FittedChat | None:
    """Encode ``messages`` in at most ``max_tokens`` ids, dropping old exchanges or cutting the last user
    message from its start as the module docstring describes. Returns None when even that cannot fit
    (the system messages plus the final answer are too long). Raises ValueError for an unknown role.
    """
    messages = [dict(m) for m in messages]
    ids, mask = encode_chat_with_mask(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    if len(ids) <= max_tokens:
        return FittedChat(ids, mask, messages)
    n_system = 0
    while n_system < len(messages) and messages[n_system]["role"] == "system":
        n_system += 1
    system, rest = messages[:n_system], messages[n_system:]
    user_starts = [i for i, m in enumerate(rest) if m["role"] == "user"]
    for start in user_starts:
        if start == 0:
            continue  # the whole conversation: already known not to fit
        kept = system + rest[start:]
        ids, mask = encode_chat_with_mask(tokenizer, kept, add_generation_prompt=add_generation_prompt)
        if len(ids) <= max_tokens:
            return FittedChat(ids, mask, kept, dropped_messages=start)
    if not user_starts:
        return None
    start = user_starts[-1]
    kept = system + rest[start:]
    content = tokenizer.encode(rest[start]["content"])
    fixed = len(encode_chat_with_mask(tokenizer, kept, add_generation_prompt=add_generation_prompt,
                                      content_ids={n_system: []})[0])
    room = max_tokens - fixed
    if room < 1:
        return None
    ids, mask = encode_chat_with_mask(tokenizer, kept, add_generation_prompt=add_generation_prompt,
                                     content_ids={n_system: content[-room:]})
    return FittedChat(ids, mask, kept, dropped_messages=start, cut_tokens=len(content) - room)


def generation_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The ids that end generation, in a chat and in plain continuation alike: every control token, and for an
    imported model its source's EOS ids (``generation_config.json``'s, as Transformers' ``generate`` stops).

    A model ends its answer with ``<|end|>``; any other control id it produces (``<|bos|>``, ``<|eos|>``,
    a role marker) starts something that is not the answer. Text never encodes to a control id.
    """
    source_eos = tokenizer.source.eos_ids if tokenizer.source is not None else ()
    return tuple(sorted({*tokenizer.special_ids.values(), *source_eos}))


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids a plain-text prompt is continued from: ``<|bos|>`` and the text for a model trained here; for an
    imported one, what its source's tokenizer gives (``tokenizer(text)``: GPT-2 nothing around it, Llama its BOS).
    Raises UnicodeEncodeError for a lone surrogate, as ``encode`` does."""
    if tokenizer.source is None:
        return [tokenizer.bos_id, *tokenizer.encode(text)]
    return [*tokenizer.source.prefix_ids, *tokenizer.encode(text), *tokenizer.source.suffix_ids]


def document_start_ids(tokenizer: Tokenizer) -> list[int]:
    """What starts each document in the token files: ``<|bos|>`` here; for an imported model its source's prefix
    (Llama's BOS), or, where it adds none (GPT-2, Qwen3), its first EOS id, the separator such models were trained
    with between documents."""
    if tokenizer.source is None:
        return [tokenizer.bos_id]
    if tokenizer.source.prefix_ids:
        return list(tokenizer.source.prefix_ids)
    return list(tokenizer.source.eos_ids[:1]) or [tokenizer.bos_id]
