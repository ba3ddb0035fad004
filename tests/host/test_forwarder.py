"""The host's Forwarder against a guest played by a real ttrpc server over real
UNIX sockets: Bind, the Accept call, relays, reconnects, table changes."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

import ttrpc_asyncio as ttrpc
from socketforward import transport
from socketforward.datastream import POOLED_PREFIX
from socketforward.host import Forward, Forwarder
from socketforward.protocol import FORWARD_IDS_METADATA, HostError
from tests.host.fake_guest import (
    AcceptCall,
    FakeGuest,
    exchange,
    guest_dialing,
    reverse_after_eof,
    unix_service,
)
from tests.host.host_env import fwd, guest_accepting, host_with_guest, running_host, wait_until

pytestmark = pytest.mark.timeout(60)

PAYLOAD = os.urandom(1 << 20) + b"tail"


async def test_bind_on_connect_and_accept_announces_forward_ids(short_tmp: Path) -> None:
    """When the guest dials in, the host Binds every configured forward (VM paths
    only, never host paths) and opens Accept announcing its forward_ids."""
    forwards = [fwd(short_tmp, "a"), fwd(short_tmp, "b")]
    async with (
        running_host(short_tmp, forwards) as env,
        guest_accepting(env.rpc) as (guest, call),
    ):
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
    async with host_with_guest(short_tmp) as (env, target, guest, call):
        result = await call.connect("s-1", "fwd-a")
        assert result.error == ""
        vm_side = guest.claimed.pop("s-1")
        assert vm_side is not None, "data stream must be open before the success result"
        with vm_side:
            assert await exchange(vm_side, PAYLOAD) == PAYLOAD[::-1]
        assert target.accepted == 1
        await wait_until(lambda: env.forwarder.stats()["fwd-a"].active == 0)
        stats = env.forwarder.stats()["fwd-a"]
        assert (stats.requests, stats.connected, stats.failed) == (1, 1, {})
        assert stats.bytes_to_host == stats.bytes_to_vm == len(PAYLOAD)


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
        guest_accepting(env.rpc, env.registry) as (guest, first),
    ):
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
    break removal: it is logged and the remaining forwards keep working on the
    one Accept call it has (it is taken for nerdbox's, which must keep it)."""
    caplog.set_level(logging.INFO, logger="socketforward.host")
    a, b = fwd(short_tmp, "a"), fwd(short_tmp, "b")
    async with (
        unix_service(Path(b.host_path), reverse_after_eof),
        running_host(short_tmp, [a, b]) as env,
    ):
        guest = FakeGuest(registry=env.registry, unbind=False)
        async with guest_dialing(guest, env.rpc):
            call = await guest.next_accept()
            await env.forwarder.remove(["fwd-a"])
            assert "does not implement Unbind" in caplog.text
            assert guest.accepts.empty() and not call.ended.is_set()
            assert (await call.connect("s-0", "fwd-a")).error == "unknown forward ID: fwd-a"
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


async def _serves_one_more(call: AcceptCall, guest: FakeGuest) -> None:
    """The Accept call still serves: a good request is answered and relayed."""
    good = await call.request("s-good", "fwd-a")
    async with asyncio.timeout(30):
        assert (await good).error == ""
    sock = guest.claimed.pop("s-good")
    assert sock is not None
    with sock:
        assert await exchange(sock, b"after") == b"retfa"


async def test_an_undecodable_connect_request_is_dropped_and_the_call_goes_on(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ConnectRequest that does not decode (its forward_id is not UTF-8) is
    dropped with one escaped log line and counted; the Accept call stays open
    and serves the request right behind it."""
    caplog.set_level(logging.INFO, logger="socketforward.host")
    async with host_with_guest(short_tmp) as (env, _, guest, call):
        await call.send_undecodable("s-bad", b"fwd-\xff\n\x1b[2J")
        await _serves_one_more(call, guest)
        assert env.forwarder.undecodable_requests == 1
        assert not call.ended.is_set() and guest.accepts.empty()
        assert env.forwarder.sessions == 1 and env.forwarder.pending == 0
    lines = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(lines) == 1
    assert "\\xff\\n\\x1b[2J" in lines[0] and "\n" not in lines[0]


async def test_a_request_naming_a_stream_the_pool_does_not_hold_is_refused_undialed(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A guest names a pooled stream the host cannot relay (this guest never
    said it picks; the other id is junk): each request is answered `failed to
    open data stream` with one escaped log line, nothing is dialed, and the
    call goes on serving."""
    caplog.set_level(logging.INFO, logger="socketforward.host")
    async with host_with_guest(short_tmp) as (env, service, guest, call):
        for stream_id, named in (
            ("s-pool", f"{POOLED_PREFIX}abc-1"),
            ("s-junk", "\x1b[2Jnot-pooled\n" * 40),
        ):
            async with asyncio.timeout(30):
                result = await (await call.request(stream_id, "fwd-a", named))
            assert (result.stream_id, result.error) == (stream_id, HostError.STREAM.text())
        assert service.accepted == 0  # nothing dialed
        await _serves_one_more(call, guest)
        assert env.forwarder.stats()["fwd-a"].failed == {"stream": 2}
    lines = [m for r in caplog.records if "no ready pooled stream" in (m := r.getMessage())]
    assert len(lines) == 2
    assert "\\x1b[2J" in lines[1] and "\n" not in lines[1]


async def test_stopping_drains_running_connections_for_the_grace_period(short_tmp: Path) -> None:
    """Stopping with a grace period takes no new connection but lets a running
    one go on and finish; the stop completes as soon as it has."""
    async with host_with_guest(short_tmp) as (env, _, guest, call):
        assert (await call.connect("s-1", "fwd-a")).error == ""
        vm_side = guest.claimed.pop("s-1")
        assert vm_side is not None
        with vm_side:
            closing = asyncio.ensure_future(env.forwarder.close(drain=30))
            await asyncio.sleep(0.1)
            assert not closing.done() and not env.forwarder.connected
            assert await exchange(vm_side, b"still going") == b"gniog llits"
        async with asyncio.timeout(5):
            await closing  # the last relay ended: no need to wait out the 30 s


async def test_a_connection_outliving_the_grace_period_is_closed(short_tmp: Path) -> None:
    """A connection still open when the grace period ends is closed: stopping
    is bounded whatever the clients do."""
    async with host_with_guest(short_tmp) as (env, _, guest, call):
        assert (await call.connect("s-1", "fwd-a")).error == ""
        vm_side = guest.claimed.pop("s-1")
        assert vm_side is not None
        with vm_side:
            async with asyncio.timeout(5):
                await env.forwarder.close(drain=0.3)
            assert env.forwarder.stats()["fwd-a"].active == 0
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(5):
                assert await loop.sock_recv(vm_side, 1) == b""
