"""The ``llm`` command: one sub-command per stage, each a thin wrapper over a library function.

Every stage reads its ``params/*.yaml`` file; ``--set key=value`` overrides a key for one run and is
validated like the file (a typo names the key).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from llm import chat as _chat
from llm.config import (
    DataParams,
    EvalParams,
    ExportParams,
    FetchLimits,
    FinetuneParams,
    ModelConfig,
    ParamsError,
    PretrainParams,
    ServeLimits,
    TokenizerParams,
    apply_overrides,
    load_params,
    parse_yaml,
    read_preset,
    validate_params,
)
from llm.stages import (
    Layout,
    clean_stage,
    evaluate_stage,
    export_hf_stage,
    export_stage,
    fetch_stage,
    finetune_stage,
    import_hf_stage,
    pretrain_stage,
    register_stage,
    tokenize_stage,
    tokenizer_stage,
)

app = typer.Typer(help="Train, evaluate and sample a GPT from scratch, stage by stage.", no_args_is_help=True,
                  add_completion=False)
data_app = typer.Typer(help="Raw data: fetch a corpus into data/corpus (the default one, a folder or a URL).",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
export_app = typer.Typer(help="Deployable exports of a checkpoint.", no_args_is_help=True)
app.add_typer(export_app, name="export")
import_app = typer.Typer(help="Models from other ecosystems as checkpoints of ours.", no_args_is_help=True)
app.add_typer(import_app, name="import")

LAYOUT = Layout()  # the default paths: params/, data/ and artifacts/<stage> under the working directory
_DEFAULT_LIMITS = FetchLimits()
_SERVE_LIMITS = ServeLimits()


def _sets(example: str) -> Any:
    """The ``--set`` option of a stage, its help showing a key of that stage's own params file."""
    return Annotated[list[str] | None, typer.Option(
        "--set", help=f"override a params key: --set key=value, e.g. --set {example} (repeatable)")]


# one example per stage, each a key of that stage's file (finetune's shows a key inside a section)
Sets = _sets("val_fraction=0.05")
TokenizerSets = _sets("kind=bpe")
PretrainSets = _sets("max_steps=1000")
FinetuneSets = _sets("chat_data.max_turns=3")
EvaluateSets = _sets("max_batches=50")
ExportSets = _sets("quantize=false")
# 0 or a negative step would silently train to max_steps or nothing: refused here, and again by the stages
UntilStep = Annotated[int | None, typer.Option(min=1, help="stop after this step (resume later)")]


def _overrides(sets: list[str] | None, option: str = "--set") -> dict:
    """The ``key=value`` items of ``--set`` as an overrides dict for ``load_params``, values read as YAML.

    A dotted key (``chat_data.max_turns=3``) or a mapping value (``chat_data={max_turns: 3}``) changes only
    the keys it names; the file's other keys stay (see ``llm.config.apply_overrides``).
    """
    out: dict = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{option} {item!r}: expected key=value")
        # merged as they come, so a later item wins over an earlier one that names the same key
        out = apply_overrides(out, {key.strip(): parse_yaml(value, f"{option} {item}")}, f"{option} {item}")
    return out


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@data_app.command("fetch")
def data_fetch(
    source: str = typer.Option("default", help="'default' (Gutenberg Shakespeare), a local folder of .txt files or "
                                                ".parquet/.jsonl/.jsonl.gz shards, or an http(s) URL of a .txt file, "
                                                "a shard or a .zip/.tar.gz archive"),
    dest: Path = typer.Option(LAYOUT.corpus, help="folder to write the corpus into"),
    max_bytes: str | None = typer.Option(
        None, show_default=_DEFAULT_LIMITS.max_bytes.human_readable(decimal=True),
        help="refuse a source whose download, or whose .txt files together, exceed this size (units: 8GB, 512MiB)"),
    max_member_bytes: str | None = typer.Option(
        None, show_default=_DEFAULT_LIMITS.max_member_bytes.human_readable(decimal=True),
        help="refuse an archive with a member larger than this, uncompressed"),
    max_members: int | None = typer.Option(
        None, min=1, show_default=str(_DEFAULT_LIMITS.max_members), help="refuse an archive with more entries"),
    timeout: float | None = typer.Option(
        None, min=0.001, show_default=f"{_DEFAULT_LIMITS.timeout_s:g}",
        help="give up a URL fetch after this many seconds in all, retries included"),
    add: bool = typer.Option(False, "--add", help="keep the sources already in the corpus folder and add this one "
                                                  "beside them (default: the corpus becomes this source alone)"),
    text_field: str = typer.Option("text", "--text-field", help="the field of a Parquet or JSON Lines shard that "
                                                                "holds the text (stored as the column 'text')"),
) -> None:
    """Build data/corpus from a source, deterministically (same source, byte-identical files). The corpus is
    replaced: the source is written to data/corpus/<name>/ and the other sources there are removed, so
    `dvc add data` records that source alone; --add keeps them."""
    given = {"max_bytes": max_bytes, "max_member_bytes": max_member_bytes, "max_members": max_members,
             "timeout_s": timeout}
    limits = validate_params(FetchLimits, {k: v for k, v in given.items() if v is not None}, "llm data fetch")
    files = fetch_stage(source, dest, limits, add=add, text_field=text_field)
    typer.echo(f"wrote {len(files)} files under {dest}" + ("" if add else " (the corpus is this source alone)"))


@app.command()
def clean(
    corpus: Path = typer.Option(LAYOUT.corpus, help="folder of raw .txt files"),
    out: Path = typer.Option(LAYOUT.artifact("clean"), help="where train.txt, val.txt and stats.json go"),
    params: Path = typer.Option(LAYOUT.params / "data.yaml"),
    sets: Sets = None,
) -> None:
    """Clean, deduplicate and split the raw corpus by document."""
    stats = clean_stage(load_params(DataParams, params, _overrides(sets)), corpus, out)
    typer.echo(json.dumps({k: v for k, v in stats.items() if not isinstance(v, (list, dict))}, indent=2))


@app.command("tokenizer")
def tokenizer_cmd(
    clean_dir: Path = typer.Option(LAYOUT.artifact("clean"), "--clean", help="output of the clean stage"),
    out: Path = typer.Option(LAYOUT.artifact("tokenizer")),
    params: Path = typer.Option(LAYOUT.params / "tokenizer.yaml"),
    sets: TokenizerSets = None,
) -> None:
    """Train the tokenizer (char, byte, bpe or unigram) on the cleaned train split."""
    tok = tokenizer_stage(load_params(TokenizerParams, params, _overrides(sets)), clean_dir, out)
    typer.echo(f"{tok['kind']} tokenizer with {tok['vocab_size']} ids written to {out}")


@app.command()
def tokenize(
    clean_dir: Path = typer.Option(LAYOUT.artifact("clean"), "--clean"),
    tokenizer_dir: Path = typer.Option(LAYOUT.artifact("tokenizer"), "--tokenizer"),
    out: Path = typer.Option(LAYOUT.artifact("tokens")),
) -> None:
    """Encode the cleaned splits into uint16/uint32 token files, using every core."""
    meta = tokenize_stage(clean_dir, tokenizer_dir, out)
    typer.echo(json.dumps(meta["splits"], indent=2))


@app.command()
def pretrain(
    tokens: Path = typer.Option(LAYOUT.artifact("tokens")),
    tokenizer_dir: Path = typer.Option(LAYOUT.artifact("tokenizer"), "--tokenizer"),
    out: Path = typer.Option(LAYOUT.artifact("pretrain")),
    params: Path = typer.Option(LAYOUT.params / "pretrain.yaml"),
    model_params: Path = typer.Option(LAYOUT.params / "model.yaml", "--model-params"),
    sets: PretrainSets = None,
    model_sets: Annotated[list[str] | None, typer.Option("--model-set", help="override a model.yaml key")] = None,
    resume: bool = typer.Option(True, help="continue the checkpoint in --out if there is one"),
    until_step: UntilStep = None,
    preset: str | None = typer.Option(None, help="a recipe of params/presets/ over the params files, e.g. gpt2"),
) -> None:
    """Pretrain the GPT on the token files; checkpoints land in --out and resume exactly."""
    result = pretrain_stage(
        load_params(PretrainParams, params, _overrides(sets), preset=read_preset(LAYOUT.params, preset, "pretrain")),
        load_params(ModelConfig, model_params, _overrides(model_sets, "--model-set"),
                    preset=read_preset(LAYOUT.params, preset, "model")),
        tokens, tokenizer_dir, out, resume=resume, until_step=until_step,
    )
    typer.echo(json.dumps(result, indent=2))


@app.command()
def finetune(
    base: Path = typer.Option(LAYOUT.artifact("pretrain"), help="pretrained checkpoint to start from"),
    clean_dir: Path = typer.Option(LAYOUT.artifact("clean"), "--clean",
                                   help="cleaned plays, for derived conversations"),
    chat_source: Path = typer.Option(LAYOUT.chat_data, help="folder of *.jsonl chat data; absent: derive from plays"),
    chat_dir: Path = typer.Option(LAYOUT.artifact("chat"),
                                  help="where the validated/derived train.jsonl and val.jsonl go"),
    out: Path = typer.Option(LAYOUT.artifact("finetune")),
    params: Path = typer.Option(LAYOUT.params / "finetune.yaml"),
    sets: FinetuneSets = None,
    resume: bool = typer.Option(True, help="continue the checkpoint in --out if there is one"),
    until_step: UntilStep = None,
) -> None:
    """Supervised finetuning into a chat model: loss on assistant tokens only."""
    result = finetune_stage(load_params(FinetuneParams, params, _overrides(sets)), base, clean_dir, chat_source,
                            chat_dir, out, resume=resume, until_step=until_step)
    typer.echo(json.dumps(result, indent=2))


@app.command()
def evaluate(
    model: str = typer.Option(str(LAYOUT.artifact("pretrain")), help="checkpoint folder or models:/ / runs:/ URI"),
    tokens: Path = typer.Option(LAYOUT.artifact("tokens")),
    split: str = typer.Option("val"),
    clean_dir: Path = typer.Option(LAYOUT.artifact("clean"), "--clean",
                                   help="cleaned text, to score the Production model"),
    chat_dir: Path = typer.Option(LAYOUT.artifact("chat"), help="chat val conversations, for finetuned models"),
    out: Path = typer.Option(LAYOUT.artifact("eval")),
    params: Path = typer.Option(LAYOUT.params / "evaluate.yaml"),
    promote: bool = typer.Option(True, help="promote the candidate to Production if it beats the current one"),
    sets: EvaluateSets = None,
) -> None:
    """Loss, perplexity and bits per byte of a checkpoint on a token file, plus samples; then the
    promotion decision against the Production model (the evaluate stage)."""
    eval_params = load_params(EvalParams, params, _overrides(sets))
    if split == "val" and not model.startswith(("models:/", "runs:/")):
        result = evaluate_stage(eval_params, Path(model), tokens, clean_dir, out, chat_dir=chat_dir, promote=promote)
    else:
        from llm.training.evaluate import evaluate_checkpoint

        result = evaluate_checkpoint(_resolve(model), tokens, eval_params, split=split, out_dir=out)
    samples = result.pop("samples")
    typer.echo(json.dumps(result, indent=2))
    for s in samples:
        typer.echo(f"\n--- {s['prompt']!r}\n{s['prompt']}{s['completion']}")


@app.command()
def register(
    model: Path = typer.Option(LAYOUT.artifact("pretrain"), help="a finished training checkpoint folder"),
    run_id: str | None = typer.Option(None, help="the run to register it under; default: the run in the "
                                                 "folder's registration.json, else a new run"),
    force: bool = typer.Option(False, "--force", help="register a checkpoint whose training stopped before "
                                                      "max_steps (refused otherwise)"),
) -> None:
    """Register a finished checkpoint as a version of gpt, when its training stage could not (the tracking
    store was down) or ran untracked. A version that already holds it is reused, never duplicated. A checkpoint
    of an unfinished training (step N of M) is refused unless --force."""
    typer.echo(json.dumps(register_stage(model, run_id=run_id, force=force), indent=2))


@app.command()
def promote(
    version: str = typer.Argument(..., help="the version of gpt to make Production"),
    why: str = typer.Option("", help="a note kept with the decision on the version"),
) -> None:
    """Make VERSION of gpt the Production model by hand (stage Production, alias production), whatever the
    evaluation decided, e.g. a candidate that could not be compared with Production."""
    from llm.mlops.registry import promote_by_hand

    typer.echo(json.dumps(promote_by_hand(version, why=why), indent=2))


@export_app.command("onnx")
def export_onnx_cmd(
    model: str = typer.Option(str(LAYOUT.artifact("finetune")), help="checkpoint folder or models:/ / runs:/ URI"),
    out: Path = typer.Option(LAYOUT.artifact("onnx")),
    params: Path = typer.Option(LAYOUT.params / "export.yaml"),
    sets: ExportSets = None,
) -> None:
    """ONNX export with KV-cache inputs, checked against PyTorch (parity.json); fails on a mismatch."""
    summary = export_stage(load_params(ExportParams, params, _overrides(sets)), _resolve(model), out)
    typer.echo(json.dumps({k: summary[k] for k in ("path", "opset", "files") if k in summary}, indent=2))


@export_app.command("hf")
def export_hf_cmd(
    model: str = typer.Option(str(LAYOUT.artifact("finetune")), help="checkpoint folder or models:/ / runs:/ URI"),
    out: Path = typer.Option(LAYOUT.artifact("hf")),
    verify: bool = typer.Option(True, help="load the folder back with Transformers and compare logits"),
    atol: float = typer.Option(1e-4, min=0.0, help="max abs logit difference the check allows"),
    adapter_only: bool = typer.Option(False, "--adapter-only",
                                      help="a LoRA checkpoint's adapters alone, in peft's format (adapter_config.json, "
                                           "adapter_model.safetensors), for the export of its base"),
) -> None:
    """Hugging Face Transformers folder (config.json, model.safetensors, tokenizer, generation config) for a
    GPT-2, Llama or Qwen3 shaped model, checked by loading it back; attached to the registered version. A LoRA
    checkpoint exports merged; with --adapter-only, as a peft adapter instead."""
    summary = export_hf_stage(_resolve(model), out, verify=verify, atol=atol, adapter_only=adapter_only)
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def merge(
    model: str = typer.Option(..., help="a LoRA checkpoint folder (method: lora), or a models:/ / runs:/ URI"),
    out: Path = typer.Option(..., help="plain checkpoint folder to write"),
    base: Path | None = typer.Option(None, help="its base checkpoint, where it is not at the path it records"),
) -> None:
    """Merge a LoRA checkpoint's adapters into its base: a plain checkpoint that needs no base."""
    from llm.model.checkpoint import merge_checkpoint

    typer.echo(json.dumps({"path": str(merge_checkpoint(_resolve(model), out, base=base))}, indent=2))


@import_app.command("hf")
def import_hf_cmd(
    folder: Path = typer.Argument(..., help="a Transformers save_pretrained folder (safetensors) of GPT-2, Llama or "
                                            "Qwen3 with a BPE tokenizer (byte-level, or Llama 2's with byte fallback)"),
    out: Path = typer.Option(LAYOUT.artifact("base"), help="checkpoint folder to write"),
    context_length: int | None = typer.Option(None, min=1, help="keep only this many positions (faster training)"),
) -> None:
    """Convert a local Transformers checkpoint into a checkpoint folder of ours, with its tokenizer, its BOS rule,
    EOS ids and chat template (every command then encodes prompts as the source does), and the project's control
    tokens added; then `llm finetune --base OUT` or `llm pretrain`-style training can start from it."""
    typer.echo(json.dumps(import_hf_stage(folder, out, context_length=context_length), indent=2))


@app.command()
def runs(
    diff: Annotated[tuple[str, str] | None, typer.Option(
        "--diff", metavar="RUN_A RUN_B",
        help="compare two runs (run ids, their first 4 characters or more, or run names; an ambiguous one is an "
             "error listing the runs it names): differences highlighted")] = None,
    only_different: bool = typer.Option(False, "--only-different", help="with --diff: hide the values that agree"),
    limit: int = typer.Option(15, min=1, help="runs and versions to list"),
    stage: str | None = typer.Option(None, help="list only this stage's runs (pretrain, finetune, evaluate, ...)"),
) -> None:
    """The latest MLflow runs (names, val/bpb, val/loss, chat bpb: bits per byte of held-out assistant answers,
    tokens/s, parameters, wall time) and the registered versions of gpt with their promotion decisions; or two
    runs side by side (--diff)."""
    from rich.console import Console

    from llm.mlops.runs import print_diff, print_overview

    console = Console()
    if diff:
        print_diff(console, *diff, only_different=only_different)
    else:
        print_overview(console, limit=limit, stage=stage)


def _resolve(model: str) -> Path:
    """A checkpoint folder for a folder path or a models:/ or runs:/ URI (through the MLflow registry)."""
    if model.startswith(("models:/", "runs:/")):
        from llm.mlops.registry import resolve_model

        return resolve_model(model)
    return Path(model)


@app.command()
def generate(
    model: str = typer.Option(str(LAYOUT.artifact("pretrain")),
                              help="checkpoint folder, or models:/gpt/Production, models:/gpt@production, "
                                   "models:/gpt/3, runs:/..."),
    prompt: str = typer.Option("", help="text to continue"),
    max_new_tokens: int = typer.Option(200, min=1),
    temperature: float = typer.Option(0.8, min=0.0),
    top_k: int | None = typer.Option(None, min=1),
    top_p: float | None = typer.Option(None, min=0.0, max=1.0),
    seed: int | None = typer.Option(None),
    device: str = typer.Option("auto"),
) -> None:
    """Continue a prompt, printing tokens as they are generated."""
    from llm.data.chat_template import generation_stop_ids
    from llm.inference.decoding import SamplingParams, complete
    from llm.inference.generate import TorchGenerator
    from llm.model.checkpoint import load_checkpoint
    from llm.training.device import select_device

    net, tok, _ = load_checkpoint(_resolve(model), select_device(device))
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, stop_ids=generation_stop_ids(tok))
    sys.stdout.write(prompt)
    for piece in complete(TorchGenerator(net, tok), prompt, sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
def serve(
    model: str = typer.Option(str(LAYOUT.artifact("onnx")),
                              help="ONNX export folder, or models:/gpt/Production, models:/gpt@production, "
                                   "models:/gpt/3, runs:/<run id> (its onnx folder)"),
    host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0: every interface; set an API key)"),
    port: int = typer.Option(8000, min=0, max=65535),
    fp32: bool = typer.Option(False, "--fp32", help="run model.onnx even when the export has an int8 model"),
    api_key: str | None = typer.Option(None, envvar="LLM_API_KEY", show_default=False,
                                       help="require 'Authorization: Bearer KEY' on /v1 (env LLM_API_KEY); "
                                            "required when --host reaches beyond this machine"),
    no_auth: bool = typer.Option(False, "--no-auth", help="serve beyond this machine without an API key"),
    ui: bool = typer.Option(True, "--ui/--no-ui", help="the chat page at / (--no-ui: the API alone, / is 404)"),
    allowed_hosts: list[str] | None = typer.Option(
        None, "--allowed-hosts", show_default="localhost, 127.0.0.1, ::1 and --host (any when --host is 0.0.0.0)",
        help="Host header names answered (others: 421); repeat for several, '*' for any"),
    model_name: str | None = typer.Option(None, help="the model id clients send (default: from --model, e.g. "
                                                     "gpt/Production)"),
    threads: int = typer.Option(1, min=1, help="onnxruntime threads per decoder call; more suit a bigger model on "
                                               "more cores (batching, not threads, serves many clients)"),
    engines: int = typer.Option(1, min=1, help="engine processes decoding side by side, --max-batch shared among "
                                               "them: each takes about a core and holds a copy of the model"),
    max_request_bytes: str | None = typer.Option(
        None, show_default=_SERVE_LIMITS.max_request_bytes.human_readable(),
        help="refuse larger request bodies with 413 (units: 1MiB, 64KB)"),
    max_prompt_tokens: int | None = typer.Option(None, min=1, show_default=str(_SERVE_LIMITS.max_prompt_tokens),
                                                 help="refuse longer prompts with 400"),
    max_tokens: int | None = typer.Option(None, min=1, show_default=str(_SERVE_LIMITS.max_tokens),
                                          help="refuse requests asking for more new tokens with 400"),
    default_max_tokens: int | None = typer.Option(None, min=1, show_default=str(_SERVE_LIMITS.default_max_tokens),
                                                  help="max_tokens of a request that does not say"),
    max_batch: int | None = typer.Option(None, min=1, show_default=str(_SERVE_LIMITS.max_batch),
                                         help="requests decoded together"),
    max_queue: int | None = typer.Option(None, min=1, show_default=str(_SERVE_LIMITS.max_queue),
                                         help="requests waiting for the batch; beyond it 429"),
    timeout: float | None = typer.Option(None, min=0.001, show_default=f"{_SERVE_LIMITS.request_timeout_s:g}",
                                         help="seconds a request may take, queueing included; beyond it 504"),
    stream_interval: float | None = typer.Option(
        None, min=0, show_default=f"{_SERVE_LIMITS.stream_interval_s:g}",
        help="seconds: streamed tokens decoded within this of the last chunk share the next one (0: each alone)"),
    max_connections: int | None = typer.Option(
        None, min=1, show_default=str(_SERVE_LIMITS.max_connections),
        help="open connections; past it the one idle longest is closed (kept below ulimit -n)"),
    header_timeout: float | None = typer.Option(None, min=0.001, show_default=f"{_SERVE_LIMITS.header_timeout_s:g}",
                                                help="seconds a request's headers may take to arrive; beyond: 408"),
    body_timeout: float | None = typer.Option(None, min=0.001, show_default=f"{_SERVE_LIMITS.body_timeout_s:g}",
                                              help="seconds a request's body may take after its headers; beyond: 408"),
    keep_alive: float | None = typer.Option(None, min=0.001, show_default=f"{_SERVE_LIMITS.keep_alive_s:g}",
                                            help="seconds an idle kept-alive connection stays open"),
    engine_heartbeat_timeout: float | None = typer.Option(
        None, min=0.001, show_default=f"{_SERVE_LIMITS.engine_heartbeat_timeout_s:g}",
        help="seconds without a heartbeat after which an engine is killed and replaced (its requests: 503)"),
    engine_max_restarts: int | None = typer.Option(
        None, min=0, show_default=str(_SERVE_LIMITS.engine_max_restarts),
        help="more engine replacements than this within --engine-restart-window: exit 1"),
    engine_restart_window: float | None = typer.Option(
        None, min=0.001, show_default=f"{_SERVE_LIMITS.engine_restart_window_s:g}",
        help="seconds over which --engine-max-restarts counts"),
) -> None:
    """Serve a model over the OpenAI HTTP API (/v1/chat/completions, /v1/completions, /v1/models) with
    ONNX Runtime, without PyTorch, and a chat page at / (unless --no-ui)."""
    given = {"max_request_bytes": max_request_bytes, "max_prompt_tokens": max_prompt_tokens, "max_tokens": max_tokens,
             "default_max_tokens": default_max_tokens, "max_batch": max_batch, "max_queue": max_queue,
             "request_timeout_s": timeout, "stream_interval_s": stream_interval, "max_connections": max_connections,
             "header_timeout_s": header_timeout, "body_timeout_s": body_timeout, "keep_alive_s": keep_alive,
             "engine_heartbeat_timeout_s": engine_heartbeat_timeout, "engine_max_restarts": engine_max_restarts,
             "engine_restart_window_s": engine_restart_window}
    limits = validate_params(ServeLimits, {k: v for k, v in given.items() if v is not None}, "llm serve")
    from llm.api_server import ServeError, run_server

    if api_key is None and os.environ.get("LLM_API_KEY") == "":
        api_key = ""  # click reads an empty variable as unset; an empty key is a mistake to say so about

    try:
        run_server(model, host=host, port=port, fp32=fp32, api_key=api_key, model_name=model_name, threads=threads,
                   engines=engines, limits=limits, hosts=allowed_hosts, no_auth=no_auth, ui=ui)
    except ServeError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(1) from None


# ------------------------------------------------------------------ demo, pipeline, chat (issue 12)
# `make demo` is `llm demo` after the install, so a machine without make (Windows) runs the same steps; the
# Dockerfile's documented `llm pipeline` and `llm chat` are these commands. Each step is a subprocess of this
# interpreter (`python -m dvc`, `python -m flows`, `python -m llm.chat`) and dvc finds this environment's
# python first on PATH, so no shell and no activated virtualenv are needed.
app.command("chat", help="Chat with a model (the REPL of `python -m llm.chat`): streams answers, keeps the "
                         "conversation, /help /reset /system /history /exit.")(_chat.chat)

DEMO_PROMPT = "ROMEO."
DEMO_QUESTION = "What news from Verona?"


def _require(module: str, extra: str, command: str) -> None:
    """Exit with one line naming the extra to install when ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        typer.secho(f"error: {command} needs {module}, from the {extra} extra: pip install -e \".[{extra}]\"",
                    fg="red", err=True)
        raise typer.Exit(1)


def _require_project(command: str) -> None:
    """Exit with one line when the working directory is not the project root (flows/ and params/ are there)."""
    if not (Path("flows") / "__main__.py").is_file() or not Path("params").is_dir():
        typer.secho(f"error: {command} runs in the project root (the folder holding flows/, params/ and dvc.yaml); "
                    f"{Path.cwd()} is not one", fg="red", err=True)
        raise typer.Exit(1)


def _step_env() -> dict[str, str]:
    """This environment with the running interpreter's folder first on PATH: dvc's `python` is this one."""
    return {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def _step(title: str, args: list[str], *, check: bool = True) -> int:
    """Run ``python args...`` (this interpreter) as one step of a command; exit with its code when it fails."""
    typer.secho(f"==> {title}: python {shlex.join(args)}", bold=True, err=True)
    code = subprocess.run([sys.executable, *args], env=_step_env(), check=False).returncode
    if code != 0 and check:
        typer.secho(f"error: {title} failed (exit code {code}): python {shlex.join(args)}", fg="red", err=True)
        raise typer.Exit(code)
    return code


MLFLOW_UI = "http://127.0.0.1:5000"  # `mlflow ui`'s address
TENSORBOARD_DIR = "logs/tensorboard"  # where the training stages write TensorBoard's event files
CHAT_PAGE = "http://127.0.0.1:8000/"  # `llm serve`'s chat page
TENSORBOARD_UI = "http://127.0.0.1:6006/#timeseries"  # its scalars, one chart per metric key


def _mlflow_link() -> str:
    """The MLflow UI's page of the pipeline's training runs (not its GenAI overview); the experiments list on that
    view when MLflow cannot say which experiment."""
    try:
        from llm.mlops.runs import training_runs_url
    except ImportError:  # mlflow is not installed
        return f"{MLFLOW_UI}/#/experiments?workflowType=machine_learning"
    return training_runs_url(MLFLOW_UI)


def _prefect_link() -> str | None:
    """Show the pipeline's Prefect server (``python -m flows server status``) and return its flow-runs page, or
    None when it is not running."""
    typer.secho("==> Prefect server status: python -m flows server status", bold=True, err=True)
    shown = subprocess.run([sys.executable, "-m", "flows", "server", "status"], env=_step_env(), check=False,
                           stdout=subprocess.PIPE, text=True)
    typer.echo(shown.stdout.rstrip())
    found = re.search(r"^running: (\S+?),", shown.stdout, re.MULTILINE)
    return f"{found.group(1).rstrip('/')}/runs" if found else None


def _next_steps(chat_model: str, mlflow_link: str, prefect_link: str | None = None) -> str:
    """The closing lines of ``llm demo``: what to run next, each UI with the link that opens its useful view."""
    windows = sys.platform == "win32"
    activate = r".venv\Scripts\Activate.ps1" if windows else "source .venv/bin/activate"
    tensorboard = "" if Path(TENSORBOARD_DIR).is_dir() else "   (after a run with tensorboard in `tracking`)"
    lines = [
        "Done: the pipeline ran on the corpus in data/; see artifacts/eval/samples.md.",
        f"Activate the environment first:  {activate}",
        f"  Chat with the model:             python -m llm.chat --model {chat_model}   (or: llm chat --model ...)",
        "  Generate text:                   llm generate --model models:/gpt/Production --prompt 'ROMEO.'",
        "  Serve the OpenAI API (ONNX):     llm serve --model models:/gpt/Production   # http://127.0.0.1:8000/v1",
        f"  Chat in the browser:             with llm serve running, open {CHAT_PAGE}",
        "  Compare runs, see the registry:  mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1",
        f"                                   then open {mlflow_link}",
        f"  Training curves in TensorBoard:  tensorboard --logdir {TENSORBOARD_DIR}",
        f"                                   then open {TENSORBOARD_UI}{tensorboard}",
        "  The guide and the notebooks:     docs/architecture.md, notebooks/ (pip install -e \".[notebooks]\")",
    ]
    if not windows:  # on Windows each stage's Prefect run uses a temporary server (flows/prefect_server.py)
        lines += [
            f"  The flow runs in the Prefect UI: open {prefect_link or '(python -m flows server start)/runs'}",
            "  Prefect server: URL, stop it:    python -m flows server status;  python -m flows server stop",
            "  Serve the flows as deployments:  export PREFECT_API_URL=$(python -m flows server start); "
            "python -m flows.deployments",
            "  Run a stage on demand:           prefect deployment run pretrain/pretrain "
            "--param overrides='{\"max_steps\": 200}'",
        ]
    return "\n".join(lines)


@app.command()
def demo(
    source: str = typer.Option("default", help="the corpus to fetch: 'default' (Gutenberg Shakespeare), a folder "
                                                "or a URL (as `llm data fetch --source`)"),
    fetch: bool = typer.Option(True, "--fetch/--no-fetch", help="fetch the corpus first; --no-fetch keeps data/ "
                                                                  "as it is"),
    chat_model: str = typer.Option("models:/gpt/Production", help="the model the chat step answers with"),
) -> None:
    """What `make demo` does after the install: fetch the corpus, `dvc repro`, `dvc metrics show`, a sample of the
    pretrained model, one chat answer, then the next steps. Run it in the project root."""
    _require_project("llm demo")
    _require("dvc", "pipeline", "llm demo")
    _require("prefect", "pipeline", "llm demo")
    if fetch:
        _step("fetch the corpus", ["-m", "llm", "data", "fetch", "--source", source])
    _step("run the pipeline", ["-m", "dvc", "repro"])
    _step("show the metrics", ["-m", "dvc", "metrics", "show"])
    _step("sample the pretrained model", ["-m", "llm", "generate", "--model", str(LAYOUT.artifact("pretrain")),
                                          "--prompt", DEMO_PROMPT, "--max-new-tokens", "200", "--seed", "1"])
    _step("ask the chat model", ["-m", "llm.chat", "--model", chat_model, "--seed", "1", "--prompt", DEMO_QUESTION])
    prefect_link = None
    if sys.platform != "win32":
        typer.echo("\nThe pipeline's Prefect server (the Prefect UI) keeps running for the next runs:")
        prefect_link = _prefect_link()
    typer.echo("\n" + _next_steps(chat_model, _mlflow_link(), prefect_link))


@app.command()
def pipeline(
    sets: Annotated[list[str] | None, typer.Option(
        "--set", metavar="FILE:KEY=VALUE",
        help="override a params key, e.g. --set pretrain:max_steps=200 (repeatable)")] = None,
    resume: bool = typer.Option(False, help="continue the pretraining checkpoint of the same run"),
) -> None:
    """The whole pipeline as one Prefect flow (`python -m flows pipeline`): clean, tokenizer, tokenize, pretrain,
    finetune, evaluate, export. Without git or DVC (the Docker image); `dvc repro` reruns only what changed."""
    _require_project("llm pipeline")
    _require("prefect", "pipeline", "llm pipeline")
    args = ["-m", "flows", "pipeline", *[a for item in sets or [] for a in ("--set", item)],
            "--param", f"resume={str(resume).lower()}"]
    _step("run the pipeline flow", args)


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The library's own error types: shown as one line, without a traceback."""
    from llm.data.chat_data import ChatDataError
    from llm.data.corpus import CorpusError
    from llm.data.tokenizer import TokenizerError
    from llm.data.tokens import TokenDataError
    from llm.io import FolderLocked
    from llm.model.checkpoint import CheckpointError
    from llm.model.lora import LoRAConfigError
    from llm.training.launch import LaunchError
    from llm.training.loop import TrainingDivergedError

    expected: tuple[type[BaseException], ...] = (ParamsError, CheckpointError, TokenDataError, TokenizerError,
                                                 CorpusError, ChatDataError, TrainingDivergedError, FileNotFoundError,
                                                 LoRAConfigError, FolderLocked, LaunchError)
    for module, name in (("llm.mlops.registry", "RegistryError"), ("llm.inference.export", "ExportError"),
                         ("llm.interop.hf", "InteropError")):
        try:  # mlflow and onnxruntime are optional on a bare GPU box
            expected += (getattr(__import__(module, fromlist=[name]), name),)
        except ImportError:
            pass
    return expected


def _training_interrupted(err: BaseException | None):
    """The TrainingInterrupted behind ``err`` (typer turns a KeyboardInterrupt into ``Exit(130)``), or None."""
    loop = sys.modules.get("llm.training.loop")  # not imported: nothing was trained
    seen: set[int] = set()
    while loop is not None and err is not None and id(err) not in seen:
        if isinstance(err, loop.TrainingInterrupted):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def run() -> None:
    """Entry point that turns the library's expected errors into one clear line and exit code 1, and a
    training stopped by SIGINT or SIGTERM into one line (where its checkpoint is, how to resume) and exit
    code 128 + the signal number (130, 143)."""
    try:
        app()
    except (SystemExit, KeyboardInterrupt) as err:
        interrupted = _training_interrupted(err)
        if interrupted is None:
            raise
        command = shlex.join(["llm", *sys.argv[1:]])
        advice = "again to resume" if interrupted.checkpoint is not None else "to start it again"
        typer.secho(f"interrupted: {interrupted}; run `{command}` {advice}", fg="yellow", err=True)
        sys.exit(interrupted.exit_code)
    except Exception as err:
        if isinstance(err, _expected_errors()):
            typer.secho(f"error: {err}", fg="red", err=True)
            sys.exit(1)
        raise


if __name__ == "__main__":
    run()
