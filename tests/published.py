"""Published-model folders built here, as a user's downloaded GPT-2, Llama 3 or Qwen3 would look: random weights,
a byte-level BPE trained on a few lines of Hamlet, the source's special tokens, BOS rule, EOS ids and (Llama,
Qwen3) chat template, saved with ``save_pretrained``. Nothing is downloaded.

The chat templates are written here in each family's layout (Llama 3's header tokens and ``| trim``, Qwen3's
ChatML with ``{% generation %}`` blocks, so Transformers can compute its assistant mask).
"""

from __future__ import annotations

from pathlib import Path

import torch

HAMLET = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
          "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n")

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN3_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# per family: special tokens, the tokenizer's roles, what tokenizer(text) adds, EOS ids, template
FAMILIES = {
    "gpt2": {"special": ["<|endoftext|>"], "bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": None,
             "prefix_bos": False, "generation_eos": ["<|endoftext|>"], "template": None},
    "llama": {"special": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>"],
              "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": None, "prefix_bos": True,
              "generation_eos": ["<|end_of_text|>", "<|eot_id|>"], "template": LLAMA_TEMPLATE},
    "qwen3": {"special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "bos": None, "eos": "<|im_end|>",
              "pad": "<|endoftext|>", "prefix_bos": False, "generation_eos": ["<|im_end|>", "<|endoftext|>"],
              "template": QWEN3_TEMPLATE},
}


def train_tokenizer(family: str):
    """A byte-level BPE trained on HAMLET with the family's special tokens, as a Transformers fast tokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    spec = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=spec["special"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([HAMLET * 4] * 10, trainer)
    if spec["prefix_bos"]:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    kwargs = {k + "_token": spec[k] for k in ("bos", "eos", "pad") if spec[k]}
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if spec["template"]:
        hf.chat_template = spec["template"]
    return hf


def hf_config(family: str, vocab_size: int, **overrides):
    """A small Transformers config of the family (2 layers; GPT-2 learned positions, Llama and Qwen3 RoPE)."""
    import transformers

    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                                       **overrides)
    # today's shapes: grouped-query attention (2 key/value heads for 4 query heads), Llama 3.x's RoPE scaling,
    # Qwen3's head size of its own (16 with a hidden size of 32)
    common = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
    if family == "llama":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32}
        return transformers.LlamaConfig(**{"rope_theta": 500000.0, "rope_scaling": scaling,
                                           "tie_word_embeddings": False, **common, **overrides})
    return transformers.Qwen3Config(**{"rope_theta": 1000000.0, "tie_word_embeddings": True, "head_dim": 16, **common,
                                       **overrides})


def write_published_model(family: str, folder: Path, std: float | None = 0.5, **overrides) -> Path:
    """Save a random-weight model of ``family`` (weights drawn with ``std``; None: Transformers' own
    initialisation) with its tokenizer and generation config into ``folder``."""
    import transformers

    spec = FAMILIES[family]
    tokenizer = train_tokenizer(family)
    config = hf_config(family, len(tokenizer), **overrides)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in spec["special"]}
    config.bos_token_id = ids.get(spec["bos"]) if spec["bos"] else None
    config.eos_token_id = ids[spec["eos"]]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters() if std is not None else ():
            p.normal_(0.0, std)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=[ids[t] for t in spec["generation_eos"]],
        pad_token_id=ids.get(spec["pad"]) if spec["pad"] else None)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def hf_greedy(folder: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Transformers' own greedy continuation of ``prompt_ids`` (source ids), the new ids only."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt_ids):].tolist()


def hf_chat_ids(folder: Path, messages: list[dict], **kwargs) -> list[int]:
    """``apply_chat_template``'s ids for ``messages`` with the folder's own tokenizer."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


ZEPHYR_TEMPLATE = (  # TinyLlama-chat's layout: its role markers are plain text, "</s>" (its EOS) ends each turn
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_sentencepiece_bpe_tokenizer():
    """A Llama 2 / TinyLlama style tokenizer trained on HAMLET: BPE with byte fallback (every byte a ``<0xNN>``
    piece), a prepended U+2581 for spaces, ``<s>`` added in front of every text, and the Zephyr chat template."""
    import json

    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([HAMLET * 4] * 10, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>")
    hf.chat_template = ZEPHYR_TEMPLATE
    return hf


def write_tinyllama_model(folder: Path) -> Path:
    """A TinyLlama-shaped folder (Llama, 4 query heads for 1 key/value head, untied) with its Llama 2 tokenizer."""
    import transformers

    tokenizer = train_sentencepiece_bpe_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                      max_position_embeddings=128, tie_word_embeddings=False,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
