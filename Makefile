# Two front doors: `make demo` (train on the default corpus) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel on this path; elsewhere point pip at PyTorch's CPU index, e.g.
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_VERSION := 2.13.0
TORCH_INDEX ?=
TORCH_INDEX_ARG := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: install install-dev demo test test-fast bench lint clean-artifacts

# what the pipeline and the servers need; `make test` adds the dev tools (the test runners, Transformers and
# lm-evaluation-harness for the interop tests, the notebook runner: 25 s more of install that `make demo` skips)
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_INDEX_ARG) torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[pipeline,onnx,serve]'
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[pipeline,onnx,serve,dev]'
	touch $@

install: $(BIN)/.installed
install-dev: $(BIN)/.installed-dev

# `llm demo` fetches the corpus, runs `dvc repro` (this venv's python first on PATH), shows the metrics, samples,
# chats and prints the next steps: the same command works without make (README, "Windows (PowerShell)")
demo: install
	$(BIN)/llm demo

# the import-layer contracts (pyproject.toml, [tool.importlinter]) first, then the tests, TEST_WORKERS at a time
# (pytest-xdist). loadscope: each module runs on one worker, so its servers, exports and models are built once;
# tests/conftest.py orders the modules costliest first by tests/durations.json (--no-loadscope-reorder keeps that
# order); PYTEST_ARGS adds pytest options (e.g. --junitxml=FILE for tests/record_durations.py)
# 3 on 2 cores: many slow tests wait on subprocesses and servers (measured, full suite on 2 idle cores, modules
# ordered by tests/durations.json: 590 s with 3 workers, 609 s with 4)
TEST_WORKERS ?= 3
XDIST := -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder
# one torch (OpenMP) thread per test process, and per process a test starts: 3 workers x torch's default of one
# thread per core would put 6 threads on 2 cores. Bytecode cached even where the environment says not to
# (PYTHONDONTWRITEBYTECODE): the tests start hundreds of interpreters that import the project's modules, and
# compiling them each time cost the full suite about 25 s of its 10 minutes on 2 cores (590 s -> 566 s)
TEST_ENV := env -u PYTHONDONTWRITEBYTECODE OMP_NUM_THREADS=1
# the fast tier: no slow tests, no servers, no commands run in fresh interpreters (pyproject.toml, markers)
FAST := not slow and not server and not pipeline
test: install-dev
	$(BIN)/lint-imports --no-logo
	$(TEST_ENV) $(BIN)/python -m pytest -q $(XDIST) $(PYTEST_ARGS)

# the inner loop (under 2 minutes on 2 cores): the contracts and every test of the fast tier, the library in
# this process; CI runs `make test`
test-fast: install-dev
	$(BIN)/lint-imports --no-logo
	$(TEST_ENV) $(BIN)/python -m pytest -q $(XDIST) -m "$(FAST)" $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/train_throughput.py --preset nanogpt small

lint: install-dev
	$(BIN)/ruff check llm tests bench flows

clean-artifacts:
	rm -rf artifacts
