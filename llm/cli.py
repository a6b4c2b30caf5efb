"""The ``llm`` command: one sub-command per stage, each a thin wrapper over a library function.

Every stage reads its ``params/*.yaml`` file; ``--set key=value`` overrides a key for one run and is
validated like the file (a typo names the key).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml

from llm.config import (
    DataParams,
    EvalParams,
    ExportParams,
    FinetuneParams,
    ModelConfig,
    ParamsError,
    PretrainParams,
    TokenizerParams,
    load_params,
)

app = typer.Typer(help="Train, evaluate and sample a GPT from scratch, stage by stage.", no_args_is_help=True,
                  add_completion=False)
data_app = typer.Typer(help="Raw data: fetch the default corpus.", no_args_is_help=True)
app.add_typer(data_app, name="data")
export_app = typer.Typer(help="Deployable exports of a checkpoint.", no_args_is_help=True)
app.add_typer(export_app, name="export")

PARAMS = Path("params")
ART = Path("artifacts")
Sets = Annotated[list[str] | None, typer.Option("--set", help="override a params key: --set key=value (repeatable)")]


def _overrides(sets: list[str] | None) -> dict:
    out = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(1)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@data_app.command("fetch")
def data_fetch(
    source: str = typer.Option("default", help="'default' (Gutenberg Shakespeare), a local folder, or an http(s) URL "
                                                "of a .txt file or a .zip/.tar.gz archive"),
    dest: Path = typer.Option(Path("data/corpus"), help="folder to write the corpus into"),
) -> None:
    """Build data/corpus from a source, deterministically (same source, byte-identical files)."""
    from llm.stages import fetch_stage

    files = fetch_stage(source, dest)
    typer.echo(f"wrote {len(files)} text files under {dest}")


@app.command()
def clean(
    corpus: Path = typer.Option(Path("data/corpus"), help="folder of raw .txt files"),
    out: Path = typer.Option(ART / "clean", help="where train.txt, val.txt and stats.json go"),
    params: Path = typer.Option(PARAMS / "data.yaml"),
    sets: Sets = None,
) -> None:
    """Clean, deduplicate and split the raw corpus by document."""
    from llm.stages import clean_stage

    stats = clean_stage(load_params(DataParams, params, _overrides(sets)), corpus, out)
    typer.echo(json.dumps({k: v for k, v in stats.items() if not isinstance(v, (list, dict))}, indent=2))


@app.command("tokenizer")
def tokenizer_cmd(
    clean_dir: Path = typer.Option(ART / "clean", "--clean", help="output of the clean stage"),
    out: Path = typer.Option(ART / "tokenizer"),
    params: Path = typer.Option(PARAMS / "tokenizer.yaml"),
    sets: Sets = None,
) -> None:
    """Train the tokenizer (char, byte, bpe or unigram) on the cleaned train split."""
    from llm.stages import tokenizer_stage

    tok = tokenizer_stage(load_params(TokenizerParams, params, _overrides(sets)), clean_dir, out)
    typer.echo(f"{tok['kind']} tokenizer with {tok['vocab_size']} ids written to {out}")


@app.command()
def tokenize(
    clean_dir: Path = typer.Option(ART / "clean", "--clean"),
    tokenizer_dir: Path = typer.Option(ART / "tokenizer", "--tokenizer"),
    out: Path = typer.Option(ART / "tokens"),
) -> None:
    """Encode the cleaned splits into uint16/uint32 token files, using every core."""
    from llm.stages import tokenize_stage

    meta = tokenize_stage(clean_dir, tokenizer_dir, out)
    typer.echo(json.dumps(meta["splits"], indent=2))


@app.command()
def pretrain(
    tokens: Path = typer.Option(ART / "tokens"),
    tokenizer_dir: Path = typer.Option(ART / "tokenizer", "--tokenizer"),
    out: Path = typer.Option(ART / "pretrain"),
    params: Path = typer.Option(PARAMS / "pretrain.yaml"),
    model_params: Path = typer.Option(PARAMS / "model.yaml", "--model-params"),
    sets: Sets = None,
    model_sets: Annotated[list[str] | None, typer.Option("--model-set", help="override a model.yaml key")] = None,
    resume: bool = typer.Option(True, help="continue the checkpoint in --out if there is one"),
    until_step: int | None = typer.Option(None, help="stop after this step (resume later)"),
) -> None:
    """Pretrain the GPT on the token files; checkpoints land in --out and resume exactly."""
    from llm.stages import pretrain_stage

    result = pretrain_stage(
        load_params(PretrainParams, params, _overrides(sets)),
        load_params(ModelConfig, model_params, _overrides(model_sets)),
        tokens, tokenizer_dir, out, resume=resume, until_step=until_step,
    )
    typer.echo(json.dumps(result, indent=2))


@app.command()
def finetune(
    base: Path = typer.Option(ART / "pretrain", help="pretrained checkpoint to start from"),
    clean_dir: Path = typer.Option(ART / "clean", "--clean", help="cleaned plays, for derived conversations"),
    chat_source: Path = typer.Option(Path("data/chat"), help="folder of *.jsonl chat data; absent: derive from plays"),
    chat_dir: Path = typer.Option(ART / "chat", help="where the validated/derived train.jsonl and val.jsonl go"),
    out: Path = typer.Option(ART / "finetune"),
    params: Path = typer.Option(PARAMS / "finetune.yaml"),
    sets: Sets = None,
    resume: bool = typer.Option(True, help="continue the checkpoint in --out if there is one"),
    until_step: int | None = typer.Option(None, help="stop after this step (resume later)"),
) -> None:
    """Supervised finetuning into a chat model: loss on assistant tokens only."""
    from llm.stages import finetune_stage

    result = finetune_stage(load_params(FinetuneParams, params, _overrides(sets)), base, clean_dir, chat_source,
                            chat_dir, out, resume=resume, until_step=until_step)
    typer.echo(json.dumps(result, indent=2))


@app.command()
def evaluate(
    model: str = typer.Option(str(ART / "pretrain"), help="checkpoint folder or models:/ / runs:/ URI"),
    tokens: Path = typer.Option(ART / "tokens"),
    split: str = typer.Option("val"),
    clean_dir: Path = typer.Option(ART / "clean", "--clean", help="cleaned text, to score the Production model"),
    chat_dir: Path = typer.Option(ART / "chat", help="chat val conversations, for finetuned models"),
    out: Path = typer.Option(ART / "eval"),
    params: Path = typer.Option(PARAMS / "evaluate.yaml"),
    promote: bool = typer.Option(True, help="promote the candidate to Production if it beats the current one"),
    sets: Sets = None,
) -> None:
    """Loss, perplexity and bits per byte of a checkpoint on a token file, plus samples; then the
    promotion decision against the Production model (the evaluate stage)."""
    eval_params = load_params(EvalParams, params, _overrides(sets))
    if split == "val" and not model.startswith(("models:/", "runs:/")):
        from llm.stages import evaluate_stage

        result = evaluate_stage(eval_params, Path(model), tokens, clean_dir, out, chat_dir=chat_dir, promote=promote)
    else:
        from llm.training.evaluate import evaluate_checkpoint

        result = evaluate_checkpoint(_resolve(model), tokens, eval_params, split=split, out_dir=out)
    samples = result.pop("samples")
    typer.echo(json.dumps(result, indent=2))
    for s in samples:
        typer.echo(f"\n--- {s['prompt']!r}\n{s['prompt']}{s['completion']}")


@export_app.command("onnx")
def export_onnx_cmd(
    model: str = typer.Option(str(ART / "finetune"), help="checkpoint folder or models:/ / runs:/ URI"),
    out: Path = typer.Option(ART / "onnx"),
    params: Path = typer.Option(PARAMS / "export.yaml"),
    sets: Sets = None,
) -> None:
    """ONNX export with KV-cache inputs, checked against PyTorch (parity.json); fails on a mismatch."""
    from llm.stages import export_stage

    summary = export_stage(load_params(ExportParams, params, _overrides(sets)), _resolve(model), out)
    typer.echo(json.dumps({k: summary[k] for k in ("path", "opset", "files") if k in summary}, indent=2))


def _resolve(model: str) -> Path:
    """A checkpoint folder for a folder path or a models:/ or runs:/ URI (through the MLflow registry)."""
    if model.startswith(("models:/", "runs:/")):
        from llm.mlops.registry import resolve_model

        return resolve_model(model)
    return Path(model)


@app.command()
def generate(
    model: str = typer.Option(str(ART / "pretrain"), help="checkpoint folder, or models:/gpt/Production, "
                                                         "models:/gpt@production, models:/gpt/3, runs:/..."),
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


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The library's own error types: shown as one line, without a traceback."""
    from llm.data.chat_data import ChatDataError
    from llm.data.corpus import CorpusError
    from llm.data.tokenizer import TokenizerError
    from llm.data.tokens import TokenDataError
    from llm.model.checkpoint import CheckpointError
    from llm.training.loop import TrainingDivergedError

    expected: tuple[type[BaseException], ...] = (ParamsError, CheckpointError, TokenDataError, TokenizerError,
                                                 CorpusError, ChatDataError, TrainingDivergedError, FileNotFoundError)
    for module, name in (("llm.mlops.registry", "RegistryError"), ("llm.inference.export", "ExportError")):
        try:  # mlflow and onnxruntime are optional on a bare GPU box
            expected += (getattr(__import__(module, fromlist=[name]), name),)
        except ImportError:
            pass
    return expected


def run() -> None:
    """Entry point that turns the library's expected errors into one clear line and exit code 1."""
    try:
        app()
    except Exception as err:
        if isinstance(err, _expected_errors()):
            typer.secho(f"error: {err}", fg="red", err=True)
            sys.exit(1)
        raise


if __name__ == "__main__":
    run()
