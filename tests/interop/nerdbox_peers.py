"""Build and run the Go stand-ins for nerdbox's two sides.

tests/interop/go/cmd/nerdbox-host behaves as nerdbox's shim (it listens for the
guest's dial-back, Binds, holds one Accept stream), tests/interop/go/cmd/nerdbox-vm
as nerdbox's vminitd socket-forward and streaming plugins (it dials the RPC
socket once and serves SocketForward on it, listens for data streams). Both are
built with containerd/ttrpc (v1.2.9, nerdbox's version) and our generated
stubs, since nerdbox's own Go module is not on the module proxy. UNIX sockets
only.

They follow nerdbox's code at containerd/nerdbox d50bdab in structure, not
just on the wire, so that the benchmark's GO path performs as nerdbox does:
io.Copy relays (32 KiB buffers between UNIX sockets), one goroutine a
direction, both connections closed at the first EOF; a goroutine per accepted
connection in the VM; ConnectRequests handled one at a time on the host's
Accept stream; and the Go runtime settings nerdbox runs with (the shim: GC at
40% and GOMAXPROCS 4, unless GOMAXPROCS is set; vminitd: GOMAXPROCS 2).
``python -m bench.forward_bench --nerdbox HOST_BIN,VM_BIN`` measures them next
to nerdbox's own code built with the same command line (GO / NERDBOX in its
report).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from tests.interop.peers import READY_TIMEOUT, _stop, _wait_ready, build_go_command

NERDBOX_HOST = "nerdbox-host"
NERDBOX_VM = "nerdbox-vm"


def build_nerdbox_host() -> Path:
    """Build the nerdbox-host stand-in into build/interop/ unless it is up to date."""
    return build_go_command(NERDBOX_HOST)


def build_nerdbox_vm() -> Path:
    """Build the nerdbox-vm stand-in into build/interop/ unless it is up to date."""
    return build_go_command(NERDBOX_VM)


class Forward(NamedTuple):
    """One forward as the host knows it: forward_id -> host socket, and its VM path."""

    forward_id: str
    host_path: Path
    vm_path: Path

    def arg(self) -> str:
        return f"{self.forward_id}={self.host_path}:{self.vm_path}"


class NerdboxProcess:
    """A running nerdbox-host or nerdbox-vm; stderr goes to log_path."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self._ready = False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait (bounded) for READY on stdout; on failure stop it and raise with its log."""
        if self._ready:
            return
        try:
            _wait_ready(self.proc, timeout, self.name)
        except (TimeoutError, RuntimeError) as e:
            _stop(self.proc)
            raise RuntimeError(f"{e}; {self.name} log:\n{self.log()}") from e
        self._ready = True

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 10 s; wait; return the exit status."""
        _stop(self.proc)
        status = self.proc.returncode
        assert status is not None
        return status


@contextlib.contextmanager
def _running(name: str, argv: list[str], log_path: Path) -> Iterator[NerdboxProcess]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
    peer = NerdboxProcess(name, proc, log_path)
    try:
        yield peer
    finally:
        _stop(proc)


@contextlib.contextmanager
def nerdbox_host(
    binary: Path,
    rpc_sock: Path,
    streams_sock: Path,
    forwards: Sequence[Forward],
    log_path: Path,
    *,
    announce: bool = False,
) -> Iterator[NerdboxProcess]:
    """Run nerdbox-host listening on rpc_sock. Does NOT wait for READY: the host
    is ready only once the guest has dialed in and Bind succeeded, so start the
    guest, then call wait_ready(). The process is gone when the block exits."""
    argv = [str(binary), "--rpc-listen", f"unix:{rpc_sock}", "--streams", f"unix:{streams_sock}"]
    for forward in forwards:
        argv += ["--forward", forward.arg()]
    if announce:
        argv.append("--announce")
    with _running(NERDBOX_HOST, argv, log_path) as peer:
        yield peer


def _wait_for_path(path: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {path} did not appear within {timeout}s")
        time.sleep(0.01)


@contextlib.contextmanager
def nerdbox_vm(
    binary: Path, rpc_sock: Path, streams_sock: Path, log_path: Path
) -> Iterator[NerdboxProcess]:
    """Run nerdbox-vm dialing rpc_sock (once, as vminitd does) and listening on
    streams_sock; waits (bounded) for rpc_sock to exist, then for READY. The
    process is gone when the block exits."""
    _wait_for_path(rpc_sock, READY_TIMEOUT, "nerdbox-vm: host RPC socket")
    argv = [str(binary), "--rpc-dial", f"unix:{rpc_sock}", "--streams", f"unix:{streams_sock}"]
    with _running(NERDBOX_VM, argv, log_path) as peer:
        peer.wait_ready()
        yield peer
