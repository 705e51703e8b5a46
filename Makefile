# make train   install (first time) and train the default experiment on the built-in data
# make test    install (first time) and run the test suite
#
# The virtual environment lives outside the clone, under ~/.cache/vaelab, keyed by a hash of
# pyproject.toml and the Python version: a fresh clone reuses it, a change of dependencies
# makes a new one. It is marked complete only after the install finished.

PYTHON ?= python3
CACHE  ?= $(HOME)/.cache/vaelab
KEY    := $(shell { cat pyproject.toml; $(PYTHON) -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)
VENV   ?= $(CACHE)/venv-$(KEY)
PY     := $(VENV)/bin/python
ARGS   ?=
PYTEST_ARGS ?=
# test processes: one per core and one more, at most 8 (pytest-xdist; each, with the train.py run
# it starts, ~2 GB resident; tests/conftest.py splits the cores' threads between them). The tests
# wait on their train.py processes' start-up and files: on this project's 2-core machine, three
# took the whole suite in 1011 s where two took 1042-1055 s (with fewer tests), using 94% of the
# cores. PYTEST_WORKERS=4 sets the number, PYTEST_WORKERS=0 runs the tests in this one process
# (for -s, --pdb)
PYTEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1; print(min(8, n + 1))')

.PHONY: install train test eval lint clean-venv

# no prerequisite: the hash in the name already changes with pyproject.toml (a fresh
# clone's newer file time must not rebuild it)
$(VENV)/.complete:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "vaelab needs Python >= 3.11: set PYTHON=python3.11 (or newer)")'
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# (re)point the editable install at this clone; cheap when it already does
install: $(VENV)/.complete
	@$(PY) -c 'import sys, vaelab, pathlib; sys.exit(0 if pathlib.Path(vaelab.__file__).resolve().is_relative_to(pathlib.Path("src").resolve()) else 1)' 2>/dev/null \
		|| $(PY) -m pip install --quiet --no-deps -e .
	@echo "environment: $(VENV)"

train: install
	$(PY) train.py $(ARGS)

eval: install
	$(PY) eval.py $(ARGS)

test: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) --maxprocesses 8 --dist worksteal $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check src tests benchmarks train.py eval.py

clean-venv:
	rm -rf $(VENV)
