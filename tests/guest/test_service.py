"""The VM-side SocketForward service, driven by a real ttrpc client over real
sockets, with a test host answering Accept streams as nerdbox's shim does."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import ttrpc_asyncio as ttrpc
from socketforward import datastream, transport
from socketforward.api import socketforward_pb2 as pb
from socketforward.api.socketforward_ttrpc import SocketForwardStub
from socketforward.datastream import POOLED_PREFIX
from socketforward.protocol import STREAM_ID_PREFIX, HostError
from tests.guest.harness import (
    PATIENCE,
    EchoService,
    Guest,
    HostStream,
    bind,
    read_to_eof,
    roundtrip,
    running_guest,
    short_tmp,
    trailer,
    until,
)


def _socket_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_socket()]


async def _bind_error(guest: Guest, sockets: list[tuple[str, str]]) -> ttrpc.TtrpcError:
    stub = await guest.connect()
    request = pb.BindRequest(sockets=[pb.Socket(forward_id=f, socket_path=p) for f, p in sockets])
    with pytest.raises(ttrpc.TtrpcError) as info:
        await stub.Bind(request, timeout=PATIENCE)
    return info.value


# -- Bind ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (("", "/x/b.sock"), "forward_id is empty"),
        (("b", "relative/b.sock"), "socket_path is relative; it must be absolute"),
        (("b", "/" + "x" * 120), "sun_path"),
        (("a", "/x/b.sock"), "forward_id repeats sockets[0]"),
        (("b", "/x/a.sock"), "socket_path repeats sockets[0]"),
        (("b", ""), "socket_path is empty"),
    ],
)
async def test_bind_rejects_bad_entry_naming_it(bad: tuple[str, str], problem: str) -> None:
    """A bad Bind entry is refused with INVALID_ARGUMENT naming the entry, and
    the good entry before it is not created either."""
    async with running_guest() as guest:
        good = str(guest.root / "vm" / "a.sock")
        forward_id, path = bad
        path = path.replace("/x/", str(guest.root / "vm") + "/")
        error = await _bind_error(guest, [("a", good), (forward_id, path)])
        assert error.code == ttrpc.Code.INVALID_ARGUMENT
        assert "sockets[1]" in error.message and problem in error.message
        assert not (guest.root / "vm").exists()
        assert guest.service.bound() == {}


async def test_bind_is_all_or_nothing_and_never_deletes_a_file() -> None:
    """When one entry cannot be bound (a regular file is at its path), none is:
    no socket file or new directory is left, and the user's file is intact."""
    async with running_guest() as guest:
        (guest.root / "data").mkdir()
        precious = guest.root / "data" / "c.sock"
        precious.write_text("keep me")
        error = await _bind_error(
            guest,
            [
                ("a", str(guest.root / "new" / "deep" / "a.sock")),
                ("b", str(guest.root / "data" / "b.sock")),
                ("c", str(precious)),
            ],
        )
        assert error.code == ttrpc.Code.ALREADY_EXISTS
        assert "sockets[2]" in error.message or str(precious) in error.message
        assert "regular file" in error.message
        assert precious.read_text() == "keep me"
        assert not (guest.root / "new").exists()
        assert _socket_files(guest.root) == [guest.root / "streams.sock"]
        # A directory at the path is refused too, and kept.
        (guest.root / "dir.sock").mkdir()
        error = await _bind_error(guest, [("d", str(guest.root / "dir.sock"))])
        assert error.code == ttrpc.Code.ALREADY_EXISTS
        assert (guest.root / "dir.sock").is_dir()


async def test_bind_creates_socket_files_mode_and_parents() -> None:
    """After Bind returns, the socket file exists with mode 0600 (owner-only by
    default) and its new parent directories are 0755."""
    async with running_guest() as guest:
        stub = await guest.connect()
        path = guest.root / "run" / "socketfwd" / "a.sock"
        await bind(stub, {"a": path})
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE((guest.root / "run").stat().st_mode) == 0o755
        assert stat.S_IMODE((guest.root / "run" / "socketfwd").stat().st_mode) == 0o755
        assert guest.service.bound() == {"a": str(path)}


async def test_bind_is_idempotent_and_conflicts_are_already_exists() -> None:
    """Binding the same forward at the same path again is a no-op (a host that
    reconnects re-Binds); the path under another id, or the id elsewhere, is refused."""
    async with running_guest() as guest:
        stub = await guest.connect()
        a, b = guest.root / "a.sock", guest.root / "b.sock"
        await bind(stub, {"a": a})
        inode = a.lstat().st_ino
        await bind(stub, {"a": a, "b": b})
        assert a.lstat().st_ino == inode  # the same listener, not a new one
        assert guest.service.bound() == {"a": str(a), "b": str(b)}
        for forward_id, path in (("other", a), ("a", guest.root / "c.sock")):
            error = await _bind_error(guest, [(forward_id, str(path))])
            assert error.code == ttrpc.Code.ALREADY_EXISTS
            assert "sockets[0]" in error.message
        assert not (guest.root / "c.sock").exists()


async def test_bind_replaces_a_stale_socket_file() -> None:
    """A socket file left by a crashed agent is replaced, not an error."""
    async with running_guest() as guest:
        path = guest.root / "stale.sock"
        with socket.socket(socket.AF_UNIX) as old:
            old.bind(str(path))
        stub = await guest.connect()
        await bind(stub, {"a": path})
        sock = await transport.connect(transport.UnixEndpoint(str(path)), timeout=PATIENCE)
        sock.close()


async def test_unbind_removes_listener_and_file() -> None:
    """Unbind removes the socket file and stops accepting; unknown ids are ignored."""
    async with running_guest() as guest:
        stub = await guest.connect()
        path = guest.root / "a.sock"
        await bind(stub, {"a": path, "b": guest.root / "b.sock"})
        await stub.Unbind(pb.UnbindRequest(forward_ids=["a", "nope"]), timeout=PATIENCE)
        assert not path.exists()
        assert guest.service.bound() == {"b": str(guest.root / "b.sock")}
        with pytest.raises(FileNotFoundError):
            await transport.connect(transport.UnixEndpoint(str(path)), timeout=PATIENCE)
        # The path is free again.
        await bind(stub, {"a2": path})


# -- forwarding ----------------------------------------------------------------


async def test_one_connection_byte_exact_both_ways_with_half_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """4 MiB go to the host service and come back byte-exact; after the client
    half-closes, the service's answer still arrives; the log names the peer."""
    caplog.set_level(logging.DEBUG, logger="socketforward.guest")
    async with running_guest() as guest:
        echo = await EchoService.start(guest.root / "target.sock")
        stub = await guest.connect()
        host = await HostStream(stub, guest.streams_ep, {"fwd": echo.endpoint}).open()
        try:
            await bind(stub, {"fwd": guest.root / "vm.sock"})
            payload = os.urandom(4 << 20)
            answer = await roundtrip(guest.root / "vm.sock", payload)
            assert answer == payload + trailer(payload)
            assert host.received[0].forward_id == "fwd"
            assert host.received[0].stream_id.startswith(STREAM_ID_PREFIX + "-")
            await until(lambda: guest.service.stats()["fwd"].active == 0)
            stats = guest.service.stats()["fwd"]
            assert stats.requests == 1 and stats.connected == 1 and stats.failed == {}
            assert stats.bytes_to_host == len(payload)
            assert stats.bytes_to_vm == len(payload) + len(trailer(payload))
            line = next(
                r.getMessage() for r in caplog.records if "connection done" in r.getMessage()
            )
            assert f"pid={os.getpid()} uid={os.getuid()} gid={os.getgid()}" in line
        finally:
            await host.close()
            await host.stop_relays()
            await echo.close()


async def test_connection_waits_until_a_host_stream_opens() -> None:
    """A container that connects before the host opened Accept is served once it does."""
    async with running_guest() as guest:
        echo = await EchoService.start(guest.root / "target.sock")
        stub = await guest.connect()
        await bind(stub, {"fwd": guest.root / "vm.sock"})
        client = asyncio.create_task(roundtrip(guest.root / "vm.sock", b"early bird"))
        await until(lambda: guest.service.pending > 0)
        host = await HostStream(stub, guest.streams_ep, {"fwd": echo.endpoint}).open()
        try:
            assert await client == b"early bird" + trailer(b"early bird")
        finally:
            await host.close()
            await host.stop_relays()
            await echo.close()


async def test_data_stream_opened_after_the_success_answer_is_waited_for() -> None:
    """A host that answers success before opening the data stream (the reverse
    of nerdbox's order) still gets its connections relayed."""
    async with running_guest() as guest:
        echo = await EchoService.start(guest.root / "target.sock")
        stub = await guest.connect()
        await bind(stub, {"fwd": guest.root / "vm.sock"})
        host = HostStream(stub, guest.streams_ep, {"fwd": echo.endpoint}, open_after_answer=True)
        await host.open()
        try:
            answers = await asyncio.gather(
                *(roundtrip(guest.root / "vm.sock", b"%d" % i) for i in range(20))
            )
            assert answers == [b"%d" % i + trailer(b"%d" % i) for i in range(20)]
        finally:
            await host.close()
            await host.stop_relays()
            await echo.close()


async def test_host_that_never_answers_gets_connections_closed_after_timeout() -> None:
    """With a host that never answers, the container sees its connection closed
    (after the pending timeout), instead of hanging forever."""
    async with running_guest(pending_timeout=0.3) as guest:
        stub = await guest.connect()
        host = await HostStream(stub, guest.streams_ep, {}, answer="silent").open()
        try:
            await bind(stub, {"fwd": guest.root / "vm.sock"})
            sock = await transport.connect(transport.UnixEndpoint(str(guest.root / "vm.sock")))
            with sock:
                async with asyncio.timeout(PATIENCE):
                    assert await read_to_eof(sock) == b""
            assert guest.service.stats()["fwd"].failed == {"timeout": 1}
            assert guest.service.pending == 0
        finally:
            await host.close()


async def test_error_answer_closes_container_connection_promptly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When the host cannot dial its service, the container sees EOF right away
    (long before the 60 s pending timeout) and the reason is logged."""
    async with running_guest(pending_timeout=60) as guest:
        stub = await guest.connect()
        host = await HostStream(
            stub, guest.streams_ep, {}, answer="failed to dial host socket"
        ).open()
        try:
            await bind(stub, {"fwd": guest.root / "vm.sock"})
            sock = await transport.connect(transport.UnixEndpoint(str(guest.root / "vm.sock")))
            with sock:
                async with asyncio.timeout(PATIENCE):
                    assert await read_to_eof(sock) == b""
            assert guest.service.stats()["fwd"].failed == {"host_error": 1}
            assert any(
                "reason=host_error" in r.getMessage()
                and "failed to dial host socket" in r.getMessage()
                for r in caplog.records
            )
        finally:
            await host.close()


async def test_result_for_unknown_stream_is_ignored() -> None:
    """A ConnectResult naming a stream the guest never announced changes nothing:
    forwarding keeps working on the same Accept stream."""
    async with running_guest() as guest:
        echo = await EchoService.start(guest.root / "target.sock")
        stub = await guest.connect()
        await bind(stub, {"fwd": guest.root / "vm.sock"})
        host = await HostStream(stub, guest.streams_ep, {"fwd": echo.endpoint}).open()
        try:
            await host.send(pb.ConnectResult(stream_id="socketfwd-1-bogus"))
            await host.send(pb.ConnectResult(stream_id="socketfwd-2-bogus", error="x"))
            answers = await asyncio.gather(
                *(roundtrip(guest.root / "vm.sock", b"%d" % i) for i in range(5))
            )
            assert answers == [b"%d" % i + trailer(b"%d" % i) for i in range(5)]
        finally:
            await host.close()
            await host.stop_relays()
            await echo.close()


async def test_requests_are_paced_per_stream() -> None:
    """At most N requests are unanswered on one Accept stream (a Go host would
    otherwise close a stream whose queue stays full); all connections are served."""
    async with running_guest(max_unanswered_per_stream=4) as guest:
        echo = await EchoService.start(guest.root / "target.sock")
        stub = await guest.connect()
        await bind(stub, {"fwd": guest.root / "vm.sock"})
        host = HostStream(stub, guest.streams_ep, {"fwd": echo.endpoint}, answer="silent")
        await host.open()
        clients = [
            asyncio.create_task(roundtrip(guest.root / "vm.sock", b"%d" % i)) for i in range(12)
        ]
        try:
            await host.wait_received(4)
            await until(lambda: guest.service.pending == 12)
            await asyncio.sleep(0.1)  # room for a misbehaving guest to send more
            assert len(host.received) == 4
            await host.close()
            host = await HostStream(stub, guest.streams_ep, {"fwd": echo.endpoint}).open()
            answers = await asyncio.gather(*clients)
            assert answers == [b"%d" % i + trailer(b"%d" % i) for i in range(12)]
            assert host.max_unanswered <= 4
        finally:
            await host.close()
            await host.stop_relays()
            await echo.close()


async def test_unanswered_requests_move_to_the_next_stream() -> None:
    """When a host stream ends with requests unanswered, they are handed to the
    next stream and the waiting containers are served, not dropped."""
    async with running_guest(pending_timeout=60) as guest:
        echo = await EchoService.start(guest.root / "target.sock")
        stub = await guest.connect()
        await bind(stub, {"fwd": guest.root / "vm.sock"})
        silent = await HostStream(stub, guest.streams_ep, {}, answer="silent").open()
        clients = [
            asyncio.create_task(roundtrip(guest.root / "vm.sock", b"%d" % i)) for i in range(3)
        ]
        await silent.wait_received(3)
        await silent.close()
        host = await HostStream(stub, guest.streams_ep, {"fwd": echo.endpoint}).open()
        try:
            answers = await asyncio.gather(*clients)
            assert answers == [b"%d" % i + trailer(b"%d" % i) for i in range(3)]
            assert {r.stream_id for r in host.received} == {r.stream_id for r in silent.received}
        finally:
            await host.close()
            await host.stop_relays()
            await echo.close()


async def test_queue_bound_closes_excess_connections_with_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past the pending-queue bound a connection is closed at once and logged;
    the queued ones are failed cleanly at shutdown."""
    async with running_guest(pending_limit=2) as guest:
        stub = await guest.connect()
        await bind(stub, {"fwd": guest.root / "vm.sock"})
        ep = transport.UnixEndpoint(str(guest.root / "vm.sock"))
        socks = [await transport.connect(ep) for _ in range(3)]
        try:
            async with asyncio.timeout(PATIENCE):
                await until(lambda: guest.service.stats()["fwd"].requests == 3)
                assert await read_to_eof(socks[2]) == b""
            assert guest.service.stats()["fwd"].failed == {"queue_full": 1}
            assert any("reason=queue_full" in r.getMessage() for r in caplog.records)
            await guest.service.shutdown()
            async with asyncio.timeout(PATIENCE):
                assert [await read_to_eof(s) for s in socks[:2]] == [b"", b""]
            assert guest.service.stats()["fwd"].failed == {"queue_full": 1, "shutdown": 2}
        finally:
            for s in socks:
                s.close()


def _raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed <= hard or (soft < needed and hard == resource.RLIM_INFINITY):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < needed:
        pytest.skip(f"needs {needed} file descriptors")


async def test_two_host_streams_one_announcing_500_connections_each() -> None:
    """Two containers' host streams on one guest (one announces its forward_ids,
    one does not): 500 connections to each forward are all served byte-exact,
    where the reference would fail about half of them."""
    _raise_nofile(12000)
    async with running_guest() as guest:
        echo_a = await EchoService.start(guest.root / "ta.sock")
        echo_b = await EchoService.start(guest.root / "tb.sock")
        stub_a, stub_b = await guest.connect(), await guest.connect()
        await bind(stub_a, {"fa": guest.root / "a.sock"})
        await bind(stub_b, {"fb": guest.root / "b.sock"})
        host_a = HostStream(stub_a, guest.streams_ep, {"fa": echo_a.endpoint}, announce=True)
        host_b = HostStream(stub_b, guest.streams_ep, {"fb": echo_b.endpoint})
        await host_a.open()
        await host_b.open()
        try:
            jobs = [
                roundtrip(guest.root / f"{name}.sock", f"{name}{i}".encode() * 10)
                for i in range(500)
                for name in ("a", "b")
            ]
            answers = await asyncio.gather(*jobs)
            expected = [
                f"{name}{i}".encode() * 10 + trailer(f"{name}{i}".encode() * 10)
                for i in range(500)
                for name in ("a", "b")
            ]
            assert answers == expected
            assert {r.forward_id for r in host_a.received} == {"fa"}
            stats = guest.service.stats()
            assert stats["fa"].connected == 500 and stats["fa"].failed == {}
            assert stats["fb"].connected == 500 and stats["fb"].failed == {}
        finally:
            for host in (host_a, host_b):
                await host.close()
                await host.stop_relays()
            await echo_a.close()
            await echo_b.close()


async def test_unannounced_streams_are_tried_in_turn() -> None:
    """Two hosts that announce nothing, each knowing one forward: requests that
    one answers with `unknown forward ID` go to the other; all are served."""
    async with running_guest() as guest:
        echo = await EchoService.start(guest.root / "t.sock")
        stub_a, stub_b = await guest.connect(), await guest.connect()
        await bind(stub_a, {"fa": guest.root / "a.sock", "fb": guest.root / "b.sock"})
        host_a = await HostStream(stub_a, guest.streams_ep, {"fa": echo.endpoint}).open()
        host_b = await HostStream(stub_b, guest.streams_ep, {"fb": echo.endpoint}).open()
        try:
            jobs = [
                roundtrip(guest.root / f"{name}.sock", f"{name}{i}".encode())
                for i in range(50)
                for name in ("a", "b")
            ]
            answers = await asyncio.gather(*jobs)
            assert answers == [
                f"{name}{i}".encode() + trailer(f"{name}{i}".encode())
                for i in range(50)
                for name in ("a", "b")
            ]
            stats = guest.service.stats()
            assert stats["fa"].failed == {} and stats["fb"].failed == {}
        finally:
            for host in (host_a, host_b):
                await host.close()
                await host.stop_relays()
            await echo.close()


async def test_forward_no_host_knows_is_closed_with_reason() -> None:
    """A connection to a forward that every open host stream says it does not
    know is closed at once, with the host's reason logged."""
    async with running_guest(pending_timeout=60) as guest:
        stub = await guest.connect()
        await bind(stub, {"orphan": guest.root / "o.sock"})
        host = await HostStream(stub, guest.streams_ep, {}).open()
        try:
            sock = await transport.connect(transport.UnixEndpoint(str(guest.root / "o.sock")))
            with sock:
                async with asyncio.timeout(PATIENCE):
                    assert await read_to_eof(sock) == b""
            assert guest.service.stats()["orphan"].failed == {"unknown_forward": 1}
        finally:
            await host.close()


async def test_shutdown_leaves_no_socket_file_fd_or_task() -> None:
    """Shutdown removes every socket file it made, ends active relays and
    pending connections (their clients see EOF), and leaves no task behind;
    a second shutdown is harmless. (The fd check runs after every test.)"""
    baseline = asyncio.all_tasks()
    with short_tmp() as root:
        echo = await EchoService.start(root / "target.sock")
        async with running_guest(pending_timeout=60) as guest:
            stub = await guest.connect()
            await bind(stub, {"fwd": guest.root / "a.sock"})
            host = HostStream(stub, guest.streams_ep, {"fwd": echo.endpoint}, announce=True)
            await host.open()
            # Bound after the host's call opened: its connection waits for a call
            # announcing it, so it is pending when shutdown comes.
            await bind(stub, {"idle": guest.root / "i.sock"})
            ep = transport.UnixEndpoint(str(guest.root / "a.sock"))
            active = await transport.connect(ep)
            waiting = await transport.connect(transport.UnixEndpoint(str(guest.root / "i.sock")))
            loop = asyncio.get_running_loop()
            try:
                await loop.sock_sendall(active, b"hello")
                assert await loop.sock_recv(active, 5) == b"hello"
                await until(lambda: guest.service.pending > 0)
                await guest.service.shutdown()
                await guest.service.shutdown()
                async with asyncio.timeout(PATIENCE):
                    await read_to_eof(active)
                    assert await read_to_eof(waiting) == b""
                assert _socket_files(guest.root) == []
                assert guest.service.bound() == {}
            finally:
                active.close()
                waiting.close()
                await host.close()
                await host.stop_relays()
        await echo.close()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(0)
    assert asyncio.all_tasks() <= baseline | {asyncio.current_task()}


async def test_python_callers_bind_and_unbind_without_rpc() -> None:
    """An embedding program can call bind/unbind directly, no ttrpc needed."""
    async with running_guest() as guest:
        path = guest.root / "direct.sock"
        request = pb.BindRequest(sockets=[pb.Socket(forward_id="d", socket_path=str(path))])
        await guest.service.bind(request)
        assert path.is_socket()
        await guest.service.unbind(pb.UnbindRequest(forward_ids=["d"]))
        assert not path.exists()


async def test_public_surface_mirrors_nerdboxs_package(tmp_path: Path) -> None:
    """What an embedder of the VM side uses (as nerdbox's socketforward package
    offers it) is importable from socketforward.guest: generate_stream_id,
    Service(streams) registered on a ttrpc server, and a StreamManager whose
    get() hands a data stream out exactly once."""
    from socketforward import guest  # noqa: PLC0415 - the import is the test
    from socketforward.datastream import StreamRegistry  # noqa: PLC0415

    assert guest.generate_stream_id("x").startswith("x-")
    endpoint = transport.UnixEndpoint(str(tmp_path / "s.sock"))
    registry: guest.StreamManager = StreamRegistry(await transport.listen(endpoint))
    service = guest.Service(registry)
    server = ttrpc.Server()
    service.register(server)
    assert service.SERVICE_NAME in server.services
    with pytest.raises(LookupError):
        registry.get("never-opened")
    await service.shutdown()
    await server.shutdown(0)
    assert not (tmp_path / "s.sock").exists()


async def test_forward_no_announcing_host_serves_fails_at_once() -> None:
    """A host restarted without forward `b` announces only `a`: a connection to
    b's socket in the VM is closed at once (unknown_forward), not after the
    pending timeout, and `a` keeps working."""
    async with running_guest(pending_timeout=60) as guest:
        echo = await EchoService.start(guest.root / "t.sock")
        stub = await guest.connect()
        await bind(stub, {"a": guest.root / "a.sock", "b": guest.root / "b.sock"})
        host = HostStream(stub, guest.streams_ep, {"a": echo.endpoint}, announce=True)
        await host.open()
        try:
            sock = await transport.connect(transport.UnixEndpoint(str(guest.root / "b.sock")))
            with sock:
                async with asyncio.timeout(5):
                    assert await read_to_eof(sock) == b""
            assert guest.service.stats()["b"].failed == {"unknown_forward": 1}
            assert host.received == []
            assert await roundtrip(guest.root / "a.sock", b"hi") == b"hi" + trailer(b"hi")
        finally:
            await host.close()
            await host.stop_relays()
            await echo.close()


async def test_an_undecodable_answer_is_dropped_and_the_call_goes_on() -> None:
    """A ConnectResult that does not decode (a stream_id that is not UTF-8) is
    logged and dropped; the Accept call stays open and the next answer on it
    is served."""
    from google.protobuf import wrappers_pb2  # noqa: PLC0415

    async with running_guest(pending_timeout=60) as guest:
        echo = await EchoService.start(guest.root / "t.sock")
        stub = await guest.connect()
        await bind(stub, {"fwd": guest.root / "a.sock"})
        host = HostStream(stub, guest.streams_ep, {"fwd": echo.endpoint})

        def garbage_first(request: pb.ConnectRequest) -> None:
            # Field 1 (stream_id, a string) as bytes that are not UTF-8.
            bad = wrappers_pb2.BytesValue(value=b"\xff\xfe")
            assert host._stream is not None
            host._stream.send_nowait(bad)  # type: ignore[arg-type]

        host.before_answer = garbage_first
        await host.open()
        try:
            for payload in (b"one", b"two"):
                answer = await roundtrip(guest.root / "a.sock", payload)
                assert answer == payload + trailer(payload)
            assert guest.service.stats()["fwd"].failed == {}
        finally:
            await host.close()
            await host.stop_relays()
            await echo.close()


async def test_a_flood_of_refused_connections_costs_a_bounded_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A container opening hundreds of connections that are refused (queue full)
    gets each one closed and counted, but the guest log holds only the first
    lines of the flood and, at shutdown, one summary of the rest."""
    caplog.set_level(logging.WARNING, logger="socketforward.guest")
    async with running_guest(pending_limit=1) as guest:
        stub = await guest.connect()
        await bind(stub, {"fwd": guest.root / "vm.sock"})
        ep = transport.UnixEndpoint(str(guest.root / "vm.sock"))
        socks = [await transport.connect(ep) for _ in range(300)]
        try:
            await until(lambda: guest.service.stats()["fwd"].failed.get("queue_full") == 299)
            await guest.service.shutdown()
        finally:
            for s in socks:
                s.close()
    closed = [m for m in caplog.messages if m.startswith("connection closed")]
    assert len(closed) <= 2 * 20  # queue_full and shutdown, the first 20 of each
    assert "log lines left out interval=" in caplog.text
    assert "queue_full=279" in caplog.text


async def test_connections_abandoned_in_the_queue_never_reach_the_host() -> None:
    """Containers that hang up while their connections wait for room on the
    host's Accept call are not announced to the host at all (no dial there):
    they are closed as withdrawn; the ones still there are served."""
    async with running_guest(max_unanswered_per_stream=1, pending_timeout=60) as guest:
        echo = await EchoService.start(guest.root / "t.sock")
        stub = await guest.connect()
        await bind(stub, {"fwd": guest.root / "a.sock"})
        silent = await HostStream(stub, guest.streams_ep, {}, answer="silent").open()
        ep = transport.UnixEndpoint(str(guest.root / "a.sock"))
        socks = [await transport.connect(ep) for _ in range(5)]
        try:
            await until(lambda: guest.service.pending == 5)
            for sock in socks[1:4]:
                sock.close()
            await silent.close()  # its one request goes back to the queue
            host = await HostStream(stub, guest.streams_ep, {"fwd": echo.endpoint}).open()
            try:
                for sock in (socks[0], socks[4]):
                    await asyncio.get_running_loop().sock_sendall(sock, b"hi")
                    sock.shutdown(socket.SHUT_WR)
                    async with asyncio.timeout(PATIENCE):
                        assert await read_to_eof(sock) == b"hi" + trailer(b"hi")
                assert len(host.received) == 2
                assert guest.service.stats()["fwd"].failed == {"withdrawn": 3}
            finally:
                await host.close()
                await host.stop_relays()
        finally:
            for sock in socks:
                sock.close()
            await echo.close()


async def test_fail_fast_closes_connections_at_once_while_no_host_is_connected() -> None:
    """`--fail-fast`: a VM client connecting while no host is connected gets its
    connection closed at once (counted no_host) instead of waiting up to the
    pending timeout; once a host is there it is served."""
    async with running_guest(fail_fast=True, pending_timeout=60) as guest:
        echo = await EchoService.start(guest.root / "t.sock")
        stub = await guest.connect()
        await bind(stub, {"fwd": guest.root / "a.sock"})
        ep = transport.UnixEndpoint(str(guest.root / "a.sock"))
        sock = await transport.connect(ep)
        with sock:
            async with asyncio.timeout(5):
                assert await read_to_eof(sock) == b""
        assert guest.service.stats()["fwd"].failed == {"no_host": 1}
        host = await HostStream(stub, guest.streams_ep, {"fwd": echo.endpoint}).open()
        try:
            await until(lambda: guest.service.accept_calls == 1)
            assert await roundtrip(guest.root / "a.sock", b"hi") == b"hi" + trailer(b"hi")
        finally:
            await host.close()
            await host.stop_relays()
            await echo.close()


# -- Dial (exposes) ----------------------------------------------------------------


async def test_dial_read_before_its_data_stream_waits_for_it_then_relays() -> None:
    """The host's Dial may be read before its data stream is registered (two
    sockets, either order): the guest waits for the stream, answers, relays to
    the VM socket, and gives the budget share back when the connection ends."""
    async with running_guest() as guest:
        echo = await EchoService.start(guest.root / "vm.sock")
        try:
            stub = await guest.connect()
            request = pb.DialRequest(
                stream_id="expose-1-a", expose_id="e", socket_path=str(guest.root / "vm.sock")
            )
            call = asyncio.create_task(stub.Dial(request, timeout=PATIENCE))
            await until(lambda: guest.service.budget().connections == 1)
            assert not call.done()  # waiting for the data stream
            data = await datastream.open_stream(guest.streams_ep, "expose-1-a")
            with data:
                await call
                await asyncio.get_running_loop().sock_sendall(data, b"hi")
                data.shutdown(socket.SHUT_WR)
                assert await read_to_eof(data) == b"hi" + trailer(b"hi")
            await until(lambda: guest.service.budget().connections == 0)
            assert guest.service.expose_stats()["e"].connected == 1
        finally:
            await echo.close()


async def test_a_waiting_dial_dropped_with_its_rpc_connection_gives_its_share_back() -> None:
    """A Dial still waiting for its data stream when the host's RPC connection
    drops ends with it: the host's call fails, and the guest gives the budget
    share back (nothing left open for a stream that will never come)."""
    async with running_guest() as guest:
        host_side, guest_side = socket.socketpair()
        serving = asyncio.create_task(guest.server.serve_connection(guest_side))
        client = await ttrpc.Client.connect(host_side)
        request = pb.DialRequest(
            stream_id="expose-2-b", expose_id="e", socket_path=str(guest.root / "vm.sock")
        )
        call = asyncio.create_task(SocketForwardStub(client).Dial(request, timeout=PATIENCE))
        await until(lambda: guest.service.budget().connections == 1)
        await client.close()
        with pytest.raises(ttrpc.TtrpcError):
            await call
        await until(lambda: guest.service.budget().connections == 0)
        await asyncio.wait_for(serving, PATIENCE)


@contextlib.asynccontextmanager
async def _answered_by_hand() -> AsyncIterator[tuple[Guest, HostStream]]:
    """A guest with forward "fwd" bound at vm.sock and a host Accept stream whose
    answers the test sends itself."""
    async with running_guest() as guest:
        stub = await guest.connect()
        await bind(stub, {"fwd": guest.root / "vm.sock"})
        host = await HostStream(stub, guest.streams_ep, {}, answer="silent").open()
        try:
            yield guest, host
        finally:
            await host.close()


async def test_an_answer_naming_a_pooled_stream_relays_on_that_stream() -> None:
    """A host of ours answers with a data stream it opened ahead of demand
    (docs/protocol.md 5.6): the container's bytes travel on it both ways."""
    loop = asyncio.get_running_loop()
    async with _answered_by_hand() as (guest, host):
        pooled = await datastream.open_stream(guest.streams_ep, POOLED_PREFIX + "a")
        client = await transport.connect(transport.UnixEndpoint(str(guest.root / "vm.sock")))
        with client, pooled:
            await loop.sock_sendall(client, b"ping")
            await host.wait_received(1)
            await host.send(
                pb.ConnectResult(
                    stream_id=host.received[0].stream_id, data_stream_id=POOLED_PREFIX + "a"
                )
            )
            async with asyncio.timeout(PATIENCE):
                assert await loop.sock_recv(pooled, 100) == b"ping"
                await loop.sock_sendall(pooled, b"pong")
                assert await loop.sock_recv(client, 100) == b"pong"
        assert guest.registry.stats().pooled == 0


async def test_a_pooled_stream_named_for_a_gone_connection_is_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An answer naming a pooled stream for a connection the guest does not hold
    closes that stream, so the host's relay on it ends instead of hanging; an
    answer naming a stream that is not a pooled one is logged and ignored, and
    the connection is served on its own stream id."""
    loop = asyncio.get_running_loop()
    async with _answered_by_hand() as (guest, host):
        with await datastream.open_stream(guest.streams_ep, POOLED_PREFIX + "late") as late:
            await host.send(
                pb.ConnectResult(
                    stream_id="socketfwd-1-gone", data_stream_id=POOLED_PREFIX + "late"
                )
            )
            async with asyncio.timeout(PATIENCE):
                assert await loop.sock_recv(late, 1) == b""
        client = await transport.connect(transport.UnixEndpoint(str(guest.root / "vm.sock")))
        with client:
            await loop.sock_sendall(client, b"ping")
            await host.wait_received(1)
            stream_id = host.received[0].stream_id
            await host.send(pb.ConnectResult(stream_id=stream_id, data_stream_id="not-pooled"))
            with await datastream.open_stream(guest.streams_ep, stream_id) as data:
                async with asyncio.timeout(PATIENCE):
                    assert await loop.sock_recv(data, 100) == b"ping"
        assert any("names no pooled stream" in r.getMessage() for r in caplog.records)


@contextlib.asynccontextmanager
async def _host_with_pool(tag: str) -> AsyncIterator[tuple[Guest, HostStream]]:
    """As _answered_by_hand, with a host that announces "fwd" and its pool *tag*."""
    async with running_guest(pooled=True) as guest:
        stub = await guest.connect()
        await bind(stub, {"fwd": guest.root / "vm.sock"})
        target = transport.UnixEndpoint(str(guest.root / "unused.sock"))
        host = await HostStream(
            stub, guest.streams_ep, {"fwd": target}, announce=True, answer="silent", pool_tag=tag
        ).open()
        try:
            yield guest, host
        finally:
            await host.close()


async def test_the_guest_picks_its_hosts_pooled_stream_and_relays_before_the_answer() -> None:
    """A host that announces its pool (docs/protocol.md 5.6): the request names
    one of that host's pooled streams (not another host's), the container's
    bytes are on it before any answer, and after the answer the reply flows
    back. An error answer instead closes the connection and the stream."""
    loop = asyncio.get_running_loop()
    async with _host_with_pool("t1") as (guest, host):
        other = await datastream.open_stream(guest.streams_ep, POOLED_PREFIX + "t2-1")
        ours = await datastream.open_stream(guest.streams_ep, POOLED_PREFIX + "t1-1")
        refused = await datastream.open_stream(guest.streams_ep, POOLED_PREFIX + "t1-2")
        client = await transport.connect(transport.UnixEndpoint(str(guest.root / "vm.sock")))
        with other, ours, refused, client:
            await loop.sock_sendall(client, b"ping")
            await host.wait_received(1)
            assert host.received[0].data_stream_id == POOLED_PREFIX + "t1-1"
            async with asyncio.timeout(PATIENCE):
                assert await loop.sock_recv(ours, 100) == b"ping"  # no answer yet
            await host.send(pb.ConnectResult(stream_id=host.received[0].stream_id))
            await loop.sock_sendall(ours, b"pong")
            async with asyncio.timeout(PATIENCE):
                assert await loop.sock_recv(client, 100) == b"pong"

            second = await transport.connect(transport.UnixEndpoint(str(guest.root / "vm.sock")))
            with second:
                await loop.sock_sendall(second, b"doomed")
                await host.wait_received(2)
                assert host.received[1].data_stream_id == POOLED_PREFIX + "t1-2"
                await host.send(
                    pb.ConnectResult(
                        stream_id=host.received[1].stream_id, error=HostError.DIAL.text()
                    )
                )
                async with asyncio.timeout(PATIENCE):
                    assert await loop.sock_recv(second, 100) == b""
                    assert await read_to_eof(refused) == b"doomed"
        assert guest.registry.stats().pooled == 1  # the other host's, untouched
        stats = guest.service.stats()["fwd"]
        assert (stats.connected, stats.failed) == (1, {"host_error": 1})


async def test_a_host_announcing_a_malformed_pool_tag_gets_no_picks() -> None:
    """A tag the guest cannot use as an id prefix: requests name no stream and
    the connection waits for the host's own stream, as before."""
    loop = asyncio.get_running_loop()
    async with _host_with_pool("t-1/../x") as (guest, host):
        with await datastream.open_stream(guest.streams_ep, POOLED_PREFIX + "t-1/../x-1"):
            client = await transport.connect(transport.UnixEndpoint(str(guest.root / "vm.sock")))
            with client:
                await loop.sock_sendall(client, b"ping")
                await host.wait_received(1)
                assert host.received[0].data_stream_id == ""
            assert guest.registry.stats().pooled == 1
