"""LoRA: low-rank adapters on the GPT's linear layers (Hu et al., 2021), read next to ``llm.model.gpt``.

A frozen weight W [d_out, d_in] gets a trainable update of rank r:

    y = W x + (alpha / r) * B (A dropout(x)),   A [r, d_in] (Kaiming-uniform init), B [d_out, r] (zeros)

so the adapted model starts equal to the base, and an adapted matrix trains r * (d_in + d_out) values
instead of d_in * d_out. Merging writes W + (alpha / r) B A back into a plain ``nn.Linear``: the same function
with no adapter left (``merge_lora``).

Our attention has one fused ``attn.qkv`` whose rows are [q, k, v] (sizes ``CausalSelfAttention.qkv_split``), and
a SwiGLU ``mlp.fc`` whose rows are [gate, up]. Transformers' Llama has separate q/k/v and gate/up projections and
peft gives each its own (A, B); so a fused layer here gets one pair per targeted *slice* of its rows, which is
the same function with the same parameters (``tests/test_lora.py`` checks it against peft).

Target names (``LoRAParams.targets``): ``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``fc``, ``down`` and the
groups ``attention``, ``mlp``, ``all`` (see ``expand_targets``).

Adapter tensors are named ``<linear>.lora_A.<slice>`` and ``<linear>.lora_B.<slice>`` in the model's
``state_dict`` (e.g. ``blocks.0.attn.qkv.lora_A.q``); the base weight keeps its name (``blocks.0.attn.qkv.weight``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llm.config import LoRAParams, ModelConfig

ORDER = ("q", "k", "v", "o", "gate", "up", "fc", "down")  # single targets, in the order a block computes them
PARAMS_FILE = "params/finetune.yaml"


class LoRAConfigError(ValueError):
    """A ``lora`` setting that does not fit the model; the message names the file and key."""


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus one low-rank update per named slice of its output rows.

    ``slices`` maps a name to the rows ``(start, stop)`` it adapts (the whole layer: one slice over every row).
    ``weight`` and ``bias`` are the base layer's own parameters, so their ``state_dict`` names do not change.
    """

    def __init__(self, base: nn.Linear, slices: dict[str, tuple[int, int]], rank: int, alpha: float,
                 dropout: float = 0.0, rng: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.slices, self.rank, self.scale = dict(slices), rank, alpha / rank
        self.lora_dropout = nn.Dropout(dropout)
        device = base.weight.device
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (start, stop) in self.slices.items():
            a = torch.empty(rank, self.in_features, device=device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=rng)  # nn.Linear's (and peft's) init
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(stop - start, rank, device=device))  # starts as the base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # [..., d_out]
        h = self.lora_dropout(x)
        for name, (start, stop) in self.slices.items():
            delta = F.linear(F.linear(h, self.lora_A[name]), self.lora_B[name]) * self.scale  # [..., stop - start]
            y[..., start:stop] += delta.to(y.dtype)  # linear's backward does not need its output: in place is safe
        return y

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A for every slice, as one [d_out, d_in] matrix (zero on rows without an adapter)."""
        delta = torch.zeros(self.out_features, self.in_features, device=self.weight.device)
        for name, (start, stop) in self.slices.items():
            delta[start:stop] = (self.lora_B[name].float() @ self.lora_A[name].float()) * self.scale
        return delta

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing W + (alpha / r) B A (the same function, without dropout)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight.float() + self.delta_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, rank={self.rank}, scale={self.scale:g}, " \
               f"slices={list(self.slices)}"


def expand_targets(targets: list[str], config: ModelConfig) -> list[str]:
    """The single targets that ``targets`` name for a model of ``config``, groups expanded, in model order.

    ``attention`` is q, k, v, o; ``mlp`` is gate, up, down with SwiGLU and fc, down otherwise; ``all`` is both;
    ``fc`` with SwiGLU is gate and up. Raises LoRAConfigError naming ``lora.targets`` for a target this model has
    no module for (``gate`` or ``up`` without SwiGLU)."""
    swiglu = config.mlp == "swiglu"
    mlp = ("gate", "up", "down") if swiglu else ("fc", "down")
    groups = {"attention": ("q", "k", "v", "o"), "mlp": mlp, "all": ("q", "k", "v", "o", *mlp)}
    chosen: set[str] = set()
    for name in targets:
        if name in groups:
            chosen.update(groups[name])
        elif name == "fc" and swiglu:
            chosen.update(("gate", "up"))
        elif name in ("gate", "up") and not swiglu:
            raise LoRAConfigError(
                f"{PARAMS_FILE}: lora.targets: {name!r} names no module of this model: its MLP is {config.mlp}, "
                "which has no gate/up halves (SwiGLU only); use 'fc' (mlp.fc), 'down' (mlp.proj) or 'mlp'")
        else:
            chosen.add(name)
    return [t for t in ORDER if t in chosen]


def adapted_slices(config: ModelConfig, qkv_split: tuple[int, ...], targets: list[str]
                   ) -> dict[str, dict[str, tuple[int, int]]]:
    """Per linear layer of a block (``attn.qkv``, ``attn.proj``, ``mlp.fc``, ``mlp.proj``), the row slices that
    ``targets`` adapt: ``{"attn.qkv": {"q": (0, d_q), ...}, ...}``. The qkv rows split by ``qkv_split``."""
    q, k, v = qkv_split
    hidden = config.ff_dim
    rows = {
        "q": ("attn.qkv", (0, q)), "k": ("attn.qkv", (q, q + k)), "v": ("attn.qkv", (q + k, q + k + v)),
        "o": ("attn.proj", (0, config.d_model)), "gate": ("mlp.fc", (0, hidden)),
        "up": ("mlp.fc", (hidden, 2 * hidden)), "fc": ("mlp.fc", (0, hidden)),
        "down": ("mlp.proj", (0, config.d_model)),
    }
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for name in expand_targets(targets, config):
        layer, span = rows[name]
        out.setdefault(layer, {})[name] = span
    return out


def apply_lora(model: nn.Module, params: LoRAParams, rng: torch.Generator | None = None) -> nn.Module:
    """Give ``model`` (a GPT) adapters as ``params`` says, freeze every base parameter, and return it.

    Raises LoRAConfigError naming ``lora.targets`` or ``lora.rank`` (in ``params/finetune.yaml``) for a target
    with no module, or a rank above an adapted slice's width."""
    for i, block in enumerate(model.blocks):
        for layer, slices in adapted_slices(model.config, block.attn.qkv_split, params.targets).items():
            parent_name, attr = layer.split(".")
            parent = getattr(block, parent_name)
            base = getattr(parent, attr)
            for name, (start, stop) in slices.items():
                if params.rank > min(base.in_features, stop - start):
                    raise LoRAConfigError(
                        f"{PARAMS_FILE}: lora.rank: {params.rank} exceeds the width of {name} in blocks.{i}.{layer} "
                        f"({base.in_features} in, {stop - start} out); pick a rank of at most "
                        f"{min(base.in_features, stop - start)}")
            setattr(parent, attr, LoRALinear(base, slices, params.rank, params.alpha, params.dropout, rng))
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_name(name))
    return model


def is_adapter_name(name: str) -> bool:
    """Whether a ``state_dict``/parameter name is an adapter tensor's."""
    return ".lora_A." in name or ".lora_B." in name


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` by ``state_dict`` name (detached, on the CPU, float32)."""
    return {name: t.detach().cpu().float().contiguous() for name, t in model.state_dict().items()
            if is_adapter_name(name)}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` (as ``adapter_state`` returns it) into the adapters of ``model``. Raises ValueError naming
    ``source`` when the names or shapes differ from the model's adapters."""
    own = {name: t for name, t in model.state_dict().items() if is_adapter_name(name)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: adapters do not match the model (missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]})")
    wrong = [n for n in own if own[n].shape != state[n].shape]
    if wrong:
        raise ValueError(f"{source}: adapter shapes differ from the model's: {wrong[:4]}")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` of ``model`` by its merged ``nn.Linear`` (in place) and return the model,
    now a plain GPT whose parameters all train again."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, attr, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count_adapter_parameters(model: nn.Module) -> int:
    """Trainable values in the adapters: r * (d_in + d_slice) per adapted slice."""
    return sum(p.numel() for name, p in model.named_parameters() if is_adapter_name(name))


def freeze_base_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Hold the frozen matrices of the blocks in ``dtype`` (bf16 on a GPU: half their memory); adapters, norms,
    embeddings and the head stay float32. Only for training under autocast to the same dtype."""
    for block in model.blocks:
        for module in block.modules():
            if isinstance(module, (LoRALinear, nn.Linear)) and not module.weight.requires_grad:
                module.weight.data = module.weight.data.to(dtype)
