# The front door: `make up` runs radtriage, `make test` runs every test.
# Both install what they need first (idempotently; caches under ~/.cache/radtriage).
VENV ?= $(or $(RADTRIAGE_VENV),$(HOME)/.cache/radtriage/venv)
PY := $(VENV)/bin/python

.PHONY: install up demo test lint lint-only

install:
	@scripts/install.sh

up: install
	@$(VENV)/bin/radtriage up

demo: install
	@$(VENV)/bin/radtriage demo

# Lint, then unit, integration and end-to-end tests; the session fixtures start (and
# stop) a real Kafka broker and a real Triton server.
test:
	@scripts/install.sh --test
	@$(MAKE) --no-print-directory lint-only
	@$(PY) -m pytest

lint: install lint-only

lint-only:
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/lint-imports --no-cache
	@$(VENV)/bin/mypy radtriage connectors streams processors models schemas
