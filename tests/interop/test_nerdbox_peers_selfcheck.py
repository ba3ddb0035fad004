"""The Go stand-ins for nerdbox's two sides work as a pair (Go vs Go).

nerdbox-host (the shim's behaviour) listens on the RPC socket, nerdbox-vm
(vminitd's behaviour) dials it and listens for data streams; a client connects
to the forwarded socket in the "VM" and reaches a real UNIX echo service on the
"host". This proves the stand-ins before they are pointed at our own guest and
host.

Not covered, on purpose:
* an unknown forward_id: the VM side only ever sends the forward_ids the host
  bound, so it cannot be provoked from outside the pair;
* the guest connecting several times in a row: not supported by the reference.
  nerdbox's libkrun instance accepts exactly one connection on the RPC socket
  and closes the listener right after (which removes the socket file), and
  vminitd's dialBackListener dials exactly once. A second dial-back finds no
  socket; a guest that lost its connection never comes back.

Relays in both stand-ins tear down both directions on the first EOF (io.Copy,
as nerdbox does), so clients here read the whole echo before closing; the
first-EOF teardown itself is checked below, from either end. So are the Go
runtime settings nerdbox runs its two sides with (the shim's GC at 40% and
GOMAXPROCS 4, vminitd's GOMAXPROCS 2), which the benchmark's GO path relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

import ttrpc_asyncio as ttrpc
from socketforward.api import socketforward_pb2, socketforward_ttrpc
from tests.interop.nerdbox_peers import Forward, NerdboxProcess, nerdbox_host, nerdbox_vm

FORWARD_ID = "fwd-echo"
IO_TIMEOUT = 60.0


class Pair(NamedTuple):
    host: NerdboxProcess
    vm: NerdboxProcess
    rpc_sock: Path
    streams_sock: Path
    target: Path
    vm_path: Path


@contextlib.contextmanager
def running_pair(
    host_bin: Path, vm_bin: Path, tmp_path: Path, announce: bool = False
) -> Iterator[Pair]:
    """nerdbox-host listening, nerdbox-vm dialing it; one forward to tmp/target.sock."""
    rpc_sock = tmp_path / "rpc.sock"
    streams_sock = tmp_path / "streams.sock"
    target = tmp_path / "target.sock"
    vm_path = tmp_path / "vm" / "fwd.sock"
    forwards = [Forward(FORWARD_ID, target, vm_path)]
    with (
        nerdbox_host(
            host_bin, rpc_sock, streams_sock, forwards, tmp_path / "host.log", announce=announce
        ) as host,
        nerdbox_vm(vm_bin, rpc_sock, streams_sock, tmp_path / "vm.log") as vm,
    ):
        host.wait_ready()
        yield Pair(host, vm, rpc_sock, streams_sock, target, vm_path)


@pytest.fixture
def pair(nerdbox_host_bin: Path, nerdbox_vm_bin: Path, tmp_path: Path) -> Iterator[Pair]:
    with running_pair(nerdbox_host_bin, nerdbox_vm_bin, tmp_path) as p:
        yield p
        assert p.host.proc.poll() is None, f"nerdbox-host died:\n{p.host.log()}"
        assert p.vm.proc.poll() is None, f"nerdbox-vm died:\n{p.vm.log()}"


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def echo_target(path: Path) -> AsyncIterator[None]:
    """The host-side target service: a UNIX echo server."""
    server = await asyncio.start_unix_server(_echo, path=str(path), backlog=1024)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


async def echo_through(vm_path: Path, payload: bytes) -> bytes:
    """Send payload through the forwarded socket while reading the echo back;
    close only after the whole echo arrived (first-EOF teardown)."""
    reader, writer = await asyncio.open_unix_connection(str(vm_path))
    try:

        async def send() -> None:
            writer.write(payload)
            await writer.drain()

        got, _ = await asyncio.gather(reader.readexactly(len(payload)), send())
        return got
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_bind_and_4mib_echo(pair: Pair) -> None:
    # Bind ran before READY: the listener exists at the VM path.
    assert pair.vm_path.is_socket()
    # The host accepted its one dial-back and closed the listener (file gone).
    assert not pair.rpc_sock.exists()
    payload = os.urandom(4 << 20)
    async with echo_target(pair.target), asyncio.timeout(IO_TIMEOUT):
        assert await echo_through(pair.vm_path, payload) == payload


async def test_200_concurrent_connections_all_served(pair: Pair) -> None:
    """200 relays open at once, all byte-exact. The connects are paced (at most
    32 being set up at a time): the reference VM side drops a connection when
    its 64-slot ConnectRequest queue is full, which an unpaced burst of 200
    connects can hit (see the burst test below)."""
    n = 200
    setup = asyncio.Semaphore(32)
    all_open = asyncio.Event()
    opened = 0

    async def one(i: int) -> bytes:
        nonlocal opened
        payload = os.urandom(64 << 10) + i.to_bytes(4, "big")
        async with setup:
            # At most 32 connections being set up; each is relayed end to end
            # once its first echo arrived.
            reader, writer = await asyncio.open_unix_connection(str(pair.vm_path))
            try:
                writer.write(b"hello")
                assert await reader.readexactly(5) == b"hello"
            except BaseException:
                writer.close()
                raise
        try:
            opened += 1
            if opened == n:
                all_open.set()
            await all_open.wait()

            async def send() -> None:
                writer.write(payload)
                await writer.drain()

            got, _ = await asyncio.gather(reader.readexactly(len(payload)), send())
            assert got == payload
            return got
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async with echo_target(pair.target), asyncio.timeout(IO_TIMEOUT):
        results = await asyncio.gather(*(one(i) for i in range(n)))
    assert len(results) == n
    assert "dropping connection" not in pair.vm.log()


async def test_unpaced_burst_drops_past_the_queue_and_closes_them(pair: Pair) -> None:
    """The reference's drop behaviour, reproduced: a burst of connects may
    overflow the VM side's 64-slot queue; each overflowing connection is logged
    ("notify channel full, dropping connection") and closed at once, never left
    hanging; every other one is served; the Accept stream survives."""
    n = 500

    async def one(i: int) -> bool:
        payload = i.to_bytes(4, "big") * 16
        try:
            return await echo_through(pair.vm_path, payload) == payload
        except (asyncio.IncompleteReadError, ConnectionError):
            return False

    async with echo_target(pair.target), asyncio.timeout(IO_TIMEOUT):
        served = await asyncio.gather(*(one(i) for i in range(n)))
        dropped = pair.vm.log().count("notify channel full, dropping connection")
        assert served.count(False) == dropped
        # Still forwarding afterwards.
        assert await echo_through(pair.vm_path, b"after") == b"after"


async def test_announce_sends_forward_ids_and_vm_ignores_them(
    nerdbox_host_bin: Path, nerdbox_vm_bin: Path, tmp_path: Path
) -> None:
    with running_pair(nerdbox_host_bin, nerdbox_vm_bin, tmp_path, announce=True) as p:
        async with echo_target(p.target), asyncio.timeout(IO_TIMEOUT):
            assert await echo_through(p.vm_path, b"ping") == b"ping"
        assert f"socketforward-forward-ids:[{FORWARD_ID}]" in p.vm.log()


def test_shutdown_exit_codes_and_files(
    nerdbox_host_bin: Path, nerdbox_vm_bin: Path, tmp_path: Path
) -> None:
    with running_pair(nerdbox_host_bin, nerdbox_vm_bin, tmp_path) as p:
        # SIGTERM: nerdbox-vm exits 0 and removes the sockets it created.
        assert p.vm.stop() == 0, p.vm.log()
        assert not p.vm_path.exists()
        assert not p.streams_sock.exists()
        # The host's Accept stream ends with an error: it exits non-zero, saying so.
        p.host.proc.wait(timeout=10)
        assert p.host.proc.returncode == 1, p.host.log()
        assert "Accept stream error" in p.host.log()
    with running_pair(nerdbox_host_bin, nerdbox_vm_bin, tmp_path) as p:
        assert p.host.stop() == 0, p.host.log()
        assert not p.rpc_sock.exists()


async def test_vm_answers_unimplemented_to_unbind(nerdbox_vm_bin: Path, tmp_path: Path) -> None:
    """Driven by our ttrpc client over the connection nerdbox-vm dials."""
    rpc_sock = tmp_path / "rpc.sock"
    vm_path = tmp_path / "vm" / "fwd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(rpc_sock))
    listener.listen(1)
    listener.setblocking(False)
    try:
        with nerdbox_vm(nerdbox_vm_bin, rpc_sock, tmp_path / "streams.sock", tmp_path / "vm.log"):
            async with asyncio.timeout(IO_TIMEOUT):
                conn, _ = await asyncio.get_running_loop().sock_accept(listener)
                async with await ttrpc.Client.connect(conn) as client:
                    stub = socketforward_ttrpc.SocketForwardStub(client)
                    socket_entry = socketforward_pb2.Socket(
                        forward_id=FORWARD_ID, socket_path=str(vm_path)
                    )
                    await stub.Bind(socketforward_pb2.BindRequest(sockets=[socket_entry]))
                    assert vm_path.is_socket()
                    with pytest.raises(ttrpc.TtrpcError) as excinfo:
                        await stub.Unbind(socketforward_pb2.UnbindRequest(forward_ids=[FORWARD_ID]))
                    assert excinfo.value.code == ttrpc.Code.UNIMPLEMENTED
                    assert vm_path.is_socket()
    finally:
        listener.close()


def test_runtime_settings_as_nerdbox(pair: Pair) -> None:
    """The shim's runtime (containerd's shim.setRuntime, GOMAXPROCS=4 from the
    shim manager) and vminitd's (GOMAXPROCS 2), said in the logs at start."""
    assert "runtime as nerdbox's shim: GOMAXPROCS=4 GC=40%" in pair.host.log()
    assert "runtime as nerdbox's vminitd: GOMAXPROCS=2" in pair.vm.log()


class _Holder:
    """A target service that answers nothing and never closes a connection by
    itself: it reads until EOF (``saw_eof``) or, with ``say``, first sends
    ``say`` and closes only its sending side."""

    def __init__(self, say: bytes = b"") -> None:
        self.say = say
        self.saw_eof = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        if self.say:
            writer.write(self.say)
            await writer.drain()
            writer.write_eof()
        with contextlib.suppress(ConnectionError):
            while await reader.read(1 << 16):
                pass
        self.saw_eof.set()


@contextlib.asynccontextmanager
async def holding_target(path: Path, holder: _Holder) -> AsyncIterator[None]:
    server = await asyncio.start_unix_server(holder.serve, path=str(path))
    try:
        yield
    finally:
        for w in holder.writers:
            w.close()
        server.close()
        await server.wait_closed()


async def test_client_half_close_ends_both_directions(pair: Pair) -> None:
    """The client closes its sending side and waits to read: nerdbox's relay
    (socketforward.go relay, both sides) closes both connections at the first
    EOF, so the client reads EOF although the target never closed, and the
    target reads EOF too. A relay that passed the half-close on would leave
    the client waiting."""
    holder = _Holder()
    async with holding_target(pair.target, holder), asyncio.timeout(IO_TIMEOUT):
        reader, writer = await asyncio.open_unix_connection(str(pair.vm_path))
        try:
            writer.write(b"x")
            writer.write_eof()
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""
            await holder.saw_eof.wait()
        finally:
            writer.close()


async def test_target_half_close_ends_both_directions(pair: Pair) -> None:
    """The target sends its answer and closes its sending side: the client
    gets the answer, then EOF, and the target reads EOF although the client
    never closed (the relay tore the connection down)."""
    holder = _Holder(say=b"bye")
    async with holding_target(pair.target, holder), asyncio.timeout(IO_TIMEOUT):
        reader, writer = await asyncio.open_unix_connection(str(pair.vm_path))
        try:
            assert await reader.readexactly(3) == b"bye"
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""
            await holder.saw_eof.wait()
        finally:
            writer.close()
