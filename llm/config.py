"""Typed configuration: one pydantic model per concern, each matching a file in ``params/``.

Every model forbids unknown keys and non-finite floats (``.inf``, ``.nan``), so a typo or a bad value in a
YAML file is an error that names the key. ``load_params`` reads a YAML file (refusing a missing file and a
key written twice), applies overrides key by key (``chat_data.max_turns=3`` changes only that key), and
re-raises validation errors with the file name attached.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# Upper bounds on sizes, checked when a params file is read, before anything is allocated: each is far above
# any model this project trains or imports (Qwen3: 40,960 positions, 151,936 tokens, 94 layers, d_ff 25,600).
MAX_CONTEXT = 1 << 20
MAX_VOCAB = 1 << 22
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_WIDTH = 1 << 16
MAX_BATCH = 1 << 16
MAX_YAML_VALUES = 100_000  # values a params file may expand to through its aliases (``*base``)


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, every float must be finite, values are re-validated
    on assignment."""

    # allow_inf_nan=False: a learning_rate of .inf or a val_fraction of .nan passes gt/lt bounds otherwise
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_coercion(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse what pydantic's lax mode would coerce: ``true`` for a number (``n_layer: true`` would be 1),
        a string or a number for a flag (``compile: 'yes'`` would be True), a string for an integer."""
        kinds = _scalar_kinds(cls.model_fields[info.field_name].annotation)
        if value is None or not kinds:
            return value
        if bool in kinds:
            if not isinstance(value, bool):
                raise PydanticCustomError("not_converted", "Input should be a valid boolean: true or false "
                                          "(anything else is not converted)")
        elif isinstance(value, bool) or (isinstance(value, str) and kinds != {float}):
            # a float may be a string: YAML 1.1 reads ``3e-4`` (no dot) as one, and pydantic parses it strictly
            raise PydanticCustomError("not_converted", "Input should be a valid {what} (a boolean or a string is "
                                      "not converted)", {"what": "integer" if kinds == {int} else "number"})
        return value


def _scalar_kinds(annotation: Any) -> set[type]:
    """``{int}``, ``{float}``, ``{bool}`` (or two of them) for a field typed so, with or without None;
    empty for any other field (strings, sizes with units, lists, nested configs), left to pydantic."""
    kinds = {int, float, bool}
    parts = set(getattr(annotation, "__args__", ())) - {type(None)} or {annotation}
    return parts if parts <= kinds else set()


class RopeScaling(StrictModel):
    """How RoPE's frequencies are rescaled for a context longer than the one pretraining saw (``rope_scaling`` of
    ``ModelConfig``; Transformers' ``rope_type`` and key names, and the same numbers, ``llm.model.gpt.rope_tables``).

    - ``linear``: every frequency divided by ``factor`` (position interpolation, Chen et al., 2023).
    - ``llama3`` (Llama 3.1 and 3.2): frequencies whose wavelength exceeds ``original_max_position_embeddings /
      low_freq_factor`` divided by ``factor``, those below ``original_max_position_embeddings / high_freq_factor``
      kept, a linear blend in between.
    - ``yarn`` (Peng et al., 2023; Qwen3's long-context setting): a blend from kept (high frequencies, more than
      ``beta_fast`` rotations over the original context) to divided by ``factor`` (fewer than ``beta_slow``), and
      cos and sin multiplied by ``attention_factor`` (None: 0.1 ln(factor) + 1), which scales every attention logit.
    """

    rope_type: Literal["linear", "llama3", "yarn"]
    factor: float = Field(gt=0, description="how many times longer the context gets")
    original_max_position_embeddings: int | None = Field(None, gt=0,
                                                         description="the pretraining context (llama3, yarn)")
    low_freq_factor: float | None = Field(None, gt=0, description="llama3: where frequencies start to be divided")
    high_freq_factor: float | None = Field(None, gt=0, description="llama3: where frequencies stay as they are")
    beta_fast: float | None = Field(None, gt=0, description="yarn: rotations above which a frequency is kept (32)")
    beta_slow: float | None = Field(None, gt=0, description="yarn: rotations below which it is divided (1)")
    attention_factor: float | None = Field(None, gt=0, description="yarn: cos/sin scale; None: 0.1 ln(factor) + 1")
    truncate: bool | None = Field(None, description="yarn: round the blend's bounds to whole channels (True)")

    @model_validator(mode="after")
    def _check_keys(self) -> RopeScaling:
        needs = {"linear": (), "llama3": ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
                 "yarn": ("original_max_position_embeddings",)}[self.rope_type]
        takes = {"linear": (), "llama3": needs,
                 "yarn": (*needs, "beta_fast", "beta_slow", "attention_factor", "truncate")}[self.rope_type]
        for name in needs:
            if getattr(self, name) is None:
                raise ValueError(f"rope_scaling.{name} is required for rope_type {self.rope_type}")
        optional = ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "beta_fast",
                    "beta_slow", "attention_factor", "truncate")
        for name in optional:
            if name not in takes and getattr(self, name) is not None:
                raise ValueError(f"rope_scaling.{name} does not apply to rope_type {self.rope_type}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                             f"low_freq_factor={self.low_freq_factor}")
        return self


class ModelConfig(StrictModel):
    """Shape of the GPT. ``vocab_size`` is filled in from the tokenizer when left unset.

    ``n_kv_head`` (grouped-query attention: fewer key/value heads than query heads, each shared by
    ``n_head / n_kv_head`` query heads), ``d_head`` and ``rope_scaling`` default to None, which gives the
    model of a config written before they existed: as many key/value heads as query heads, ``d_model / n_head``
    channels per head, plain RoPE.
    """

    vocab_size: int | None = Field(None, gt=0, le=MAX_VOCAB, description="set from the tokenizer when None")
    context_length: int = Field(256, gt=0, le=MAX_CONTEXT)
    n_layer: int = Field(6, gt=0, le=MAX_LAYERS)
    n_head: int = Field(6, gt=0, le=MAX_HEADS)
    n_kv_head: int | None = Field(None, gt=0, le=MAX_HEADS, description="key/value heads (grouped-query "
                                  "attention): a divisor of n_head; None: n_head")
    d_model: int = Field(384, gt=0, le=MAX_WIDTH)
    d_head: int | None = Field(None, gt=0, le=MAX_WIDTH, description="channels per head; None: d_model / n_head")
    d_ff: int | None = Field(None, gt=0, le=4 * MAX_WIDTH,
                             description="hidden width of the MLP; None picks 4*d_model (8/3*d_model for swiglu)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    position: Literal["learned", "sinusoidal", "rope", "none"] = "rope"
    mlp: Literal["gelu", "gelu_tanh", "swiglu", "relu2"] = Field(
        "gelu", description="gelu: exact (erf); gelu_tanh: GPT-2's tanh approximation")
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = Field(1e-5, gt=0, description="epsilon of every norm (GPT-2: 1e-5; Llama, Qwen3: 1e-6)")
    qk_norm: bool = False
    tie_weights: bool = True
    bias: bool = False
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = Field(None, description="RoPE frequency scaling (Llama 3.x, Qwen3 yarn); "
                                             "None: plain RoPE")

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_head is None and self.d_model % self.n_head != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                f"pick d_model as a multiple of n_head (e.g. {self.n_head * max(1, self.d_model // self.n_head)}) "
                "or set d_head"
            )
        if self.n_kv_head is not None and self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}: each key/value "
                             "head serves the same number of query heads")
        if self.position == "rope" and self.head_dim % 2 != 0:
            source = f"d_head = {self.d_head}" if self.d_head else f"d_model/n_head = {self.d_model}/{self.n_head}"
            raise ValueError(f"rope needs an even head_dim, but {source} = {self.head_dim}")
        if self.rope_scaling is not None and self.position != "rope":
            raise ValueError(f"rope_scaling applies to position: rope only, not position: {self.position}")
        return self

    @property
    def head_dim(self) -> int:
        """Channels per head: ``d_head``, or ``d_model / n_head`` when unset."""
        return self.d_head if self.d_head is not None else self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_head``, or ``n_head`` (plain multi-head attention) when unset."""
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

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

    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share held out for validation: of the documents "
                                "(by count) in a split by document, of the bytes in a split into sections")
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
    vocab_size: int = Field(4096, gt=0, le=MAX_VOCAB,
                            description="target size for bpe/unigram; ignored by char and byte")
    character_coverage: float = Field(1.0, gt=0.0, le=1.0)
    max_train_chars: int = Field(50_000_000, gt=0, description="cap on text fed to the trainer")
    seed: int = 1337


LoggerName = Literal["mlflow", "tensorboard", "wandb", "csv"]


def _tracking_field() -> Any:
    return Field(default_factory=lambda: ["mlflow"], description="where the run's params, tags and metrics go: any of "
                 "mlflow, tensorboard (logs/tensorboard/), wandb (logs/wandb/), csv (logs/csv/); [] logs nowhere")


def _distinct_loggers(value: list[str]) -> list[str]:
    repeated = sorted({name for name in value if value.count(name) > 1})
    if repeated:
        raise ValueError(f"tracking names {', '.join(repeated)} more than once")
    return value
class LaunchParams(StrictModel):
    """How many processes train (``launch`` in ``params/pretrain.yaml`` and ``params/finetune.yaml``).

    More than one process on one node, or more than one node, makes the stage run its training under PyTorch's
    elastic launcher (``python -m torch.distributed.run``; ``llm.training.launch``), whatever started the stage
    (``dvc repro``, ``python -m flows``, ``llm pipeline``, a Prefect deployment). ``nproc_per_node: auto`` is every
    visible GPU, and 1 process where there is none.
    """

    nproc_per_node: int | Literal["auto"] = Field(
        "auto", description="processes on this node: a number, or auto (every visible GPU; 1 on CPU)")
    nnodes: int = Field(1, gt=0, le=MAX_BATCH, description="machines in the job (each runs the stage itself)")
    rdzv_endpoint: str | None = Field(None, description="host:port of the rendezvous (node 0) when nnodes > 1")
    rdzv_id: str = Field("llm", min_length=1, description="the job's name, the same on every node")
    max_restarts: int = Field(0, ge=0, description="times the launcher restarts the workers after a failure (each "
                              "restart resumes from the last checkpoint)")

    @field_validator("nproc_per_node", mode="before")
    @classmethod
    def _auto_or_count(cls, value: Any) -> Any:
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_BATCH):
            raise ValueError(f"must be auto or a number of processes from 1 to {MAX_BATCH}")
        return value

    @model_validator(mode="after")
    def _endpoint_for_nodes(self) -> LaunchParams:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint: host:port of node 0, reachable from every node")
        return self


class PretrainParams(StrictModel):
    """Optimisation and bookkeeping for pretraining (``params/pretrain.yaml``)."""

    seed: int = 1337
    max_steps: int = Field(2000, ge=0, description="0: no training, the start model of params/base.yaml evaluated "
                           "and checkpointed as it is (finetune a published model without continued pretraining)")
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description="sequences per micro-batch")
    grad_accum_steps: int = Field(1, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr as a fraction of learning_rate")
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, gt=0.0, lt=1.0)
    beta2: float = Field(0.99, gt=0.0, lt=1.0)
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="adamw: AdamW for every weight; muon: Muon for the blocks' matrices, AdamW for the rest")
    muon_lr: float = Field(0.02, gt=0, description="peak learning rate of the Muon matrices (optimizer: muon)")
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0, description="Muon's Nesterov momentum (optimizer: muon)")
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
    tracking: list[LoggerName] = _tracking_field()
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every process holds the whole model and optimizer; fsdp: FSDP2 shards them over "
        "the processes, checkpoints through torch.distributed.checkpoint")
    launch: LaunchParams = Field(default_factory=LaunchParams)

    _check_tracking = field_validator("tracking")(_distinct_loggers)


class EvalParams(StrictModel):
    """Evaluation of a checkpoint (``params/evaluate.yaml``)."""

    batch_size: int = Field(16, gt=0, le=MAX_BATCH)
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
    tracking: list[LoggerName] = _tracking_field()

    _check_tracking = field_validator("tracking")(_distinct_loggers)


class BaseParams(StrictModel):
    """Where the model starts (``params/base.yaml``): from scratch, or from a published model.

    With ``hf_folder`` the tokenizer stage takes that model's tokenizer instead of training one, and
    pretraining continues that model on the corpus instead of starting from random weights (its shape
    replaces ``params/model.yaml``'s, except ``dropout``): "finetune GPT-2 on my text" is one ``dvc repro``.
    """

    hf_folder: str | None = Field(None, description="a local Transformers save_pretrained folder (safetensors) of "
                                  "GPT-2, Llama or Qwen3; None: train from scratch")
    context_length: int | None = Field(None, gt=0, le=MAX_CONTEXT, description="shorten the imported model's context "
                                       "(faster on a CPU); None keeps it")
    preset: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+$", description="a recipe, params/presets/<preset>.yaml:"
                               " its tokenizer, model and pretrain sections override those params files (read_preset)")


PRESET_SECTIONS = ("tokenizer", "model", "pretrain")


def read_preset(params_dir: str | Path, name: str | None, section: str) -> dict[str, Any]:
    """The ``section`` (``tokenizer``, ``model`` or ``pretrain``) of the recipe ``params_dir/presets/<name>.yaml``:
    values that override that params file's, before any ``--set``. Empty for ``name`` None or a section the
    preset leaves alone. Raises ParamsError naming the file when it is missing, not YAML, or holds another section."""
    if name is None:
        return {}
    path = Path(params_dir) / "presets" / f"{name}.yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        known = sorted(p.stem for p in (Path(params_dir) / "presets").glob("*.yaml"))
        raise ParamsError(f"{path}: no such preset (params/base.yaml: preset: {name}); known: {known}") from None
    data = parse_yaml(text, str(path)) or {}
    unknown = set(data) - set(PRESET_SECTIONS) if isinstance(data, dict) else {"(not a mapping)"}
    if unknown:
        raise ParamsError(f"{path}: unknown section(s) {sorted(unknown)}; a preset holds {list(PRESET_SECTIONS)}")
    return dict(data.get(section) or {})


class ExportParams(StrictModel):
    """ONNX export of the chat model (``params/export.yaml``)."""

    opset: int | None = Field(None, ge=17, description="ONNX opset; None: the exporter's default")
    quantize: bool = Field(True, description="also write model.int8.onnx (dynamic int8 quantization)")
    static_cache: bool = Field(True, description="also write model.static.onnx, the serving graph whose cache "
                               "onnxruntime updates in place (llm serve batches with it)")
    verify: bool = Field(True, description="check ONNX Runtime against PyTorch and fail the export on a mismatch")
    atol: float = Field(1e-4, gt=0, description="max abs logit difference allowed by the parity check")
    hf: bool = Field(False, description="also write artifacts/hf, a Transformers folder (GPT-2, Llama or Qwen3 "
                     "shapes only), checked with the same atol")


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


def validate_params(model: type[P], data: Mapping | None, source: str) -> P:
    """Validate ``data`` against ``model``; raise ParamsError naming ``source`` and each bad key."""
    try:
        return model.model_validate(data or {})
    except ValidationError as err:
        raise ParamsError(format_validation_error(err, source)) from None


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_unique_keys(loader: yaml.SafeLoader, node: yaml.Node, source: str, path: str = "",
                       seen: list[int] | None = None) -> None:
    """Raise ParamsError naming ``source``, the key and both lines when a mapping holds a key twice
    (PyYAML would keep the last value silently), or when the document expands, through aliases of aliases,
    to more than ``MAX_YAML_VALUES`` values (nine nested ``*a`` make billions: refused before any is built)."""
    seen = [0] if seen is None else seen
    seen[0] += 1
    if seen[0] > MAX_YAML_VALUES:
        raise ParamsError(f"{source}: line {node.start_mark.line + 1}: the document expands to more than "
                          f"{MAX_YAML_VALUES} values through its aliases (*name); write the values out")
    if isinstance(node, yaml.MappingNode):
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # ``<<: *base`` may be overridden by explicit keys, as YAML intends
                _check_unique_keys(loader, value_node, source, path, seen)
                continue
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            name = f"{path}{key}"
            try:
                first = first_line.get(key)
            except TypeError:  # an unhashable key (a list): the constructor rejects it with its own message
                continue
            if first is not None:
                raise ParamsError(f"{source}: line {line}: duplicate key {name!r} (first on line {first}); "
                                  "keep one of them")
            first_line[key] = line
            _check_unique_keys(loader, value_node, source, f"{name}.", seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(loader, item, source, f"{path}{i}.", seen)


def parse_yaml(text: str, source: str) -> Any:
    """The value of the YAML document ``text`` (None when it is empty), read like ``yaml.safe_load``.

    Raises ParamsError naming ``source`` for invalid YAML and for a mapping that holds a key twice (with
    the key and both line numbers).
    """
    stream = io.StringIO(text)
    stream.name = source  # PyYAML's own messages then say where: in "params/data.yaml", line 3, column 1
    loader = yaml.SafeLoader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(loader, node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ParamsError(f"{source}: not valid YAML: {err}") from None
    finally:
        loader.dispose()


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any] | None, source: str) -> dict[str, Any]:
    """``data`` with ``overrides`` applied in order; returns a new dict and leaves ``data`` as it was.

    A dotted key (``chat_data.max_turns``) names a key inside a mapping. A mapping value is merged key by
    key into the mapping it overrides, so ``{"chat_data": {"max_turns": 3}}`` changes ``max_turns`` and keeps
    the other ``chat_data`` keys; any other value replaces the old one. Raises ParamsError naming ``source``
    and the override when a dotted key has an empty part or runs through a value that is not a mapping.
    """
    merged = copy.deepcopy(dict(data))
    for key, value in (overrides or {}).items():
        parts = str(key).split(".")
        if not all(part.strip() for part in parts):
            raise ParamsError(f"{source}: override {key!r}: a key may not be empty (write a.b, not a..b or .a)")
        target = merged
        for depth, part in enumerate(parts[:-1]):
            inner = target.get(part)
            if inner is None:
                inner = target[part] = {}
            elif not isinstance(inner, dict):
                raise ParamsError(f"{source}: override {key!r}: {'.'.join(parts[:depth + 1])} is {inner!r}, "
                                  "not a mapping of keys")
            target = inner
        target[parts[-1]] = _merge_value(target.get(parts[-1]), value)
    return merged


def _merge_value(old: Any, new: Any) -> Any:
    """``new`` merged into ``old``: mappings key by key (recursively), anything else replaced."""
    if isinstance(old, dict) and isinstance(new, Mapping):
        return {**old, **{k: _merge_value(old.get(k), v) for k, v in new.items()}}
    return copy.deepcopy(new)


def load_params(model: type[P], path: str | Path | None, overrides: Mapping[str, Any] | None = None, *,
                preset: Mapping[str, Any] | None = None) -> P:
    """Read the YAML params file ``path``, apply ``preset`` (a recipe's section: ``read_preset``) then ``overrides``
    on top (``apply_overrides``: dotted keys and mappings change only the keys they name), and validate it
    against ``model``.

    ``path=None`` says there is no params file: the model's defaults with ``overrides``. A path that does
    not exist is an error, never the defaults in disguise.

    Raises ParamsError naming the file (and key, and line where there is one) when the file is missing or
    unreadable, is not valid YAML, holds a key twice, is not a mapping, or holds an invalid value.
    """
    if path is None:
        return validate_params(model, apply_overrides({}, overrides, "overrides"), f"{model.__name__} (no params file)")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found (looked for {path.absolute()}); run from the project "
                          "root, or name an existing file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: cannot read the params file: {err}") from None
    data = parse_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    data = apply_overrides(data, preset, f"{path} (preset)")
    return validate_params(model, apply_overrides(data, overrides, str(path)), str(path))


def check_until_step(until_step: int | None) -> None:
    """Refuse an ``until_step`` that would train nothing or everything by accident: it must be None
    (train to ``max_steps``) or a step number of at least 1. Raises ParamsError naming ``until_step``."""
    if until_step is not None and (isinstance(until_step, bool) or not isinstance(until_step, int) or until_step < 1):
        raise ParamsError(f"until_step={until_step!r}: must be a step number of at least 1 "
                          "(leave it unset to train to max_steps)")


class FetchLimits(StrictModel):
    """Caps on what fetching a corpus source may read and write (``llm.data.corpus.fetch_corpus``).

    A source past a cap is refused with an error that names the cap and how to raise it; nothing is
    written. Sizes accept units (``4GB``, ``512MiB``). They are options of ``llm data fetch`` rather than
    keys of a params file, as fetching is not a pipeline stage: its output is versioned by ``data.dvc``.
    """

    max_bytes: ByteSize = Field(ByteSize(2_000_000_000), gt=0,
                                description="total bytes of a download, and of the .txt files written")
    max_member_bytes: ByteSize = Field(ByteSize(1_000_000_000), gt=0,
                                       description="bytes of one archive member, uncompressed")
    max_members: int = Field(100_000, gt=0, description="entries of an archive, of any kind")
    timeout_s: float = Field(3600.0, gt=0, description="deadline for a whole URL fetch, retries included")


class ServeLimits(StrictModel):
    """What ``llm serve`` accepts and how much work it queues (options of ``llm serve``, like FetchLimits).

    A request past a limit is refused with the HTTP status that says why (413 for its size, 400 for its
    tokens, 429 when the queue is full, 504 past the timeout) before any work is spent on it; a client too
    slow to send its request is cut (408 and a closed socket), and the connections are capped
    (``llm.connection_limits``).
    """

    max_request_bytes: ByteSize = Field(ByteSize(1 << 20), gt=0, description="bytes of a request body")
    max_prompt_tokens: int = Field(4096, gt=0, description="tokens of a prompt (the chat template included)")
    max_tokens: int = Field(1024, gt=0, description="the largest max_tokens a request may ask for")
    default_max_tokens: int = Field(128, gt=0, description="max_tokens of a request that does not say")
    max_batch: int = Field(8, gt=0, description="requests decoded together")
    max_queue: int = Field(64, gt=0, description="requests waiting for a place in the batch")
    request_timeout_s: float = Field(60.0, gt=0, description="deadline of a request, queueing included")
    stream_interval_s: float = Field(0.02, ge=0, description="a streamed answer's tokens that decode within "
                                     "this long of its last chunk go out as one chunk (0: each at once)")
    max_connections: int = Field(1000, gt=0, description="open connections; past it the one idle longest is "
                                 "closed (kept below the process's file limit, ulimit -n)")
    header_timeout_s: float = Field(10.0, gt=0, description="a request's headers must all arrive within this")
    body_timeout_s: float = Field(30.0, gt=0, description="a request's body must all arrive within this of its "
                                  "headers")
    keep_alive_s: float = Field(5.0, gt=0, description="an idle kept-alive connection is closed after this")
    engine_heartbeat_timeout_s: float = Field(2.0, gt=0, description="an engine silent this long is killed and "
                                              "replaced (its requests: 503)")
    engine_max_restarts: int = Field(5, ge=0, description="more engine replacements than this within "
                                     "engine_restart_window_s: the server exits non-zero")
    engine_restart_window_s: float = Field(60.0, gt=0, description="the window of engine_max_restarts")

    @model_validator(mode="after")
    def _check_default(self) -> ServeLimits:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} > max_tokens={self.max_tokens}")
        return self


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


LoRATarget = Literal["q", "k", "v", "o", "gate", "up", "fc", "down", "attention", "mlp", "all"]


class LoRAParams(StrictModel):
    """Low-rank adapters (``lora`` in ``params/finetune.yaml``; ``llm.model.lora``): each adapted weight W becomes
    W + (alpha / rank) * B A, with only A [rank, d_in] and B [d_out, rank] trained.

    ``targets`` name what gets adapters: ``q``, ``k``, ``v`` (the query, key and value rows of the fused
    ``attn.qkv``, one pair each), ``o`` (``attn.proj``), ``gate`` and ``up`` (the halves of a SwiGLU ``mlp.fc``),
    ``fc`` (the whole ``mlp.fc``; with SwiGLU, gate and up), ``down`` (``mlp.proj``); and the groups
    ``attention`` (q, k, v, o), ``mlp`` (the MLP's matrices) and ``all`` (both).
    """

    rank: int = Field(8, gt=0, description="r: the inner width of every adapter")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input (training only)")
    targets: list[LoRATarget] = Field(default_factory=lambda: ["attention"], min_length=1)


class FinetuneParams(PretrainParams):
    """Supervised finetuning on chat data (``params/finetune.yaml``): the pretraining loop with its own defaults.

    The model shape comes from the base checkpoint; only ``dropout`` may be overridden.
    """

    max_steps: int = Field(300, gt=0)
    batch_size: int = Field(16, gt=0, le=MAX_BATCH, description="conversations per micro-batch")
    learning_rate: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    eval_interval: int = Field(50, gt=0)
    eval_batches: int = Field(10, gt=0, description="val batches of conversations per evaluation")
    checkpoint_interval: int = Field(100, gt=0)
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="None keeps the base model's dropout")
    chat_data: ChatDataParams = Field(default_factory=ChatDataParams)
    method: Literal["full", "lora"] = Field(
        "full", description="full: train every weight; lora: train low-rank adapters on a frozen base (lora:)")
    lora: LoRAParams = Field(default_factory=LoRAParams)

    @model_validator(mode="after")
    def _no_sharded_adapters(self) -> FinetuneParams:
        if self.method == "lora" and self.strategy == "fsdp":
            raise ValueError("strategy: fsdp shards whole weights; with method: lora (a frozen base, small adapters) "
                             "use strategy: ddp")
        return self
