# Every target sets up what it needs on a fresh machine (uv, the locked venv).
UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := $(HOME)/.local/bin/uv
endif
RUN := $(UV) run --locked --all-extras

.PHONY: setup demo test lint proto bench clean

$(UV):
	python3 -m pip install --quiet --user "uv==$(UV_VERSION)"

setup: $(UV)
	$(UV) sync --locked --all-extras

demo: setup
	$(RUN) socketforward demo

lint: setup
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy

test: lint
	$(RUN) pytest

proto: setup
	$(RUN) python scripts/generate_protos.py

bench: setup
	$(RUN) python -m bench

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache build
