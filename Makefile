# make book   creates .venv when missing, installs the pinned dependencies and eandc (editable),
#             executes every notebook of notebooks/ with papermill for PROFILE (smoke, standard,
#             paper; default standard) and builds the HTML book; prints where index.html is.
# make test   the same environment; checks the code with ruff and runs the whole test suite
#             (notebooks, golden notebook, smoke book, headless browser included).
# make lab    opens the notebook templates in JupyterLab, with the project's kernel.
# make golden rewrites the golden notebook book/golden/quickstart.ipynb (smoke parameters).
# make demo   recovers a random teacher from the command line.
PYTHON  ?= python3
PROFILE ?= standard
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: book test lint lab golden demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,book]"
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/eandc book --profile $(PROFILE)

test: $(STAMP)
	$(BIN)/ruff check eandc tests
	TQDM_DISABLE=1 $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check eandc tests

lab: $(STAMP)
	$(BIN)/python -c "import eandc.book; eandc.book.ensure_kernel()"
	$(BIN)/jupyter lab notebooks/

golden: $(STAMP)
	$(BIN)/eandc book --golden

demo: $(STAMP)
	$(BIN)/eandc demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build _build book/executed *.egg-info
