"""End to end: our guest agent and host forwarder as separate processes over
``unix:`` endpoints (as libkrun exposes vsock ports), real target services."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import http.server
import os
import signal
import socket
import socketserver
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import Running, echo_round_trip, echo_server, socketforward, wait_for_socket

GIB = 1 << 30


@dataclass
class Vm:
    rpc: Path
    streams: Path
    run_dir: Path
    tmp: Path

    def guest_args(self, *, listen: bool = False) -> list[str]:
        rpc = ["--rpc-listen" if listen else "--rpc-dial", f"unix:{self.rpc}"]
        return ["guest", *rpc, "--streams", f"unix:{self.streams}"]

    def host_args(self, *forwards: str, dial: bool = False) -> list[str]:
        rpc = ["--rpc-dial" if dial else "--rpc-listen", f"unix:{self.rpc}"]
        pairs = [arg for forward in forwards for arg in ("--forward", forward)]
        return ["host", *rpc, "--streams", f"unix:{self.streams}", *pairs]


@pytest.fixture
def vm(tmp_path: Path) -> Vm:
    (tmp_path / "host").mkdir(mode=0o700)
    return Vm(tmp_path / "host" / "rpc.sock", tmp_path / "streams.sock", tmp_path / "vm", tmp_path)


@pytest.fixture
async def echo(tmp_path: Path) -> AsyncIterator[Path]:
    path = tmp_path / "echo.sock"
    async with await echo_server(path):
        yield path


@contextlib.contextmanager
def forwarding(vm: Vm, *forwards: str) -> Iterator[tuple[Running, Running]]:
    """Host listening, guest dialing it: the default (nerdbox) direction."""
    with socketforward(vm.host_args(*forwards), vm.tmp / "host.log") as host:
        wait_for_socket(vm.rpc, 30, host)
        with socketforward(vm.guest_args(), vm.tmp / "guest.log") as guest:
            yield host, guest
            assert guest.stop() == 0, guest.log()
        assert host.stop() == 0, host.log()


async def _upload_hash(path: Path, size: int) -> tuple[str, str]:
    """Send ``size`` bytes, half-close, read the service's sha256 answer."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    digest = hashlib.sha256()
    block = os.urandom(1 << 20)
    for _ in range(size // len(block)):
        digest.update(block)
        writer.write(block)
        await writer.drain()
    writer.write_eof()
    answer = (await reader.read()).decode()
    writer.close()
    await writer.wait_closed()
    return answer, digest.hexdigest()


async def _hash_service(path: Path) -> asyncio.Server:
    """Reads to EOF, answers the sha256; or, sent b"GET n", answers n known bytes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(1 << 16)
        if first.startswith(b"GET "):
            count = int(first[4:])
            block = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB
            for _ in range(count // len(block)):
                writer.write(block)
                await writer.drain()
        else:
            digest = hashlib.sha256(first)
            while chunk := await reader.read(1 << 20):
                digest.update(chunk)
            writer.write(digest.hexdigest().encode())
        writer.close()
        await writer.wait_closed()

    return await asyncio.start_unix_server(handle, path=str(path))


async def test_one_gib_each_way_is_exact(vm: Vm, tmp_path: Path) -> None:
    """1 GiB up (answered after half-close) and 1 GiB down, sha256-exact."""
    target = tmp_path / "hash.sock"
    vm_path = vm.run_dir / "hash.sock"
    async with await _hash_service(target):
        with forwarding(vm, f"hash={target}:{vm_path}") as (host, guest):
            await asyncio.to_thread(wait_for_socket, vm_path, 30, host, guest)
            answer, expected = await _upload_hash(vm_path, GIB)
            assert answer == expected
            reader, writer = await asyncio.open_unix_connection(str(vm_path))
            writer.write(b"GET %d" % GIB)
            await writer.drain()
            digest, count = hashlib.sha256(), 0
            while chunk := await reader.read(1 << 20):
                digest.update(chunk)
                count += len(chunk)
            writer.close()
            await writer.wait_closed()
            block = hashlib.sha256(b"seed").digest() * (1 << 15)
            assert count == GIB
            assert digest.hexdigest() == hashlib.sha256(block * 1024).hexdigest()


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = f"hello {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _http_get(path: Path, url: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("localhost", timeout=30)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(path))
    conn.sock = sock
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_http_requests_through_the_forward(vm: Vm, tmp_path: Path) -> None:
    """A stdlib HTTP server on the host answers requests made inside the VM,
    several on one kept-alive connection and many in parallel."""
    target = tmp_path / "http.sock"
    vm_path = vm.run_dir / "http.sock"
    httpd = _UnixHTTPServer(str(target), _Hello)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with forwarding(vm, f"web={target}:{vm_path}") as (host, guest):
            wait_for_socket(vm_path, 30, host, guest)
            assert _http_get(vm_path, "/a") == (200, b"hello /a")
            results = []
            threads = [
                threading.Thread(target=lambda i=i: results.append(_http_get(vm_path, f"/{i}")))
                for i in range(50)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert sorted(results) == sorted((200, f"hello /{i}".encode()) for i in range(50))
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_missing_host_socket_closes_connection_and_logs_why(vm: Vm, tmp_path: Path) -> None:
    """A forward whose host socket does not exist: the container's connection is
    closed promptly; the host log names the path, the guest never learns it."""
    missing = tmp_path / "nobody-home.sock"
    vm_path = vm.run_dir / "gone.sock"
    with forwarding(vm, f"gone={missing}:{vm_path}") as (host, guest):
        await asyncio.to_thread(wait_for_socket, vm_path, 30, host, guest)
        reader, writer = await asyncio.open_unix_connection(str(vm_path))
        writer.write(b"anyone?")
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), timeout=15) == b""
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        await asyncio.sleep(0.2)
        assert str(missing) in host.log()
        assert str(missing) not in guest.log()


async def test_guest_logs_statistics_on_sigusr1(vm: Vm, echo: Path) -> None:
    """`kill -USR1` makes the guest log each forward's counts (as the host does),
    and it logs them once more when it stops."""
    vm_path = vm.run_dir / "echo.sock"
    with forwarding(vm, f"e={echo}:{vm_path}") as (host, guest):
        await asyncio.to_thread(wait_for_socket, vm_path, 30, host, guest)
        for payload in (b"one", b"two"):
            assert await echo_round_trip(vm_path, payload) == payload
        line = "stats forward_id=e requests=2 connected=2 active=0 failed=none to_host=6 to_vm=6"
        for _ in range(100):  # the relays' last bytes are counted as they end
            guest.proc.send_signal(signal.SIGUSR1)
            await asyncio.sleep(0.05)
            if line in guest.log():
                break
        assert line in guest.log(), guest.log()
        assert "stats pending=0" in guest.log()
        await asyncio.sleep(0.2)  # any signal still on its way is logged by now
        before = guest.log().count(line)
    assert guest.log().count(line) == before + 1  # the exit's


async def test_sighup_without_anything_to_reload_is_logged_not_fatal(vm: Vm, echo: Path) -> None:
    """`kill -HUP` (what service managers send to reload) neither kills the guest
    nor a host without --forwards-file: both log it, keep forwarding, and stop
    cleanly afterwards, leaving no socket file behind."""
    vm_path = vm.run_dir / "echo.sock"
    with forwarding(vm, f"e={echo}:{vm_path}") as (host, guest):
        await asyncio.to_thread(wait_for_socket, vm_path, 30, host, guest)
        for proc in (host, guest):
            proc.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if all("SIGHUP ignored" in p.log() for p in (host, guest)):
                break
            await asyncio.sleep(0.05)
        assert "SIGHUP ignored: nothing to reload" in guest.log(), guest.log()
        assert "SIGHUP ignored: nothing to reload" in host.log(), host.log()
        assert host.proc.poll() is None and guest.proc.poll() is None
        assert await echo_round_trip(vm_path, b"still here") == b"still here"
    assert not vm_path.exists()
    assert not vm.rpc.exists()


async def test_guest_restart_forwarding_resumes(vm: Vm, echo: Path) -> None:
    """The guest agent is killed and started again: the host accepts its new
    dial-back, re-Binds, and forwarding works without restarting the host."""
    vm_path = vm.run_dir / "echo.sock"
    with socketforward(vm.host_args(f"e={echo}:{vm_path}"), vm.tmp / "host.log") as host:
        await asyncio.to_thread(wait_for_socket, vm.rpc, 30, host)
        with socketforward(vm.guest_args(), vm.tmp / "guest1.log") as guest:
            await asyncio.to_thread(wait_for_socket, vm_path, 30, host, guest)
            assert await echo_round_trip(vm_path, b"first") == b"first"
            guest.proc.send_signal(signal.SIGKILL)
            guest.proc.wait()
        with socketforward(vm.guest_args(), vm.tmp / "guest2.log") as guest:
            for _ in range(300):  # the stale file from the killed guest is replaced by Bind
                with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                    if await echo_round_trip(vm_path, b"again") == b"again":
                        break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"no forwarding after restart:\n{host.log()}\n{guest.log()}")
            assert guest.stop() == 0, guest.log()
        assert host.stop() == 0, host.log()


async def test_host_restart_guest_dials_again(vm: Vm, echo: Path) -> None:
    """The host restarts: the guest dials again (bounded backoff) and the same
    forward works again."""
    vm_path = vm.run_dir / "echo.sock"
    args = vm.host_args(f"e={echo}:{vm_path}")
    with socketforward(args, vm.tmp / "host1.log") as host:
        await asyncio.to_thread(wait_for_socket, vm.rpc, 30, host)
        with socketforward(vm.guest_args(), vm.tmp / "guest.log") as guest:
            await asyncio.to_thread(wait_for_socket, vm_path, 30, host, guest)
            assert await echo_round_trip(vm_path, b"before") == b"before"
            assert host.stop() == 0, host.log()
            with socketforward(args, vm.tmp / "host2.log") as host2:
                for _ in range(300):
                    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                        if await echo_round_trip(vm_path, b"after") == b"after":
                            break
                    await asyncio.sleep(0.1)
                else:
                    pytest.fail(f"no forwarding after host restart:\n{guest.log()}")
                assert guest.stop() == 0, guest.log()
                assert host2.stop() == 0, host2.log()
    assert not vm_path.exists()


async def test_two_containers_share_one_vm(vm: Vm, tmp_path: Path) -> None:
    """Two hosts (one per container) dial one guest, each announcing only its own
    forward; 500 connections each are all served by the right target."""
    services = []
    vm_paths = {}
    for tag in ("a", "b"):
        target = tmp_path / f"{tag}.sock"
        services.append(await _tag_server(target, tag.encode()))
        vm_paths[tag] = vm.run_dir / f"{tag}.sock"
    try:
        with socketforward(vm.guest_args(listen=True), vm.tmp / "guest.log") as guest:
            await asyncio.to_thread(wait_for_socket, vm.rpc, 30, guest)
            with (
                socketforward(vm.host_args(f"ctr-a={tmp_path / 'a.sock'}:{vm_paths['a']}",
                                           dial=True), vm.tmp / "host-a.log") as host_a,
                socketforward(vm.host_args(f"ctr-b={tmp_path / 'b.sock'}:{vm_paths['b']}",
                                           dial=True), vm.tmp / "host-b.log") as host_b,
            ):  # fmt: skip
                for path in vm_paths.values():
                    await asyncio.to_thread(wait_for_socket, path, 30, guest, host_a, host_b)

                async def one(tag: str, i: int) -> bool:
                    data = b"%d" % i
                    reader, writer = await asyncio.open_unix_connection(str(vm_paths[tag]))
                    writer.write(data)
                    writer.write_eof()
                    answer = await reader.read()
                    writer.close()
                    await writer.wait_closed()
                    return answer == tag.encode() + data

                results = await asyncio.wait_for(
                    asyncio.gather(*(one(t, i) for t in "ab" for i in range(500))), 120
                )
                assert all(results), f"{results.count(False)} connections failed"
                assert host_a.stop() == 0 and host_b.stop() == 0
            assert guest.stop() == 0, guest.log()
    finally:
        for server in services:
            server.close()
            await server.wait_closed()


async def _tag_server(path: Path, tag: bytes) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(tag + data)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    return await asyncio.start_unix_server(handle, path=str(path), backlog=2048)
