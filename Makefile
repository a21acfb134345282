# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch, installed before anything else can pull a CUDA build
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo demo-quick test bench clean

$(BIN)/hires: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/hires

install: $(BIN)/hires

demo: install
	$(BIN)/hires demo --out out/demo

demo-quick: install
	$(BIN)/hires demo --out out/demo-quick --quick

test: install
	$(BIN)/python -m pytest

# measures this machine and writes docs/performance.md (a few minutes; see hires bench --help)
bench: install
	$(BIN)/hires bench --out docs/performance.md

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
