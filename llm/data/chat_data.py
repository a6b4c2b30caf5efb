"""Chat data for finetuning: read and validate JSONL conversations, or derive them from the plays.

File format (one conversation per line, the common ``messages`` form; other keys are kept but ignored)::

    {"messages": [{"role": "system", "content": "You are JULIET. Answer in character."},
                  {"role": "user", "content": "Wilt thou be gone?"},
                  {"role": "assistant", "content": "It is not yet near day."}]}

A valid conversation has at least one message; every role is ``system``, ``user`` or ``assistant``; system
messages only open it; every content is a non-empty string of characters (no lone surrogate, such as an
unpaired ``\\ud800`` escape); it ends with an assistant turn.
``read_chat_file`` raises ChatDataError naming the file and line of the first problem.

``prepare_chat_data`` is the chat-data stage: user conversations in ``data/chat/*.jsonl`` when there are
any (validated, pooled, split train/val by a seeded hash), else conversations derived from the cleaned
corpus by ``build_chat_data``. It writes ``train.jsonl``, ``val.jsonl`` and ``stats.json``, atomically.

Play-derived conversations. Each document of a cleaned split is parsed into scenes of speeches:

- modern editions: a paragraph (lines between blank lines) whose first line is a speaker heading, either
  ``Name.`` (every word capitalised, "of"/"the"/... allowed) or ``NAME`` in capitals, and whose other
  lines are the speech. A paragraph without a heading after a stage direction continues the speech.
- First Folio texts (``  Name. text`` on an indented line, following lines unindented): the speech runs
  to a blank line, the next heading or a stage-direction line (Enter, Exit, Exeunt, ...).

Whichever pattern gives more headings in a document is used; a heading must occur at least twice, which
rules out verse lines that happen to look like one. Bracketed stage directions are removed; ``ACT``/
``SCENE`` headings (``Actus``/``Scena`` in the Folio) end a scene. Abbreviated names (``Ham.``) are
expanded to the most frequent longer name with that prefix in the stage directions (``Hamlet``).
Consecutive speeches of one speaker are merged; a speech outside ``[min_speech_chars,
max_speech_chars]`` breaks the dialogue. Within a scene, each reply by a different speaker becomes the
assistant turn of exactly one conversation: the speech before it is the user turn, the system message
names who answers (``system_template``), and while the two speakers keep alternating the conversation
grows to ``max_turns`` exchanges; the next conversation starts with the last reply as its user turn.
Train documents give ``train.jsonl``, val documents ``val.jsonl``, so no speech is in both (a play that
the clean stage cut into sections gives its beginning to train and its end to val).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm.config import ChatDataParams
from llm.data.clean import SPLIT_FILES, iter_documents
from llm.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
CHAT_FILES = {"train": "train.jsonl", "val": "val.jsonl"}
STATS_FILE = "stats.json"

Conversation = list[dict[str, str]]


# json.loads turns an unpaired "\ud800" escape into a str that no UTF-8 file can hold
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class ChatDataError(ValueError):
    """Chat data is malformed or missing; the message names the file and line."""


# ---------------------------------------------------------------------------------------------------
# Reading, validating and writing JSONL


def validate_conversation(record: Any, where: str) -> Conversation:
    """Check one parsed JSONL record; return its messages as ``[{"role", "content"}]``.

    Raises ChatDataError prefixed with ``where`` (e.g. ``"data/chat/a.jsonl:3"``) on the first problem.
    """
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ChatDataError(f'{where}: expected an object with a "messages" list')
    messages = record["messages"]
    if not messages:
        raise ChatDataError(f"{where}: the conversation has no messages")
    out: Conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatDataError(f"{where}: message {i}: expected an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatDataError(f"{where}: message {i}: unknown role {role!r}; expected system, user or assistant")
        if not isinstance(content, str):
            raise ChatDataError(
                f"{where}: message {i} ({role}): content must be a string, got {type(content).__name__}"
            )
        if not content.strip():
            raise ChatDataError(f"{where}: message {i} ({role}): empty content")
        if (surrogate := _LONE_SURROGATE.search(content)) is not None:
            raise ChatDataError(
                f"{where}: message {i} ({role}): content holds the lone surrogate \\u{ord(surrogate.group()):04x} at "
                f"character {surrogate.start()}, which is no character and cannot be written as UTF-8; a JSON "
                "\\ud800-\\udbff escape must be followed by a \\udc00-\\udfff one (fix the tool that wrote the file)"
            )
        if role == "system" and out and out[-1]["role"] != "system":
            raise ChatDataError(f"{where}: message {i}: a system message may only open the conversation")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise ChatDataError(
            f"{where}: the conversation ends with a {out[-1]['role']} turn; it must end with an assistant turn"
        )
    return out


def iter_chat_file(path: str | Path) -> Iterator[tuple[int, Conversation]]:
    """Yield ``(line_number, messages)`` for each conversation of a JSONL file, validating as it reads.

    Blank lines are skipped. Raises ChatDataError naming the file and line for invalid UTF-8, invalid
    JSON or an invalid conversation (see ``validate_conversation``), and for a missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"{path}: chat data file not found")
    with open(path, encoding="utf-8-sig") as f:
        lineno = 0
        while True:
            lineno += 1
            try:
                line = f.readline()
            except UnicodeDecodeError as err:
                raise ChatDataError(f"{path}:{lineno}: not valid UTF-8 ({err.reason})") from None
            if not line:
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ChatDataError(f"{path}:{lineno}: not valid JSON: {err.msg} (column {err.colno})") from None
            yield lineno, validate_conversation(record, f"{path}:{lineno}")


def read_chat_file(path: str | Path) -> list[Conversation]:
    """All conversations of a JSONL chat file (see ``iter_chat_file`` for the errors raised)."""
    return [messages for _, messages in iter_chat_file(path)]


def write_chat_file(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write records (each with a ``messages`` list) as JSONL at ``path``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, (json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------
# Speeches from plays


@dataclass
class Speech:
    speaker: str
    text: str


_SPEAKER_CONNECTORS = {"of", "the", "de", "la", "le", "du", "and", "to", "in", "a"}
_MODERN_HEADING = re.compile(r"^([A-Z][A-Za-z'&\- ]{0,38}[A-Za-z])(\.?)$|^([A-Z])(\.)$")
_FOLIO_HEADING = re.compile(r"^ {1,4}([A-Z][A-Za-z]*(?: [A-Z][A-Za-z]*)?)\. +(\S.*)$")
_SCENE_HEADING = re.compile(r"^\s*(?:act|actus|scene|scena|scoena|scaena)\b", re.IGNORECASE)
_FOLIO_DIRECTION = re.compile(
    r"^\s*(?:enter|exit|exeunt|manet|flourish|florish|alarum|alarums|sennet|trumpets|musicke|hoboyes|"
    r"thunder|actus|scena|scoena|scaena)\b",
    re.IGNORECASE,
)
_BRACKETED = re.compile(r"\[[^\]]*\]", re.DOTALL)
_DIRECTION_WORD = re.compile(r"[A-Z][A-Za-z]+")


def _modern_heading(line: str) -> str | None:
    m = _MODERN_HEADING.match(line)
    if not m:
        return None
    name, period = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    words = name.split()
    if len(words) > 4 or _SCENE_HEADING.match(name):
        return None
    if not period and name != name.upper():
        return None  # without a period only capitals count: "THESEUS", not a short verse line
    if not all(w[0].isupper() or w.lower() in _SPEAKER_CONNECTORS for w in words):
        return None
    return name


def _paragraphs(lines: list[str]) -> Iterator[list[str]]:
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []
    if block:
        yield block


def _modern_scenes(text: str, speakers: set[str]) -> list[list[Speech]]:
    scenes: list[list[Speech]] = [[]]
    current: Speech | None = None
    for block in _paragraphs(text.split("\n")):
        if _SCENE_HEADING.match(block[0]):
            scenes.append([])
            current = None
            continue
        heading = _modern_heading(block[0])
        if heading in speakers and len(block) > 1:
            body = _clean_speech(block[1:])
            current = Speech(heading, body)
            scenes[-1].append(current)
        elif current is not None:
            body = _clean_speech(block)
            if body:
                current.text = f"{current.text}\n{body}" if current.text else body
    return scenes


def _folio_scenes(text: str, speakers: set[str]) -> list[list[Speech]]:
    scenes: list[list[Speech]] = [[]]
    current: list[str] | None = None
    speaker = ""

    def close() -> None:
        nonlocal current
        if current is not None:
            scenes[-1].append(Speech(speaker, _clean_speech(current)))
        current = None

    for line in text.split("\n"):
        m = _FOLIO_HEADING.match(line)
        if m and m.group(1) in speakers:
            close()
            speaker, current = m.group(1), [m.group(2)]
        elif not line.strip():
            close()
        elif _FOLIO_DIRECTION.match(line):
            close()
            if _SCENE_HEADING.match(line):
                scenes.append([])
        elif current is not None:
            current.append(line)
    close()
    return scenes


def _clean_speech(lines: Sequence[str]) -> str:
    text = _BRACKETED.sub("", "\n".join(lines))
    return "\n".join(stripped for line in text.split("\n") if (stripped := line.strip()))


def _direction_words(text: str, folio: bool) -> Counter[str]:
    if folio:
        directions = "\n".join(line for line in text.split("\n") if _FOLIO_DIRECTION.match(line))
    else:
        directions = "\n".join(_BRACKETED.findall(text))
    return Counter(w.lower() for w in _DIRECTION_WORD.findall(directions))


def _expand_names(names: Iterable[str], words: Counter[str]) -> dict[str, str]:
    """Map each speaker heading to its display name: abbreviations expanded, then upper-cased."""
    out = {}
    for name in names:
        full, key = name, name.lower()
        if " " not in name:
            # abbreviations also occur in directions ("Ros. and Guil."), so the most frequent form wins
            forms = [(-n, w) for w, n in words.items()
                     if w.startswith(key) and (w == key or w not in (key + "s", key + "es"))]
            if forms:
                full = min(forms)[1]
        out[name] = full.upper()
    return out


def parse_play(text: str) -> tuple[str, list[list[Speech]]]:
    """Split a play into scenes of speeches (see the module docstring).

    Returns ``(format, scenes)`` where format is ``"modern"``, ``"folio"`` or ``"none"`` (no dialogue
    found: poems, sonnets), and each speech's speaker is its display name (e.g. ``"HAMLET"``).
    """
    lines = text.split("\n")
    modern = Counter()
    for block in _paragraphs(lines):
        heading = _modern_heading(block[0])
        if heading and len(block) > 1:
            modern[heading] += 1
    folio = Counter(m.group(1) for line in lines if (m := _FOLIO_HEADING.match(line)))
    modern_speakers = {n for n, c in modern.items() if c >= 2}
    folio_speakers = {n for n, c in folio.items() if c >= 2}
    n_modern = sum(modern[n] for n in modern_speakers)
    n_folio = sum(folio[n] for n in folio_speakers)
    if max(n_modern, n_folio) < 2:
        return "none", []
    is_folio = n_folio > n_modern
    speakers = folio_speakers if is_folio else modern_speakers
    scenes = _folio_scenes(text, speakers) if is_folio else _modern_scenes(text, speakers)
    names = _expand_names(speakers, _direction_words(text, is_folio))
    merged_scenes = []
    for scene in scenes:
        merged: list[Speech] = []
        for speech in scene:
            speech = Speech(names[speech.speaker], speech.text)
            if merged and merged[-1].speaker == speech.speaker:
                merged[-1].text = "\n".join(t for t in (merged[-1].text, speech.text) if t)
            else:
                merged.append(speech)
        if merged:
            merged_scenes.append(merged)
    return ("folio" if is_folio else "modern"), merged_scenes


def _dialogue_runs(scene: list[Speech], params: ChatDataParams) -> Iterator[list[Speech]]:
    run: list[Speech] = []
    for speech in scene:
        if params.min_speech_chars <= len(speech.text) <= params.max_speech_chars:
            run.append(speech)
        else:
            if len(run) > 1:
                yield run
            run = []
    if len(run) > 1:
        yield run


def conversations_from_play(text: str, params: ChatDataParams) -> list[Conversation]:
    """Conversations derived from one play (see the module docstring); [] when it has no dialogue."""
    _, scenes = parse_play(text)
    conversations: list[Conversation] = []
    for scene in scenes:
        for run in _dialogue_runs(scene, params):
            s, n = 0, len(run)
            while s + 1 < n:
                user, assistant = run[s].speaker, run[s + 1].speaker  # differ: same-speaker speeches are merged
                e, turns = s + 1, 1
                while (turns < params.max_turns and e + 2 < n
                       and run[e + 1].speaker == user and run[e + 2].speaker == assistant):
                    e, turns = e + 2, turns + 1
                messages = [{"role": "system", "content": params.system_template.format(name=assistant)}]
                for k, speech in enumerate(run[s : e + 1]):
                    messages.append({"role": "user" if k % 2 == 0 else "assistant", "content": speech.text})
                conversations.append(messages)
                s = e
    return conversations


def _play_title(text: str) -> str:
    return next((line.strip() for line in text.split("\n") if line.strip()), "")


def _split_stats(conversations: Sequence[Conversation]) -> dict[str, int]:
    return {
        "conversations": len(conversations),
        "messages": sum(len(c) for c in conversations),
        "assistant_turns": sum(m["role"] == "assistant" for c in conversations for m in c),
        "assistant_chars": sum(len(m["content"]) for c in conversations for m in c if m["role"] == "assistant"),
    }


def build_chat_data(clean_dir: str | Path, out_dir: str | Path, params: ChatDataParams) -> dict[str, Any]:
    """Derive conversations from the plays in ``clean_dir/{train,val}.txt`` into ``out_dir/{train,val}.jsonl``.

    Deterministic for the same inputs and params; each file and ``stats.json`` is written atomically.
    Returns the stats (per split: documents, documents with dialogue, conversations, ...). Raises
    ChatDataError when a split file is missing or the train split yields no conversation.
    """
    clean_dir, out_dir = Path(clean_dir), Path(out_dir)
    stats: dict[str, Any] = {"source": "plays", "params": params.model_dump()}
    for split, name in SPLIT_FILES.items():
        path = clean_dir / name
        if not path.exists():
            raise ChatDataError(f"{path}: missing; run the clean stage first (`llm clean`)")
        records, formats, plays = [], Counter(), []
        for doc in iter_documents(path):
            fmt, _ = parse_play(doc)
            formats[fmt] += 1
            conversations = conversations_from_play(doc, params)
            title = _play_title(doc)
            if conversations:
                plays.append({"play": title, "conversations": len(conversations)})
            records.extend({"messages": c, "play": title} for c in conversations)
        write_chat_file(out_dir / CHAT_FILES[split], records)
        stats[split] = {
            **_split_stats([r["messages"] for r in records]),
            "documents": sum(formats.values()),
            "documents_with_dialogue": len(plays),
            "formats": dict(sorted(formats.items())),
            "plays": plays,
        }
    if stats["train"]["conversations"] == 0:
        raise ChatDataError(f"{clean_dir / SPLIT_FILES['train']}: no dialogue found to derive conversations from")
    _write_json(out_dir / STATS_FILE, stats)
    log.info("derived %d train and %d val conversations from the plays",
             stats["train"]["conversations"], stats["val"]["conversations"])
    return stats


# ---------------------------------------------------------------------------------------------------
# The stage


def split_conversations(
    conversations: Sequence[Conversation], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices of train and val conversations: the val share are those ranked first by a seeded hash of
    their content, so the split depends only on the data and the seed. Both keep input order; with two
    or more conversations each side gets at least one.
    """
    n = len(conversations)
    n_val = min(max(int(val_fraction * n + 0.5), 1), n - 1) if n >= 2 else 0

    def rank(i: int) -> tuple[str, int]:
        blob = json.dumps(conversations[i], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(f"{seed}\x00{blob}".encode()).hexdigest(), i

    val = set(sorted(range(n), key=rank)[:n_val])
    return [i for i in range(n) if i not in val], sorted(val)


def prepare_chat_data(
    chat_dir: str | Path | None, clean_dir: str | Path, out_dir: str | Path, params: ChatDataParams
) -> dict[str, Any]:
    """The chat-data stage: write ``out_dir/{train,val}.jsonl`` and ``stats.json``; return the stats.

    With ``*.jsonl`` files in ``chat_dir``, they are validated (every file, in sorted order), pooled and
    split by ``split_conversations``; otherwise (``chat_dir`` None, absent or without .jsonl files) the
    conversations are derived from the plays in ``clean_dir`` by ``build_chat_data``.
    Raises ChatDataError naming file and line for invalid data, or when fewer than two user
    conversations are given (one is needed for validation).
    """
    out_dir = Path(out_dir)
    files = sorted(Path(chat_dir).glob("*.jsonl")) if chat_dir is not None and Path(chat_dir).is_dir() else []
    if not files:
        log.info("no chat data in %s: deriving conversations from the plays in %s", chat_dir, clean_dir)
        return build_chat_data(clean_dir, out_dir, params)
    conversations: list[Conversation] = []
    per_file = {}
    for path in files:
        found = read_chat_file(path)
        per_file[str(path)] = len(found)
        conversations.extend(found)
    if len(conversations) < 2:
        raise ChatDataError(
            f"{chat_dir}: {len(conversations)} conversation(s) in {len(files)} file(s); at least 2 are needed "
            "(one is held out for validation)"
        )
    train_idx, val_idx = split_conversations(conversations, params.val_fraction, params.split_seed)
    stats: dict[str, Any] = {"source": "user", "files": per_file, "params": params.model_dump()}
    for split, indices in (("train", train_idx), ("val", val_idx)):
        write_chat_file(out_dir / CHAT_FILES[split], ({"messages": conversations[i]} for i in indices))
        stats[split] = _split_stats([conversations[i] for i in indices])
    _write_json(out_dir / STATS_FILE, stats)
    log.info("validated %d conversations from %d file(s): %d train, %d val",
             len(conversations), len(files), len(train_idx), len(val_idx))
    return stats
