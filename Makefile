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
	$(BIN)/python -m pip install --quiet -e '.[pipeline,onnx,dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/llm data fetch
	$(BIN)/llm clean
	$(BIN)/llm tokenizer
	$(BIN)/llm tokenize
	$(BIN)/llm pretrain
	$(BIN)/llm evaluate
	$(BIN)/llm generate --prompt "ROMEO." --max-new-tokens 300 --seed 1
	@echo
	@echo "Done. The model is in artifacts/pretrain; metrics in artifacts/eval/metrics.json."
	@echo "Generate more:   $(BIN)/llm generate --prompt 'JULIET.' --temperature 0.8 --top-k 50"
	@echo "Evaluate again:  $(BIN)/llm evaluate --model artifacts/pretrain"

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/train_throughput.py

lint: install
	$(BIN)/ruff check llm tests bench

clean-artifacts:
	rm -rf artifacts
