"""Tokenizers: text <-> token ids, four kinds behind one interface.

- ``byte``: the 256 UTF-8 byte values.
- ``char``: every character seen in training, with the 256 bytes as fallback for unseen ones.
- ``bpe`` / ``unigram``: sentencepiece subword models with byte fallback.
- ``bytelevel_bpe`` / ``sentencepiece_bpe``: a Transformers BPE (GPT-2's byte-level one, or Llama 2's with byte
  fallback) run by ``tokenizers``, imported with a model
  (``llm.data.hf_tokenizer``, ``llm import hf``), never trained here.

Every vocabulary starts with the same reserved control tokens at ids ``0..len(SPECIAL_TOKENS)-1``
(``<|pad|>`` is 0, ``<|bos|>`` is 1, ...), so chat formatting code can rely on the ids whatever the kind.
``encode`` never produces them: text that spells "<|assistant|>" encodes as ordinary characters.
Any UTF-8 text round-trips exactly: ``decode(encode(text)) == text``.

The interface (``Tokenizer``, ``TokenizerError``) and the control tokens live in ``llm.data.tokenizer_base``, which
the imported kinds (``llm.data.hf_tokenizer``) build on; this module re-exports them, and ``load_tokenizer`` loads
every kind, the imported ones through ``llm.data.hf_tokenizer`` (which never imports this module).
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from llm.config import TokenizerParams
from llm.data.conventions import SourceConventions
from llm.data.tokenizer_base import (  # the interface and the control tokens, re-exported: what callers import
    CONFIG_FILE,
    N_SPECIAL,
    SPECIAL_IDS,
    SPECIAL_TOKENS,
    StreamDecoder,  # noqa: F401 - re-exported with the interface
    Tokenizer,
    TokenizerError,
)
from llm.io import atomic_folder, atomic_write_bytes

log = logging.getLogger(__name__)

BYTE_OFFSET = N_SPECIAL  # byte/char kinds: byte value b has id BYTE_OFFSET + b

MODEL_FILE = "tokenizer.model"  # sentencepiece kinds only

_SP_SPACE = "\u2581"  # sentencepiece's visible space; decodes to " ", so a literal one needs byte tokens
_MAX_SENTENCE_CHARS = 4096  # longer lines are split before sentencepiece sees them
_SP_TRAIN_THREADS = 4  # fixed, not the machine's core count: unigram's vocabulary depends on it


def _special_and_byte_table() -> list[bytes]:
    return [token.encode() for token in SPECIAL_TOKENS] + [bytes([b]) for b in range(256)]


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte: ids ``BYTE_OFFSET + b``."""

    kind = "byte"

    def __init__(self) -> None:
        super().__init__(_special_and_byte_table())

    def encode(self, text: str) -> list[int]:
        return [BYTE_OFFSET + b for b in text.encode("utf-8")]


class CharTokenizer(Tokenizer):
    """One token per known character (ids after the bytes, in code point order); others fall back to bytes."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise TokenizerError("a char vocabulary must be distinct single characters")
        self.chars = list(chars)
        base = BYTE_OFFSET + 256
        self._char_to_id = {c: base + i for i, c in enumerate(self.chars)}
        super().__init__(_special_and_byte_table() + [c.encode("utf-8") for c in self.chars])

    def encode(self, text: str) -> list[int]:
        char_to_id = self._char_to_id
        try:
            return [char_to_id[c] for c in text]  # fast path: every character is known
        except KeyError:
            pass
        ids: list[int] = []
        for c in text:
            token_id = char_to_id.get(c)
            if token_id is None:
                ids.extend(BYTE_OFFSET + b for b in c.encode("utf-8"))
            else:
                ids.append(token_id)
        return ids

    def _save_files(self, directory: Path) -> dict[str, Any]:
        return {"chars": self.chars}


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (``bpe`` or ``unigram``) trained with byte fallback and identity normalization."""

    def __init__(self, kind: str, model_proto: bytes, source: str = "sentencepiece model"):
        if kind not in ("bpe", "unigram"):
            raise TokenizerError(f"{source}: sentencepiece kind must be bpe or unigram, got {kind!r}")
        self.kind = kind
        self._model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        for token, expected in SPECIAL_IDS.items():
            token_id = self._sp.piece_to_id(token)
            if token_id != expected or not (self._sp.is_control(token_id) or self._sp.is_unknown(token_id)):
                raise TokenizerError(f"{source}: {token} must be control token {expected}, found id {token_id}")
        super().__init__([self._piece_bytes(i) for i in range(self._sp.get_piece_size())])
        self._space_bytes = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SP_SPACE.encode("utf-8")]

    def _piece_bytes(self, token_id: int) -> bytes:
        piece = self._sp.id_to_piece(token_id)
        if self._sp.is_byte(token_id):  # "<0xAB>"
            return bytes([int(piece[3:5], 16)])
        return piece.replace(_SP_SPACE, " ").encode("utf-8")

    def encode(self, text: str) -> list[int]:
        if _SP_SPACE not in text:
            return self._sp.encode(text, out_type=int)
        # sentencepiece reads a literal U+2581 as a space; emit its UTF-8 bytes instead so it round-trips
        ids: list[int] = []
        for i, part in enumerate(text.split(_SP_SPACE)):
            if i:
                ids.extend(self._space_bytes)
            ids.extend(self._sp.encode(part, out_type=int))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        if any(_SP_SPACE in t for t in texts):
            return [self.encode(t) for t in texts]
        return self._sp.encode(texts, out_type=int, num_threads=os.cpu_count() or 1)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        atomic_write_bytes(directory / MODEL_FILE, self._model_proto)
        return {"model_file": MODEL_FILE}


def _capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Yield documents until ``max_chars`` characters have been yielded, cutting the last one."""
    left = max_chars
    for text in texts:
        text = text[:left]
        left -= len(text)
        yield text
        if left <= 0:
            return  # without reading another document


def _train_chars(texts: Iterable[str], coverage: float) -> list[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    for c in [c for c in counts if "\ud800" <= c <= "\udfff"]:  # lone surrogates are not UTF-8 text
        del counts[c]
    if coverage < 1.0:
        # keep the most frequent characters covering `coverage` of the text; the rest fall back to bytes
        total, covered, kept = sum(counts.values()), 0, []
        for c, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
            if covered >= coverage * total:
                break
            kept.append(c)
            covered += n
        return sorted(kept)
    return sorted(counts)


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """Lines of every document, without their newline.

    "\n" is a user-defined symbol, which sentencepiece always keeps as a piece of its own, so no
    learned piece can span a line break: feeding lines loses nothing and keeps sentences short.
    """
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), _MAX_SENTENCE_CHARS):
                yield line[start : start + _MAX_SENTENCE_CHARS]


def _train_sentencepiece(params: TokenizerParams, texts: Iterable[str]) -> SentencePieceTokenizer:
    meta = {"pad": "<|pad|>", "bos": "<|bos|>", "eos": "<|eos|>", "unk": "<|unk|>"}
    # sentencepiece places control symbols in the free ids in order, so they land on our ids
    control = [t for t in SPECIAL_TOKENS if t not in meta.values()]
    meta_args = {f"{name}_id": SPECIAL_IDS[tok] for name, tok in meta.items()}
    meta_args |= {f"{name}_piece": tok for name, tok in meta.items()}
    spm.set_random_generator_seed(params.seed)
    model = io.BytesIO()
    n_sentences = [0]  # to tell "no text" apart from other training errors

    def counted_sentences() -> Iterator[str]:
        for sentence in _sentences(texts):
            n_sentences[0] += bool(sentence)
            yield sentence

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted_sentences(),
            model_writer=model,
            model_type=params.kind,
            vocab_size=params.vocab_size,
            hard_vocab_limit=False,  # a small corpus gives a smaller vocabulary instead of an error
            character_coverage=params.character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            control_symbols=control,
            user_defined_symbols=["\n"],
            max_sentence_length=4 * _MAX_SENTENCE_CHARS,  # bytes: 4 per character at most
            input_sentence_size=0,  # use every sentence: max_train_chars already caps the input
            num_threads=_SP_TRAIN_THREADS,
            minloglevel=2,
            **meta_args,
        )
    except RuntimeError as err:
        if not n_sentences[0]:
            raise TokenizerError(f"cannot train a {params.kind} tokenizer: no training text") from None
        raise TokenizerError(
            f"sentencepiece {params.kind} training failed (vocab_size={params.vocab_size}): {err}"
        ) from None
    return SentencePieceTokenizer(params.kind, model.getvalue())


def train_tokenizer(params: TokenizerParams, texts: Iterable[str]) -> Tokenizer:
    """Train a tokenizer of ``params.kind`` on ``texts``, an iterable of documents read once, as a stream.

    At most ``params.max_train_chars`` characters are used. ``byte`` reads no text. Training is
    deterministic for the same text and params. Returns the tokenizer (call ``save`` to write it).
    Raises TokenizerError when sentencepiece cannot train (e.g. no text, or vocab_size below the
    265 reserved pieces plus the characters seen).
    """
    start = time.perf_counter()
    if params.kind == "byte":
        tokenizer: Tokenizer = ByteTokenizer()
    elif params.kind == "char":
        tokenizer = CharTokenizer(_train_chars(_capped(texts, params.max_train_chars), params.character_coverage))
    else:
        tokenizer = _train_sentencepiece(params, _capped(texts, params.max_train_chars))
    log.info(
        "trained %s tokenizer: vocab_size=%d in %.1fs", params.kind, tokenizer.vocab_size, time.perf_counter() - start
    )
    return tokenizer


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a tokenizer written by ``Tokenizer.save`` from ``directory``.

    Raises TokenizerError naming the file when a file is missing, unreadable, or inconsistent
    (unknown kind, different special tokens, wrong vocabulary size).
    """
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{path}: tokenizer file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path}: cannot read tokenizer config: {err}") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("special_tokens") != list(SPECIAL_TOKENS):
        raise TokenizerError(
            f"{path}: special tokens {config.get('special_tokens')} differ from {list(SPECIAL_TOKENS)}"
        )
    kind = config.get("kind")
    if kind == "byte":
        tokenizer: Tokenizer = ByteTokenizer()
    elif kind == "char":
        chars = config.get("chars")
        if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
            raise TokenizerError(f"{path}: 'chars' must be a list of characters")
        try:
            tokenizer = CharTokenizer(chars)
        except TokenizerError as err:
            raise TokenizerError(f"{path}: {err}") from None
    elif kind in ("bpe", "unigram"):
        model_path = Path(directory) / str(config.get("model_file", MODEL_FILE))
        try:
            proto = model_path.read_bytes()
        except FileNotFoundError:
            raise TokenizerError(f"{model_path}: sentencepiece model file not found") from None
        except OSError as err:
            raise TokenizerError(f"{model_path}: cannot read sentencepiece model: {err}") from None
        try:
            tokenizer = SentencePieceTokenizer(kind, proto, source=str(model_path))
        except (RuntimeError, OSError) as err:  # sentencepiece's error for a corrupt model
            raise TokenizerError(f"{model_path}: not a valid sentencepiece model: {err}") from None
    elif kind in ("bytelevel_bpe", "sentencepiece_bpe"):
        from llm.data.hf_tokenizer import load_bytelevel_bpe

        tokenizer = load_bytelevel_bpe(Path(directory), config)
    else:
        raise TokenizerError(f"{path}: unknown tokenizer kind {kind!r}; expected char, byte, bpe, unigram, "
                             "bytelevel_bpe or sentencepiece_bpe")
    if config.get("vocab_size") != tokenizer.vocab_size:
        raise TokenizerError(
            f"{path}: vocab_size {config.get('vocab_size')} does not match the loaded {tokenizer.vocab_size}"
        )
    if "source" in config:
        try:
            tokenizer.set_source(SourceConventions.from_json(config["source"], str(path), tokenizer.vocab_size))
        except ValueError as err:
            raise TokenizerError(str(err)) from None
    return tokenizer


def train_tokenizer_on_split(params: TokenizerParams, train_file: str | Path, out_dir: str | Path) -> Tokenizer:
    """The tokenizer stage: train on the documents of a cleaned split file and save into ``out_dir``.

    The folder is written under a temporary name and renamed, so a failed run leaves no tokenizer that
    looks complete. Returns the tokenizer. Raises TokenizerError if ``train_file`` is missing.
    """
    from llm.data.clean import iter_documents

    train_file, out_dir = Path(train_file), Path(out_dir)
    if not train_file.exists():
        raise TokenizerError(f"{train_file}: missing; run the clean stage first")
    tokenizer = train_tokenizer(params, iter_documents(train_file))
    with atomic_folder(out_dir) as tmp:
        tokenizer.save(tmp)
    return tokenizer
