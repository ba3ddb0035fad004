"""The data-stream channel: handshake, registry hand-out, TTL, budgets, opener retries."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from socketforward.datastream import (
    MAX_ID_LEN,
    HandshakeError,
    RegistryStats,
    StreamEndpointUnavailable,
    StreamNotFound,
    StreamRegistry,
    open_stream,
)
from socketforward.transport import UnixEndpoint, connect, listen


@contextlib.asynccontextmanager
async def registry_at(
    path: Path,
    *,
    handshake_timeout: float = 10.0,
    ttl: float = 30.0,
    max_handshakes: int = 256,
    max_unclaimed: int = 1024,
) -> AsyncIterator[StreamRegistry]:
    listener = await listen(UnixEndpoint(str(path)))
    async with StreamRegistry(
        listener,
        handshake_timeout=handshake_timeout,
        ttl=ttl,
        max_handshakes=max_handshakes,
        max_unclaimed=max_unclaimed,
    ) as reg:
        yield reg


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[StreamRegistry]:
    async with registry_at(tmp_path / "streams.sock", handshake_timeout=1.0) as reg:
        yield reg


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


async def _read_reply(sock: socket.socket) -> bytes:
    """Read everything the registry sends until it closes; return the string in it."""
    loop = asyncio.get_running_loop()
    data = b""
    while chunk := await loop.sock_recv(sock, 4096):
        data += chunk
    if not data:
        return b""
    (size,) = struct.unpack(">I", data[:4])
    assert len(data) == 4 + size
    return data[4:]


async def _raw_handshake(reg: StreamRegistry, payload: bytes, *, half_close: bool) -> bytes:
    loop = asyncio.get_running_loop()
    sock = await connect(reg.endpoint, timeout=5)
    with sock:
        await loop.sock_sendall(sock, payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return await _read_reply(sock)


async def _echo_check(a: socket.socket, b: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(a, b"to the vm")
    assert await loop.sock_recv(b, 100) == b"to the vm"
    await loop.sock_sendall(b, b"to the host")
    assert await loop.sock_recv(a, 100) == b"to the host"


async def test_open_and_claim_once(registry: StreamRegistry) -> None:
    """An opened stream is handed out once, carries bytes, then is gone."""
    host = await open_stream(registry.endpoint, "fwd-1-abc")
    with host:
        vm = registry.get("fwd-1-abc")
        with vm:
            await _echo_check(host, vm)
        with pytest.raises(StreamNotFound):
            registry.get("fwd-1-abc")


async def test_unknown_id_is_not_found(registry: StreamRegistry) -> None:
    """Claiming an id nobody opened raises a KeyError-style not-found naming it."""
    with pytest.raises(StreamNotFound, match="never-opened") as info:
        registry.get("never-opened")
    assert isinstance(info.value, KeyError)


async def test_huge_length_is_refused_unread(registry: StreamRegistry) -> None:
    """A 2 GiB id length is refused with an error text before anything is allocated."""
    reply = await _raw_handshake(registry, struct.pack(">I", 2**31), half_close=False)
    assert b"exceeds the limit of 256" in reply
    assert len(registry) == 0


async def test_short_read_is_dropped(
    registry: StreamRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """An opener that hangs up mid-id is dropped and logged, not registered."""
    caplog.set_level(logging.WARNING, logger="socketforward.datastream")
    await _raw_handshake(registry, struct.pack(">I", 10) + b"abc", half_close=True)
    assert len(registry) == 0
    assert "closed after 3 of 10 bytes" in caplog.text


async def test_non_utf8_id_is_refused(registry: StreamRegistry) -> None:
    """Garbage bytes as an id are refused with an error text."""
    reply = await _raw_handshake(registry, _string(b"\xff\xfe\xfd\xfc"), half_close=False)
    assert b"not valid UTF-8" in reply
    assert len(registry) == 0


async def test_empty_id_is_refused(registry: StreamRegistry) -> None:
    """An empty id is refused with an error text."""
    reply = await _raw_handshake(registry, _string(b""), half_close=False)
    assert b"empty stream id" in reply


async def test_silent_opener_times_out_alone(
    registry: StreamRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that never sends its id is closed after the timeout; others get through."""
    caplog.set_level(logging.WARNING, logger="socketforward.datastream")
    loop = asyncio.get_running_loop()
    silent = await connect(registry.endpoint, timeout=5)
    with silent:
        # While the silent handshake is pending, a good one completes.
        host = await open_stream(registry.endpoint, "fast")
        with host, registry.get("fast"):
            pass
        assert await loop.sock_recv(silent, 1) == b""  # closed by the registry
    assert "handshake timed out" in caplog.text


async def test_duplicate_id_is_refused(registry: StreamRegistry) -> None:
    """Opening an id that is already registered fails with the registry's text."""
    first = await open_stream(registry.endpoint, "dup")
    with first:
        with pytest.raises(HandshakeError, match="already exists"):
            await open_stream(registry.endpoint, "dup")
        with registry.get("dup") as vm:
            await _echo_check(first, vm)


async def test_max_length_id_round_trips(registry: StreamRegistry) -> None:
    """An id of exactly 256 bytes is accepted; 257 is refused by the opener."""
    long_id = "x" * MAX_ID_LEN
    with await open_stream(registry.endpoint, long_id), registry.get(long_id):
        pass
    with pytest.raises(ValueError, match=r"1\.\.256 bytes"):
        await open_stream(registry.endpoint, long_id + "x")


async def test_wait_for_a_stream_that_arrives_late(registry: StreamRegistry) -> None:
    """A claimer can wait briefly for a stream the host has not opened yet."""
    waiter = asyncio.create_task(registry.wait_for("late", 10))
    await asyncio.sleep(0.05)
    host = await open_stream(registry.endpoint, "late")
    with host, await waiter as vm:
        await _echo_check(host, vm)


async def test_wait_for_gives_up(registry: StreamRegistry) -> None:
    """Waiting for a stream that never comes ends with not-found."""
    with pytest.raises(StreamNotFound, match="within"):
        await registry.wait_for("never", 0.1)


async def test_unclaimed_stream_is_closed_after_ttl(tmp_path: Path) -> None:
    """A stream nobody claims is closed (the host sees EOF) and forgotten."""
    loop = asyncio.get_running_loop()
    async with registry_at(tmp_path / "s.sock", ttl=0.2) as reg:
        host = await open_stream(reg.endpoint, "orphan")
        with host:
            assert await loop.sock_recv(host, 1) == b""
        with pytest.raises(StreamNotFound):
            reg.get("orphan")
        assert len(reg) == 0


async def test_close_drops_unclaimed_and_removes_socket(tmp_path: Path) -> None:
    """Closing the registry closes waiting streams and removes its socket file."""
    loop = asyncio.get_running_loop()
    path = tmp_path / "s.sock"
    async with registry_at(path) as reg:
        host = await open_stream(reg.endpoint, "pending")
        silent = await connect(reg.endpoint, timeout=5)
        await reg.close()
        await reg.close()  # idempotent
        with host, silent:
            assert await loop.sock_recv(host, 1) == b""
            # Not yet accepted when the listener closed: reset instead of EOF.
            with contextlib.suppress(ConnectionResetError):
                assert await loop.sock_recv(silent, 1) == b""
    assert not path.exists()


async def test_opener_retries_until_endpoint_appears(tmp_path: Path) -> None:
    """The host waits for a VM that is still booting instead of failing."""
    path = tmp_path / "late.sock"
    opener = asyncio.create_task(open_stream(UnixEndpoint(str(path)), "boot", retry_for=20))
    await asyncio.sleep(0.2)
    assert not opener.done()
    async with registry_at(path) as reg:
        host = await opener
        with host, reg.get("boot") as vm:
            await _echo_check(host, vm)


async def test_opener_retries_while_refused(tmp_path: Path) -> None:
    """A stale socket file (refused) is retried until a registry takes over."""
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(path))
    opener = asyncio.create_task(open_stream(UnixEndpoint(str(path)), "boot", retry_for=20))
    await asyncio.sleep(0.2)
    assert not opener.done()
    async with registry_at(path) as reg:
        with await opener, reg.get("boot"):
            pass


async def test_opener_gives_up_naming_endpoint(tmp_path: Path) -> None:
    """When the endpoint never appears the error names it."""
    ep = UnixEndpoint(str(tmp_path / "never.sock"))
    with pytest.raises(StreamEndpointUnavailable, match=r"never\.sock") as info:
        await open_stream(ep, "x", retry_for=0.2)
    assert isinstance(info.value.__cause__, FileNotFoundError)


@contextlib.asynccontextmanager
async def fake_stream_server(path: Path, reply: bytes) -> AsyncIterator[UnixEndpoint]:
    """A stream endpoint that reads one id and answers *reply* verbatim."""
    loop = asyncio.get_running_loop()
    listener = await listen(UnixEndpoint(str(path)))

    async def serve() -> None:
        conn = await listener.accept()
        with conn:
            (size,) = struct.unpack(">I", await loop.sock_recv(conn, 4))
            await loop.sock_recv(conn, size)
            await loop.sock_sendall(conn, reply)
            await loop.sock_recv(conn, 1)

    task = asyncio.create_task(serve())
    try:
        yield UnixEndpoint(str(path))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        listener.close()


async def test_wrong_ack_is_reported(tmp_path: Path) -> None:
    """An ack that is not our id fails the open and shows what came back."""
    async with fake_stream_server(tmp_path / "s.sock", _string(b"someone-else")) as ep:
        with pytest.raises(HandshakeError, match="someone-else"):
            await open_stream(ep, "mine")


async def test_huge_ack_length_is_refused(tmp_path: Path) -> None:
    """A VM claiming a 4 GiB ack is refused without allocating it."""
    async with fake_stream_server(tmp_path / "s.sock", struct.pack(">I", 2**32 - 1)) as ep:
        with pytest.raises(HandshakeError, match="exceeds the limit"):
            await open_stream(ep, "mine")


async def test_silent_stream_server_times_out(tmp_path: Path) -> None:
    """A stream endpoint that never acks gives a timeout naming the stream."""
    async with fake_stream_server(tmp_path / "s.sock", b"") as ep:
        with pytest.raises(TimeoutError, match="mine"):
            await open_stream(ep, "mine", timeout=0.2)


async def test_many_streams_at_once(registry: StreamRegistry) -> None:
    """500 streams opened concurrently are all registered and claimable."""
    ids = [f"s-{i}" for i in range(500)]
    hosts = await asyncio.gather(*(open_stream(registry.endpoint, i) for i in ids))
    try:
        assert len(registry) == 500
        for i in ids:
            registry.get(i).close()
    finally:
        for sock in hosts:
            sock.close()


async def test_id_trickling_in_byte_by_byte_registers_and_raw_bytes_stay(
    registry: StreamRegistry,
) -> None:
    """A slow opener's id arriving one byte at a time (each in its own segment)
    is assembled; the raw bytes sent right after the ack wait for the claimer,
    none swallowed by the handshake."""
    loop = asyncio.get_running_loop()
    sock = await connect(registry.endpoint, timeout=5)
    with sock:
        for byte in _string(b"slow-id"):
            await loop.sock_sendall(sock, bytes([byte]))
            await asyncio.sleep(0.005)
        assert await loop.sock_recv(sock, 64) == _string(b"slow-id")
        await loop.sock_sendall(sock, b"payload right after the ack")
        with registry.get("slow-id") as vm:
            vm.setblocking(False)
            assert await loop.sock_recv(vm, 64) == b"payload right after the ack"


async def test_ack_trickling_in_is_assembled_by_the_opener(tmp_path: Path) -> None:
    """The opener reads an ack that arrives in pieces (length, then the id in two
    parts), and the raw bytes that follow it are left for the relay."""
    loop = asyncio.get_running_loop()
    listener = await listen(UnixEndpoint(str(tmp_path / "s.sock")))

    async def serve() -> None:
        conn = await listener.accept()
        with conn:
            (size,) = struct.unpack(">I", await loop.sock_recv(conn, 4))
            stream_id = await loop.sock_recv(conn, size)
            ack = _string(stream_id)
            for piece in (ack[:4], ack[4:6], ack[6:]):
                await asyncio.sleep(0.01)
                await loop.sock_sendall(conn, piece)
            await loop.sock_sendall(conn, b"raw")
            await loop.sock_recv(conn, 1)

    task = asyncio.create_task(serve())
    try:
        sock = await open_stream(listener.endpoint, "pieces")
        with sock:
            assert await loop.sock_recv(sock, 16) == b"raw"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        listener.close()


async def test_close_drops_a_handshake_half_way(tmp_path: Path) -> None:
    """A connection in the middle of its handshake when the registry closes is
    closed too (the opener sees EOF), with nothing left watching its fd."""
    loop = asyncio.get_running_loop()
    async with registry_at(tmp_path / "s.sock") as reg:
        half = await connect(reg.endpoint, timeout=5)
        with half:
            await loop.sock_sendall(half, b"\x00\x00")  # half of the id's length
            await asyncio.sleep(0.1)  # accepted, the two bytes read, waiting for more
            await reg.close()
            assert await asyncio.wait_for(loop.sock_recv(half, 1), 5) == b""


# -- budgets: concurrent handshakes, unclaimed streams ---------------------------


def _open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _until(predicate: Callable[[], bool], patience: float = 5.0) -> None:
    async with asyncio.timeout(patience):
        for _ in itertools.count():
            if predicate():
                return
            await asyncio.sleep(0.005)


def _idle(stats: RegistryStats) -> bool:
    return stats.handshakes == 0 and stats.unclaimed == 0 and not stats.paused


async def _silent_clients(reg: StreamRegistry, count: int) -> list[socket.socket]:
    """*count* connections that never send a byte (queued in the backlog if need be)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(await connect(reg.endpoint, timeout=5))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


async def test_silent_clients_hold_at_most_the_handshake_cap(tmp_path: Path) -> None:
    """A client opening many silent connections on the stream port makes the
    VM hold at most max_handshakes of them (the rest wait in the kernel's
    backlog, costing the guest no fd); the registry pauses accepting and,
    once the silent ones time out, a genuine stream from the host gets through
    within about a handshake timeout per batch."""
    cap, timeout = 8, 0.3
    async with registry_at(
        tmp_path / "s.sock", handshake_timeout=timeout, max_handshakes=cap
    ) as reg:
        baseline = _open_fd_count()
        silent = await _silent_clients(reg, 3 * cap)
        try:
            await _until(lambda: reg.stats().paused)
            await asyncio.sleep(0.05)  # give it the chance to accept more (it must not)
            stats = reg.stats()
            assert stats.handshakes == cap
            # Our own client sockets plus the registry's accepted ones.
            assert _open_fd_count() - baseline - len(silent) == cap
            started = time.monotonic()
            host = await open_stream(reg.endpoint, "genuine", timeout=10)
            with host, reg.get("genuine") as vm:
                await _echo_check(host, vm)
            # 3 batches of silent handshakes time out before the host's turn.
            assert time.monotonic() - started < 3 * timeout + 2.0
            await _until(lambda: reg.stats().handshakes == 0)
            assert reg.stats().refused["timeout"] == 3 * cap
            assert _open_fd_count() - baseline - len(silent) == 0
        finally:
            for sock in silent:
                sock.close()
        await _until(lambda: _idle(reg.stats()))


async def test_accepting_resumes_as_soon_as_a_slot_frees(tmp_path: Path) -> None:
    """With the handshake slots taken by silent peers, one of them going away
    lets the next waiting connection in at once: a genuine stream does not wait
    for the (here long) handshake timeout."""
    cap = 4
    async with registry_at(tmp_path / "s.sock", handshake_timeout=30, max_handshakes=cap) as reg:
        silent = await _silent_clients(reg, cap)
        try:
            await _until(lambda: reg.stats().paused)
            opener = asyncio.create_task(open_stream(reg.endpoint, "next", timeout=10))
            await asyncio.sleep(0.1)
            assert not opener.done()  # waiting in the backlog
            silent.pop().close()
            async with asyncio.timeout(5):
                host = await opener
            with host, reg.get("next"):
                pass
            assert reg.stats().handshakes == cap - 1
            assert not reg.stats().paused
        finally:
            for sock in silent:
                sock.close()
        await reg.close()
        assert reg.stats().handshakes == 0


async def test_prompt_handshakes_are_not_held_back_by_a_small_cap(tmp_path: Path) -> None:
    """A burst of 300 genuine streams all register even with room for only 4
    handshakes at a time: a prompt handshake finishes in the callback that
    accepts it and never holds its slot."""
    async with registry_at(tmp_path / "s.sock", max_handshakes=4) as reg:
        ids = [f"b-{i}" for i in range(300)]
        hosts = await asyncio.gather(*(open_stream(reg.endpoint, i) for i in ids))
        try:
            assert len(reg) == 300
            for i in ids:
                reg.get(i).close()
        finally:
            for sock in hosts:
                sock.close()
        assert _idle(reg.stats())


async def test_unclaimed_cap_refuses_the_next_stream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When max_unclaimed streams already wait to be claimed, the host's next
    open fails with a HandshakeError saying "too many unclaimed streams" (and
    the guest logs it); once one is claimed, opening works again."""
    caplog.set_level(logging.WARNING, logger="socketforward.datastream")
    async with registry_at(tmp_path / "s.sock", max_unclaimed=3) as reg:
        hosts = [await open_stream(reg.endpoint, f"u-{i}") for i in range(3)]
        try:
            with pytest.raises(HandshakeError, match="too many unclaimed streams") as info:
                await open_stream(reg.endpoint, "one-too-many")
            assert "one-too-many" in str(info.value)
            assert "too_many_unclaimed" in caplog.text
            stats = reg.stats()
            assert stats.unclaimed == 3
            assert stats.refused == {"too_many_unclaimed": 1}
            with pytest.raises(StreamNotFound):
                reg.get("one-too-many")
            reg.get("u-0").close()
            host = await open_stream(reg.endpoint, "now-fits")
            with host, reg.get("now-fits") as vm:
                await _echo_check(host, vm)
        finally:
            for sock in hosts:
                sock.close()
        await reg.close()
        assert _idle(reg.stats())


async def test_racing_clients_never_pass_the_unclaimed_cap(tmp_path: Path) -> None:
    """Raw clients racing for the last unclaimed places never get more
    streams registered than the cap: exactly max_unclaimed acks, the rest
    refused with the error text (acks still being written count as taken)."""
    async with registry_at(tmp_path / "s.sock", max_unclaimed=5) as reg:
        replies = await asyncio.gather(
            *(_raw_handshake_kept(reg, f"r-{i}".encode()) for i in range(20))
        )
        acks = [r for r in replies if r.startswith(b"r-")]
        refusals = [r for r in replies if r.startswith(b"too many unclaimed streams")]
        assert len(acks) == 5
        assert len(refusals) == 15
        assert len(reg) == 5
        assert reg.stats().refused == {"too_many_unclaimed": 15}


async def _raw_handshake_kept(reg: StreamRegistry, stream_id: bytes) -> bytes:
    """Send an id and read the one string that comes back (the connection is
    closed right after, so a registered stream stays registered)."""
    loop = asyncio.get_running_loop()
    sock = await connect(reg.endpoint, timeout=5)
    with sock:
        await loop.sock_sendall(sock, _string(stream_id))
        header = b""
        while len(header) < 4:
            chunk = await loop.sock_recv(sock, 4 - len(header))
            assert chunk
            header += chunk
        (size,) = struct.unpack(">I", header)
        body = b""
        while len(body) < size:
            chunk = await loop.sock_recv(sock, size - len(body))
            assert chunk
            body += chunk
        return body


async def test_error_text_for_a_long_duplicate_id_stays_readable(registry: StreamRegistry) -> None:
    """Re-opening a 256-byte id gets a "already exists" refusal the opener can
    read (cut to the 256-byte bound), not an "ack length exceeds the limit"."""
    long_id = "d" * MAX_ID_LEN
    with await open_stream(registry.endpoint, long_id):
        with pytest.raises(HandshakeError, match="rejected by") as info:
            await open_stream(registry.endpoint, long_id)
        assert "exceeds the limit" not in str(info.value)
        registry.get(long_id).close()


async def _hostile(reg: StreamRegistry, kind: int, rng: random.Random) -> None:
    """One hostile or broken client; never raises (the registry may reset it)."""
    loop = asyncio.get_running_loop()
    try:
        sock = await connect(reg.endpoint, timeout=5)
    except OSError:
        return
    with sock, contextlib.suppress(OSError):
        if kind == 0:  # silent until the registry gives up on it
            await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
        elif kind == 1:  # garbage
            await loop.sock_sendall(sock, rng.randbytes(rng.randrange(1, 64)))
        elif kind == 2:  # a huge claimed length
            await loop.sock_sendall(sock, struct.pack(">I", rng.randrange(257, 2**32)))
        elif kind == 3:  # half an id, then hang up
            await loop.sock_sendall(sock, struct.pack(">I", 50) + b"half")
        elif kind == 4:  # reset at once
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif kind == 5:  # a valid id, never claimed, ack not read
            await loop.sock_sendall(sock, _string(f"h-{rng.randrange(40)}".encode()))
            await asyncio.sleep(rng.random() * 0.1)
        elif kind == 6:  # a valid id, then read the answer
            await loop.sock_sendall(sock, _string(f"h-{rng.randrange(40)}".encode()))
            await asyncio.wait_for(loop.sock_recv(sock, 300), 5)
        else:  # invalid UTF-8
            await loop.sock_sendall(sock, _string(b"\xff" * rng.randrange(1, 9)))


async def test_hostile_storm_leaves_no_count_or_fd_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A storm of silent, garbage, oversized, cut-off, reset, duplicate and
    unclaimed handshakes never takes the registry past its caps, and once the
    registry is closed every figure is back to zero and no fd is left open
    (the fd check runs after every test); the log holds only the first lines
    of each kind and a summary of the rest."""
    caplog.set_level(logging.WARNING, logger="socketforward.datastream")
    cap, unclaimed_cap = 16, 10
    rng = random.Random(1234)
    async with registry_at(
        tmp_path / "s.sock",
        handshake_timeout=0.2,
        ttl=0.3,
        max_handshakes=cap,
        max_unclaimed=unclaimed_cap,
    ) as reg:
        peaks = {"handshakes": 0, "unclaimed": 0}
        stop = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                stats = reg.stats()
                peaks["handshakes"] = max(peaks["handshakes"], stats.handshakes)
                peaks["unclaimed"] = max(peaks["unclaimed"], stats.unclaimed)
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.gather(*(_hostile(reg, rng.randrange(8), rng) for _ in range(400)))
        finally:
            stop.set()
            await watcher
        assert 0 < peaks["handshakes"] <= cap
        assert 0 < peaks["unclaimed"] <= unclaimed_cap
        refused = reg.stats().refused
        assert {"invalid", "timeout", "duplicate", "too_many_unclaimed"} <= set(refused)
        # The storm's leftovers time out or expire; then a genuine stream gets through.
        await _until(lambda: _idle(reg.stats()))
        with await open_stream(reg.endpoint, "after-the-storm"), reg.get("after-the-storm"):
            pass
        # Leave some handshakes and unclaimed streams for close() to clean up.
        left = await _silent_clients(reg, 5)
        extra = await open_stream(reg.endpoint, "left-unclaimed")
        with extra, contextlib.ExitStack() as stack:
            for sock in left:
                stack.enter_context(sock)
            await _until(lambda: reg.stats().handshakes == 5)
            await reg.close()
            assert _idle(reg.stats())
            assert len(reg) == 0
    kinds = 8  # accept_failed paused invalid error duplicate too_many_unclaimed timeout expired
    assert len(caplog.messages) <= kinds * 20 + 1
    assert "log lines left out" in caplog.text


async def test_budgets_must_be_positive(tmp_path: Path) -> None:
    """A zero cap is a configuration mistake, reported at construction."""
    async with await listen(UnixEndpoint(str(tmp_path / "s.sock"))) as listener:
        with pytest.raises(ValueError, match="max_handshakes"):
            StreamRegistry(listener, max_handshakes=0)
        with pytest.raises(ValueError, match="max_unclaimed"):
            StreamRegistry(listener, max_unclaimed=0)
