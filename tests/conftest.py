"""Shared fixtures: a small synthetic corpus taken through clean, tokenizer and tokenize once per session; and
the suite's tiers and scheduling (see ``pytest_collection_modifyitems``).

Plain builder functions (corpora, tiny models, tiny checkpoints) are in ``helpers.py``.

Tiers: ``slow`` (a minute or more), ``server`` (starts a server process: llm serve or its engine processes,
Prefect, MLflow) and ``pipeline`` (runs the project's commands in fresh interpreters: llm, llm.chat, flows,
dvc, a notebook, a bench or docs script). ``make test-fast`` leaves all three out. Tests that use a fixture in
``SERVER_FIXTURES`` are marked ``server`` here; the rest carry their marks in their modules.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from helpers import write_checkpoint, write_corpus

# fixtures that start servers: every test using one of them (directly or through another fixture) is `server`
SERVER_FIXTURES = {"servers", "prefect_api", "llm_servers", "mlflow_servers"}
# The order in which the xdist workers are handed modules: the costliest first, so that the last ones to start
# are short and the workers finish together. A module's cost is the sum of its selected tests' measured seconds
# (durations.json, written by tests/record_durations.py from a run of the suite); a test not measured yet is
# estimated from its tiers (seconds, roughly), and its module's shared fixtures (models, exports, databases) add
# SHARED_FIXTURE_COST each.
MEASURED: dict[str, float] = json.loads(Path(__file__).with_name("durations.json").read_text())
TIER_COST = {"slow": 60, "server": 10, "pipeline": 10}
SHARED_FIXTURE_COST = 5

# Tests send SIGINT (Ctrl-C) to the processes they start and expect the default disposition. A test run launched
# in the background of a non-interactive shell (`make test &`) inherits SIGINT ignored, and so would every process
# it starts (an ignored signal stays ignored across exec): give this process Python's own handler, which exec
# resets to the default in each child.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """Mark the users of SERVER_FIXTURES ``server`` (before ``-m`` deselects by marks). Then, in an xdist worker,
    order the modules that are left by cost, the most expensive first: ``--dist loadscope`` hands each module to
    one worker whole (its module-scoped servers, exports and models are built once), in this order when
    ``--no-loadscope-reorder`` is given. Within a module the order stays the file's: some modules build on what
    an earlier test left."""
    for item in items:
        if SERVER_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.server)
    result = yield  # -m and -k deselect
    if hasattr(config, "workerinput"):  # one process: the files' order
        _costliest_modules_first(items)
    return result


def _costliest_modules_first(items: list[pytest.Item]) -> None:
    cost: dict[str, float] = {}
    position: dict[str, int] = {}
    shared: dict[str, set[str]] = {}
    for i, item in enumerate(items):
        module = item.nodeid.split("::", 1)[0]
        measured = MEASURED.get(item.nodeid)
        estimate = max([TIER_COST[m.name] for m in item.iter_markers() if m.name in TIER_COST], default=1)
        cost[module] = cost.get(module, 0.0) + (estimate if measured is None else measured)
        position.setdefault(module, i)
        if measured is None:  # a measured test's time includes the fixtures it set up
            definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
            shared.setdefault(module, set()).update(n for n, d in definitions.items() if d[-1].scope != "function")
    for module, names in shared.items():
        cost[module] += SHARED_FIXTURE_COST * len(names)
    items.sort(key=lambda item: (-cost[item.nodeid.split("::", 1)[0]], position[item.nodeid.split("::", 1)[0]]))


@pytest.fixture(scope="session")
def make_corpus():
    """``make_corpus(folder, n_docs=6)`` writes deterministic play-shaped .txt files into ``folder``."""
    return write_corpus


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """Paths of a corpus prepared with a char tokenizer: corpus, clean, tokenizer, tokens."""
    from llm.config import DataParams, TokenizerParams
    from llm.data.clean import clean_corpus
    from llm.data.tokenizer import train_tokenizer_on_split
    from llm.data.tokens import tokenize_corpus

    root = tmp_path_factory.mktemp("prepared")
    corpus = write_corpus(root / "corpus")
    clean_corpus(DataParams(val_fraction=0.3, min_doc_chars=100), corpus, root / "clean")
    train_tokenizer_on_split(TokenizerParams(kind="char"), root / "clean" / "train.txt", root / "tokenizer")
    tokenize_corpus(root / "clean", root / "tokenizer", root / "tokens", workers=2)
    return {"root": root, "corpus": corpus, "clean": root / "clean", "tokenizer": root / "tokenizer",
            "tokens": root / "tokens"}


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, export folder) of a tiny rope model (seed 1, context 32, weights widened so samples vary),
    exported once per session without int8 and without the parity check (test_export's business). Read-only:
    several modules decode with it."""
    from llm.inference.export import export_onnx

    root = tmp_path_factory.mktemp("tiny_export")
    checkpoint = write_checkpoint(root / "checkpoint", seed=1, context_length=32, position="rope")
    export_onnx(checkpoint, root / "onnx", verify=False)
    return checkpoint, root / "onnx"


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: tiny models decode fastest so, and a busy machine makes more threads
    far slower. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow database with its tables created once per session (creating them takes seconds)."""
    path = tmp_path_factory.getbasetemp() / "mlflow-template" / "mlflow.db"
    if not path.exists():
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        path.parent.mkdir(parents=True, exist_ok=True)
        SqlAlchemyStore(f"sqlite:///{path}", (path.parent / "mlruns").as_uri())
    return path
