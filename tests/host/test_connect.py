"""One ConnectRequest against a guest played by a real ttrpc server over real
UNIX sockets: admission (unknown forward, bad stream id, overload), the dial,
the data stream and its ack, the relay, and what each failure does."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from socketforward import transport
from tests.host.fake_guest import (
    FakeGuest,
    exchange,
    guest_dialing,
    recv_all,
    reverse_after_eof,
    unix_service,
)
from tests.host.host_env import (
    fwd,
    guest_accepting,
    host_with_guest,
    misbehaving_streams,
    running_host,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


async def test_unknown_forward_id_is_rejected_and_nothing_dialed(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A forward_id the host never configured (even one spelled like a host path)
    gets `unknown forward ID: <id>`, is logged, and no host socket is dialed."""
    caplog.set_level(logging.INFO, logger="socketforward.host")
    forward = fwd(short_tmp, "a")
    async with host_with_guest(short_tmp) as (env, target, _, call):
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
    async with host_with_guest(short_tmp) as (env, target, guest, call):
        for stream_id in ("", "x" * 257):
            assert (await call.connect(stream_id, "fwd-a")).error == "invalid stream ID"
        assert target.accepted == 0
        assert env.forwarder.stats()["fwd-a"].failed == {"bad_stream_id": 2}
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
    async with (
        running_host(short_tmp, [forward]) as env,
        guest_accepting(env.rpc, env.registry) as (_, call),
    ):
        result = await call.connect("s-1", "fwd-missing")
        assert result.error == "failed to dial host socket"
        assert str(short_tmp) not in result.error
        assert len(env.registry) == 0
        assert f"host_path={forward.host_path}" in caplog.text
        assert env.forwarder.stats()["fwd-missing"].failed == {"dial": 1}


async def test_vm_supplied_stream_id_cannot_forge_log_lines(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream id with a line break (valid on the wire) is logged quoted, so
    the VM cannot write a line of its own into the host's log."""
    caplog.set_level(logging.INFO, logger="socketforward.host")
    forward = fwd(short_tmp, "missing")
    forged = "s-1\n2026-01-01 00:00:00 INFO socketforward.host: forged"
    async with (
        running_host(short_tmp, [forward]) as env,
        guest_accepting(env.rpc, env.registry) as (_, call),
    ):
        result = await call.connect(forged, "fwd-missing")
        assert result.error == "failed to dial host socket"
    assert "host socket dial failed stream_id='s-1\\n2026" in caplog.text
    assert not any(m.startswith("2026-01-01") for m in caplog.text.splitlines())


@contextlib.contextmanager
def _black_hole(path: Path) -> Iterator[None]:
    """A UNIX listener that never accepts, its backlog already full: a dial to it
    hangs until the dialer gives up."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(str(path))
        listener.listen(0)
        for _ in range(64):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            fillers.append(s)
            try:
                s.connect(str(path))
            except BlockingIOError:
                break
        else:
            raise AssertionError("backlog never filled")
        yield
    finally:
        listener.close()
        for s in fillers:
            s.close()


async def test_concurrent_requests_are_not_held_up_by_a_black_hole_target(
    short_tmp: Path,
) -> None:
    """One host service that never answers its dial does not delay other
    connections: twenty requests made after it all succeed while it still hangs."""
    slow, fast = fwd(short_tmp, "slow"), fwd(short_tmp, "fast")
    (short_tmp / "host").mkdir(mode=0o700)
    with _black_hole(Path(slow.host_path)):
        async with (
            unix_service(Path(fast.host_path), reverse_after_eof) as target,
            running_host(short_tmp, [slow, fast], dial_timeout=120) as env,
            guest_accepting(env.rpc, env.registry) as (guest, call),
        ):
            stuck = await call.request("s-slow", "fwd-slow")
            futures = [await call.request(f"s-{i}", "fwd-fast") for i in range(20)]
            async with asyncio.timeout(30):
                results = await asyncio.gather(*futures)
            assert [r.error for r in results] == [""] * 20
            assert not stuck.done()
            assert target.accepted == 20
            guest.close_claimed()


async def test_requests_beyond_max_pending_are_refused_and_nothing_dialed(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With as many requests pending as allowed, the next one gets `too many
    pending connections` at once, is counted and logged, and its host socket is
    never dialed; the pending one is still waiting."""
    caplog.set_level(logging.INFO, logger="socketforward.host")
    slow, fast = fwd(short_tmp, "slow"), fwd(short_tmp, "fast")
    (short_tmp / "host").mkdir(mode=0o700)
    with _black_hole(Path(slow.host_path)):
        async with (
            unix_service(Path(fast.host_path), reverse_after_eof) as target,
            running_host(short_tmp, [slow, fast], dial_timeout=120, max_pending=1) as env,
            guest_accepting(env.rpc, env.registry) as (_, call),
        ):
            stuck = await call.request("s-slow", "fwd-slow")
            result = await call.connect("s-1", "fwd-fast")
            assert result.error == "too many pending connections"
            assert env.forwarder.stats()["fwd-fast"].failed == {"overload": 1}
            assert "too many pending connections stream_id=s-1 forward_id=fwd-fast" in caplog.text
            assert target.accepted == 0
            assert not stuck.done()


async def test_huge_ack_length_fails_one_connection_without_allocating_it(
    short_tmp: Path,
) -> None:
    """A guest stream endpoint answering a 4 GiB ack length fails that one
    connection (its host socket is closed) without the host allocating it; the
    next connection works."""
    forward = fwd(short_tmp, "a")
    async with (
        misbehaving_streams(short_tmp) as evil,
        unix_service(Path(forward.host_path), reverse_after_eof) as target,
        running_host(short_tmp, [forward], streams=evil.listener.endpoint) as env,
        guest_accepting(env.rpc) as (_, call),
    ):
        tracemalloc.start()
        try:
            result = await call.connect("evil-1", "fwd-a")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert result.error == "failed to open data stream"
        assert peak < 64 << 20
        assert env.forwarder.stats()["fwd-a"].failed == {"stream": 1}
        good = await call.connect("good-1", "fwd-a")
        assert good.error == ""
        assert await exchange(evil.streams["good-1"], b"ping") == b"gnip"
        assert target.accepted == 2


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
        guest_accepting(env.rpc) as (_, call),
    ):
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
        assert env.forwarder.stats()["fwd-a"].failed == {"stream": 1}
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
        await wait_until(lambda: env.forwarder.stats()["fwd-a"].failed == {"rpc_lost": 1})


async def test_a_flood_of_bad_requests_costs_a_bounded_log(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A VM sending hundreds of requests for forwards the host does not have gets
    each one refused, but the host log holds only the first lines of the flood
    and, when the host stops, one summary line counting the rest."""
    caplog.set_level(logging.INFO, logger="socketforward.host")
    async with host_with_guest(short_tmp) as (env, _, _, call):
        answers = await asyncio.gather(*(call.connect(f"s-{i}", f"nope-{i}") for i in range(300)))
        assert all(a.error.startswith("unknown forward ID: nope-") for a in answers)
        assert env.forwarder.unknown_requests == 300
    rejected = [m for m in caplog.messages if m.startswith("unknown forward ID rejected")]
    assert len(rejected) == 20
    assert "log lines left out interval=" in caplog.text and "unknown_forward=280" in caplog.text


async def test_a_vm_holding_max_relays_connections_gets_no_more(short_tmp: Path) -> None:
    """A VM that keeps every forwarded connection open cannot take the host's
    descriptors: past max_relays a request is refused (counted relays_full) and
    nothing is dialed; once one connection ends, the next is served."""
    async with host_with_guest(short_tmp, max_relays=2) as (env, target, guest, call):
        assert env.forwarder.max_relays == 2
        for stream_id in ("s-1", "s-2"):
            assert (await call.connect(stream_id, "fwd-a")).error == ""
        refused = await call.connect("s-3", "fwd-a")
        assert refused.error == "too many pending connections"
        assert target.accepted == 2
        assert env.forwarder.stats()["fwd-a"].failed == {"relays_full": 1}
        held = guest.claimed.pop("s-1")
        assert held is not None
        held.close()
        await wait_until(lambda: env.forwarder.stats()["fwd-a"].active == 1)
        assert (await call.connect("s-4", "fwd-a")).error == ""
        assert target.accepted == 3


async def test_one_dial_per_request_while_the_vm_is_still_booting(short_tmp: Path) -> None:
    """With the stream endpoint not there yet, a request dials the host service
    once (the fast path hands its socket to the waiting path instead of
    dialing again), and fails cleanly when the endpoint never comes."""
    forward = fwd(short_tmp, "a")
    missing = transport.UnixEndpoint(str(short_tmp / "vm" / "not-yet.sock"))
    async with (
        unix_service(Path(forward.host_path), reverse_after_eof) as target,
        running_host(short_tmp, [forward], streams=missing, stream_retry_for=0.3) as env,
        guest_accepting(env.rpc, env.registry) as (_, call),
    ):
        answers = await asyncio.gather(*(call.connect(f"s-{i}", "fwd-a") for i in range(5)))
        assert {a.error for a in answers} == {"failed to open data stream"}
        await wait_until(lambda: target.accepted >= 5)
        await asyncio.sleep(0.1)  # a second dial would have arrived by now
        assert target.accepted == 5
        assert env.forwarder.pending == 0
