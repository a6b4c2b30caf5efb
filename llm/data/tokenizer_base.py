"""The tokenizer interface every kind implements, and the control tokens every vocabulary starts with.

``Tokenizer`` (an abstract base) shares decoding, the control-token ids and saving. The kinds build on it in
``llm.data.tokenizer`` (trained here: byte, char, sentencepiece; its ``load_tokenizer`` loads every kind) and
``llm.data.hf_tokenizer`` (imported with a Transformers model). The first imports the second, never the other way
round: the import-linter contract ``data-acyclic`` keeps the modules of ``llm.data`` free of import cycles.
"""

from __future__ import annotations

import codecs
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm.data.conventions import SourceConventions
from llm.io import atomic_write_json

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|unk|>")
SPECIAL_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
N_SPECIAL = len(SPECIAL_TOKENS)

CONFIG_FILE = "tokenizer.json"
FORMAT_VERSION = 1


class TokenizerError(ValueError):
    """A tokenizer cannot be trained, loaded or used as asked; the message names the file or value."""


class StreamDecoder:
    """Turns token ids fed one at a time into text, holding back incomplete UTF-8 sequences.

    Byte-fallback tokens can split one character over several ids; ``feed`` returns only the text
    completed so far, so printing it as tokens arrive never shows half a character.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly ""). Raises TokenizerError on a bad id."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id, self._skip_special))

    def finish(self) -> str:
        """Flush what is held back; an unfinished character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)


class Tokenizer(ABC):
    """Common interface. Subclasses set ``kind``, implement ``encode`` and describe their files.

    Decoding is shared: each id maps to a byte string (a special id to its literal text) and the
    concatenated bytes are decoded as UTF-8, invalid sequences becoming U+FFFD.
    """

    kind: str
    # "\n" is always a token of its own, so text encodes the same cut after any newline (llm.data.tokenize
    # encodes long texts in runs of lines); byte-level BPE merges "\n\n" and sets this False
    newline_splits: bool = True
    # an imported model's text conventions (llm.data.conventions); None: the project's own
    source: SourceConventions | None = None

    def __init__(self, id_to_bytes: list[bytes]):
        self._id_to_bytes = id_to_bytes
        self._hidden: frozenset[int] = frozenset()  # ids besides the control tokens that skip_special hides

    def set_source(self, source: SourceConventions | None) -> None:
        """Give the tokenizer an imported model's conventions (None: the project's); its added tokens are then
        hidden like control tokens when decoding with ``skip_special``."""
        self.source = source
        self._hidden = frozenset(source.special_tokens.values()) if source else frozenset()

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_bytes)

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(SPECIAL_IDS)

    def special_id(self, token: str) -> int:
        """Id of a control token such as ``"<|user|>"``. Raises TokenizerError for an unknown token."""
        try:
            return SPECIAL_IDS[token]
        except KeyError:
            raise TokenizerError(f"{token!r} is not a special token; known: {', '.join(SPECIAL_TOKENS)}") from None

    pad_id = property(lambda self: SPECIAL_IDS["<|pad|>"])
    bos_id = property(lambda self: SPECIAL_IDS["<|bos|>"])
    eos_id = property(lambda self: SPECIAL_IDS["<|eos|>"])
    end_id = property(lambda self: SPECIAL_IDS["<|end|>"])
    system_id = property(lambda self: SPECIAL_IDS["<|system|>"])
    user_id = property(lambda self: SPECIAL_IDS["<|user|>"])
    assistant_id = property(lambda self: SPECIAL_IDS["<|assistant|>"])
    unk_id = property(lambda self: SPECIAL_IDS["<|unk|>"])

    @staticmethod
    def is_special(token_id: int) -> bool:
        return 0 <= token_id < N_SPECIAL

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids for ``text``; never a special id. Raises UnicodeEncodeError for lone surrogates."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` applied to each text."""
        return [self.encode(text) for text in texts]

    def token_bytes(self, token_id: int, skip_special: bool = False) -> bytes:
        """The bytes a token stands for (a special token: its literal, or b"" when skipped)."""
        if not 0 <= token_id < len(self._id_to_bytes):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary of size {self.vocab_size}")
        if skip_special and (token_id < N_SPECIAL or token_id in self._hidden):
            return b""
        return self._id_to_bytes[token_id]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text for ``ids``; special ids render as their literal (e.g. "<|end|>") unless ``skip_special``.

        Accepts lists, numpy arrays and tensors. Raises TokenizerError for an id outside the vocabulary.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if ids and (min(ids) < 0 or max(ids) >= len(self._id_to_bytes)):
            bad = next(i for i in ids if not 0 <= i < len(self._id_to_bytes))
            raise TokenizerError(f"token id {bad} is outside the vocabulary of size {self.vocab_size}")
        table = self._id_to_bytes
        if skip_special:
            data = b"".join(table[i] for i in ids if i >= N_SPECIAL and i not in self._hidden)
        else:
            data = b"".join(table[i] for i in ids)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        """A decoder to feed generated ids one at a time (see StreamDecoder)."""
        return StreamDecoder(self, skip_special)

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` (and the kind's own files) into ``directory``, creating it; return it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "special_tokens": list(SPECIAL_TOKENS),
            **self._save_files(directory),
        }
        if self.source is not None:
            config["source"] = self.source.to_json()
        atomic_write_json(directory / CONFIG_FILE, config, indent=1, ensure_ascii=False)
        return directory

    def _save_files(self, directory: Path) -> dict[str, Any]:
        """Write kind-specific files; return extra entries for tokenizer.json."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size})"
