"""Transformers BPE tokenizers run by Hugging Face ``tokenizers``, behind ``Tokenizer``: byte-level BPE (GPT-2's,
also Llama 3's, SmolLM2's and Qwen's, kind ``bytelevel_bpe``) and sentencepiece-style BPE with byte fallback
(Llama 2's, TinyLlama's, Mistral's: pieces spell a space as U+2581 and unseen bytes as ``<0xNN>``, kind
``sentencepiece_bpe``).

The Transformers tokenizer (``tokenizer.json``) is stored in this project's id space: every id of the
original shifted up by ``N_SPECIAL``, so the control tokens keep ids ``0..N_SPECIAL-1`` as in every other
kind, written there as special added tokens (what a Transformers user of an exported folder sees).
Encoding goes through a copy without any added tokens and without a post-processor, so no text, whatever
it spells ("<|assistant|>", "<|endoftext|>"), encodes to a control id: it becomes ordinary pieces. Decoding
uses the bytes of each piece (the byte-level alphabet mapped back; U+2581 as a space and ``<0xNN>`` as its byte),
like the other kinds. A sentencepiece-style tokenizer puts a space before a text it encodes (its normalizer's
prepended U+2581), so its decoded text starts with that space, which Transformers' decoder strips.

``tokenizers`` is imported when such a tokenizer is built or loaded, never by the rest of the library.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from llm.data.conventions import SourceConventions
from llm.data.tokenizer_base import N_SPECIAL, SPECIAL_TOKENS, Tokenizer, TokenizerError
from llm.io import atomic_write_text

HF_FILE = "hf_tokenizer.json"  # beside our tokenizer.json: the Transformers tokenizer in our id space
KIND = "bytelevel_bpe"
SP_KIND = "sentencepiece_bpe"
_SP_SPACE = "\u2581"


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes for
    the code points 256, 257, ... in byte order, so every piece is printable text."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in byte_to_unicode().items()}


def _has_byte_level(component: dict | None) -> bool:
    if not component:
        return False
    if component.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(part) for part in component.get("pretokenizers", component.get("decoders", [])))


def control_added_tokens() -> list[dict[str, Any]]:
    return [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True} for i, token in enumerate(SPECIAL_TOKENS)]


def shift_hf_tokenizer(spec: dict[str, Any], source: str) -> dict[str, Any]:
    """A Transformers ``tokenizer.json`` (parsed) moved into this project's id space: ids + ``N_SPECIAL``, the
    control tokens added at ``0..N_SPECIAL-1``. Raises TokenizerError naming ``source`` when it is not a
    byte-level BPE."""
    model = spec.get("model") or {}
    if hf_kind(spec) is None:
        raise TokenizerError(f"{source}: only BPE tokenizers, byte-level (GPT-2, Llama 3, Qwen) or with byte "
                             f"fallback (Llama 2, Mistral), can be imported; this one is {model.get('type')!r} with "
                             f"pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')!r}")
    spec = copy.deepcopy(spec)
    spec["model"]["vocab"] = {piece: i + N_SPECIAL for piece, i in model["vocab"].items()}
    kept = [dict(t, id=t["id"] + N_SPECIAL) for t in spec.get("added_tokens") or []
            if t["content"] not in SPECIAL_TOKENS]
    spec["added_tokens"] = control_added_tokens() + kept
    # tokenizers gives an added token that is not a piece of the model a new id of its own: make each a piece
    spec["model"]["vocab"].update({t["content"]: t["id"] for t in spec["added_tokens"]})
    spec["truncation"] = spec["padding"] = None
    spec["post_processor"] = _shift_processor(spec.get("post_processor"))
    return spec


def hf_kind(spec: dict[str, Any]) -> str | None:
    """``bytelevel_bpe`` or ``sentencepiece_bpe`` for a ``tokenizer.json`` (parsed) this module can run, else None."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None
    if _has_byte_level(spec.get("pre_tokenizer")) or _has_byte_level(spec.get("decoder")):
        return KIND
    return SP_KIND if model.get("byte_fallback") else None


def _shift_processor(processor: Any) -> Any:
    """A post-processor (what ``tokenizer(text)`` adds: Llama's BOS) with its token ids moved by N_SPECIAL."""
    if not isinstance(processor, dict):
        return processor
    processor = dict(processor)
    if isinstance(processor.get("special_tokens"), dict):  # TemplateProcessing
        processor["special_tokens"] = {name: {**token, "ids": [i + N_SPECIAL for i in token.get("ids", [])]}
                                       for name, token in processor["special_tokens"].items()}
    for key in ("sep", "cls"):  # BertProcessing, RobertaProcessing: [token, id]
        if isinstance(processor.get(key), list) and len(processor[key]) == 2:
            processor[key] = [processor[key][0], processor[key][1] + N_SPECIAL]
    if isinstance(processor.get("processors"), list):  # Sequence
        processor["processors"] = [_shift_processor(p) for p in processor["processors"]]
    return processor


class ByteLevelBPETokenizer(Tokenizer):
    """A byte-level BPE ``tokenizer.json`` in this project's id space (see the module docstring).

    ``vocab_size`` may exceed the pieces (a model's embedding padded past its vocabulary): those ids decode
    to nothing and are never produced.
    """

    kind = KIND
    newline_splits = False  # GPT-2's pre-tokenizer keeps runs of whitespace such as "\n\n" together

    def __init__(self, spec: dict[str, Any], vocab_size: int | None = None, source: str = "tokenizer.json"):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise TokenizerError(f"{source}: a {KIND} tokenizer needs the `tokenizers` package "
                                 "(pip install -e '.[hf]' in the project folder)") from None
        self.spec, self._source = spec, source
        # nothing but BPE pieces: no added tokens, no control pieces (no merge makes them), no post-processor
        added = {t["content"] for t in spec.get("added_tokens") or []}
        vocab = {piece: i for piece, i in spec["model"]["vocab"].items() if piece not in SPECIAL_TOKENS}
        encoder_spec = {**spec, "added_tokens": [], "post_processor": None, "model": {**spec["model"], "vocab": vocab}}
        try:
            self._hf = HFTokenizer.from_str(json.dumps(encoder_spec))
        except Exception as err:  # tokenizers raises a bare Exception for a malformed file
            raise TokenizerError(f"{source}: not a valid tokenizers file: {err}") from None
        pieces: dict[int, bytes] = {i: token.encode() for i, token in enumerate(SPECIAL_TOKENS)}
        for piece, i in vocab.items():
            if piece in added:  # an added token: its text, not byte-level pieces
                pieces[i] = piece.encode()
                continue
            pieces[i] = self._piece_bytes(piece, source)
        low = min(vocab.values())
        if low < N_SPECIAL:
            raise TokenizerError(f"{source}: piece id {low} collides with the control tokens 0..{N_SPECIAL - 1}")
        size = max(max(pieces) + 1, vocab_size or 0)
        super().__init__([pieces.get(i, b"") for i in range(size)])

    def _piece_bytes(self, piece: str, source: str) -> bytes:
        try:
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        except KeyError:
            raise TokenizerError(f"{source}: piece {piece!r} is not in the byte-level alphabet") from None

    @classmethod
    def from_hf_folder(cls, folder: str | Path, vocab_size: int | None = None) -> ByteLevelBPETokenizer:
        """The tokenizer of a Transformers ``save_pretrained`` folder (``tokenizer.json``, or GPT-2's
        ``vocab.json`` + ``merges.txt``), shifted into this project's id space. ``vocab_size``: the size
        the model's embedding needs (original rows + N_SPECIAL). Raises TokenizerError naming the file."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if path.is_file():
            try:
                spec = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise TokenizerError(f"{path}: cannot read: {err}") from None
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            from tokenizers import ByteLevelBPETokenizer as HFByteLevel

            spec = json.loads(HFByteLevel(str(folder / "vocab.json"), str(folder / "merges.txt")).to_str())
            path = folder / "vocab.json"
        else:
            raise TokenizerError(f"{folder}: no tokenizer.json (nor vocab.json and merges.txt) to import")
        kind = SentencePieceBPETokenizer if hf_kind(spec) == SP_KIND else cls
        tokenizer = kind(shift_hf_tokenizer(spec, str(path)), vocab_size, str(path))
        tokenizer.set_source(read_source_conventions(folder, spec))
        return tokenizer

    def encode(self, text: str) -> list[int]:
        text.encode("utf-8")  # lone surrogates: UnicodeEncodeError, as every kind raises
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``encode``'s ids and the character span of ``text`` each one covers (for a chat template's SFT mask)."""
        text.encode("utf-8")
        encoding = self._hf.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(o) for o in encoding.offsets]

    def encode_batch(self, texts) -> list[list[int]]:
        texts = list(texts)
        for text in texts:
            text.encode("utf-8")
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def hf_json(self) -> str:
        """The Transformers ``tokenizer.json`` in this project's ids, control tokens as special added tokens."""
        return json.dumps(self.spec, ensure_ascii=False)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        atomic_write_text(directory / HF_FILE, self.hf_json())
        return {"model_file": HF_FILE}


class SentencePieceBPETokenizer(ByteLevelBPETokenizer):
    """A sentencepiece-style BPE ``tokenizer.json`` with byte fallback (Llama 2, TinyLlama, Mistral) in this
    project's id space: the same encoder, pieces read as text with U+2581 for a space and ``<0xNN>`` for a byte."""

    kind = SP_KIND

    def _piece_bytes(self, piece: str, source: str) -> bytes:
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace(_SP_SPACE, " ").encode("utf-8")


# ------------------------------------------------------------------------------- the source's conventions


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path}: cannot read: {err}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A token as tokenizer_config.json writes it: a string, or an AddedToken's ``{"content": ...}``."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The default chat template: ``chat_template.jinja`` (Transformers >= 4.43 writes it), else
    ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates)."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _wrapping_ids(spec: dict[str, Any], source: str) -> tuple[list[int], list[int]]:
    """What the source's post-processor puts before and after a text (``tokenizer(text)`` in Transformers)."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_str(json.dumps(spec))
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        raise TokenizerError(f"{source}: not a valid tokenizers file: {err}") from None
    bare = hf.encode("a b", add_special_tokens=False).ids
    full = hf.encode("a b", add_special_tokens=True).ids
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    raise TokenizerError(f"{source}: its post-processor changes the text's own ids; cannot tell what it adds")


def _id_list(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def read_source_conventions(folder: str | Path, spec: dict[str, Any]) -> SourceConventions:
    """The text conventions of the Transformers model in ``folder`` (``spec``: its parsed, unshifted
    ``tokenizer.json``), in this project's ids: what ``tokenizer(text)`` adds around a text (``add_bos_token`` /
    ``add_eos_token`` of ``tokenizer_config.json`` override the post-processor, as Transformers does), the EOS ids
    ``generate`` stops at (``generation_config.json``, else ``config.json``, else ``eos_token``), the pad id,
    the chat template and the added tokens. Raises TokenizerError naming an unreadable file."""
    folder = Path(folder)
    config = _read_json(folder / "tokenizer_config.json")
    added = {t["content"]: t["id"] for t in spec.get("added_tokens") or [] if t["content"] not in SPECIAL_TOKENS}
    vocab = {**spec["model"]["vocab"], **added}
    tokens = {key: text for key in ("bos_token", "eos_token", "pad_token", "unk_token")
              if (text := _token_text(config.get(key))) is not None}
    prefix, suffix = _wrapping_ids(spec, str(folder / "tokenizer.json"))
    bos, eos = vocab.get(tokens.get("bos_token")), vocab.get(tokens.get("eos_token"))
    if config.get("add_bos_token") is not None and bos is not None:
        prefix = [bos] if config["add_bos_token"] else [i for i in prefix if i != bos]
    if config.get("add_eos_token") is not None and eos is not None:
        suffix = [eos] if config["add_eos_token"] else [i for i in suffix if i != eos]
    generation = _read_json(folder / "generation_config.json")
    model = _read_json(folder / "config.json")
    eos_ids = (_id_list(generation.get("eos_token_id")) or _id_list(model.get("eos_token_id"))
               or ([eos] if eos is not None else []))
    pad = next(iter(_id_list(generation.get("pad_token_id")) or _id_list(model.get("pad_token_id"))
                    or _id_list(vocab.get(tokens.get("pad_token")))), None)
    shift = lambda ids: tuple(i + N_SPECIAL for i in ids)  # noqa: E731
    return SourceConventions(
        prefix_ids=shift(prefix), suffix_ids=shift(suffix), eos_ids=shift(eos_ids),
        pad_id=None if pad is None else pad + N_SPECIAL, chat_template=_chat_template(folder, config),
        template_tokens=tokens, special_tokens={text: i + N_SPECIAL for text, i in added.items()},
        origin=str(folder))


def load_bytelevel_bpe(directory: Path, config: dict[str, Any]) -> ByteLevelBPETokenizer:
    """The tokenizer ``Tokenizer.save`` wrote in ``directory`` (``config``: its parsed tokenizer.json)."""
    path = directory / str(config.get("model_file", HF_FILE))
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{path}: byte-level BPE file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path}: cannot read: {err}") from None
    if not isinstance(spec, dict) or "model" not in spec:
        raise TokenizerError(f"{path}: not a tokenizers file (no 'model')")
    kind = SentencePieceBPETokenizer if config.get("kind") == SP_KIND else ByteLevelBPETokenizer
    return kind(spec, config.get("vocab_size"), str(path))
