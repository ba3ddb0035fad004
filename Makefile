# Every target sets up what it needs on a fresh machine: uv (from PyPI, into the
# user's site) and the locked environment in .venv.
UV_VERSION := 0.13.9
PYTHON ?= python3
UV := $(PYTHON) -m uv
RUN := $(UV) run --locked --all-extras

# The demo runs the program alone: the project, its runtime dependencies and
# its extras (uvloop), none of the dev tools. `uv run` syncs inexactly: in a
# .venv that `make setup` filled, the dev tools stay where they are.
DEMO_RUN := $(UV) run --locked --no-dev --all-extras

.PHONY: uv setup demo test lint proto bench clean vm-setup vm-demo

uv:
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --user "uv==$(UV_VERSION)"

# The dev tools (pytest, ruff, mypy, protoc and its plugins) and every extra.
setup: uv
	$(UV) sync --locked --all-extras

demo: uv
	$(DEMO_RUN) socketforward demo

lint: setup
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy

# The real-VM test's QEMU, kernel, busybox and vhost-device-vsock (cached in
# build/vm). A failure here is reported, not fatal: tests/vm then fails loudly,
# or skips if QEMU cannot start at all, and the rest of the suite still runs.
vm-setup:
	-./scripts/vm_setup.sh

test: lint vm-setup
	$(RUN) pytest

# The guest agent in a real VM over vsock, 32 MiB and 256 MiB each way, then
# boot time, throughput and round trips of ours against socat over vsock.
vm-demo: setup vm-setup
	$(RUN) pytest tests/vm -m "slow or not slow" -s -p no:cacheprovider
	$(RUN) python -m tests.vm.measure

proto: setup
	$(RUN) python scripts/generate_protos.py

bench: setup
	@command -v socat >/dev/null 2>&1 || { \
		echo "bench: socat is not installed; installing it: apt-get install -y socat"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq socat; }
	$(RUN) --group bench python -m bench.ttrpc_bench
	$(RUN) --group bench python -m bench.relay_bench
	$(RUN) --group bench python -m bench.forward_bench

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache build
