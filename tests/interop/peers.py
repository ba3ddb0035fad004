"""Helpers to build and run the ttrpc interop peers: Go's (tests/interop/go/cmd/peer,
containerd/ttrpc) and Rust's (tests/interop/rust, containerd/ttrpc-rust)."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
GO_DIR = REPO_ROOT / "tests" / "interop" / "go"
PEER_BIN = REPO_ROOT / "build" / "interop" / "peer"
READY_TIMEOUT = 30.0
BUILD_TIMEOUT = 600.0


RUST_DIR = REPO_ROOT / "tests" / "interop" / "rust"
RUST_TARGET = REPO_ROOT / "build" / "interop" / "rust-target"
RUST_PEER_BIN = RUST_TARGET / "debug" / "rust-peer"


class GoMissingError(RuntimeError):
    """The go toolchain is not on PATH."""


class CargoMissingError(RuntimeError):
    """The Rust toolchain (cargo) is not on PATH."""


# The scenarios both peers' clients run (tests/interop/go/cmd/peer, tests/interop/rust);
# the raw-frame ones need the Go client's frame-level access.
PEER_CASES = [
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
    "concurrent_100",
]
GO_ONLY_CASES = ["max_frame", "oversize"]


def _require(tool: str, what: str) -> None:
    """Skip (or, under CI, fail) the calling test when *tool* is not on PATH."""
    if shutil.which(tool) is not None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{tool} is not on PATH, and CI is set: the {what} interop tests must run")
    pytest.skip(f"{tool} is not on PATH: {what} interop tests skipped (they run under CI)")


def require_go() -> None:
    _require("go", "Go")


def require_cargo() -> None:
    _require("cargo", "Rust")


def _newest_source_mtime() -> float:
    sources = [*GO_DIR.rglob("*.go"), GO_DIR / "go.mod", GO_DIR / "go.sum"]
    return max(p.stat().st_mtime for p in sources if p.exists())


def build_rust_peer() -> Path:
    """Build tests/interop/rust (ttrpc-rust from crates.io) unless it is up to date."""
    cargo = shutil.which("cargo")
    if cargo is None:
        raise CargoMissingError("cargo is not on PATH: the Rust interop peer cannot be built")
    sources = [*RUST_DIR.rglob("*.rs"), RUST_DIR / "Cargo.toml", RUST_DIR / "Cargo.lock"]
    sources.append(REPO_ROOT / "ttrpc-asyncio" / "tests" / "echo" / "echo.proto")
    newest = max(p.stat().st_mtime for p in sources if p.exists())
    if RUST_PEER_BIN.exists() and RUST_PEER_BIN.stat().st_mtime >= newest:
        return RUST_PEER_BIN
    proc = subprocess.run(
        [cargo, "build", "--locked", "--target-dir", str(RUST_TARGET)],
        cwd=RUST_DIR,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cargo build of the Rust interop peer failed:\n{proc.stderr}")
    RUST_PEER_BIN.touch()  # cargo keeps an unchanged binary's old mtime
    return RUST_PEER_BIN


def build_go_command(name: str) -> Path:
    """Build tests/interop/go/cmd/NAME into build/interop/NAME unless it is up to date."""
    go = shutil.which("go")
    if go is None:
        raise GoMissingError(f"go is not on PATH: the Go interop program {name} cannot be built")
    binary = PEER_BIN.parent / name
    if binary.exists() and binary.stat().st_mtime >= _newest_source_mtime():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [go, "build", "-o", str(binary), f"./cmd/{name}"],
        cwd=GO_DIR,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"go build of the interop {name} failed:\n{proc.stdout}{proc.stderr}")
    return binary


def build_peer() -> Path:
    """Build the Go peer into build/interop/peer unless it is up to date."""
    return build_go_command(PEER_BIN.name)


def _wait_ready(
    proc: subprocess.Popen[bytes], timeout: float, what: str = "Go peer server"
) -> None:
    """Wait until the process prints a READY line on stdout."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    seen = b""
    while b"READY\n" not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{what} not READY within {timeout}s")
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RuntimeError(f"{what} exited before READY (status {proc.wait()})")
        seen += chunk


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def peer_server(peer: Path, sock_path: Path, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `peer server` on sock_path (stderr to log_path) until the block exits;
    the Rust peer (`rust-peer server`) takes the same arguments."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(peer), "server", "--listen", f"unix:{sock_path}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        try:
            _wait_ready(proc, READY_TIMEOUT, f"{peer.name} server")
        except (TimeoutError, RuntimeError) as e:
            _stop(proc)
            raise RuntimeError(f"{e}; server log:\n{log_path.read_text(errors='replace')}") from e
        yield proc
    finally:
        _stop(proc)


def run_peer_client(
    peer: Path, sock_path: Path, case: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `peer client --case CASE` against the ttrpc server at sock_path (the
    Rust peer's client takes the same arguments and prints the same PASS lines)."""
    return subprocess.run(
        [str(peer), "client", "--dial", f"unix:{sock_path}", "--case", case],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
