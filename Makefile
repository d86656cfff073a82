# make test   creates .venv when missing, installs the pinned dependencies and eandc (editable),
#             checks the code with ruff, and runs the whole test suite.
# make demo   recovers a random teacher from the command line.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test lint demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check eandc tests
	TQDM_DISABLE=1 $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check eandc tests

demo: $(STAMP)
	$(BIN)/eandc demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
