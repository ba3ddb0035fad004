"""Go client (containerd/ttrpc v1.2.9) -> our Python server: every scenario."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.interop.peers import GO_ONLY_CASES, PEER_CASES, run_peer_client

CASES = PEER_CASES + GO_ONLY_CASES


@pytest.mark.parametrize("case", CASES)
async def test_go_client_against_python_server(go_peer: Path, echo_server: Path, case: str) -> None:
    """The Go client's view of our server matches what it expects of a Go server."""
    result = await asyncio.to_thread(run_peer_client, go_peer, echo_server, case)
    assert result.returncode == 0, f"{case}: {result.stderr}{result.stdout}"
    assert f"PASS {case}" in result.stdout
