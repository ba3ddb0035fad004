# Every target sets up what it needs on a fresh machine: uv (from PyPI, into the
# user's site) and the locked environment in .venv.
UV_VERSION := 0.13.9
PYTHON ?= python3
UV := $(PYTHON) -m uv
RUN := $(UV) run --locked --all-extras

.PHONY: setup demo test lint proto bench clean

setup:
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --user "uv==$(UV_VERSION)"
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
	$(RUN) python bench/ttrpc_bench.py
	$(RUN) python bench/relay_bench.py

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache build
