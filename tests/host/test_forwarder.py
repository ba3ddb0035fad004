"""The host's Forwarder against a guest played by a real ttrpc server over real
UNIX sockets: Bind, Accept, ConnectRequests, data streams, relays, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from socketforward import streams, transport, ttrpc
from socketforward.host import Forward, Forwarder
from socketforward.ids import FORWARD_IDS_METADATA
from tests.host.fake_guest import (
    FakeGuest,
    HugeAckEndpoint,
    exchange,
    guest_dialing,
    recv_all,
    reverse_after_eof,
    unix_service,
)

pytestmark = pytest.mark.timeout(60)

PAYLOAD = os.urandom(1 << 20) + b"tail"


@dataclass
class HostEnv:
    rpc: transport.UnixEndpoint
    registry: streams.StreamRegistry
    forwarder: Forwarder
    listener: transport.Listener


@contextlib.asynccontextmanager
async def running_host(
    tmp: Path, forwards: list[Forward], **options: Any
) -> AsyncIterator[HostEnv]:
    """A Forwarder accepting the guest's dial on a 0600 UNIX socket, with a real
    StreamRegistry as the guest's stream endpoint."""
    rpc = transport.UnixEndpoint(str(tmp / "host" / "rpc.sock"))
    streams_ep = transport.UnixEndpoint(str(tmp / "vm" / "streams.sock"))
    registry = streams.StreamRegistry(await transport.listen(streams_ep))
    registry.start()
    listener = await transport.listen(rpc, mode=0o600)
    forwarder = Forwarder(forwards, options.pop("streams", streams_ep), **options)
    task = asyncio.get_running_loop().create_task(forwarder.run_listening(listener))
    try:
        yield HostEnv(rpc, registry, forwarder, listener)
    finally:
        task.cancel()
        await asyncio.wait({task})
        await forwarder.close()
        listener.close()
        await registry.close()


def fwd(tmp: Path, name: str) -> Forward:
    return Forward(f"fwd-{name}", str(tmp / "host" / f"{name}.sock"), f"/run/socketfwd/{name}.sock")


async def wait_until(predicate: Any) -> None:
    """Poll a figure that has no event of its own (stats), with a bound."""
    async with asyncio.timeout(30):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_bind_on_connect_and_accept_announces_forward_ids(short_tmp: Path) -> None:
    """When the guest dials in, the host Binds every configured forward (VM paths
    only, never host paths) and opens Accept announcing its forward_ids."""
    forwards = [fwd(short_tmp, "a"), fwd(short_tmp, "b")]
    async with running_host(short_tmp, forwards) as env:
        guest = FakeGuest()
        async with guest_dialing(guest, env.rpc):
            call = await guest.next_accept()
            assert guest.binds == [
                [("fwd-a", "/run/socketfwd/a.sock"), ("fwd-b", "/run/socketfwd/b.sock")]
            ]
            assert call.announced == ["fwd-a,fwd-b"]
            async with asyncio.timeout(30):
                await env.forwarder.wait_ready()
            assert env.forwarder.connected
    assert oct(os.stat(short_tmp / "host").st_mode & 0o777) == "0o700"


async def test_relays_bytes_both_ways_with_half_close(short_tmp: Path) -> None:
    """A connection is forwarded byte-exact both ways; the host service sees EOF
    when the VM side half-closes and can still answer; the data stream is there
    when the success result arrives; stats count it."""
    forward = fwd(short_tmp, "a")
    async with (
        unix_service(Path(forward.host_path), reverse_after_eof) as target,
        running_host(short_tmp, [forward]) as env,
    ):
        guest = FakeGuest(registry=env.registry)
        async with guest_dialing(guest, env.rpc):
            call = await guest.next_accept()
            result = await call.connect("s-1", "fwd-a")
            assert result.error == ""
            vm_side = guest.claimed.pop("s-1")
            assert vm_side is not None, "data stream must be open before the success result"
            with vm_side:
                assert await exchange(vm_side, PAYLOAD) == PAYLOAD[::-1]
            assert target.accepted == 1
            await wait_until(lambda: env.forwarder.stats()["fwd-a"].active_relays == 0)
            stats = env.forwarder.stats()["fwd-a"]
            assert (stats.requests, stats.connections, stats.failures) == (1, 1, {})
            assert stats.bytes_to_host == stats.bytes_to_vm == len(PAYLOAD)


async def test_unknown_forward_id_is_rejected_and_nothing_dialed(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A forward_id the host never configured (even one spelled like a host path)
    gets `unknown forward ID: <id>`, is logged, and no host socket is dialed."""
    caplog.set_level(logging.INFO, logger="socketforward.host")
    forward = fwd(short_tmp, "a")
    async with (
        unix_service(Path(forward.host_path), reverse_after_eof) as target,
        running_host(short_tmp, [forward]) as env,
    ):
        guest = FakeGuest(registry=env.registry)
        async with guest_dialing(guest, env.rpc):
            call = await guest.next_accept()
            forged = [("s-1", "forged"), ("s-2", forward.host_path), ("s-3", "")]
            for stream_id, forward_id in forged:
                result = await call.connect(stream_id, forward_id)
                assert result.error == f"unknown forward ID: {forward_id}"
            assert target.accepted == 0
            assert len(env.registry) == 0
            assert env.forwarder.unknown_requests == 3
            assert "unknown forward ID rejected stream_id=s-1 forward_id=forged" in caplog.text


async def test_unusable_stream_ids_are_refused_and_nothing_dialed(short_tmp: Path) -> None:
    """A ConnectRequest whose stream_id could not be sent on the data-stream
    channel (empty, or over 256 bytes) gets `invalid stream ID`, is counted,
    and no host socket is dialed; a good one right after works."""
    forward = fwd(short_tmp, "a")
    async with (
        unix_service(Path(forward.host_path), reverse_after_eof) as target,
        running_host(short_tmp, [forward]) as env,
    ):
        guest = FakeGuest(registry=env.registry)
        async with guest_dialing(guest, env.rpc):
            call = await guest.next_accept()
            for stream_id in ("", "x" * 257):
                assert (await call.connect(stream_id, "fwd-a")).error == "invalid stream ID"
            assert target.accepted == 0
            assert env.forwarder.stats()["fwd-a"].failures == {"bad_stream_id": 2}
            assert (await call.connect("x" * 256, "fwd-a")).error == ""
            assert target.accepted == 1
            guest.close_claimed()


async def test_missing_host_socket_error_names_no_host_path(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When the host socket is missing the VM gets an error without the host path
    (which only the host log shows), and no data stream is opened."""
    caplog.set_level(logging.INFO, logger="socketforward.host")
    forward = fwd(short_tmp, "missing")
    async with running_host(short_tmp, [forward]) as env:
        guest = FakeGuest(registry=env.registry)
        async with guest_dialing(guest, env.rpc):
            call = await guest.next_accept()
            result = await call.connect("s-1", "fwd-missing")
            assert result.error == "failed to dial host socket"
            assert str(short_tmp) not in result.error
            assert len(env.registry) == 0
            assert f"host_path={forward.host_path}" in caplog.text
            assert env.forwarder.stats()["fwd-missing"].failures == {"dial": 1}


def _black_hole(path: Path) -> tuple[socket.socket, list[socket.socket]]:
    """A UNIX listener that never accepts, its backlog already full: a dial to it
    hangs until the dialer gives up."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    fillers: list[socket.socket] = []
    for _ in range(64):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        fillers.append(s)
        try:
            s.connect(str(path))
        except BlockingIOError:
            return listener, fillers
    raise AssertionError("backlog never filled")


async def test_concurrent_requests_are_not_held_up_by_a_black_hole_target(
    short_tmp: Path,
) -> None:
    """One host service that never answers its dial does not delay other
    connections: twenty requests made after it all succeed while it still hangs."""
    slow, fast = fwd(short_tmp, "slow"), fwd(short_tmp, "fast")
    (short_tmp / "host").mkdir(mode=0o700)
    hole, fillers = _black_hole(Path(slow.host_path))
    try:
        async with (
            unix_service(Path(fast.host_path), reverse_after_eof) as target,
            running_host(short_tmp, [slow, fast], dial_timeout=120) as env,
        ):
            guest = FakeGuest(registry=env.registry)
            async with guest_dialing(guest, env.rpc):
                call = await guest.next_accept()
                stuck = await call.request("s-slow", "fwd-slow")
                futures = [await call.request(f"s-{i}", "fwd-fast") for i in range(20)]
                async with asyncio.timeout(30):
                    results = await asyncio.gather(*futures)
                assert [r.error for r in results] == [""] * 20
                assert not stuck.done()
                assert target.accepted == 20
                guest.close_claimed()
    finally:
        hole.close()
        for s in fillers:
            s.close()


async def test_huge_ack_length_fails_one_connection_without_allocating_it(
    short_tmp: Path,
) -> None:
    """A guest stream endpoint answering a 4 GiB ack length fails that one
    connection (its host socket is closed) without the host allocating it; the
    next connection works."""
    forward = fwd(short_tmp, "a")
    evil = HugeAckEndpoint(
        await transport.listen(transport.UnixEndpoint(str(short_tmp / "vm" / "evil.sock")))
    )
    serving = asyncio.get_running_loop().create_task(evil.serve())
    try:
        async with (
            unix_service(Path(forward.host_path), reverse_after_eof) as target,
            running_host(short_tmp, [forward], streams=evil.listener.endpoint) as env,
        ):
            guest = FakeGuest()
            async with guest_dialing(guest, env.rpc):
                call = await guest.next_accept()
                tracemalloc.start()
                try:
                    result = await call.connect("evil-1", "fwd-a")
                    _, peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
                assert result.error == "failed to open data stream"
                assert peak < 64 << 20
                assert env.forwarder.stats()["fwd-a"].failures == {"stream": 1}
                good = await call.connect("good-1", "fwd-a")
                assert good.error == ""
                assert await exchange(evil.streams["good-1"], b"ping") == b"gnip"
                assert target.accepted == 2
    finally:
        serving.cancel()
        await asyncio.wait({serving})
        await evil.close()


@contextlib.asynccontextmanager
async def misbehaving_streams(tmp: Path) -> AsyncIterator[HugeAckEndpoint]:
    evil = HugeAckEndpoint(
        await transport.listen(transport.UnixEndpoint(str(tmp / "vm" / "evil.sock")))
    )
    serving = asyncio.get_running_loop().create_task(evil.serve())
    try:
        yield evil
    finally:
        serving.cancel()
        await asyncio.wait({serving})
        await evil.close()


async def test_silent_stream_endpoint_fails_that_connection_after_the_timeout(
    short_tmp: Path,
) -> None:
    """A data stream that is never acked fails its connection after the stream
    timeout (error to the VM, host socket closed, counted), and does not hold up
    the connections opened meanwhile, one of them with an ack in pieces."""
    forward = fwd(short_tmp, "a")
    async with (
        misbehaving_streams(short_tmp) as evil,
        unix_service(Path(forward.host_path), reverse_after_eof) as target,
        running_host(
            short_tmp, [forward], streams=evil.listener.endpoint, stream_timeout=0.5
        ) as env,
    ):
        guest = FakeGuest()
        async with guest_dialing(guest, env.rpc):
            call = await guest.next_accept()
            silent = await call.request("silent-1", "fwd-a")
            good = await call.connect("good-1", "fwd-a")
            assert good.error == "" and not silent.done()
            assert await exchange(evil.streams["good-1"], b"ping") == b"gnip"
            # An ack arriving in pieces is assembled, not mistaken for a bad one.
            slow = await call.connect("slow-1", "fwd-a")
            assert slow.error == "" and not silent.done()
            assert await exchange(evil.streams["slow-1"], b"snail") == b"lians"
            async with asyncio.timeout(10):
                result = await silent
            assert result.error == "failed to open data stream"
            assert env.forwarder.stats()["fwd-a"].failures == {"stream": 1}
            assert target.accepted == 3
            await wait_until(lambda: evil.silent_closed == 1)  # the host hung up on it


async def test_rpc_loss_while_an_ack_is_awaited_closes_both_sockets(short_tmp: Path) -> None:
    """When the RPC connection drops while a data stream's ack is awaited, both
    of that connection's sockets are closed (the host service sees EOF) and the
    loss is counted; nothing is left open."""
    forward = fwd(short_tmp, "a")
    saw_eof = asyncio.Event()

    async def wait_for_eof(sock: socket.socket) -> None:
        await recv_all(sock)
        saw_eof.set()

    async with (
        misbehaving_streams(short_tmp) as evil,
        unix_service(Path(forward.host_path), wait_for_eof),
        running_host(short_tmp, [forward], streams=evil.listener.endpoint) as env,
    ):
        guest = FakeGuest()
        async with guest_dialing(guest, env.rpc) as serving:
            call = await guest.next_accept()
            await call.request("silent-1", "fwd-a")
            await wait_until(lambda: evil.silent == 1)
            serving.cancel()
        async with asyncio.timeout(10):
            await saw_eof.wait()
        await wait_until(lambda: env.forwarder.stats()["fwd-a"].failures == {"rpc_lost": 1})


async def test_guest_reconnect_rebinds_and_running_relays_continue(short_tmp: Path) -> None:
    """When the guest's RPC connection drops and it dials again, the host Binds
    again and reopens Accept; a connection relaying across the drop keeps going."""
    forward = fwd(short_tmp, "a")
    async with (
        unix_service(Path(forward.host_path), reverse_after_eof),
        running_host(short_tmp, [forward]) as env,
    ):
        first = FakeGuest(registry=env.registry)
        async with guest_dialing(first, env.rpc) as connection:
            call = await first.next_accept()
            assert (await call.connect("s-old", "fwd-a")).error == ""
            old = first.claimed.pop("s-old")
            assert old is not None
            await asyncio.get_running_loop().sock_sendall(old, PAYLOAD[:1000])
            connection.cancel()  # the guest agent goes away
            await asyncio.wait({connection})
        with old:
            second = FakeGuest(registry=env.registry)
            async with guest_dialing(second, env.rpc):
                call = await second.next_accept()
                assert second.binds == [[("fwd-a", "/run/socketfwd/a.sock")]]
                assert call.announced == ["fwd-a"]
                assert (await call.connect("s-new", "fwd-a")).error == ""
                new = second.claimed.pop("s-new")
                assert new is not None
                with new:
                    assert await exchange(new, b"after") == b"retfa"
                # The relay set up on the first connection is still running.
                rest = await exchange(old, PAYLOAD[1000:])
                assert rest == PAYLOAD[::-1]
                await wait_until(lambda: env.forwarder.sessions == 2)


async def test_forwards_added_and_removed_at_run_time(short_tmp: Path) -> None:
    """Adding a forward Binds it and re-announces; removing one Unbinds it, its
    connections are refused from then on, and the superseded Accept streams end."""
    a, c = fwd(short_tmp, "a"), fwd(short_tmp, "c")
    async with (
        unix_service(Path(c.host_path), reverse_after_eof),
        running_host(short_tmp, [a]) as env,
    ):
        guest = FakeGuest(registry=env.registry)
        async with guest_dialing(guest, env.rpc):
            first = await guest.next_accept()
            await env.forwarder.add([c])
            assert guest.binds[-1] == [("fwd-c", "/run/socketfwd/c.sock")]
            second = await guest.next_accept()
            assert second.announced == ["fwd-a,fwd-c"]
            assert (await second.connect("s-1", "fwd-c")).error == ""
            async with asyncio.timeout(30):
                await first.ended.wait()

            await env.forwarder.remove(["fwd-a"])
            assert guest.unbinds == [["fwd-a"]]
            third = await guest.next_accept()
            assert third.announced == ["fwd-c"]
            result = await third.connect("s-2", "fwd-a")
            assert result.error == "unknown forward ID: fwd-a"
            assert set(env.forwarder.forwards) == {"fwd-c"}
            guest.close_claimed()


async def test_unimplemented_unbind_is_tolerated(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A guest that answers UNIMPLEMENTED to Unbind (nerdbox's vminitd) does not
    break removal: it is logged and the remaining forwards keep working."""
    caplog.set_level(logging.INFO, logger="socketforward.host")
    a, b = fwd(short_tmp, "a"), fwd(short_tmp, "b")
    async with (
        unix_service(Path(b.host_path), reverse_after_eof),
        running_host(short_tmp, [a, b]) as env,
    ):
        guest = FakeGuest(registry=env.registry, unbind=False)
        async with guest_dialing(guest, env.rpc):
            await guest.next_accept()
            await env.forwarder.remove(["fwd-a"])
            assert "does not implement Unbind" in caplog.text
            call = await guest.next_accept()
            assert call.announced == ["fwd-b"]
            assert (await call.connect("s-1", "fwd-b")).error == ""
            vm_side = guest.claimed.pop("s-1")
            assert vm_side is not None
            with vm_side:
                assert await exchange(vm_side, b"abc") == b"cba"


async def test_dial_mode_retries_until_the_guest_listens_and_redials(short_tmp: Path) -> None:
    """With --rpc-dial the host keeps dialing (with backoff) until the guest
    listens, and dials again after the connection drops, Binding each time."""
    rpc = transport.UnixEndpoint(str(short_tmp / "vm" / "rpc.sock"))
    streams_ep = transport.UnixEndpoint(str(short_tmp / "vm" / "streams.sock"))
    guest = FakeGuest()
    server = ttrpc.Server()
    server.register(guest)
    forwarder = Forwarder([fwd(short_tmp, "a")], streams_ep)
    dialing = asyncio.get_running_loop().create_task(forwarder.run_dialing(rpc, backoff_max=0.2))
    try:
        await asyncio.sleep(0.1)  # a few dials fail: nothing listens yet
        async with await transport.listen(rpc) as listener:
            for attempt in range(1, 3):
                sock = await listener.accept()
                connection = asyncio.get_running_loop().create_task(server.serve_connection(sock))
                call = await guest.next_accept()
                assert call.announced == ["fwd-a"]
                assert len(guest.binds) == attempt
                connection.cancel()  # drop it; the host dials again
                await asyncio.wait({connection})
    finally:
        dialing.cancel()
        await asyncio.wait({dialing})
        await forwarder.close()
        await server.shutdown(grace=0)


async def test_forward_table_rejects_conflicting_entries(short_tmp: Path) -> None:
    """Two different forwards under one forward_id are refused; the same entry
    added again is a no-op; ids that would break the metadata list are refused."""
    a = fwd(short_tmp, "a")
    with pytest.raises(ValueError, match="already used"):
        Forwarder([a, Forward("fwd-a", "/other.sock", "/run/x.sock")], transport.UnixEndpoint("/s"))
    forwarder = Forwarder([a], transport.UnixEndpoint("/s"))
    await forwarder.add([a])
    assert list(forwarder.forwards) == ["fwd-a"]
    with pytest.raises(ValueError, match="forward ID"):
        Forward("a,b", "/h.sock", "/v.sock")
    assert FORWARD_IDS_METADATA == "socketforward-forward-ids"
