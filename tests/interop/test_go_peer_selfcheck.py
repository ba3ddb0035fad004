"""The Go peer's client cases pass against its own server (Go vs Go).

This proves the scenarios themselves before they are pointed at the Python
ttrpc server.
"""

from __future__ import annotations

from pathlib import Path

from tests.interop.peers import run_peer_client


def test_go_client_all_cases_against_go_server(go_peer: Path, go_server: Path) -> None:
    proc = run_peer_client(go_peer, go_server, "all")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "PASS concurrent_100" in proc.stdout


def test_go_client_rejects_unknown_case(go_peer: Path, go_server: Path) -> None:
    proc = run_peer_client(go_peer, go_server, "no_such_case")
    assert proc.returncode != 0
    assert "unknown case" in proc.stderr
