# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch, installed before anything else can pull a CUDA build
TORCH_SPEC ?= torch==2.13.0
# the exact, tested versions `make install` uses (regenerate with `make lock`)
LOCK := requirements/lock.txt
# extras the lock covers and `make install` installs
EXTRAS ?= dev
# drift checks: the newest versions the requirements allow, and their lower bounds
LATEST_VENV ?= .venv-latest
OLDEST_VENV ?= .venv-oldest
SMOKE := @tests/smoke.txt
PIPFLAGS ?= -q
# what `make lint` type-checks: the whole package (mypy settings in pyproject.toml)
MYPY_TARGETS ?= src/hires_lmm

LMMS_VENV ?= .venv-lmms

.PHONY: install lock demo demo-quick test test-fast lint test-latest test-oldest test-lmms-eval bench clean

$(BIN)/hires: pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIPFLAGS) --upgrade pip
	$(BIN)/python -m pip install $(PIPFLAGS) -c $(LOCK) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install $(PIPFLAGS) -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $(BIN)/hires

install: $(BIN)/hires

# resolve the newest versions pyproject.toml allows in a scratch venv and write them as the lock
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/python -m pip install $(PIPFLAGS) --upgrade pip
	.venv-lock/bin/python -m pip install $(PIPFLAGS) "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install $(PIPFLAGS) -e ".[$(EXTRAS)]"
	{ echo "# The exact versions \`make install\` installs (pip constraints), for Python 3.11 on Linux."; \
	  echo "# Regenerate with \`make lock\`: the newest releases pyproject.toml allows, with $(TORCH_SPEC) (CPU)."; \
	  echo "# Resolved on $$(date -u +%Y-%m-%d) with extras [$(EXTRAS)]."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock
	@echo "wrote $(LOCK); run make test before committing it"

demo: install
	$(BIN)/hires demo --out out/demo

demo-quick: install
	$(BIN)/hires demo --out out/demo-quick --quick

test: install
	$(BIN)/python -m pytest

# the suite without the tests marked slow (tests/conftest.py): a few minutes
test-fast: install
	$(BIN)/python -m pytest -m "not slow"

# ruff and mypy, configured in pyproject.toml
lint: install
	$(BIN)/ruff check src tests bench tools
	$(BIN)/mypy --follow-imports=silent $(MYPY_TARGETS)

# the drift smoke subset (tests/smoke.txt) with the newest releases the requirements allow, no lock
test-latest:
	rm -rf $(LATEST_VENV)
	$(PY) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install $(PIPFLAGS) --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install $(PIPFLAGS) "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install $(PIPFLAGS) -e ".[dev]"
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -i -E '^(torch|transformers|tokenizers|huggingface.hub|accelerate|safetensors|numpy|pillow|starlette|uvicorn)=='
	$(LATEST_VENV)/bin/python -m pytest $(SMOKE)

# the same subset with every runtime dependency at its lower bound in pyproject.toml
test-oldest:
	rm -rf $(OLDEST_VENV)
	$(PY) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install $(PIPFLAGS) --upgrade pip
	$(PY) tools/pins.py lowest > $(OLDEST_VENV)/lowest.txt
	$(OLDEST_VENV)/bin/python -m pip install $(PIPFLAGS) -c $(OLDEST_VENV)/lowest.txt "$(TORCH_SPEC)"
	$(OLDEST_VENV)/bin/python -m pip install $(PIPFLAGS) -c $(OLDEST_VENV)/lowest.txt -e ".[dev]"
	$(OLDEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -i -E '^(torch|transformers|tokenizers|huggingface.hub|accelerate|safetensors|numpy|pillow|starlette|uvicorn)=='
	$(OLDEST_VENV)/bin/python -m pytest $(SMOKE)

# lmms-eval beside the CPU torch (its own requirements would pull a CUDA torch and torchvision:
# installed --no-deps from requirements/lmms-eval.txt, in a venv of its own because it needs an
# older filelock than the lock), then `lmms-eval --model hires_lmm` end to end on local tasks
test-lmms-eval:
	rm -rf $(LMMS_VENV)
	$(PY) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/python -m pip install $(PIPFLAGS) --upgrade pip
	$(LMMS_VENV)/bin/python -m pip install $(PIPFLAGS) -c $(LOCK) "$(TORCH_SPEC)"
	$(LMMS_VENV)/bin/python -m pip install $(PIPFLAGS) -c $(LOCK) -e ".[$(EXTRAS)]"
	$(LMMS_VENV)/bin/python -m pip install $(PIPFLAGS) --no-deps -r requirements/lmms-eval.txt
	$(LMMS_VENV)/bin/lmms-eval --help >/dev/null
	HIRES_REQUIRE_LMMS_EVAL=1 $(LMMS_VENV)/bin/python -m pytest tests/test_lmms_eval.py -rs

# measures this machine and writes docs/performance.md (a few minutes; see hires bench --help)
bench: install
	$(BIN)/hires bench --out docs/performance.md

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(OLDEST_VENV) $(LMMS_VENV) .venv-lock out .pytest_cache .hypothesis
