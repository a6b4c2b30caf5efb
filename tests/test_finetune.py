"""Specification of supervised finetuning: loss positions, fitting, learning, lineage and exact resume."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch

from llm.config import FinetuneParams, ModelConfig
from llm.data.chat_data import write_chat_file
from llm.data.tokenizer import ByteTokenizer, CharTokenizer
from llm.inference.chat_session import ChatSession
from llm.inference.generate import TorchGenerator
from llm.model.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from llm.model.gpt import GPT
from llm.training.finetune import (
    ChatBatches,
    assistant_loss,
    collate_chat_examples,
    encode_chat_examples,
    finetune,
    finetune_identity,
)

WORDS = ["lamp", "rose", "moon", "star", "king", "sword", "crown", "ring", "bell", "door", "tree", "wolf"]


def synthetic_chats(seed: int, n: int) -> list[dict]:
    """Conversations whose answers follow from the question: the model can learn them."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(WORDS, 2)
        out.append({"messages": [
            {"role": "system", "content": "You are ECHO."},
            {"role": "user", "content": f"say {a} and {b}"},
            {"role": "assistant", "content": f"{a} {b}!"},
        ]})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft")
    chat = root / "chat"
    write_chat_file(chat / "train.jsonl", synthetic_chats(0, 200))
    write_chat_file(chat / "val.jsonl", synthetic_chats(1, 24))
    tokenizer = CharTokenizer(sorted(set("".join(WORDS) + "say and You are ECHO.!")))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=64, n_layer=2, n_head=2, d_model=32)
    model = GPT(config)
    base = save_checkpoint(root / "base", model, config, tokenizer, metadata={"stage": "pretrain", "step": 100})
    return {"root": root, "chat": chat, "base": base}


def sft_params(**kw) -> FinetuneParams:
    base = {"max_steps": 60, "batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 5, "eval_interval": 30,
            "eval_batches": 3, "checkpoint_interval": 30, "log_interval": 10, "device": "cpu", "progress": False,
            "seed": 3, "num_threads": 1}  # one thread: far faster than two for a model this small
    return FinetuneParams(**{**base, **kw})


def test_loss_falls_only_on_assistant_tokens_and_their_end():
    t = ByteTokenizer()
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"},
                    {"role": "assistant", "content": "!"}]
    short = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    examples, counts = encode_chat_examples(t, [conversation, short], context_length=32)
    assert counts == {"kept": 2, "shortened": 0, "dropped": 0}
    x, y, mask = collate_chat_examples(examples, t.pad_id)
    # ids: bos sys S end user h i end asst y o end user ? end asst ! end  (18 ids -> 17 positions)
    assert x.shape == y.shape == mask.shape == (2, 17)
    assert mask[0].nonzero().flatten().tolist() == [8, 9, 10, 15, 16]
    assert t.decode(y[0][mask[0].bool()].tolist()) == "yo<|end|>!<|end|>"
    assert t.decode(x[0][mask[0].bool()].tolist()) == "<|assistant|>yo<|assistant|>!"  # what each is predicted from
    assert x[0].tolist() == examples[0].ids[:-1] and y[0].tolist() == examples[0].ids[1:]
    # the short row: bos user a end asst b end (7 ids), then padding that never counts
    assert mask[1].nonzero().flatten().tolist() == [4, 5]
    assert x[1, 6:].eq(t.pad_id).all() and y[1, 6:].eq(-100).all() and mask[1, 6:].eq(0).all()


def test_conversations_longer_than_the_context_are_shortened_or_left_out():
    t = ByteTokenizer()
    long_history = [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "old"},
                    {"role": "user", "content": "new?"}, {"role": "assistant", "content": "yes"}]
    too_long_answer = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y" * 40}]
    examples, counts = encode_chat_examples(t, [long_history, too_long_answer], context_length=20)
    assert counts == {"kept": 1, "shortened": 1, "dropped": 1}
    assert t.decode(examples[0].ids) == "<|bos|><|user|>new?<|end|><|assistant|>yes<|end|>"
    assert examples[0].assistant_bytes == 3


def test_finetuning_lowers_assistant_loss_and_records_its_parent(setup, tmp_path):
    val = setup["chat"] / "val.jsonl"
    before = assistant_loss(setup["base"], None, val, device="cpu")
    result = finetune(sft_params(max_steps=150, eval_interval=50, checkpoint_interval=50), setup["base"],
                      setup["chat"], tmp_path / "sft")
    after = assistant_loss(tmp_path / "sft", None, val, device="cpu")
    assert before > 5.0 and after < 2.0, (before, after)  # from uniform over ~290 ids to a learned format
    model, tokenizer, _ = load_checkpoint(tmp_path / "sft")
    session = ChatSession(TorchGenerator(model, tokenizer), system="You are ECHO.", temperature=0, max_new_tokens=30)
    answer = "".join(session.reply("say lamp and wolf"))
    assert answer.endswith("!") and len(answer) < 30  # it learned to close its answer with <|end|>
    # val/loss of the run is the same quantity: assistant-token loss on the (here: all) val conversations
    assert result.metrics["val/loss"] == pytest.approx(after, rel=1e-5)
    assert result.metrics["val/bpb"] > 0
    config = verify_checkpoint(tmp_path / "sft")
    manifest = json.loads((setup["base"] / "manifest.json").read_text())
    assert config["stage"] == "finetune"
    assert config["parent"] == {"path": str(setup["base"]), "stage": "pretrain", "step": 100,
                                "weights_sha256": manifest["model.safetensors"]["sha256"]}
    assert config["params"]["learning_rate"] == 3e-3


def test_resumed_finetuning_reproduces_the_uninterrupted_run(setup, tmp_path):
    params = sft_params(max_steps=8, eval_interval=4, checkpoint_interval=4, dropout=0.1)
    full = finetune(params, setup["base"], setup["chat"], tmp_path / "full")
    assert full.run_identity == finetune_identity(params, setup["base"], setup["chat"])  # known before training
    part = finetune(params, setup["base"], setup["chat"], tmp_path / "split", until_step=3)
    assert part.step == 3
    resumed = finetune(params, setup["base"], setup["chat"], tmp_path / "split")
    assert resumed.step == 8
    assert [h["train/loss"] for h in resumed.history] == [h["train/loss"] for h in full.history]
    assert [h.get("val/loss") for h in resumed.history] == [h.get("val/loss") for h in full.history]
    a, _, config = load_checkpoint(tmp_path / "full")
    b, _, _ = load_checkpoint(tmp_path / "split")
    assert config["model"]["dropout"] == 0.1
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_val_batches_are_fixed_and_spread_over_the_file(setup):
    t = load_checkpoint(setup["base"])[1]
    data = ChatBatches(setup["chat"] / "train.jsonl", setup["chat"] / "val.jsonl", t, 64, batch_size=4,
                       eval_batches=2)
    assert len(data.val) == 8
    first = [b[0].tolist() for b in data.val_batches()]
    assert first == [b[0].tolist() for b in data.val_batches()] and len(first) == 2
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(data.train_batch(g1), data.train_batch(g2)))
    assert data.tokens_per_byte == pytest.approx(
        sum(sum(e.mask[1:]) for e in data.val) / sum(e.assistant_bytes for e in data.val))


def test_missing_chat_data_says_what_to_run(setup, tmp_path):
    from llm.data.chat_data import ChatDataError

    with pytest.raises(ChatDataError, match=r"train\.jsonl: missing; prepare the chat data first"):
        finetune(sft_params(), setup["base"], tmp_path / "nothing", tmp_path / "out")


def test_a_new_base_model_starts_finetuning_over_and_the_same_one_resumes(setup, tmp_path, caplog):
    params = sft_params(max_steps=6, eval_interval=3, checkpoint_interval=3)
    finetune(params, setup["base"], setup["chat"], tmp_path / "sft", until_step=3)
    model, tokenizer, config = load_checkpoint(setup["base"])
    with torch.no_grad():
        model.wte.weight.mul_(2.0)  # the base was trained further: other weights, same shape and tokenizer
    other_base = save_checkpoint(tmp_path / "base2", model, model.config, tokenizer, metadata={"stage": "pretrain"})

    with caplog.at_level(logging.INFO, logger="llm.training.loop"):
        restarted = finetune(params, other_base, setup["chat"], tmp_path / "sft", until_step=3)
    assert "inputs.base_model.weights_sha256 changed" in caplog.text and "resuming" not in caplog.text
    fresh = finetune(params, other_base, setup["chat"], tmp_path / "fresh", until_step=3)
    assert [h["train/loss"] for h in restarted.history] == [h["train/loss"] for h in fresh.history]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llm.training.loop"):
        resumed = finetune(params, other_base, setup["chat"], tmp_path / "sft")
    assert "resuming from" in caplog.text and resumed.step == 6
    assert verify_checkpoint(tmp_path / "sft")["identity"]["inputs"]["base_model"]["weights_sha256"] == json.loads(
        (other_base / "manifest.json").read_text())["model.safetensors"]["sha256"]


def test_answer_bits_are_the_models_bits_on_each_final_answer_and_skip_what_does_not_fit():
    """Promotion's chat score (issue 22, item 1): the bits a model spends on each held-out final answer, from
    its own logits, over the answer's UTF-8 bytes; a conversation its context cannot hold is left out."""
    import math

    from llm.data.chat_template import encode_chat_with_mask
    from llm.training.finetune import answer_bits, answers_bpb

    tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=48, n_layer=1, n_head=2,
                            d_model=16)).eval()
    conversations = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "well met"},
         {"role": "user", "content": "and?"}, {"role": "assistant", "content": "good night, sweet"}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "an answer far too long " * 4}],
        [{"role": "user", "content": "café?"}, {"role": "assistant", "content": "é"}],
    ]
    scored = answer_bits(model, tokenizer, conversations)
    assert sorted(scored) == [0, 2]  # the second answer alone exceeds 48 tokens
    ids, mask = encode_chat_with_mask(tokenizer, conversations[0])
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0]
    nats = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    answer = len(tokenizer.encode("good night, sweet")) + 1  # its tokens and <|end|>: the last targets
    assert mask[-answer:] == [1] * answer and mask[-answer - 1] == 0
    expected = float(nats[-answer:].sum()) / math.log(2)
    assert scored[0][0] == pytest.approx(expected, rel=1e-5) and scored[0][1] == len("good night, sweet")
    assert scored[2][1] == 2  # bytes, not characters
    both = answers_bpb(scored)
    assert both["bpb"] == pytest.approx((scored[0][0] + scored[2][0]) / (17 + 2)) and both["answers"] == 2
    assert answers_bpb(scored, [2])["bpb"] == pytest.approx(scored[2][0] / 2)
