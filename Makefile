# Two front doors: `make demo` (train on the default corpus) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel on this path; elsewhere point pip at PyTorch's CPU index, e.g.
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_VERSION := 2.13.0
TORCH_INDEX ?=
TORCH_INDEX_ARG := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: install demo test bench lint clean-artifacts

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_INDEX_ARG) torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[pipeline,onnx,serve,dev]'
	touch $@

install: $(BIN)/.installed

# dvc runs each stage as `python -m flows <stage>`: the venv's python must come first on PATH
RUN := PATH="$(CURDIR)/$(BIN):$$PATH"

demo: install
	$(BIN)/llm data fetch
	$(RUN) dvc repro
	$(RUN) dvc metrics show
	$(BIN)/llm generate --model artifacts/pretrain --prompt "ROMEO." --max-new-tokens 200 --seed 1
	$(BIN)/python -m llm.chat --model models:/gpt/Production --seed 1 --prompt "What news from Verona?"
	@echo
	@echo "The pipeline's Prefect server (the Prefect UI) keeps running for the next runs:"
	@$(BIN)/python -m flows server status || true
	@echo
	@echo "Done: the pipeline ran on the default corpus; see artifacts/eval/samples.md."
	@echo "Activate the environment first:  source $(VENV)/bin/activate"
	@echo "  Chat with the Production model:  python -m llm.chat --model models:/gpt/Production"
	@echo "  Generate text:                   llm generate --model models:/gpt/Production --prompt 'ROMEO.'"
	@echo "  Serve the OpenAI API (ONNX):     llm serve --model models:/gpt/Production   # http://127.0.0.1:8000/v1"
	@echo "  Compare runs, see the registry:  mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1"
	@echo "  Prefect server: URL, stop it:    python -m flows server status;  python -m flows server stop"
	@echo "  Serve the flows as deployments:  export PREFECT_API_URL=\$$(python -m flows server start); python -m flows.serve"
	@echo "  Run a stage on demand:           prefect deployment run pretrain/pretrain --param overrides='{\"max_steps\": 200}'"

# the import-layer contracts (pyproject.toml, [tool.importlinter]) first, then the tests
test: install
	$(BIN)/lint-imports --no-logo
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/train_throughput.py

lint: install
	$(BIN)/ruff check llm tests bench flows

clean-artifacts:
	rm -rf artifacts
