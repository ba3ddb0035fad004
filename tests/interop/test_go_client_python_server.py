"""Go client (containerd/ttrpc v1.2.9) -> our Python server: every scenario."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.interop.conftest import run_peer_client

CASES = [
    "unary",
    "metadata",
    "server_stream",
    "server_stream_empty",
    "client_stream",
    "client_stream_none",
    "bidi",
    "bidi_1000",
    "deadline",
    "unimplemented_service",
    "unimplemented_method",
    "error_codes",
    "server_stream_error",
    "max_frame",
    "oversize",
    "concurrent_100",
]


@pytest.mark.parametrize("case", CASES)
async def test_go_client_against_python_server(go_peer: Path, echo_server: Path, case: str) -> None:
    """The Go client's view of our server matches what it expects of a Go server."""
    result = await asyncio.to_thread(run_peer_client, go_peer, echo_server, case)
    assert result.returncode == 0, f"{case}: {result.stderr}{result.stdout}"
    assert f"PASS {case}" in result.stdout
