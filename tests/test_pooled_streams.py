"""Data streams opened ahead of demand (docs/protocol.md 5.6): the guest's
registry keeps pooled streams until the host names them, the host's pool keeps
a few ready, and a forwarded connection takes one instead of waiting."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from socketforward import Expose, Forward, Guest, Host
from socketforward.datastream import (
    POOLED_PREFIX,
    HandshakeError,
    StreamNotFound,
    StreamRegistry,
    open_stream,
)
from socketforward.host.pool import StreamPool
from socketforward.transport import UnixEndpoint, listen
from tests.host.test_expose import Faults
from tests.processes import echo_round_trip, echo_server, embedded_endpoints

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def registry_at(
    path: Path, *, ttl: float = 30.0, max_pooled: int = 64, max_unclaimed: int = 1024
) -> AsyncIterator[StreamRegistry]:
    listener = await listen(UnixEndpoint(str(path)))
    async with StreamRegistry(
        listener, ttl=ttl, max_pooled=max_pooled, max_unclaimed=max_unclaimed
    ) as reg:
        yield reg


async def _until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"not {what} within {timeout}s")


async def _eof(sock: socket.socket) -> bool:
    """Whether the peer closed *sock* (EOF or reset) within a few seconds."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(5):
            return await loop.sock_recv(sock, 1) == b""
    except ConnectionResetError:
        return True


# -- the guest's registry -------------------------------------------------------------


async def test_a_pooled_stream_waits_past_the_ttl_until_an_answer_names_it(
    tmp_path: Path,
) -> None:
    """A pooled stream outlives the unclaimed-stream TTL and is handed out
    once, under its pooled id, with bytes flowing both ways."""
    async with registry_at(tmp_path / "s.sock", ttl=0.2) as reg:
        host_side = await open_stream(reg.endpoint, POOLED_PREFIX + "1")
        with host_side:
            await asyncio.sleep(0.5)
            stats = reg.stats()
            assert (stats.pooled, stats.unclaimed, stats.expired) == (1, 0, 0)
            host_side.sendall(b"first bytes")
            with reg.get(POOLED_PREFIX + "1") as guest_side:
                guest_side.setblocking(True)
                assert guest_side.recv(100) == b"first bytes"
                guest_side.sendall(b"back")
                host_side.setblocking(True)
                assert host_side.recv(100) == b"back"
            assert reg.stats().pooled == 0
            with pytest.raises(StreamNotFound):
                reg.get(POOLED_PREFIX + "1")


async def test_dropping_the_pool_closes_what_nobody_claimed(tmp_path: Path) -> None:
    """The host's pool is gone (its StreamEnds call ended): every pooled stream
    still waiting is closed, so a host relay on one whose answer was lost
    ends instead of hanging; ordinary streams stay."""
    async with registry_at(tmp_path / "s.sock") as reg:
        pooled = [await open_stream(reg.endpoint, f"{POOLED_PREFIX}{i}") for i in range(3)]
        ordinary = await open_stream(reg.endpoint, "conn-1")
        await _until(lambda: reg.stats().pooled == 3, "pooled")
        assert reg.drop_pooled() == 3
        for sock in pooled:
            with sock:
                assert await _eof(sock)
        assert reg.stats().pooled == 0
        with reg.get("conn-1"), ordinary:
            pass


async def test_pooled_streams_are_capped_and_zero_takes_none(tmp_path: Path) -> None:
    """Past max_pooled the handshake is answered with an error text; a guest
    with max_pooled 0 takes no pooled stream at all."""
    async with registry_at(tmp_path / "a.sock", max_pooled=2) as reg:
        kept = [await open_stream(reg.endpoint, f"{POOLED_PREFIX}{i}") for i in range(2)]
        with pytest.raises(HandshakeError, match=r"too many pooled streams \(limit 2\)"):
            await open_stream(reg.endpoint, POOLED_PREFIX + "2")
        assert reg.stats().refused == {"too_many_pooled": 1}
        for sock in kept:
            sock.close()
    async with registry_at(tmp_path / "b.sock", max_pooled=0) as reg:
        with pytest.raises(HandshakeError, match=r"too many pooled streams \(limit 0\)"):
            await open_stream(reg.endpoint, POOLED_PREFIX + "0")


async def test_at_the_cap_pooled_streams_their_host_closed_make_room(tmp_path: Path) -> None:
    """A full pool of pooled streams whose host went away without a word does
    not lock pooling out: the closed ones are dropped when a new one comes;
    one with bytes still to read (its answer on the way) is kept."""
    async with registry_at(tmp_path / "s.sock", max_pooled=2) as reg:
        gone = await open_stream(reg.endpoint, POOLED_PREFIX + "gone")
        answered = await open_stream(reg.endpoint, POOLED_PREFIX + "answered")
        answered.sendall(b"banner")
        gone.close()
        answered.close()
        await asyncio.sleep(0.05)
        with await open_stream(reg.endpoint, POOLED_PREFIX + "new"):
            assert reg.stats().pooled == 2
            with reg.get(POOLED_PREFIX + "answered") as sock:
                sock.setblocking(True)
                assert sock.recv(100) == b"banner"
            with pytest.raises(StreamNotFound):
                reg.get(POOLED_PREFIX + "gone")


async def test_closing_the_registry_closes_its_pooled_streams(tmp_path: Path) -> None:
    """Guest shutdown: every pooled stream is closed (the host sees EOF)."""
    async with registry_at(tmp_path / "s.sock") as reg:
        sock = await open_stream(reg.endpoint, POOLED_PREFIX + "1")
        await _until(lambda: reg.stats().pooled == 1, "pooled")
    with sock:
        assert await _eof(sock)


# -- the host's pool -------------------------------------------------------------------


async def test_the_pool_fills_to_the_guests_limit_and_refills_after_a_take(
    tmp_path: Path,
) -> None:
    """min(size, the guest's limit) streams stand ready; the one taken is the
    guest's under its pooled id, bytes flowing both ways, and the pool opens
    a replacement."""
    async with registry_at(tmp_path / "s.sock", max_pooled=3) as reg:
        pool = StreamPool(reg.endpoint, size=4)
        pool.start(3)
        try:
            await _until(lambda: pool.stats().ready == 3 and reg.stats().pooled == 3, "full")
            taken = pool.take()
            assert taken is not None
            pool_id, host_side = taken
            assert pool_id.startswith(POOLED_PREFIX)
            asyncio.get_running_loop().remove_reader(host_side.fileno())  # the pool's watch
            with host_side, reg.get(pool_id) as guest_side:
                host_side.sendall(b"to the vm")
                guest_side.setblocking(True)
                assert guest_side.recv(100) == b"to the vm"
                guest_side.sendall(b"to the host")
                host_side.setblocking(True)
                assert host_side.recv(100) == b"to the host"
            await _until(lambda: pool.stats().ready == 3, "refilled")
            assert (pool.stats().taken, pool.stats().failed) == (1, 0)
        finally:
            pool.stop()
        assert (pool.stats().ready, pool.stats().opening) == (0, 0)
        assert reg.drop_pooled() == 3  # what the guest does when the host's call ends


async def test_a_stream_the_guest_picked_is_claimed_by_its_id_with_its_bytes(
    tmp_path: Path,
) -> None:
    """A guest that picks (its hello says so): the host never takes a stream
    itself; the one the guest named is claimed by its id, even when the guest
    wrote to it before the request came, and those bytes are all there."""
    async with registry_at(tmp_path / "s.sock") as reg:
        pool = StreamPool(reg.endpoint, size=2)
        pool.start(64, guest_picks=True)
        try:
            await _until(lambda: pool.stats().ready == 2 and reg.stats().pooled == 2, "full")
            assert pool.take() is None
            picked = reg.take_pooled(f"{POOLED_PREFIX}{pool.tag}-")
            assert picked is not None
            pool_id, guest_side = picked
            assert reg.take_pooled(f"{POOLED_PREFIX}another-") is None
            with guest_side:
                guest_side.sendall(b"early bytes")
                await asyncio.sleep(0.1)  # the pool sees them before any request
                assert pool.claim(f"{POOLED_PREFIX}{pool.tag}-999") is None
                host_side = pool.claim(pool_id)
                assert host_side is not None
                asyncio.get_running_loop().remove_reader(host_side.fileno())
                with host_side:
                    host_side.setblocking(True)
                    assert host_side.recv(100) == b"early bytes"
                assert pool.claim(pool_id) is None  # once only
            await _until(lambda: pool.stats().ready == 2, "refilled")
            assert (pool.stats().taken, pool.stats().lost) == (1, 0)
        finally:
            pool.stop()


@contextlib.asynccontextmanager
async def _guest_picked(
    tmp_path: Path, *, stream_timeout: float
) -> AsyncIterator[tuple[StreamPool, str, socket.socket]]:
    """A pool of one for a guest that picks, and the stream the guest picked
    (not yet named in any request): the pool, its id, the guest's end."""
    async with registry_at(tmp_path / "s.sock") as reg:
        pool = StreamPool(reg.endpoint, size=1, stream_timeout=stream_timeout)
        pool.start(64, guest_picks=True)
        try:
            await _until(lambda: pool.stats().ready == 1, "full")
            picked = reg.take_pooled(POOLED_PREFIX)
            assert picked is not None
            with picked[1]:
                yield pool, *picked
        finally:
            pool.stop()


async def test_a_claimed_stream_is_the_callers_even_before_its_relay_starts(
    tmp_path: Path,
) -> None:
    """Between a claim and the relay taking over (a dial that must wait), the
    guest's bytes arrive on the stream: the pool leaves it alone (no hold, no
    close at its timeout or when it stops), and the bytes are all there."""
    async with _guest_picked(tmp_path, stream_timeout=0.2) as (pool, pool_id, guest_side):
        host_side = pool.claim(pool_id)
        assert host_side is not None
        with host_side:
            guest_side.sendall(b"early")
            await asyncio.sleep(0.5)  # past the pool's stream timeout
            await _until(lambda: pool.stats().ready == 1, "refilled")
            pool.stop()
            assert host_side.fileno() >= 0, "the pool closed a stream it gave away"
            asyncio.get_running_loop().remove_reader(host_side.fileno())
            host_side.setblocking(True)
            assert host_side.recv(100) == b"early"
        assert pool.stats().lost == 0


async def test_a_picked_stream_no_request_names_is_closed_after_the_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes on a pooled stream and no request for it: the host holds it no
    longer than its stream timeout, then closes it (one line), counts it lost
    and opens another."""
    async with _guest_picked(tmp_path, stream_timeout=0.3) as (pool, pool_id, guest_side):
        guest_side.sendall(b"x")
        assert await _eof(guest_side)
        assert pool.claim(pool_id) is None
        await _until(lambda: pool.stats().ready == 1, "refilled")
        assert pool.stats().lost == 1
    assert "written to but never named by a request" in caplog.text


async def test_a_pool_claims_nothing_for_a_guest_that_does_not_pick(tmp_path: Path) -> None:
    """A guest whose hello does not say it picks: a request naming a pooled
    stream finds none (the host may have taken it for another connection)."""
    async with registry_at(tmp_path / "s.sock") as reg:
        pool = StreamPool(reg.endpoint, size=1)
        pool.start(64)
        try:
            await _until(lambda: pool.stats().ready == 1, "full")
            picked = reg.take_pooled(POOLED_PREFIX)
            assert picked is not None
            picked[1].close()
            assert pool.claim(picked[0]) is None
        finally:
            pool.stop()


async def test_a_pool_the_guest_takes_none_of_opens_nothing(tmp_path: Path) -> None:
    """A hello without a limit (nerdbox, or --max-pooled-streams 0): nothing is
    opened, take finds nothing and the caller opens its own stream."""
    async with registry_at(tmp_path / "s.sock") as reg:
        pool = StreamPool(reg.endpoint, size=4)
        pool.start(0)
        await asyncio.sleep(0.1)
        assert pool.take() is None
        assert (reg.stats().pooled, reg.stats().handshakes, pool.stats().size) == (0, 0, 0)


async def test_a_pool_whose_guest_is_gone_backs_off(tmp_path: Path) -> None:
    """The guest goes away: its ready streams are lost, re-opening fails with a
    growing pause instead of a spin, and stop leaves nothing open."""
    path = tmp_path / "s.sock"
    async with registry_at(path) as reg:
        pool = StreamPool(reg.endpoint, size=4)
        pool.start(64)
        await _until(lambda: pool.stats().ready == 4, "full")
    try:
        await _until(lambda: pool.stats().lost == 4, "lost")
        await asyncio.sleep(0.6)
        failed = pool.stats().failed
        # 50 ms, doubling: at most 5 tries in 0.6 s (a spin would be thousands).
        assert 1 <= failed <= 6, failed
        assert pool.take() is None
    finally:
        pool.stop()
    assert pool.stats().opening == 0


async def test_a_pool_refuses_a_listener_of_another_user(tmp_path: Path) -> None:
    """The peer check fails (another user listens at the endpoint): no stream
    is kept, the failure is counted."""
    async with registry_at(tmp_path / "s.sock") as reg:
        pool = StreamPool(reg.endpoint, size=2, check_peer=lambda sock: "peer_uid=4242")
        pool.start(64)
        try:
            await _until(lambda: pool.stats().failed >= 1, "failed")
            assert pool.stats().ready == 0 and pool.take() is None
        finally:
            pool.stop()


# -- both sides -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _forwarding(
    tmp: Path, *, echo: bool = True, stream_pool: int = 4, guest_pool: int = 64
) -> AsyncIterator[tuple[Host, Guest, Path]]:
    """A Host and a Guest of ours, connected, with forward "e" to an echo
    service (or to no service at all) and the host's pool full; the VM path."""
    rpc, streams = embedded_endpoints(tmp)
    target, vm_path = tmp / "echo.sock", tmp / "vm" / "echo.sock"
    async with contextlib.AsyncExitStack() as stack:
        if echo:
            await stack.enter_async_context(await echo_server(target))
        host = await stack.enter_async_context(
            Host(
                rpc_listen=rpc,
                streams=streams,
                forwards=[Forward("e", str(target), str(vm_path))],
                stream_pool=stream_pool,
            )
        )
        guest = await stack.enter_async_context(
            Guest(rpc_dial=rpc, streams=streams, max_pooled_streams=guest_pool)
        )
        async with asyncio.timeout(30):
            await host.wait_connected()
        if guest_pool:
            full = min(stream_pool, guest_pool)
            await _until(lambda: host.forwarder.pool_stats().ready == full, "pool full", 10)
        yield host, guest, vm_path


async def _forward_many(short_tmp: Path, *, guest_pool: int) -> tuple[int, int]:
    """20 echo connections through a forward; the host pool's (size, taken)."""
    async with _forwarding(short_tmp, guest_pool=guest_pool) as (host, _, vm_path):
        for i in range(20):
            payload = b"connection %d " % i * 100
            assert await echo_round_trip(vm_path, payload) == payload
        stats = host.forwarder.pool_stats()
        assert host.stats()["e"].connected == 20
        return stats.size, stats.taken


async def test_forwarded_connections_take_pooled_streams(short_tmp: Path) -> None:
    """With a guest of ours, new connections run on pooled streams (every byte
    exact); with a guest that takes none, on streams opened for each."""
    size, taken = await _forward_many(short_tmp / "a", guest_pool=64)
    assert size == 4 and taken >= 15, (size, taken)  # a refill may lag a take
    assert await _forward_many(short_tmp / "b", guest_pool=0) == (0, 0)


async def test_a_host_that_goes_leaves_no_pooled_stream_in_the_guest(short_tmp: Path) -> None:
    """The guest holds the host's pooled streams while the host is connected
    and closes them when it goes (its StreamEnds call ends)."""
    rpc, streams = embedded_endpoints(short_tmp)
    async with Guest(rpc_dial=rpc, streams=streams) as guest:
        assert guest.registry is not None
        registry = guest.registry
        async with Host(rpc_listen=rpc, streams=streams) as host:
            async with asyncio.timeout(30):
                await host.wait_connected()
            await _until(lambda: registry.stats().pooled == 4, "pooled", timeout=10)
        await _until(lambda: registry.stats().pooled == 0, "dropped", timeout=10)


async def test_exposes_open_their_own_streams_when_the_guest_picks(short_tmp: Path) -> None:
    """The other direction leaves the pool to the guest's picks (a stream the
    host named in a Dial could be one the guest just picked): exposes are
    served on streams opened for them, every byte exact."""
    rpc, streams = embedded_endpoints(short_tmp)
    vm_service, exposed = short_tmp / "vm-echo.sock", short_tmp / "host" / "echo.sock"
    async with (
        await echo_server(vm_service),
        Host(
            rpc_listen=rpc, streams=streams, exposes=[Expose("e", str(vm_service), str(exposed))]
        ) as host,
        Guest(rpc_dial=rpc, streams=streams),
    ):
        async with asyncio.timeout(30):
            await host.wait_connected()
        await _until(lambda: host.forwarder.pool_stats().ready == 4, "pool full", timeout=10)
        for i in range(10):
            payload = b"exposed %d " % i * 100
            assert await echo_round_trip(exposed, payload) == payload
        assert host.forwarder.pool_stats().taken == 0
        assert host.expose_stats()["e"].connected == 10


async def test_a_refused_connection_on_a_picked_stream_is_closed_and_counted(
    short_tmp: Path,
) -> None:
    """The guest relays a new connection at once on a stream it picked; the
    host then cannot dial its target: the container's connection is closed,
    nothing it sent is counted as relayed, the failure is counted once on each
    side, the shares are given back and the pool refills."""
    async with _forwarding(short_tmp, echo=False) as (host, guest, vm_path):
        reader, writer = await asyncio.open_unix_connection(str(vm_path))
        with contextlib.closing(writer):
            writer.write(b"request bytes")
            with contextlib.suppress(ConnectionResetError):  # a reset: bytes nobody read
                assert await asyncio.wait_for(reader.read(), 10) == b""
        await _until(lambda: host.forwarder.pool_stats().ready == 4, "refilled", timeout=10)
        assert host.forwarder.pool_stats().taken == 1
        service = guest.service
        assert service is not None
        await _until(lambda: service.budget().connections == 0, "share back")
        vm_stats, host_stats = guest.stats()["e"], host.stats()["e"]
        assert (vm_stats.connected, vm_stats.active, vm_stats.bytes_to_host) == (0, 0, 0)
        assert vm_stats.failed == {"host_error": 1}
        assert (host_stats.connected, host_stats.failed) == (0, {"dial": 1})


async def test_emfile_while_refilling_the_pool_costs_no_connection(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No descriptor for the pool's refill (docs/protocol.md 5.6): the pool
    counts it and backs off; connections are served on streams opened for
    them meanwhile."""
    faults = Faults(monkeypatch, lambda n: n == 2)  # 1: the dial; 2: the refill
    async with _forwarding(short_tmp, stream_pool=1) as (host, _, vm_path):
        faults.armed = True
        assert await echo_round_trip(vm_path, b"first") == b"first"
        await _until(lambda: host.forwarder.pool_stats().failed >= 1, "refill failed")
        for i in range(3):
            assert await echo_round_trip(vm_path, b"next %d" % i) == b"next %d" % i
        stats = host.stats()["e"]
        assert (stats.connected, stats.failed) == (4, {})
