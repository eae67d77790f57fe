# Set-up and everyday commands. `make run` and `make test` install into .venv first if needed.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install run test test-slow bench clean-venv

install: $(INSTALLED)

# torch is installed first and pinned, so pip takes the local CPU wheel, never a multi-GB CUDA build.
$(INSTALLED): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --disable-pip-version-check -q "torch==2.13.0"
	$(PYTHON) -m pip install --disable-pip-version-check -q -e ".[test]"
	touch $(INSTALLED)

run: install
	$(VENV)/bin/moeplex demo serve

test: install
	$(PYTHON) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: install
	$(PYTHON) -m pytest -q -m slow $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/moeplex bench decode --json docs/results/bench_decode.json

clean-venv:
	rm -rf $(VENV)
