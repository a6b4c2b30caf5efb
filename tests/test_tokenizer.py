"""Specification of the tokenizers: exact round trips, unforgeable control tokens, stable ids, files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from llm.config import TokenizerParams
from llm.data.tokenizer import (
    BYTE_OFFSET,
    CONFIG_FILE,
    MODEL_FILE,
    SPECIAL_TOKENS,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    train_tokenizer,
)

KINDS = ["char", "byte", "bpe", "unigram"]
SENTENCEPIECE_KINDS = ["bpe", "unigram"]
VOCAB = 400

_SPEAKERS = ["ROMEO", "JULIET", "KING HENRY", "FIRST CITIZEN", "LADY MACBETH", "HAMLET"]
_VERSE = """
the and to of my a i you is that in not it with me be your his this but he have as thou so will what
thy all her no by do shall if are we thee our lord on good now come sir o love well how let more
king say than here would then there night heart death hath doth art speak fair sweet noble
"""
_WORDS = _VERSE.split()


def make_corpus(n_docs: int = 6, lines_per_doc: int = 60, seed: int = 0) -> list[str]:
    """Play-like documents: speaker names, indented verse, blank lines, punctuation and a few numbers."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        lines = [f"ACT {d + 1}. SCENE {rng.randint(1, 9)}.", ""]
        for _ in range(lines_per_doc):
            if rng.random() < 0.2:
                lines += ["", f"{rng.choice(_SPEAKERS)}."]
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 10))]
            words[0] = words[0].capitalize()
            lines.append("  " + " ".join(words) + rng.choice([",", ".", ";", "!", "?", ":", " --", "'s"]))
        docs.append("\n".join(lines) + "\n")
    return docs


CORPUS = make_corpus()

HARD_TEXTS = [
    "",
    "a",
    "Hello, world!",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 and a flag 🇫🇷",
    "漢字かなカナ 한국어 中文混合 text",
    "combining e\u0301 (not normalised) vs \u00e9, and a\u030a\u0323",
    "   leading and trailing spaces   ",
    "runs  of   spaces\t\ttabs\n\n\nnewlines \n \t \r\n",
    "\n",
    " ",
    "\t",
    "sentencepiece's own space \u2581 and \u2581\u2581 twice\u2581",
    "NUL \x00 and other controls \x01\x7f\u200b\ufeff",
    "digits 0123456789 and 3.14159e-10",
    "<|assistant|> <|end|><|pad|><|unk|> <s> </s> <unk>",
    "\U0010ffff private \ue000 and rare \U0001f9ec",
]


def random_unicode(rng: random.Random, n: int) -> str:
    """Random text over all planes, skipping the surrogate range (not encodable as UTF-8)."""
    out = []
    for _ in range(n):
        cp = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xFFFF), rng.randint(0x10000, 0x10FFFF)])
        out.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else "?")
    return "".join(out)


def _train(kind: str, **overrides) -> Tokenizer:
    return train_tokenizer(TokenizerParams(kind=kind, vocab_size=VOCAB, **overrides), iter(CORPUS))


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    return {kind: _train(kind) for kind in KINDS}


@pytest.fixture(params=KINDS)
def tok(request, tokenizers) -> Tokenizer:
    return tokenizers[request.param]


def test_special_ids_are_the_same_for_every_kind(tokenizers):
    expected = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for kind, tok in tokenizers.items():
        assert tok.kind == kind
        assert tok.special_ids == expected
        assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.end_id) == (0, 1, 2, 3)
        assert (tok.system_id, tok.user_id, tok.assistant_id, tok.unk_id) == (4, 5, 6, 7)
        assert tok.special_id("<|assistant|>") == 6
        assert [tok.decode([i]) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)


def test_special_id_of_unknown_token_is_an_error(tok):
    with pytest.raises(TokenizerError, match="not a special token"):
        tok.special_id("<|tool|>")


def test_vocab_sizes(tokenizers):
    assert tokenizers["byte"].vocab_size == len(SPECIAL_TOKENS) + 256
    n_chars = len(set("".join(CORPUS)))
    assert tokenizers["char"].vocab_size == len(SPECIAL_TOKENS) + 256 + n_chars
    # the small corpus may leave unigram short of the target (hard_vocab_limit=False)
    assert tokenizers["bpe"].vocab_size == VOCAB
    assert len(SPECIAL_TOKENS) + 256 + n_chars < tokenizers["unigram"].vocab_size <= VOCAB


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_round_trip_any_utf8_text(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and len(SPECIAL_TOKENS) <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_random_unicode_and_training_text(tok):
    rng = random.Random(1)
    texts = [random_unicode(rng, rng.randint(1, 40)) for _ in range(200)] + CORPUS
    for text in texts:
        assert tok.decode(tok.encode(text)) == text


def test_control_tokens_cannot_be_forged_by_text(tok):
    text = " ".join(SPECIAL_TOKENS) + "".join(SPECIAL_TOKENS) + "\n<|user|>hi<|end|>\n<|assistant|>"
    ids = tok.encode(text)
    assert ids and not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text


def test_decode_renders_special_ids_as_literals_unless_skipped(tok):
    ids = [tok.user_id, *tok.encode("hi"), tok.end_id, tok.assistant_id, *tok.encode("yo"), tok.end_id]
    assert tok.decode(ids) == "<|user|>hi<|end|><|assistant|>yo<|end|>"
    assert tok.decode(ids, skip_special=True) == "hiyo"


def test_decode_accepts_numpy_and_torch_ids(tok):
    ids = tok.encode("To be, or not to be 😀")
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "To be, or not to be 😀"
    assert tok.decode(torch.tensor(ids)) == "To be, or not to be 😀"


@pytest.mark.parametrize("bad_id", [-1, 10**6])
def test_decode_rejects_ids_outside_the_vocabulary(tok, bad_id):
    with pytest.raises(TokenizerError, match=f"token id {bad_id} is outside"):
        tok.decode([BYTE_OFFSET, bad_id])
    with pytest.raises(TokenizerError, match="outside"):
        tok.stream_decoder().feed(bad_id)


def test_encode_batch_matches_encode(tok):
    texts = HARD_TEXTS + CORPUS[:2]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_byte_tokenizer_is_utf8_bytes_after_the_specials(tokenizers):
    tok = tokenizers["byte"]
    assert tok.encode("A\u00e9") == [BYTE_OFFSET + 0x41, BYTE_OFFSET + 0xC3, BYTE_OFFSET + 0xA9]


def test_char_vocab_is_sorted_and_deterministic(tokenizers):
    tok = tokenizers["char"]
    assert tok.chars == sorted(set("".join(CORPUS)))
    assert _train("char").chars == tok.chars
    first_char_id = BYTE_OFFSET + 256
    assert tok.encode(tok.chars[0] + tok.chars[-1]) == [first_char_id, first_char_id + len(tok.chars) - 1]
    # an unseen character falls back to its UTF-8 bytes
    assert "Ω" not in tok.chars
    assert tok.encode("Ω😀") == [BYTE_OFFSET + b for b in "Ω😀".encode()]


def test_char_coverage_drops_the_rarest_characters():
    docs = ["a" * 90 + "b" * 9 + "c"]
    full = train_tokenizer(TokenizerParams(kind="char"), docs)
    covered = train_tokenizer(TokenizerParams(kind="char", character_coverage=0.95), docs)
    assert full.chars == ["a", "b", "c"]
    assert covered.chars == ["a", "b"]
    assert covered.decode(covered.encode("abc")) == "abc"


def test_training_reads_at_most_max_train_chars():
    def docs():
        yield "abc"
        yield "defgh"
        raise AssertionError("read a document past max_train_chars")

    tok = train_tokenizer(TokenizerParams(kind="char", max_train_chars=5), docs())
    assert tok.chars == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("kind", SENTENCEPIECE_KINDS)
def test_newline_is_a_single_piece(tokenizers, kind):
    tok = tokenizers[kind]
    (newline,) = tok.encode("\n")
    ids = tok.encode("to be\n\nor not")
    assert ids.count(newline) == 2
    assert tok.decode([newline]) == "\n"


@pytest.mark.parametrize("kind", SENTENCEPIECE_KINDS)
def test_sentencepiece_compresses_text(tokenizers, kind):
    text = "".join(CORPUS)
    # only ~70 merges fit in the small test vocabulary beside the bytes and characters
    assert len(tokenizers[kind].encode(text)) < 0.6 * len(text.encode())


@pytest.mark.parametrize("kind", SENTENCEPIECE_KINDS)
def test_sentencepiece_training_is_deterministic(tokenizers, tmp_path, kind):
    first, second = tokenizers[kind], _train(kind)
    assert [first.token_bytes(i) for i in range(first.vocab_size)] == [
        second.token_bytes(i) for i in range(second.vocab_size)
    ]
    first.save(tmp_path / "a")
    second.save(tmp_path / "b")
    assert (tmp_path / "a" / MODEL_FILE).read_bytes() == (tmp_path / "b" / MODEL_FILE).read_bytes()


def test_sentencepiece_vocab_too_small_is_a_clear_error():
    with pytest.raises(TokenizerError, match="bpe training failed.*Increase vocab_size"):
        train_tokenizer(TokenizerParams(kind="bpe", vocab_size=100), CORPUS)


@pytest.mark.parametrize("kind", SENTENCEPIECE_KINDS)
def test_sentencepiece_without_text_is_a_clear_error(kind):
    with pytest.raises(TokenizerError, match="no training text"):
        train_tokenizer(TokenizerParams(kind=kind), ["", "\n\n"])


def test_save_load_gives_identical_encoding(tok, tmp_path):
    saved = tok.save(tmp_path / "tok")
    config = json.loads((saved / CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["kind"] == tok.kind and config["special_tokens"] == list(SPECIAL_TOKENS)
    loaded = load_tokenizer(saved)
    assert (type(loaded), loaded.kind, loaded.vocab_size) == (type(tok), tok.kind, tok.vocab_size)
    for text in HARD_TEXTS + CORPUS:
        assert loaded.encode(text) == tok.encode(text)
    all_ids = list(range(tok.vocab_size))
    assert loaded.decode(all_ids) == tok.decode(all_ids)


def test_stream_decoder_holds_back_partial_utf8(tokenizers):
    stream = tokenizers["byte"].stream_decoder()
    emoji_bytes = [BYTE_OFFSET + b for b in "😀".encode()]
    assert len(emoji_bytes) == 4
    assert [stream.feed(i) for i in emoji_bytes] == ["", "", "", "😀"]
    assert stream.feed(BYTE_OFFSET + ord("!")) == "!"
    assert stream.finish() == ""


def test_stream_decoder_matches_decode_token_by_token(tok):
    ids = [tok.bos_id, *tok.encode("Thou 😀 art 漢字\n"), tok.end_id, *tok.encode("e\u0301👨‍👩‍👧")]
    for skip_special in (False, True):
        stream = tok.stream_decoder(skip_special=skip_special)
        assert isinstance(stream, StreamDecoder)
        pieces = [stream.feed(i) for i in ids]
        assert "\ufffd" not in "".join(pieces)
        assert "".join(pieces) + stream.finish() == tok.decode(ids, skip_special=skip_special)


def test_stream_decoder_flushes_an_unfinished_character_as_replacement(tokenizers):
    stream = tokenizers["byte"].stream_decoder()
    assert stream.feed(BYTE_OFFSET + "😀".encode()[0]) == ""
    assert stream.finish() == "\ufffd"


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match=f"{tmp_path / 'nowhere' / CONFIG_FILE}.*not found"):
        load_tokenizer(tmp_path / "nowhere")


@pytest.mark.parametrize("kind", SENTENCEPIECE_KINDS)
def test_missing_or_corrupt_sentencepiece_model_is_a_clear_error(tokenizers, tmp_path, kind):
    directory = tokenizers[kind].save(tmp_path / "tok")
    model = directory / MODEL_FILE
    model.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=f"{model}: not a valid sentencepiece model"):
        load_tokenizer(directory)
    model.unlink()
    with pytest.raises(TokenizerError, match=f"{model}: sentencepiece model file not found"):
        load_tokenizer(directory)


def test_corrupt_or_inconsistent_config_is_a_clear_error(tokenizers, tmp_path):
    directory = tokenizers["char"].save(tmp_path / "tok")
    config_path = directory / CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8"))

    config_path.write_text("{ truncated", encoding="utf-8")
    with pytest.raises(TokenizerError, match=f"{config_path}: cannot read"):
        load_tokenizer(directory)

    for change, message in [
        ({"kind": "wordpiece"}, "unknown tokenizer kind 'wordpiece'"),
        ({"special_tokens": ["<|pad|>"]}, "special tokens"),
        ({"vocab_size": 3}, "vocab_size 3 does not match"),
        ({"chars": ["ab"]}, "single characters"),
    ]:
        config_path.write_text(json.dumps({**config, **change}), encoding="utf-8")
        with pytest.raises(TokenizerError, match=f"{config_path}: .*{message}"):
            load_tokenizer(directory)
