"""Chat with a model in the terminal: ``python -m llm.chat --model URI``.

``URI`` is a checkpoint folder (default ``artifacts/finetune``) or, through ``llm.mlops.registry``, a registry
URI: ``models:/gpt/Production``, ``models:/gpt@production``, ``models:/gpt/3``, ``runs:/<run id>/...``.
``--backend onnx`` generates with onnxruntime from an ONNX export instead (the folder itself, or its
``onnx/`` subfolder).

Interactive (a terminal): answers stream as they are generated; the conversation is kept and, when it no
longer fits the model's context with room for an answer, its oldest messages are dropped (with a notice).
Commands: ``/help`` lists them, ``/reset`` forgets the conversation, ``/system TEXT`` sets the system prompt
(``/system`` alone removes it), ``/history`` shows the conversation, ``/exit`` (or Ctrl-D) leaves. Ctrl-C stops
the answer being generated and keeps the session.

Scripts: ``--prompt TEXT`` answers one message and exits; with stdin not a terminal each input line is a
user turn (commands work too), each answer is printed on stdout followed by a newline, and the program
exits at end of input. Notices go to stderr, so stdout holds only answers.

Errors (no model, no registry or tracking database, a corrupt checkpoint) are one line on stderr and
exit code 1.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TextIO

import typer

from llm.inference.chat_session import ChatSession
from llm.inference.decoding import TextGenerator

DEFAULT_MODEL = "artifacts/finetune"
COMMANDS = "/help, /reset, /system TEXT, /history, /exit"
HELP = """commands:
  /help          this list
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt (/system alone removes it)
  /history       show the conversation
  /exit          leave (Ctrl-D too); Ctrl-C stops the answer being written
"""


class ChatError(Exception):
    """A chat cannot start; the message is the one line shown to the user."""


class Backend(str, Enum):
    torch = "torch"
    onnx = "onnx"


# ------------------------------------------------------------------------------------------ loading


def resolve_model_uri(uri: str, backend: Backend | str = Backend.torch) -> Path:
    """The local folder for ``uri``: a path as is, a ``models:/``/``runs:/`` URI through ``llm.mlops.registry``
    (for the onnx backend, the ONNX export attached to the registered version).

    Raises ChatError with one line saying what went wrong and what to run.
    """
    if not uri.startswith(("models:/", "runs:/")):
        path = Path(uri)
        if not path.exists():
            raise ChatError(
                f"no model at {path}: train one with `llm finetune` (or `dvc repro`), or pass --model with a "
                "checkpoint folder or a registry URI such as models:/gpt/Production"
            )
        return path
    onnx = Backend(backend) is Backend.onnx and uri.startswith("models:/")
    try:
        # an ONNX export resolves through the torch-free lookup: the onnx backend runs without PyTorch
        if onnx:
            from llm.mlops.lookup import RegistryError
            from llm.mlops.lookup import resolve_onnx as resolve
        else:
            from llm.mlops.registry import RegistryError
            from llm.mlops.registry import resolve_model as resolve
    except ImportError as err:  # the registry needs mlflow, which a bare inference box may lack
        missing = (err.name or "mlflow").split(".")[0]  # the module that is missing: mlflow, or torch
        raise ChatError(f"cannot resolve {uri}: the model registry is unavailable ({err}); "
                        f"install {missing} or pass --model with a checkpoint folder") from None
    try:
        return Path(resolve(uri))
    except RegistryError as err:
        raise ChatError(_one_line(f"cannot resolve {uri}: {err}", hint=True)) from None
    except Exception as err:  # noqa: BLE001  (e.g. MLflow's own errors for an unreachable store): still one line
        raise ChatError(_one_line(f"cannot resolve {uri}: {type(err).__name__}: {err}", hint=True)) from None


def _one_line(message: str, hint: bool = False) -> str:
    line = " ".join(message.split())
    if hint and "`" not in line:
        line += " (run `dvc repro` to train, evaluate and register a model, or pass --model with a checkpoint folder)"
    return line


def _load_torch(path: Path, device: str) -> TextGenerator:
    from llm.data.tokenizer import TokenizerError
    from llm.inference.generate import TorchGenerator
    from llm.model.checkpoint import CheckpointError, load_checkpoint
    from llm.training.device import select_device

    try:
        model, tokenizer, _ = load_checkpoint(path, select_device(device))
    except (CheckpointError, TokenizerError, ValueError) as err:
        raise ChatError(_one_line(str(err))) from None
    return TorchGenerator(model, tokenizer)


def _load_onnx(path: Path, int8: bool = False) -> TextGenerator:
    try:
        from llm.inference.onnx_runtime import CONFIG_FILE, OnnxGenerator
    except ImportError as err:
        raise ChatError(f"the onnx backend is unavailable ({err}); "
                        "install onnxruntime or use --backend torch") from None
    folder = next((p for p in (path, path / "onnx") if (p / CONFIG_FILE).exists()), None)
    if folder is None:
        raise ChatError(f"no ONNX export in {path} (nor in {path / 'onnx'}): export one with `llm export`, "
                        "or use --backend torch")
    try:
        onnx = OnnxGenerator(folder, int8=int8)
        onnx.tokenizer  # noqa: B018  (load it now: a broken tokenizer is a loading error, not a chat error)
    except Exception as err:  # noqa: BLE001  (a broken export: onnxruntime and tokenizer errors alike)
        raise ChatError(_one_line(f"cannot load the ONNX export in {folder}: {err}")) from None
    return onnx


def load_chat_model(uri: str, backend: Backend | str = Backend.torch, device: str = "auto",
                    int8: bool = False) -> TextGenerator:
    """Resolve ``uri`` and load it for ``backend`` (torch or onnx; ``int8`` picks the quantized ONNX model).
    Raises ChatError (one line)."""
    path = resolve_model_uri(uri, backend)
    if Backend(backend) is Backend.onnx:
        return _load_onnx(path, int8)
    return _load_torch(path, device)


# ------------------------------------------------------------------------------------------ REPL


def _speaker(system: str | None) -> str:
    m = re.match(r"\s*You are ([^.!\n]{1,40})[.!]", system or "")
    return m.group(1).strip() if m else "assistant"


def run_repl(
    session: ChatSession,
    read_line: Callable[[], str | None],
    out: TextIO,
    err: TextIO,
    *,
    interactive: bool,
) -> None:
    """Read lines until ``/exit`` or end of input (``read_line`` returns None); answer each non-command line.

    Interactive mode prefixes answers with the speaker's name; otherwise each answer is one output record
    ending in a newline. Ctrl-C while an answer streams stops that answer only.
    """
    while True:
        line = read_line()
        if line is None:
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command == "/exit":
                return
            if command == "/reset":
                session.reset()
                err.write("[conversation cleared]\n")
            elif command == "/system":
                session.set_system(arg.strip())
                err.write(f"[system prompt set: {session.system}]\n" if session.system else "[system prompt removed]\n")
            elif command == "/history":
                out.writelines(f"{m['role']}: {m['content']}\n" for m in session.history)
                out.flush()
            elif command == "/help":
                err.write(HELP)
            else:
                err.write(f"[unknown command {command}; commands: {COMMANDS}]\n")
            err.flush()
            continue
        if interactive:
            out.write(f"{_speaker(session.system)}> ")
        answer = session.reply(line)
        try:
            for piece in answer:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            answer.close()
            out.write("\n")
            out.flush()
            err.write("[interrupted]\n")
            err.flush()
            continue
        out.write("\n")
        out.flush()


def _interactive_reader(err: TextIO) -> Callable[[], str | None]:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass

    def read() -> str | None:
        while True:
            try:
                return input("you> ")
            except EOFError:
                return None
            except KeyboardInterrupt:
                err.write("\n[type /exit or press Ctrl-D to leave]\n")

    return read


def _piped_reader(stream: TextIO) -> Callable[[], str | None]:
    def read() -> str | None:
        line = stream.readline()
        return line.rstrip("\n") if line else None

    return read


app = typer.Typer(add_completion=False, help="Chat with a GPT checkpoint, registered model or ONNX export.")


@app.command()
def chat(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                              help="checkpoint folder, or models:/gpt/Production, models:/gpt@production, "
                                   "models:/gpt/3, runs:/..."),
    prompt: str | None = typer.Option(None, help="answer this one message and exit"),
    system: str | None = typer.Option(None, help='system prompt, e.g. "You are JULIET. Answer in character."'),
    temperature: float = typer.Option(0.8, min=0.0, help="0 is greedy"),
    top_k: int | None = typer.Option(50, min=1),
    top_p: float | None = typer.Option(None, min=0.0, max=1.0),
    max_new_tokens: int = typer.Option(200, min=1),
    seed: int | None = typer.Option(None, help="reproducible sampling (answer n uses seed + n)"),
    backend: Backend = typer.Option(Backend.torch, help="torch (checkpoint) or onnx (ONNX export, onnxruntime)"),
    device: str = typer.Option("auto", help="torch backend: auto, cpu, cuda or mps"),
    int8: bool = typer.Option(False, "--int8", help="onnx backend: the int8-quantized model (faster decoding; "
                                                    "bits-per-byte cost measured by bench/generate.py)"),
) -> None:
    """Chat with a model: streams answers, keeps the conversation, /help /reset /system /history /exit."""
    err = sys.stderr

    def notify(message: str) -> None:
        err.write(message + "\n")
        err.flush()

    if top_p is not None and top_p <= 0:
        raise typer.BadParameter("must be in (0, 1]", param_hint="--top-p")
    try:
        chat_model = load_chat_model(model, backend, device, int8)
    except ChatError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:  # while loading: leave quietly
        raise typer.Exit(130) from None
    session = ChatSession(chat_model, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, notify=notify)
    if prompt is not None:
        lines = iter([prompt])
        run_repl(session, lambda: next(lines, None), sys.stdout, err, interactive=False)
    elif sys.stdin.isatty():
        err.write(f"Chatting with {model} ({chat_model.context_length}-token context). Commands: {COMMANDS}; "
                  "Ctrl-C stops an answer.\n")
        run_repl(session, _interactive_reader(err), sys.stdout, err, interactive=True)
    else:
        run_repl(session, _piped_reader(sys.stdin), sys.stdout, err, interactive=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
