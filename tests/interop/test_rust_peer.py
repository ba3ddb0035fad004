"""ttrpc-rust (containerd/ttrpc-rust from crates.io, tests/interop/rust) against
our Python server, and our Python client against it (in test_python_client)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.interop.peers import PEER_CASES, run_peer_client

CASES = PEER_CASES


def test_rust_client_cases_hold_against_go_server(rust_peer: Path, go_server: Path) -> None:
    """The Rust client's cases pass against the reference (Go) server: the
    scenarios are right before they are pointed at ours."""
    proc = run_peer_client(rust_peer, go_server, "all")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert [f"PASS {case}" in proc.stdout for case in CASES] == [True] * len(CASES)


@pytest.mark.parametrize("case", CASES)
async def test_rust_client_against_python_server(
    rust_peer: Path, echo_server: Path, case: str
) -> None:
    """The Rust client sees our server answer as it expects a ttrpc server to."""
    result = await asyncio.to_thread(run_peer_client, rust_peer, echo_server, case)
    assert result.returncode == 0, f"{case}: {result.stderr}{result.stdout}"
    assert f"PASS {case}" in result.stdout
