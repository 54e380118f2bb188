# Two commands from a fresh clone: `make run` and `make test`. Both build .venv by themselves.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= ../shared/data/steg
HOST ?= 127.0.0.1
PORT ?= 7071

.PHONY: run test lint format typecheck train bench azurite clean security loadtest

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || { echo "error: Python 3.11 is needed ($(PYTHON) is not it); install it or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

node_modules/.bin/azurite-blob: package.json
	npm install --no-audit --no-fund --silent
	touch $@

azurite: node_modules/.bin/azurite-blob

run: $(STAMP)
	$(VENV)/bin/ptd serve --host $(HOST) --port $(PORT)

test: $(STAMP) azurite
	$(PY) -m pytest -n 2 --dist loadgroup

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile

# Static security scan of the served code (clean = no finding at any severity). The dependency
# audit (pip-audit --strict) runs in .github/workflows/ci.yml: it needs the vulnerability database.
security: $(STAMP)
	$(VENV)/bin/bandit -r detector function_app.py -q

# Bounded load test on 127.0.0.1: concurrent clients for LOAD_SECONDS; fails on any error.
LOAD_SECONDS ?= 20
LOAD_CLIENTS ?= 16
loadtest: $(STAMP)
	$(PY) -m benchmarks.loadtest --seconds $(LOAD_SECONDS) --clients $(LOAD_CLIENTS)

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

train: $(STAMP)
	$(VENV)/bin/ptd train --data $(DATA) --out models_artifacts --baseline docs/baseline-20261127-edbd3118db.json --plots docs/model_card

bench: $(STAMP) azurite
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
