"""Fixtures for the ttrpc interop tests against the Go and Rust peers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from echo.fixtures import client, echo_server
from tests.interop.nerdbox_peers import build_nerdbox_host, build_nerdbox_vm
from tests.interop.peers import (
    build_peer,
    build_rust_peer,
    peer_server,
    require_cargo,
    require_go,
    run_peer_client,
)

__all__ = [
    "client",
    "echo_server",
    "go_peer",
    "go_server_sock",
    "nerdbox_host_bin",
    "nerdbox_vm_bin",
    "require_go",
    "run_peer_client",
    "rust_peer",
    "rust_server_sock",
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
    with peer_server(go_peer, sock, tmp_path / "go-server.log") as proc:
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


@pytest.fixture(scope="session")
def rust_peer() -> Path:
    """Path of the built Rust peer binary (containerd/ttrpc-rust)."""
    require_cargo()
    return build_rust_peer()


@pytest.fixture(name="rust_server")
def rust_server_sock(rust_peer: Path, tmp_path: Path) -> Iterator[Path]:
    """A running `rust-peer server`; yields its UNIX socket path."""
    sock = tmp_path / "rust.sock"
    with peer_server(rust_peer, sock, tmp_path / "rust-server.log") as proc:
        yield sock
        assert proc.poll() is None, f"Rust peer server died (status {proc.returncode})"
