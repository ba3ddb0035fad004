"""Fixtures for the ttrpc interop tests against the Go peer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.nerdbox_peers import build_nerdbox_host, build_nerdbox_vm
from tests.interop.peers import build_peer, go_server, require_go, run_go_client
from tests.ttrpc_fixtures import client, echo_server

__all__ = [
    "client",
    "echo_server",
    "go_peer",
    "go_server_sock",
    "nerdbox_host_bin",
    "nerdbox_vm_bin",
    "require_go",
    "run_go_client",
]


@pytest.fixture(scope="session")
def go_peer() -> Path:
    """Path of the built Go peer binary."""
    require_go()
    return build_peer()


@pytest.fixture(name="go_server")
def go_server_sock(go_peer: Path, tmp_path: Path) -> Iterator[Path]:
    """A running `peer server`; yields its UNIX socket path."""
    sock = tmp_path / "go.sock"
    with go_server(go_peer, sock, tmp_path / "go-server.log") as proc:
        yield sock
        assert proc.poll() is None, f"Go peer server died (status {proc.returncode})"


@pytest.fixture(scope="session")
def nerdbox_host_bin() -> Path:
    """Path of the built nerdbox-host stand-in (nerdbox's shim side)."""
    require_go()
    return build_nerdbox_host()


@pytest.fixture(scope="session")
def nerdbox_vm_bin() -> Path:
    """Path of the built nerdbox-vm stand-in (nerdbox's vminitd side)."""
    require_go()
    return build_nerdbox_vm()
