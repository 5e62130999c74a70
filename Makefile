# The two commands of the README. Each creates the virtual environment when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU build of torch that lies on disk here; elsewhere pip resolves the package's own range.
TORCH  ?= torch==2.13.0

.PHONY: demo test lint bench-samplers clean

# the package alone (what the demo needs) ...
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# ... and what the tests need beside it (pytest, ruff, the text encoder, tensorboard, datasets)
$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/difflab demo --out outputs/demo --overwrite

# two workers of one thread each (a machine with 2 cores; one thread per process is the fast setting
# there), whole files per worker so module fixtures (the page's server, trained helpers) are made once
test: $(BIN)/.installed-dev
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile

lint: $(BIN)/.installed-dev
	$(BIN)/ruff check .

bench-samplers: $(BIN)/.installed-dev
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	OMP_NUM_THREADS=1 $(BIN)/python bench/samplers.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
