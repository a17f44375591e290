# neurolm_nb: every target creates (or reuses) .venv on first use; nothing is installed outside it.
#
#   make demo    run the smoke pipeline (data stages + training demo) into runs/smoke/
#   make test    the test suite: library tests, every notebook under papermill, export/clean sync
#   make lab     JupyterLab on nbs/ with the project's environment as the python3 kernel
#
# Variables: PYTHON (interpreter to build .venv from, >= 3.10), PROFILE (for demo), PYTEST_ARGS,
# TORCH_SPEC (what to install when the venv has no torch yet, e.g. TORCH_SPEC=torch==2.13.0).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= smoke
PYTEST_ARGS ?=
TORCH_SPEC ?= torch
PIP := $(PY) -m pip --disable-pip-version-check
# The install is redone only when the packaging files change (their checksum names the stamp).
STAMP := $(VENV)/.installed-$(shell cat settings.ini setup.py pyproject.toml 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: help venv install demo test lab export clean check samples book book-test test-interop

help:
	@echo "make demo     run the '$(PROFILE)' pipeline with papermill into runs/$(PROFILE)/"
	@echo "make test     run the test suite (PYTEST_ARGS='-k io' to select)"
	@echo "make lab      JupyterLab on nbs/ (installs jupyterlab into .venv on first use; LAB_ARGS=--no-browser)"
	@echo "make install  create .venv and install the project with its dev tools"
	@echo "make export   nbdev_export: regenerate neurolm_nb/ from nbs/"
	@echo "make clean    strip outputs and metadata from nbs/*.ipynb (nbdev_clean)"
	@echo "make check    export + clean, and fail if that changed any file"
	@echo "make samples  regenerate data_samples/"
	@echo "make book     render the executed notebooks of runs/$(PROFILE) (BOOK_RUN=runs/<profile>) into _book/html"
	@echo "              (installs the book extra on first use; runs the non-stage notebooks once, cached; BOOK_EXECUTE= to skip)"
	@echo "make book-test  build the book and open every page in headless Chromium (installs chromium + playwright)"
	@echo "make test-interop  our LaBraM vs the real braindecode Labram, in .venv-interop (torch 2.9.1 + torchaudio; ~7 GB)"

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: '$(PYTHON)' not found; install Python >= 3.10 or run make PYTHON=/path/to/python3.x" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { \
	  echo "error: neurolm_nb needs Python >= 3.10, but '$(PYTHON)' is $$($(PYTHON) -V 2>&1)." >&2; \
	  echo "       Run e.g. 'make $(MAKECMDGOALS) PYTHON=python3.11' with a newer interpreter." >&2; exit 1; }
	@echo "creating $(VENV) with $$($(PYTHON) -V 2>&1)"
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "error: '$(PYTHON) -m venv' failed (on Debian/Ubuntu: apt install python3-venv)" >&2; exit 1; }

venv: $(PY)

$(STAMP): | $(PY)
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { \
	  echo "error: $(VENV) runs $$($(PY) -V 2>&1); neurolm_nb needs >= 3.10. Remove $(VENV) and run again with PYTHON=python3.11 (or newer)." >&2; exit 1; }
	@# An installed torch (a CUDA build, or the CPU build CI puts there first) is never replaced:
	@# it is pinned as a constraint for the project install.
	@if $(PY) -c 'import torch' >/dev/null 2>&1; then \
	  echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') is installed: leaving it alone"; \
	else \
	  echo "installing $(TORCH_SPEC) (choose a build with TORCH_SPEC=..., see https://pytorch.org)"; \
	  $(PIP) install "$(TORCH_SPEC)"; \
	fi
	@# Pin the installed *distribution's* version (e.g. 2.14.1, or 2.13.0+cpu), never torch.__version__,
	@# whose local label (+cu130) a registry's plain "2.14.1" wheel does not carry.
	@$(PY) -c 'from importlib.metadata import version; print("torch==" + version("torch"))' > $(VENV)/torch-constraint.txt
	$(PIP) install -e ".[dev]" -c $(VENV)/torch-constraint.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m neurolm_nb.pipeline --profile $(PROFILE)
	@echo
	@if [ -f runs/$(PROFILE)/evaluation/results.md ]; then echo; cat runs/$(PROFILE)/evaluation/results.md; fi
	@echo
	@echo "Executed notebooks: runs/$(PROFILE)/<stage>/*.ipynb   figures: runs/$(PROFILE)/<stage>/figures/"
	@echo "Paper figures and tables: runs/$(PROFILE)/figures/ (index.md lists them)"
	@echo "Record of the run:  runs/$(PROFILE)/pipeline.json"

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# JupyterLab runs from .venv, so its python3 kernel is the project's interpreter (what papermill uses too).
LAB_ARGS ?=
$(VENV)/.lab-installed: $(STAMP)
	$(PIP) install "jupyterlab>=4" -c $(VENV)/torch-constraint.txt
	@touch $@

lab: $(VENV)/.lab-installed
	$(VENV)/bin/jupyter lab --notebook-dir=nbs $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

export: $(STAMP)
	$(VENV)/bin/nbdev_export

clean: $(STAMP)
	$(PY) -m neurolm_nb.pipeline --strip-outputs nbs
	$(VENV)/bin/nbdev_clean

# Fingerprint of everything export and clean may touch; check compares it before and after.
FINGERPRINT = find nbs neurolm_nb pyproject.toml -type f \( -name '*.ipynb' -o -name '*.py' -o -name '*.toml' \) \
	-not -path '*/__pycache__/*' -not -path '*/.ipynb_checkpoints/*' | LC_ALL=C sort | xargs cksum

check: $(STAMP)
	@$(FINGERPRINT) > $(VENV)/.check-before
	@$(VENV)/bin/nbdev_export
	@$(PY) -m neurolm_nb.pipeline --strip-outputs nbs >/dev/null
	@$(VENV)/bin/nbdev_clean
	@$(FINGERPRINT) > $(VENV)/.check-after
	@if diff $(VENV)/.check-before $(VENV)/.check-after >/dev/null; then echo "check: nbdev_export and nbdev_clean change nothing"; \
	else echo "check FAILED: these files changed (review and commit them):" >&2; \
	  diff $(VENV)/.check-before $(VENV)/.check-after | sed -n 's/^> [0-9]* [0-9]* /  /p' >&2; exit 1; fi

samples: $(STAMP)
	$(PY) -m neurolm_nb.shards make-samples data_samples

# The book: Sphinx + myst-nb + sphinx-book-theme render the executed notebooks of a finished run (nothing is
# re-executed); notebooks that are not stages of the run are executed once with papermill and cached
# (BOOK_EXECUTE= renders them from source, without outputs). The site is _book/html/index.html (book/conf.py).
BOOK_RUN ?= runs/$(PROFILE)
BOOK_EXECUTE ?= 1
ifneq ($(filter book book-test,$(MAKECMDGOALS)),)
ifeq ($(filter demo,$(MAKECMDGOALS))$(wildcard $(BOOK_RUN)/.),)
$(error no run folder $(BOOK_RUN): run 'make demo' first (or make book BOOK_RUN=runs/<profile>))
endif
endif

$(VENV)/.book-installed: $(STAMP)
	$(PIP) install -e ".[book]" -c $(VENV)/torch-constraint.txt
	@touch $@

book: $(VENV)/.book-installed
	$(PY) tools/build_book.py --run "$(BOOK_RUN)" $(if $(BOOK_EXECUTE),--execute)

# The browser test needs a Chromium (Debian's package, installed here when missing and we are root) and the
# playwright client (into .venv; it drives /usr/bin/chromium, never downloads a browser of its own).
$(VENV)/.book-test-installed: $(VENV)/.book-installed
	$(PIP) install "playwright>=1.40" -c $(VENV)/torch-constraint.txt
	@touch $@

book-test: $(VENV)/.book-test-installed book
	@if [ ! -x /usr/bin/chromium ] && [ -z "$$BOOK_CHROMIUM" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the browser test (apt-get)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	      || echo "warning: apt-get could not install chromium; the browser test will skip" >&2; \
	  else echo "warning: no /usr/bin/chromium (install it, or set BOOK_CHROMIUM=/path/to/chrome); the browser test will skip" >&2; fi; \
	fi
	BOOK_SITE=_book/html BOOK_TEST_STRICT=1 $(PY) -m pytest tests/test_book.py -s $(PYTEST_ARGS)

# braindecode interop against the real package. braindecode imports torchaudio, and no torchaudio on the registry
# loads beside the torch of .venv, so this runs in its own venv with torch 2.9.1 + torchaudio 2.9 (a CUDA build on
# x86_64, about 7 GB), reused while the packaging files and the pins stay the same (their checksum names the stamp).
# NEUROLM_REQUIRE_BRAINDECODE=1 turns the tests' "braindecode is not usable" skip into a failure.
INTEROP_VENV ?= .venv-interop
INTEROP_TORCH ?= torch==2.9.1
INTEROP_TORCHAUDIO ?= torchaudio==2.9.*
INTEROP_PY := $(INTEROP_VENV)/bin/python
INTEROP_PIP := $(INTEROP_PY) -m pip --disable-pip-version-check
INTEROP_STAMP := $(INTEROP_VENV)/.installed-$(shell { cat settings.ini setup.py pyproject.toml; echo '$(INTEROP_TORCH) $(INTEROP_TORCHAUDIO)'; } 2>/dev/null | cksum | cut -d' ' -f1)

$(INTEROP_STAMP):
	@[ -x $(INTEROP_PY) ] || { echo "creating $(INTEROP_VENV) with $$($(PYTHON) -V 2>&1)"; $(PYTHON) -m venv $(INTEROP_VENV); }
	$(INTEROP_PIP) install "$(INTEROP_TORCH)" "$(INTEROP_TORCHAUDIO)"
	@$(INTEROP_PY) -c 'from importlib.metadata import version as v; print("torch==" + v("torch")); print("torchaudio==" + v("torchaudio"))' > $(INTEROP_VENV)/torch-constraint.txt
	$(INTEROP_PIP) install -e ".[interop]" "pytest>=7" -c $(INTEROP_VENV)/torch-constraint.txt
	@rm -f $(INTEROP_VENV)/.installed-*
	@touch $@

test-interop: $(INTEROP_STAMP)
	@$(INTEROP_PY) -c 'from importlib.metadata import version as v; print(" ".join(p + " " + v(p) for p in ("torch", "torchaudio", "braindecode")))'
	NEUROLM_REQUIRE_BRAINDECODE=1 $(INTEROP_PY) -m pytest tests/test_interop.py tests/test_baselines.py -p no:cacheprovider -rs -s $(PYTEST_ARGS)
