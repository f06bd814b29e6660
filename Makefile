# The README's two commands: `make book` (main job) and `make test` (tests).
# Both create .venv (Python 3.11) on first use and install the pinned requirements.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROFILE ?= ci
DEVICE  ?= auto

.PHONY: venv test test-fast book book-execute book-build clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

book: $(STAMP)
	$(BIN)/python -m subboost.book all --profile $(PROFILE) --device $(DEVICE)

# the two halves of `book`: execute the chapters (papermill), render the executed notebooks
book-execute: $(STAMP)
	$(BIN)/python -m subboost.book execute --profile $(PROFILE) --device $(DEVICE)

book-build: $(STAMP)
	$(BIN)/python -m subboost.book build

clean:
	rm -rf _build book/_build
