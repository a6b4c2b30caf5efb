"""Specification of LoRA finetuning: the layer against peft, merging, training only the adapters, adapter
checkpoints tied to their base, exact resume, the peft export and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_finetune import synthetic_chats

from llm.config import FinetuneParams, LoRAParams, ModelConfig
from llm.data.chat_data import write_chat_file
from llm.data.tokenizer import ByteTokenizer
from llm.model.checkpoint import (
    CheckpointError,
    base_identity,
    load_checkpoint,
    merge_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from llm.model.gpt import GPT
from llm.model.lora import LoRAConfigError, LoRALinear, adapter_state, apply_lora, expand_targets, merge_lora
from llm.training.finetune import finetune

torch.set_num_threads(1)

LLAMA = dict(context_length=32, n_layer=2, n_head=2, d_model=32, d_ff=48, position="rope", mlp="swiglu",
             norm="rmsnorm", norm_eps=1e-6, tie_weights=False, bias=False)
GPT2 = dict(context_length=32, n_layer=2, n_head=2, d_model=32, position="learned", mlp="gelu_tanh",
            norm="layernorm", tie_weights=True, bias=True)
VOCAB = ByteTokenizer().vocab_size


def adapted_model(shape: dict, lora: LoRAParams, seed: int = 0) -> GPT:
    """A GPT of ``shape`` with random weights, biases and adapters (B not zero, so the adapters matter)."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=VOCAB, **shape))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    apply_lora(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def hf_base(model: GPT):
    """The Transformers model with ``model``'s base weights (adapters left out)."""
    import transformers

    from llm.interop.hf import ARCHITECTURES, hf_architecture, hf_config, to_hf_state_dict

    base = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    hf = getattr(transformers, ARCHITECTURES[hf_architecture(model.config)])(hf_config(model.config)).eval()
    result = hf.load_state_dict(to_hf_state_dict(base, model.config), strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys
    return hf


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))


# today's Llama shapes: grouped-query attention with a head size of its own, so q, k and v rows differ in number
LLAMA_GQA = {**LLAMA, "n_head": 4, "n_kv_head": 2, "d_head": 12}


@pytest.mark.parametrize("shape", [LLAMA, LLAMA_GQA], ids=["mha", "gqa"])
def test_lora_matches_peft_on_a_llama_shape(shape):
    from peft import LoraConfig, get_peft_model

    lora = LoRAParams(rank=4, alpha=8.0, targets=["all"])
    ours = adapted_model(shape, lora)
    peft_model = get_peft_model(hf_base(ours), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).eval()
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    layers = {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "o": "attn.proj", "gate": "mlp.fc", "up": "mlp.fc",
              "down": "mlp.proj"}
    state = ours.state_dict()
    with torch.no_grad():
        for i, layer in enumerate(peft_model.base_model.model.model.layers):
            for target, module_name in names.items():
                module = layer.get_submodule(module_name)
                module.lora_A["default"].weight.copy_(state[f"blocks.{i}.{layers[target]}.lora_A.{target}"])
                module.lora_B["default"].weight.copy_(state[f"blocks.{i}.{layers[target]}.lora_B.{target}"])
        diff = (ours(ids()).logits - peft_model(ids()).logits).abs().max().item()
        base_diff = (ours(ids()).logits - hf_base(ours)(ids()).logits).abs().max().item()
    assert diff <= 1e-5 and base_diff > 1e-2, (diff, base_diff)  # the adapters matter, and match peft's


def test_lora_q_k_v_on_gpt2_match_one_peft_pair_on_its_fused_c_attn():
    """GPT-2's c_attn is fused like ours: our q, k, v pairs of rank r are peft's one c_attn pair of rank 3r with
    A stacked and B block-diagonal (alpha 3*alpha keeps the scale)."""
    from peft import LoraConfig, get_peft_model

    lora = LoRAParams(rank=4, alpha=8.0, targets=["attention", "mlp"])
    ours = adapted_model(GPT2, lora)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, fan_in_fan_out=True,
                        target_modules=["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
                        rank_pattern={"attn.c_attn": 12}, alpha_pattern={"attn.c_attn": 24})
    peft_model = get_peft_model(hf_base(ours), config).eval()
    s = ours.state_dict()
    with torch.no_grad():
        for i, h in enumerate(peft_model.base_model.model.transformer.h):
            pairs = {h.attn.c_attn: (torch.cat([s[f"blocks.{i}.attn.qkv.lora_A.{t}"] for t in "qkv"]),
                                     torch.block_diag(*[s[f"blocks.{i}.attn.qkv.lora_B.{t}"] for t in "qkv"])),
                     h.attn.c_proj: (s[f"blocks.{i}.attn.proj.lora_A.o"], s[f"blocks.{i}.attn.proj.lora_B.o"]),
                     h.mlp.c_fc: (s[f"blocks.{i}.mlp.fc.lora_A.fc"], s[f"blocks.{i}.mlp.fc.lora_B.fc"]),
                     h.mlp.c_proj: (s[f"blocks.{i}.mlp.proj.lora_A.down"], s[f"blocks.{i}.mlp.proj.lora_B.down"])}
            for module, (a, b) in pairs.items():
                module.lora_A["default"].weight.copy_(a)
                module.lora_B["default"].weight.copy_(b)
        diff = (ours(ids()).logits - peft_model(ids()).logits).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("shape", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_merged_model_computes_what_the_adapted_one_does(shape):
    ours = adapted_model(shape, LoRAParams(rank=3, alpha=5.0, targets=["q", "v", "o", "down"]))
    with torch.no_grad():
        before = ours(ids()).logits
        merged = merge_lora(ours)
        after = merged(ids()).logits
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(GPT(merged.config).state_dict())  # a plain GPT again
    assert (before - after).abs().max().item() <= 1e-5


def test_only_adapters_train_and_the_optimizer_sees_only_them():
    from llm.training.loop import build_optimizer

    model = GPT(ModelConfig(vocab_size=VOCAB, **LLAMA))
    apply_lora(model, LoRAParams(rank=2, targets=["attention"]))
    x = ids()
    model(x, x).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert len(with_grad) == 2 * 2 * 4  # 2 layers x (q, k, v, o) x (A, B)
    optimizer = build_optimizer(model, FinetuneParams(), torch.device("cpu"))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    # r * (d_in + d_out) per adapted matrix: 4 matrices of 32 x 32 per layer
    assert sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) == 2 * 4 * 2 * (32 + 32)


def test_a_base_held_in_bf16_trains_fp32_adapters_under_autocast():
    from llm.model.lora import freeze_base_in

    model = GPT(ModelConfig(vocab_size=VOCAB, **LLAMA))
    apply_lora(model, LoRAParams(rank=2, targets=["all"]))
    freeze_base_in(model, torch.bfloat16)
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16 and model.wte.weight.dtype == torch.float32
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, x).loss
    loss.backward()
    adapters = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.isfinite().all() for p in adapters)
    assert torch.isfinite(loss)


def test_targets_expand_by_the_models_mlp_and_bad_targets_and_ranks_name_the_key():
    swiglu, gelu = ModelConfig(vocab_size=VOCAB, **LLAMA), ModelConfig(vocab_size=VOCAB, **GPT2)
    assert expand_targets(["mlp"], swiglu) == ["gate", "up", "down"]
    assert expand_targets(["mlp", "q"], gelu) == ["q", "fc", "down"]
    assert expand_targets(["fc"], swiglu) == ["gate", "up"]
    assert expand_targets(["all"], gelu) == ["q", "k", "v", "o", "fc", "down"]
    with pytest.raises(LoRAConfigError, match=r"params/finetune.yaml: lora.targets: 'gate' names no module.*gelu"):
        apply_lora(GPT(gelu), LoRAParams(targets=["gate"]))
    with pytest.raises(LoRAConfigError, match=r"params/finetune.yaml: lora.rank: 33 exceeds the width of q"):
        apply_lora(GPT(swiglu), LoRAParams(rank=33, targets=["q"]))
    from llm.config import ParamsError, load_params

    with pytest.raises(ParamsError, match=r"lora.targets"):
        load_params(FinetuneParams, None, {"method": "lora", "lora.targets": ["qq"]})


# ------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    chat = root / "chat"
    write_chat_file(chat / "train.jsonl", synthetic_chats(0, 120))
    write_chat_file(chat / "val.jsonl", synthetic_chats(1, 16))
    tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, **{**LLAMA, "context_length": 64})
    base = save_checkpoint(root / "base", GPT(config), config, tokenizer, metadata={"stage": "pretrain", "step": 10})
    return {"root": root, "chat": chat, "base": base}


def lora_params(**kw) -> FinetuneParams:
    values = {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 1, "eval_interval": 3,
              "eval_batches": 1, "checkpoint_interval": 3, "log_interval": 1, "device": "cpu", "progress": False,
              "seed": 3, "num_threads": 1, "method": "lora",
              "lora": {"rank": 2, "alpha": 4.0, "dropout": 0.1, "targets": ["q", "v", "down"]}}
    return FinetuneParams(**{**values, **kw})


def test_a_lora_run_stores_adapters_with_its_base_identity_and_loads_merged(setup, tmp_path):
    finetune(lora_params(), setup["base"], setup["chat"], tmp_path / "sft")
    files = set(verify_checkpoint(tmp_path / "sft")) and json.loads((tmp_path / "sft" / "manifest.json").read_text())
    assert "adapter.safetensors" in files and "adapter_config.json" in files and "model.safetensors" not in files
    adapter = json.loads((tmp_path / "sft" / "adapter_config.json").read_text())
    assert adapter["base"] == base_identity(setup["base"])
    assert adapter["lora"]["targets"] == ["q", "v", "down"]
    model, _, config = load_checkpoint(tmp_path / "sft")
    assert config["method"] == "lora" and not any(isinstance(m, LoRALinear) for m in model.modules())
    base, _, _ = load_checkpoint(setup["base"])
    changed = {n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert changed == {f"blocks.{i}.{layer}.weight" for i in range(2) for layer in ("attn.qkv", "mlp.proj")}
    # llm merge: a plain checkpoint that computes the same, with no base needed
    merged_dir = merge_checkpoint(tmp_path / "sft", tmp_path / "merged")
    assert (merged_dir / "model.safetensors").exists() and not (merged_dir / "adapter.safetensors").exists()
    merged, _, merged_config = load_checkpoint(merged_dir)
    assert merged_config["merged_from"]["base"] == adapter["base"]
    with torch.no_grad():
        assert torch.equal(merged(ids()).logits, model(ids()).logits)


def test_lora_resume_reproduces_the_uninterrupted_run_bit_for_bit(setup, tmp_path):
    params = lora_params()
    straight = finetune(params, setup["base"], setup["chat"], tmp_path / "straight")
    finetune(params, setup["base"], setup["chat"], tmp_path / "split", until_step=3)
    resumed = finetune(params, setup["base"], setup["chat"], tmp_path / "split")
    assert resumed.step == straight.step == 6
    assert [h["train/loss"] for h in resumed.history] == [h["train/loss"] for h in straight.history]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it trained


def test_adapters_refuse_a_base_that_differs(setup, tmp_path):
    finetune(lora_params(max_steps=1), setup["base"], setup["chat"], tmp_path / "sft")
    model, tokenizer, _ = load_checkpoint(setup["base"])
    with torch.no_grad():
        model.wte.weight.mul_(2.0)
    other = save_checkpoint(tmp_path / "other", model, model.config, tokenizer)
    with pytest.raises(CheckpointError, match=r"sft: its adapters were trained on a base .* but .*other holds"):
        load_checkpoint(tmp_path / "sft", base=other)
    moved = tmp_path / "moved"
    setup["base"].rename(moved)
    try:
        with pytest.raises(CheckpointError, match=r"its base checkpoint .*base is not there"):
            load_checkpoint(tmp_path / "sft")
        assert load_checkpoint(tmp_path / "sft", base=moved).model is not None  # the same base elsewhere is fine
    finally:
        moved.rename(setup["base"])


def test_adapter_only_export_loads_in_peft_onto_the_exported_base(setup, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llm.interop.hf import export_hf, export_peft_adapter

    finetune(lora_params(max_steps=2, lora={"rank": 2, "alpha": 4.0, "targets": ["all"]}), setup["base"],
             setup["chat"], tmp_path / "sft")
    export_hf(setup["base"], tmp_path / "hf", verify=False)
    summary = export_peft_adapter(tmp_path / "sft", tmp_path / "adapter")
    assert summary["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"])
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ours, _, _ = load_checkpoint(tmp_path / "sft")
    with torch.no_grad():
        diff = (ours(ids()).logits - peft_model(ids()).logits).abs().max().item()
        base_diff = (load_checkpoint(setup["base"]).model(ids()).logits - ours(ids()).logits).abs().max().item()
    assert diff <= 1e-5 and base_diff > 0, (diff, base_diff)
    # llm export hf of the adapter checkpoint itself: the merged model, as Transformers weights
    assert export_hf(tmp_path / "sft", tmp_path / "hf-merged")["parity"]["ok"]
    merged_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged_hf(ids()).logits - peft_model(ids()).logits).abs().max().item() <= 1e-5


def test_gpt2_adapter_only_export_stacks_q_k_v_into_c_attn(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llm.interop.hf import export_hf, export_peft_adapter

    lora = LoRAParams(rank=2, alpha=4.0, targets=["q", "v", "o", "fc"])
    model = adapted_model(GPT2, lora)
    tokenizer = ByteTokenizer()
    base = GPT(model.config)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    base_dir = save_checkpoint(tmp_path / "base", base, base.config, tokenizer)
    adapter_dir = save_checkpoint(tmp_path / "sft", model, model.config, tokenizer, metadata={
        "adapter": {"lora": lora.model_dump(), "base": base_identity(base_dir)}})
    export_hf(base_dir, tmp_path / "hf", verify=False)
    summary = export_peft_adapter(adapter_dir, tmp_path / "adapter")
    assert summary["target_modules"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        diff = (model(ids()).logits - peft_model(ids()).logits).abs().max().item()
    assert diff <= 1e-5, diff
    assert adapter_state(model).keys()  # the adapters are what was exported


def test_cli_finetunes_with_lora_and_generates_from_the_adapter_checkpoint(setup, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import llm.cli

    monkeypatch.setenv("LLM_TRACKING", "0")
    monkeypatch.chdir(tmp_path)
    sets = ["max_steps=2", "batch_size=2", "eval_interval=2", "eval_batches=1", "checkpoint_interval=2",
            "device=cpu", "progress=false", "num_threads=1", "method=lora", "lora.rank=2"]
    args = ["finetune", "--base", str(setup["base"]), "--chat-source", str(setup["chat"]), "--chat-dir",
            str(tmp_path / "chat"), "--out", str(tmp_path / "sft"), "--clean", str(tmp_path / "none"),
            "--params", str(Path(__file__).resolve().parents[1] / "params" / "finetune.yaml")]
    for item in sets:
        args += ["--set", item]
    result = CliRunner().invoke(llm.cli.app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sft" / "adapter.safetensors").exists()
    out = CliRunner().invoke(llm.cli.app, ["generate", "--model", str(tmp_path / "sft"), "--prompt", "say",
                                           "--max-new-tokens", "5", "--temperature", "0", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    model, tokenizer, _ = load_checkpoint(tmp_path / "sft")
    from llm.inference.decoding import SamplingParams, complete
    from llm.inference.generate import TorchGenerator

    expected = "".join(complete(TorchGenerator(model, tokenizer), "say", SamplingParams(max_new_tokens=5,
                                                                                        temperature=0)))
    assert out.output.strip() == ("say" + expected).strip()
    merged = CliRunner().invoke(llm.cli.app, ["merge", "--model", str(tmp_path / "sft"), "--out",
                                              str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output and (tmp_path / "merged" / "model.safetensors").exists()


@pytest.mark.slow
def test_onnx_export_of_an_adapter_checkpoint_is_the_merged_model(setup, tmp_path):
    from llm.inference.export import check_parity, export_onnx

    finetune(lora_params(max_steps=2, lora={"rank": 2, "alpha": 4.0, "targets": ["all"]}), setup["base"],
             setup["chat"], tmp_path / "sft")
    summary = export_onnx(tmp_path / "sft", tmp_path / "onnx", verify=True, static_cache=False)
    assert summary["parity"]["passed"]  # against the checkpoint as load_checkpoint gives it: merged
    assert not check_parity(setup["base"], tmp_path / "onnx")["passed"]  # and the adapters are in the graph
