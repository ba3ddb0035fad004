"""Half-close through a data-stream channel that loses it (docs/protocol.md 5.5).

Between our guest and host, the data streams pass through a proxy that
behaves like a broken vsock device: ``drop`` never passes a half-close on
(vhost-device-vsock with a guest's SHUTDOWN(SEND)), ``close`` turns it into a
full close (older Cloud Hypervisor with a host-side EOF). A full close passes
either way, as it does through those devices. The ends then travel on the RPC
connection, so a client that half-closes still gets its whole answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import select
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Literal

import pytest

from tests.processes import Running, socketforward, wait_for_socket

MIB = 1 << 20
ANSWER_TIMEOUT = 30.0

Loss = Literal["drop", "close"]


def _fully_closed(sock: socket.socket) -> bool:
    """Our side of a UNIX stream whose peer closed (POLLHUP), not only shut its
    write side (POLLRDHUP alone)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


class LossyProxy:
    """A UNIX-socket proxy that mishandles half-closes as *loss* says."""

    def __init__(self, listen: Path, upstream: Path, loss: Loss) -> None:
        self.listen, self.upstream, self.loss = listen, upstream, loss
        self.half_closes = 0
        """Half-closes that came through and were lost."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> LossyProxy:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.listen))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            r2, w2 = await asyncio.open_unix_connection(str(self.upstream))
        except OSError:
            w1.close()
            return
        try:
            await asyncio.gather(self._pump(r1, w1, w2), self._pump(r2, w2, w1))
        except asyncio.CancelledError:
            pass  # the proxy is closing: a server callback has nobody to raise to
        finally:
            for w in (w1, w2):
                w.close()
            self._tasks.discard(task)

    async def _pump(
        self, src: asyncio.StreamReader, src_w: asyncio.StreamWriter, dst: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()
            sock = src_w.get_extra_info("socket")
            if _fully_closed(sock):
                dst.close()  # a full close passes
            elif self.loss == "close":
                self.half_closes += 1
                dst.close()
                src_w.close()
            else:
                self.half_closes += 1  # dropped: dst never hears of it


async def _hash_service(path: Path) -> asyncio.Server:
    """Reads to EOF, then answers 1 MiB: the sha256 of what it read, repeated."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        while chunk := await reader.read(1 << 20):
            digest.update(chunk)
        writer.write(digest.digest() * (MIB // 32))
        await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(handle, path=str(path))


async def _send_then_answer(path: Path, payload: bytes) -> bytes:
    """Send *payload*, shut down the write side, read the answer to EOF."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), ANSWER_TIMEOUT)
    finally:
        writer.close()


@pytest.fixture(params=["drop", "close"])
async def lossy_pair(
    request: pytest.FixtureRequest, short_tmp: Path
) -> AsyncIterator[tuple[Path, LossyProxy]]:
    """Our host and guest, data streams through a lossy proxy, two forwards:
    ``hash`` to a hash service, ``speak`` to short_tmp/speak.sock (the test's
    to serve); yields (the VM's directory of forwarded sockets, proxy)."""
    loss: Loss = request.param
    (short_tmp / "host").mkdir(mode=0o700)
    rpc, guest_streams = short_tmp / "host" / "rpc.sock", short_tmp / "g-streams.sock"
    proxied = short_tmp / "host" / "streams.sock"
    target, vm_path = short_tmp / "hash.sock", short_tmp / "vm" / "hash.sock"
    async with await _hash_service(target), LossyProxy(proxied, guest_streams, loss) as proxy:
        host_args = ["host", "--rpc-listen", f"unix:{rpc}", "--streams", f"unix:{proxied}"]
        host_args += ["--forward", f"hash={target}:{vm_path}", "-v"]
        host_args += [
            "--forward",
            f"speak={short_tmp / 'speak.sock'}:{vm_path.parent / 'speak.sock'}",
        ]
        guest_args = ["guest", "--rpc-dial", f"unix:{rpc}", "--streams", f"unix:{guest_streams}"]
        with _running(host_args, short_tmp / "host.log") as host:
            await asyncio.to_thread(wait_for_socket, rpc, 30, host)
            with _running([*guest_args, "-v"], short_tmp / "guest.log") as guest:
                await asyncio.to_thread(wait_for_socket, vm_path, 30, host, guest)
                yield vm_path.parent, proxy
                assert "stream ends call open" in host.log(), host.log()


@contextlib.contextmanager
def _running(args: list[str], log: Path) -> Iterator[Running]:
    with socketforward(args, log) as proc:
        yield proc
        assert proc.stop() == 0, proc.log()


async def test_the_proxy_loses_a_half_close(short_tmp: Path) -> None:
    """Calibration: a client that half-closes straight through the proxy gets no
    answer (drop) or an empty one (close): the proxy breaks what it should."""
    target, proxied = short_tmp / "hash.sock", short_tmp / "proxy.sock"
    for loss in ("drop", "close"):
        async with await _hash_service(target), LossyProxy(proxied, target, loss) as proxy:
            reader, writer = await asyncio.open_unix_connection(str(proxied))
            writer.write(b"x" * MIB)
            writer.write_eof()
            try:
                answer = await asyncio.wait_for(reader.read(), 2.0)
            except TimeoutError:
                answer = None
            writer.close()
            assert proxy.half_closes == 1
            assert answer in (None, b""), f"{loss}: the answer came through"
        target.unlink()
        proxied.unlink()


async def test_half_close_from_the_vm_survives_a_lossy_channel(
    lossy_pair: tuple[Path, LossyProxy],
) -> None:
    """A VM client sends 1 MiB, shuts down its write side and gets the 1 MiB
    answer in full, sha256-exact, though the data stream lost the half-close."""
    vm_dir, proxy = lossy_pair
    payload = os.urandom(MIB)
    answer = await _send_then_answer(vm_dir / "hash.sock", payload)
    assert answer == hashlib.sha256(payload).digest() * (MIB // 32)
    assert proxy.half_closes == 0, "a half-close travelled on the data stream"


async def test_half_close_from_the_host_survives_a_lossy_channel(
    lossy_pair: tuple[Path, LossyProxy], short_tmp: Path
) -> None:
    """A host service that sends 1 MiB and shuts down its write side: the VM
    client sees exactly 1 MiB then EOF, and can still send its own 1 MiB."""
    vm_dir, proxy = lossy_pair
    banner, reply = os.urandom(MIB), os.urandom(MIB)
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(banner)
        await writer.drain()
        writer.write_eof()
        got.set_result(await reader.read())
        writer.close()

    async with await asyncio.start_unix_server(handle, path=str(short_tmp / "speak.sock")):
        reader, writer = await asyncio.open_unix_connection(str(vm_dir / "speak.sock"))
        try:
            assert await asyncio.wait_for(reader.read(), ANSWER_TIMEOUT) == banner
            writer.write(reply)
            await writer.drain()
            writer.write_eof()
            assert await asyncio.wait_for(got, ANSWER_TIMEOUT) == reply
        finally:
            writer.close()
    assert proxy.half_closes == 0, "a half-close travelled on the data stream"
