"""Specification of chat data: JSONL validation, conversations derived from plays, the chat-data stage."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llm.config import ChatDataParams
from llm.data.chat_data import (
    ChatDataError,
    build_chat_data,
    conversations_from_play,
    parse_play,
    prepare_chat_data,
    read_chat_file,
    split_conversations,
)
from llm.data.clean import write_documents

GOOD = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."}]}


def write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_valid_file_reads_back_its_messages(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, "", {"messages": GOOD["messages"][1:], "id": 7}])
    assert read_chat_file(path) == [GOOD["messages"], GOOD["messages"][1:]]  # blank lines and extra keys ignored


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"messages": [', r"a\.jsonl:3: not valid JSON"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"a\.jsonl:3: message 0: unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
         r"a\.jsonl:3: message 1 \(assistant\): empty content"),
        ({"messages": [{"role": "user", "content": "Hi"}]},
         r"a\.jsonl:3: the conversation ends with a user turn; it must end with an assistant turn"),
        ({"messages": []}, r"a\.jsonl:3: the conversation has no messages"),
        ({"conversation": []}, r'a\.jsonl:3: expected an object with a "messages" list'),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
         r"a\.jsonl:3: message 0 \(user\): content must be a string"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                       {"role": "assistant", "content": "c"}]},
         r"a\.jsonl:3: message 1: a system message may only open the conversation"),
    ],
)
def test_invalid_conversation_names_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(ChatDataError, match=message):
        read_chat_file(path)


MODERN_PLAY = """THE TRAGEDY OF TESTING

ACT I.

SCENE I. A hall.

[Enter Romeo and Juliet.]

Rom.
Good morrow, lady.

JULIET.
Good morrow, sir.
[Aside.] He is fair.

Rom.
How fares the day?

JULIET.
It fares well.

Rom.
[Kneels.]

And my heart with it.

NURSE.
Madam!

SCENE II. A garden.

JULIET.
Where is the nurse?

NURSE.
Here, madam.

Rom.
Farewell.
"""


def test_modern_play_is_parsed_into_scenes_of_speeches():
    fmt, scenes = parse_play(MODERN_PLAY)
    assert fmt == "modern"
    assert [[(s.speaker, s.text) for s in scene] for scene in scenes] == [
        [("ROMEO", "Good morrow, lady."), ("JULIET", "Good morrow, sir.\nHe is fair."),
         ("ROMEO", "How fares the day?"), ("JULIET", "It fares well."),
         ("ROMEO", "And my heart with it."), ("NURSE", "Madam!")],
        [("JULIET", "Where is the nurse?"), ("NURSE", "Here, madam."), ("ROMEO", "Farewell.")],
    ]


def test_each_reply_is_the_answer_of_one_conversation_and_alternation_makes_turns():
    params = ChatDataParams(max_turns=2, system_template="You are {name}.")
    convs = conversations_from_play(MODERN_PLAY, params)

    def summary(c):
        return [c[0]["content"]] + [f"{m['role']}:{m['content'][:9]}" for m in c[1:]]

    assert [summary(c) for c in convs] == [
        ["You are JULIET.", "user:Good morr", "assistant:Good morr", "user:How fares", "assistant:It fares "],
        ["You are ROMEO.", "user:It fares ", "assistant:And my he"],
        ["You are NURSE.", "user:And my he", "assistant:Madam!"],
        ["You are NURSE.", "user:Where is ", "assistant:Here, mad"],  # a new scene starts afresh
        ["You are ROMEO.", "user:Here, mad", "assistant:Farewell."],
    ]
    single = conversations_from_play(MODERN_PLAY, params.model_copy(update={"max_turns": 1}))
    assert len(single) == 7 and all(len(c) == 3 for c in single)  # every reply answers exactly once


def test_speeches_outside_the_length_limits_break_the_dialogue():
    params = ChatDataParams(max_turns=1, max_speech_chars=18)  # "Good morrow, sir.\nHe is fair." is too long
    answers = [c[-1]["content"] for c in conversations_from_play(MODERN_PLAY, params)]
    assert "Good morrow, sir.\nHe is fair." not in answers and "How fares the day?" not in answers
    assert "It fares well." in answers


def test_folio_style_play_and_abbreviated_names():
    play = """The Tragedie of Testing

Actus Primus. Scoena Prima.

Enter Hamlet and Horatio.

  Ham. Who is there?
  Hor. A friend
to this ground

   Ham. Welcome, friend
  Hor. I thanke you
Exeunt.
"""
    fmt, scenes = parse_play(play)
    assert fmt == "folio"
    assert [(s.speaker, s.text) for s in scenes[0]] == [
        ("HAMLET", "Who is there?"), ("HORATIO", "A friend\nto this ground"),
        ("HAMLET", "Welcome, friend"), ("HORATIO", "I thanke you"),
    ]


def test_poems_without_dialogue_give_no_conversations():
    poem = "THE PHOENIX\n\nLet the bird of loudest lay,\nOn the sole Arabian tree.\n\nHerald sad and trumpet be."
    assert parse_play(poem) == ("none", [])
    assert conversations_from_play(poem, ChatDataParams()) == []


def make_play(seed: int, n_speeches: int) -> str:
    """A play in the modern-edition format: speaker lines ``NAME.``, speeches, blank lines."""
    rng = random.Random(seed)
    words = ["love", "night", "day", "sweet", "death", "fair", "heart", "eyes", "light", "soul", "hand", "lord"]
    lines = [f"THE TRAGEDY OF PLAY {seed}", "", "ACT I.", ""]
    for _ in range(n_speeches):
        lines.append(f"{rng.choice(['ROMEO', 'JULIET', 'NURSE', 'FRIAR'])}.")
        lines += [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(rng.randint(1, 3))]
        lines.append("")
    return "\n".join(lines)


def make_clean_dir(root: Path) -> Path:
    clean = root / "clean"
    clean.mkdir(parents=True)
    write_documents(clean / "train.txt", [make_play(1, 30), "A POEM\n\nNo speakers here at all.", make_play(2, 30)])
    write_documents(clean / "val.txt", [make_play(3, 20)])
    return clean


def test_build_splits_by_play_and_is_deterministic(tmp_path):
    clean = make_clean_dir(tmp_path)
    stats = build_chat_data(clean, tmp_path / "a", ChatDataParams())
    build_chat_data(clean, tmp_path / "b", ChatDataParams())
    for name in ("train.jsonl", "val.jsonl", "stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (tmp_path / "a" / "val.jsonl").read_text().splitlines()]
    assert {r["play"] for r in train} == {"THE TRAGEDY OF PLAY 1", "THE TRAGEDY OF PLAY 2"}
    assert {r["play"] for r in val} == {"THE TRAGEDY OF PLAY 3"}
    assert stats["train"]["conversations"] == len(train) > 20 and stats["val"]["conversations"] == len(val) > 5
    assert stats["train"]["formats"] == {"modern": 2, "none": 1} and stats["train"]["documents_with_dialogue"] == 2
    assert read_chat_file(tmp_path / "a" / "train.jsonl")  # what the builder writes passes validation
    assert train[0]["messages"][0]["content"].endswith(". Answer in character.")
    assert not list((tmp_path / "a").glob(".*tmp"))  # no temporary files left behind


def test_prepare_uses_user_data_when_present_and_splits_it_deterministically(tmp_path):
    chat = tmp_path / "data" / "chat"
    convs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(20)]
    write_jsonl(chat / "a.jsonl", convs[:12])
    write_jsonl(chat / "b.jsonl", convs[12:])
    stats = prepare_chat_data(chat, tmp_path / "no-clean-needed", tmp_path / "out", ChatDataParams(val_fraction=0.2))
    train = read_chat_file(tmp_path / "out" / "train.jsonl")
    val = read_chat_file(tmp_path / "out" / "val.jsonl")
    assert stats["source"] == "user" and (len(train), len(val)) == (16, 4)
    assert sorted(map(str, train + val)) == sorted(str(c["messages"]) for c in convs)
    again = split_conversations([c["messages"] for c in convs], 0.2, 1337)
    assert [c["messages"] for c in (convs[i] for i in again[1])] == val


def test_prepare_builds_from_plays_without_user_data(tmp_path):
    clean = make_clean_dir(tmp_path)
    (tmp_path / "chat").mkdir()  # present but empty
    stats = prepare_chat_data(tmp_path / "chat", clean, tmp_path / "out", ChatDataParams())
    assert stats["source"] == "plays" and (tmp_path / "out" / "val.jsonl").exists()
    assert prepare_chat_data(None, clean, tmp_path / "out2", ChatDataParams())["source"] == "plays"


def test_prepare_reports_invalid_user_data_and_too_few_conversations(tmp_path):
    chat = tmp_path / "chat"
    write_jsonl(chat / "a.jsonl", [GOOD, {"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(ChatDataError, match=r"a\.jsonl:2: the conversation ends with a user turn"):
        prepare_chat_data(chat, tmp_path / "clean", tmp_path / "out", ChatDataParams())
    write_jsonl(chat / "a.jsonl", [GOOD])
    with pytest.raises(ChatDataError, match="at least 2 are needed"):
        prepare_chat_data(chat, tmp_path / "clean", tmp_path / "out", ChatDataParams())


def test_missing_clean_split_says_what_to_run(tmp_path):
    with pytest.raises(ChatDataError, match=r"train\.txt: missing; run the clean stage first"):
        build_chat_data(tmp_path / "clean", tmp_path / "out", ChatDataParams())


def test_a_lone_surrogate_escape_is_refused_naming_file_and_line_before_anything_is_written(tmp_path):
    chat = tmp_path / "chat"
    # an unpaired \ud800 escape is valid JSON, but no character: it could never be written as UTF-8
    write_jsonl(chat / "a.jsonl", [GOOD, GOOD, r'{"messages": [{"role": "user", "content": "\ud800"}]}'])
    with pytest.raises(ChatDataError, match=r"a\.jsonl:3: message 0 \(user\): content holds the lone surrogate "
                                            r"\\ud800 at character 0"):
        prepare_chat_data(chat, tmp_path / "clean", tmp_path / "out", ChatDataParams())
    assert not (tmp_path / "out").exists()

    write_jsonl(chat / "a.jsonl", [{"messages": [{"role": "user", "content": "Hi \udfff"},
                                                 {"role": "assistant", "content": "x"}]}])
    with pytest.raises(ChatDataError, match=r"a\.jsonl:1: .*lone surrogate \\udfff at character 3"):
        read_chat_file(chat / "a.jsonl")
    write_jsonl(chat / "a.jsonl", [r'{"messages": [{"role": "user", "content": "\ud83d\ude00"},'
                                   r' {"role": "assistant", "content": "x"}]}'])
    assert read_chat_file(chat / "a.jsonl")[0][0]["content"] == "\U0001f600"  # a pair is one character
