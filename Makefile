# vault-secrets: `make run` starts the plugin on a local OpenBao dev server; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PLUGIN_NAME ?= vault-secrets
PYTEST_ARGS ?=

.PHONY: venv run test lint lock unit bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: venv
	$(PY) -m devenv.run --plugin-name $(PLUGIN_NAME)

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The layer rules (import-linter contracts in pyproject.toml), lint and formatting: a broken rule fails the build.
lint: venv
	$(VENV)/bin/lint-imports
	$(PY) -m mypy
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: venv
	$(PY) -m bench.run

# The managed plugin's dependencies, pinned with hashes, from pyproject.toml (PyPI only: no local wheel dirs).
lock: venv
	env -u PIP_FIND_LINKS $(VENV)/bin/pip-compile --quiet --strip-extras --generate-hashes --no-emit-index-url \
		--no-emit-find-links --output-file packaging/requirements.lock pyproject.toml

unit: venv
	$(PY) -m pytest -m 'not openbao and not docker' $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .run build *.egg-info

# Packaging targets (managed plugin, host service) live beside their files.
-include packaging/*.mk
