# The book's two commands (README): `make book` and `make test`. Both create the virtual
# environment from the pinned requirements first, so they work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Executed notebooks store plain figures, not widget state that needs a live kernel.
export COHW_STATIC := 1
STAMP  := $(VENV)/.installed

.PHONY: book test venv browser-deps probe clean

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

venv: $(STAMP)

# The whole book, every notebook executed with its full parameters, warnings are errors.
# Execution is cached per notebook (jupyter-cache) and the cache is cleared whenever the package,
# its data or the requirements change; `make book FORCE=1` re-executes every chapter.
book: $(STAMP)
	$(PY) tools/book_cache.py $(if $(FORCE),--force)
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going
	@echo "book: open _build/html/index.html"

# Debian's Chromium for the browser test of the rendered book (root, as on CI).
browser-deps:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# The whole test suite: unit tests, every notebook under papermill with the small CI
# parameters (the outputs notebooks mark for checking compared with their references), a warning-free Sphinx build
# of the executed smoke notebooks, that build opened page by page in headless Chromium, and last
# a check that the tree the tests leave behind still builds as the book (no stray pages).
test: $(STAMP) browser-deps
	$(PY) -m pytest tests -q --ignore=tests/browser
	$(PY) tools/smoke_book.py
	$(PY) -m pytest tests/browser -q
	$(PY) tools/check_book_sources.py

probe: $(STAMP)
	$(PY) -c "from cohw_utils.hardware.probe import probe_host; print(probe_host(refresh=True))"

clean:
	rm -rf _build
