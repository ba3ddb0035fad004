"""``socketforward demo``: the main job on one machine, no VM and no root.

It starts a real host service (an HTTP server on a UNIX socket), the host
forwarder and the guest agent as separate processes talking over ``unix:``
endpoints in a temporary directory (the way libkrun exposes vsock ports), then
acts as a container process: HTTP requests through the forwarded socket in the
"VM", a sha256-checked upload with half-close, a burst of concurrent requests.
Everything it created is removed at the end (``--keep`` leaves it running).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import http.server
import os
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FORWARD_ID = "demo-web"


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _Handler(http.server.BaseHTTPRequestHandler):
    """The host's service: GET / greets; POST /sha256 answers the body's digest."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass  # the demo prints its own lines

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply(b"hello from the host service, through socketforward\n")

    def do_POST(self) -> None:
        remaining = int(self.headers.get("Content-Length", "0"))
        digest = hashlib.sha256()
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
        self._reply(digest.hexdigest().encode())


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=60)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _request(path: str, method: str = "GET", body: bytes | None = None) -> bytes:
    conn = _UnixHTTPConnection(path)
    try:
        conn.request(method, "/sha256" if body is not None else "/", body=body)
        response = conn.getresponse()
        return response.read()
    finally:
        conn.close()


def _say(text: str) -> None:
    print(text, flush=True)


@contextlib.contextmanager
def _process(name: str, argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        # Own session: Ctrl-C reaches only the demo, which then stops both sides itself.
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    _say(f"  started {name} (pid {proc.pid}): {' '.join(argv[2:])}")
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _say(f"  {name} exited with status {proc.returncode}")


def _wait_for_socket(path: Path, procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_socket():
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a side exited early with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f}s")
        time.sleep(0.02)


def run(size_mib: int, burst: int, keep: bool) -> int:
    python = [sys.executable, "-m", "socketforward"]
    with tempfile.TemporaryDirectory(prefix="socketforward-demo-") as tmp_name:
        tmp = Path(tmp_name)
        host_dir, vm_dir = tmp / "host", tmp / "vm"
        host_dir.mkdir(mode=0o700)
        vm_dir.mkdir(mode=0o700)
        service = host_dir / "web.sock"
        rpc, streams = host_dir / "rpc.sock", vm_dir / "streams.sock"
        vm_path = vm_dir / "run" / "web.sock"
        _say("socketforward demo: a host UNIX service, forwarded into a pretend VM")
        _say(f"  host service:  HTTP on {service}")
        _say(f"  forward table: {FORWARD_ID} = {service} -> (VM) {vm_path}")
        _say(f"  RPC: the guest dials unix:{rpc}; data streams: the host connects to "
             f"unix:{streams}")  # fmt: skip
        httpd = _UnixHTTPServer(str(service), _Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        ok = True
        try:
            with (
                _process("host", [*python, "host", "--rpc-listen", f"unix:{rpc}",
                                  "--streams", f"unix:{streams}",
                                  "--forward", f"{FORWARD_ID}={service}:{vm_path}"],
                         tmp / "host.log") as host,
                _process("guest", [*python, "guest", "--rpc-dial", f"unix:{rpc}",
                                   "--streams", f"unix:{streams}"],
                         tmp / "guest.log") as guest,
            ):  # fmt: skip
                _wait_for_socket(vm_path, [host, guest], timeout=30)
                _say(f"  the guest bound {vm_path}; acting as a container process now")
                ok = _exercise(str(vm_path), size_mib, burst)
                if keep:
                    _say(f"\nleft running; from another shell try:\n"
                         f"  curl --unix-socket {vm_path} http://localhost/\n"
                         f"press Ctrl-C to stop and clean up")  # fmt: skip
                    with contextlib.suppress(KeyboardInterrupt):
                        signal.pause()
                    signal.signal(signal.SIGINT, signal.SIG_IGN)  # one Ctrl-C is enough
        finally:
            httpd.shutdown()
            httpd.server_close()
            with contextlib.suppress(FileNotFoundError):
                service.unlink()
        for line in (tmp / "host.log").read_text(errors="replace").splitlines():
            if " stats " in line:
                _say("  host " + line.split(": ", 1)[-1])
        leftovers = [p for p in tmp.rglob("*") if p.is_socket()]
        _say(f"summary: {'all checks passed' if ok else 'CHECKS FAILED'}; "
             f"socket files left behind: {len(leftovers)}")  # fmt: skip
        if not ok or leftovers:
            for log in ("host.log", "guest.log"):
                _say(f"--- {log} ---\n{(tmp / log).read_text(errors='replace')}")
        return 0 if ok and not leftovers else 1


def _exercise(vm_path: str, size_mib: int, burst: int) -> bool:
    greeting = _request(vm_path)
    _say(f"  GET /            -> {greeting.decode().strip()!r}")
    body = os.urandom(1 << 20) * size_mib
    started = time.monotonic()
    digest = _request(vm_path, "POST", body).decode()
    elapsed = time.monotonic() - started
    matches = digest == hashlib.sha256(body).hexdigest()
    _say(f"  POST {size_mib} MiB   -> sha256 {'matches' if matches else 'DIFFERS'} "
         f"({len(body) / elapsed / 1e6:.0f} MB/s through the forward)")  # fmt: skip
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(lambda _: _request(vm_path), range(burst)))
    elapsed = time.monotonic() - started
    served = sum(1 for a in answers if a == greeting)
    _say(f"  {burst} requests   -> {served} served ({burst / elapsed:.0f} requests/s)")
    return bool(greeting) and matches and served == burst


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo", help="forward a real host HTTP service into a pretend VM, on this machine"
    )
    parser.add_argument("--size-mib", type=int, default=64, help="upload size (MiB)")
    parser.add_argument("--burst", type=int, default=200, help="concurrent requests")
    parser.add_argument("--keep", action="store_true", help="leave it running for curl")
    parser.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    if args.size_mib < 0 or args.burst < 1:
        print("socketforward demo: --size-mib must be >= 0 and --burst >= 1", file=sys.stderr)
        return 2
    return run(args.size_mib, args.burst, args.keep)
