"""How a model expects its text: what starts a prompt, which ids end an answer, how a conversation is written.

A model trained here follows the project's conventions: ``<|bos|>`` starts every document and prompt, any control
token ends generation, and conversations use the project's chat template (``llm.data.chat_template``). A model
imported from Transformers (``llm import hf``) follows its source's, which ``SourceConventions`` records:

- ``prefix_ids`` / ``suffix_ids``: what the source's tokenizer puts around a text (``tokenizer(text)``): nothing for
  GPT-2 and Qwen3, ``<|begin_of_text|>`` (Llama 3) or ``<s>`` (Llama 2) in front;
- ``eos_ids``: the ids that end its generation (``generation_config.json``, else ``config.json``, else the
  tokenizer's ``eos_token``), and ``pad_id``;
- ``chat_template``: its Jinja chat template, when it has one (``llm.data.source_template`` renders it), with the
  token strings the template may name (``bos_token``, ``eos_token``, ...) and every added token of the source
  (``special_tokens``: text -> id), which only the template's own text can produce.

Ids are in this project's id space (the source's plus ``N_SPECIAL``). The record is stored with the tokenizer
(``tokenizer.json``'s ``source`` entry), so it travels wherever the tokenizer goes: checkpoints, the ONNX export,
registered models, the servers. A tokenizer without one (every tokenizer trained here, and every older file) keeps
the project's conventions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class ConventionsError(ValueError):
    """A stored ``source`` record is malformed; the message names the file and key."""


@dataclass(frozen=True)
class SourceConventions:
    """The text conventions of an imported model (see the module docstring). Ids are in this project's space."""

    prefix_ids: tuple[int, ...] = ()
    suffix_ids: tuple[int, ...] = ()
    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    chat_template: str | None = None
    template_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... as the template names
    special_tokens: dict[str, int] = field(default_factory=dict)  # every added token of the source: text -> id
    origin: str = ""  # the folder it was read from, for messages

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("prefix_ids", "suffix_ids", "eos_ids"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_json(cls, data: Any, source: str, vocab_size: int) -> SourceConventions:
        """The record ``to_json`` wrote, read from ``source``. Raises ConventionsError naming ``source`` and the key
        for a wrong type or an id outside ``vocab_size``."""
        if not isinstance(data, dict):
            raise ConventionsError(f"{source}: 'source' must be an object")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConventionsError(f"{source}: unknown key source.{unknown[0]}")
        ids = {key: _ids(data.get(key, []), f"{source}: source.{key}", vocab_size)
               for key in ("prefix_ids", "suffix_ids", "eos_ids")}
        pad = data.get("pad_id")
        if pad is not None:
            pad = _ids([pad], f"{source}: source.pad_id", vocab_size)[0]
        template = data.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise ConventionsError(f"{source}: source.chat_template must be a string or null")
        tokens = _str_map(data.get("template_tokens", {}), f"{source}: source.template_tokens", str)
        special = _str_map(data.get("special_tokens", {}), f"{source}: source.special_tokens", int)
        _ids(list(special.values()), f"{source}: source.special_tokens", vocab_size)
        return cls(**ids, pad_id=pad, chat_template=template, template_tokens=tokens, special_tokens=special,
                   origin=str(data.get("origin", "")))


def _ids(values: Any, where: str, vocab_size: int) -> tuple[int, ...]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConventionsError(f"{where} must be a list of token ids")
    bad = [v for v in values if not 0 <= v < vocab_size]
    if bad:
        raise ConventionsError(f"{where}: id {bad[0]} is outside the vocabulary of size {vocab_size}")
    return tuple(values)


def _str_map(values: Any, where: str, kind: type) -> dict[str, Any]:
    if not isinstance(values, dict) or not all(isinstance(k, str) and type(v) is kind for k, v in values.items()):
        raise ConventionsError(f"{where} must map strings to {kind.__name__}s")
    return dict(values)
