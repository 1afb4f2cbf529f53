# align-kit: `make demo` runs the whole pipeline on the embedded default; `make test` is what CI runs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.align-kit-installed
TORCH  := torch==2.13.0
export TRL_EXPERIMENTAL_SILENCE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install browser demo test test-all bench lint format clean

install: $(STAMP)

# torch goes in first, pinned: a plain or newer torch would pull several GB of CUDA packages.
# The stamp depends on pyproject.toml, so a second call reinstalls nothing unless it changed.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@echo "[align-kit] installing $(TORCH) (CPU build, about 1 minute) into $(VENV)"
	$(PY) -m pip install --quiet $(TORCH)
	@echo "[align-kit] installing align-kit and its dependencies (trl, transformers, datasets, ...) into $(VENV)"
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $(STAMP)

# The report test screenshots report.html in a headless browser: install Debian's chromium when missing.
browser:
	@sh tests/ensure-browser.sh

demo: $(STAMP)
	$(PY) -m align_kit.demo

test: $(STAMP) browser
	$(PY) -m pytest -q

# The long checks include the alignment tax's lm-evaluation-harness task (the optional lm-eval extra).
test-all: $(STAMP) browser
	$(PY) -m pip install --quiet -e ".[lm-eval]"
	$(PY) -m pytest -q -m ""

bench: $(STAMP)
	$(PY) bench/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf runs .pytest_cache .ruff_cache
