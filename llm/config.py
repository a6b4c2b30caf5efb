"""Typed configuration: one pydantic model per concern, each matching a file in ``params/``.

Every model forbids unknown keys, so a typo in a YAML file is an error that names the key.
``load_params`` reads a YAML file and re-raises validation errors with the file name attached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    """Shape of the GPT. ``vocab_size`` is filled in from the tokenizer when left unset."""

    vocab_size: int | None = Field(None, gt=0, description="set from the tokenizer when None")
    context_length: int = Field(256, gt=0)
    n_layer: int = Field(6, gt=0)
    n_head: int = Field(6, gt=0)
    d_model: int = Field(384, gt=0)
    d_ff: int | None = Field(None, gt=0,
                             description="hidden width of the MLP; None picks 4*d_model (8/3*d_model for swiglu)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    position: Literal["learned", "sinusoidal", "rope", "none"] = "rope"
    mlp: Literal["gelu", "swiglu", "relu2"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    qk_norm: bool = False
    tie_weights: bool = True
    bias: bool = False
    rope_theta: float = Field(10000.0, gt=0)

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                f"pick d_model as a multiple of n_head (e.g. {self.n_head * max(1, self.d_model // self.n_head)})"
            )
        if self.position == "rope" and self.head_dim % 2 != 0:
            raise ValueError(
                f"rope needs an even head_dim, but d_model/n_head = {self.d_model}/{self.n_head} = {self.head_dim}"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":
            # 8/3 * d keeps the parameter count of a 4*d GELU MLP; round up to a multiple of 64
            return 64 * ((int(8 * self.d_model / 3) + 63) // 64)
        return 4 * self.d_model


class DataParams(StrictModel):
    """Cleaning and splitting of the raw corpus (``params/data.yaml``)."""

    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of documents (by count) held out")
    split_seed: int = 1337
    min_doc_chars: int = Field(500, ge=0, description="documents shorter than this after cleaning are dropped")
    strip_gutenberg: bool = True
    dedup_exact: bool = True
    dedup_near: bool = True
    # on the default corpus, two editions of one play score well above this and two different works far below
    near_dup_threshold: float = Field(
        0.05, gt=0.0, le=1.0, description="word-shingle Jaccard at or above which two documents are near duplicates")
    shingle_size: int = Field(5, gt=0)
    num_perm: int = Field(128, gt=0, description="MinHash permutations used to estimate Jaccard")


class TokenizerParams(StrictModel):
    """Which tokenizer to train and how (``params/tokenizer.yaml``)."""

    kind: Literal["char", "byte", "bpe", "unigram"] = "char"
    vocab_size: int = Field(4096, gt=0, description="target size for bpe/unigram; ignored by char and byte")
    character_coverage: float = Field(1.0, gt=0.0, le=1.0)
    max_train_chars: int = Field(50_000_000, gt=0, description="cap on text fed to the trainer")
    seed: int = 1337


class PretrainParams(StrictModel):
    """Optimisation and bookkeeping for pretraining (``params/pretrain.yaml``)."""

    seed: int = 1337
    max_steps: int = Field(2000, gt=0)
    batch_size: int = Field(32, gt=0, description="sequences per micro-batch")
    grad_accum_steps: int = Field(1, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr as a fraction of learning_rate")
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, gt=0.0, lt=1.0)
    beta2: float = Field(0.99, gt=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0, description="max global grad norm; 0 disables clipping")
    eval_interval: int = Field(200, gt=0)
    eval_batches: int = Field(20, gt=0)
    checkpoint_interval: int = Field(500, gt=0)
    log_interval: int = Field(10, gt=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    compile: bool = False
    num_threads: int = Field(0, ge=0, description="torch CPU threads; 0 keeps torch's default")
    progress: bool = True


class EvalParams(StrictModel):
    """Evaluation of a checkpoint (``params/evaluate.yaml``)."""

    batch_size: int = Field(16, gt=0)
    max_batches: int = Field(0, ge=0, description="0 evaluates the whole token file")
    prompts: list[str] = Field(default_factory=lambda: ["ROMEO.\n", "To be, or not", "KING HENRY.\nMy lords,"])
    max_new_tokens: int = Field(200, gt=0)
    temperature: float = Field(0.8, ge=0.0)
    top_k: int | None = Field(50, gt=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    max_conversations: int | None = Field(200, gt=0, description="val conversations scored for chat models; None: all")
    sample_conversations: int = Field(3, ge=0, description="val conversations answered in samples.md for chat models")


class ExportParams(StrictModel):
    """ONNX export of the chat model (``params/export.yaml``)."""

    opset: int | None = Field(None, ge=17, description="ONNX opset; None: the exporter's default")
    quantize: bool = Field(True, description="also write model.int8.onnx (dynamic int8 quantization)")
    verify: bool = Field(True, description="check ONNX Runtime against PyTorch and fail the export on a mismatch")
    atol: float = Field(1e-4, gt=0, description="max abs logit difference allowed by the parity check")


P = TypeVar("P", bound=BaseModel)


class ParamsError(ValueError):
    """A params file is missing, unreadable or invalid; the message names the file and key."""


def format_validation_error(err: ValidationError, source: str) -> str:
    """Render a pydantic error as one line per problem: ``source: key: what was expected``."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        got = "" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"
        lines.append(f"{source}: {key}: {msg}{got}")
    return "\n".join(lines)


def validate_params(model: type[P], data: dict | None, source: str) -> P:
    """Validate ``data`` against ``model``; raise ParamsError naming ``source`` and each bad key."""
    try:
        return model.model_validate(data or {})
    except ValidationError as err:
        raise ParamsError(format_validation_error(err, source)) from None


def load_params(model: type[P], path: str | Path, overrides: dict | None = None) -> P:
    """Read a YAML params file, apply ``overrides`` on top, and validate it.

    Raises ParamsError naming the file (and key) when the file is missing, not a mapping or invalid.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) if path.exists() else {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    data = {**data, **(overrides or {})}
    return validate_params(model, data, str(path))


class ChatDataParams(StrictModel):
    """How chat conversations are derived from the plays, or split when supplied (``chat_data`` in
    ``params/finetune.yaml``)."""

    max_turns: int = Field(2, gt=0, description="user/assistant exchanges per play-derived conversation")
    min_speech_chars: int = Field(2, ge=1, description="shorter speeches end a dialogue run")
    max_speech_chars: int = Field(400, gt=0,
                                  description="longer speeches end a dialogue run (they rarely fit a context)")
    system_template: str = Field("You are {name}. Answer in character.", description="{name}: the answering character")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of user-supplied conversations held out")
    split_seed: int = 1337

    @model_validator(mode="after")
    def _check_template(self) -> ChatDataParams:
        try:
            self.system_template.format(name="X")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"system_template may use only {{name}}: {err!r}") from None
        if self.min_speech_chars > self.max_speech_chars:
            raise ValueError(f"min_speech_chars={self.min_speech_chars} > max_speech_chars={self.max_speech_chars}")
        return self


class FinetuneParams(PretrainParams):
    """Supervised finetuning on chat data (``params/finetune.yaml``): the pretraining loop with its own defaults.

    The model shape comes from the base checkpoint; only ``dropout`` may be overridden.
    """

    max_steps: int = Field(300, gt=0)
    batch_size: int = Field(16, gt=0, description="conversations per micro-batch")
    learning_rate: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    eval_interval: int = Field(50, gt=0)
    eval_batches: int = Field(10, gt=0, description="val batches of conversations per evaluation")
    checkpoint_interval: int = Field(100, gt=0)
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="None keeps the base model's dropout")
    chat_data: ChatDataParams = Field(default_factory=ChatDataParams)
