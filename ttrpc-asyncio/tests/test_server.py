"""Server behaviour over real sockets: shutdown, peer checks, slow consumers, deadlines."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable
from pathlib import Path

import pytest

import ttrpc_asyncio as ttrpc
from echo import echo_pb2, echo_ttrpc
from echo.service import EchoService
from ttrpc_asyncio._frame import Frame, FrameDecoder, encode_frame
from ttrpc_asyncio.proto import ttrpc_pb2

Req = echo_pb2.EchoRequest


def _listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    return sock


async def test_shutdown_lets_inflight_calls_finish_and_refuses_new(tmp_path: Path) -> None:
    """Graceful shutdown: a running call completes; afterwards nothing is served."""
    path = tmp_path / "s.sock"
    with _listener(path) as listener:
        server = ttrpc.Server()
        server.register(EchoService())
        server.start(listener)
        async with await ttrpc.Client.connect_unix(str(path)) as client:
            stub = echo_ttrpc.EchoStub(client)
            slow = asyncio.create_task(stub.Unary(Req(payload=b"slow", sleep_ms=300)))
            await asyncio.sleep(0.1)
            await server.shutdown(grace=5)
            assert (await slow).payload == b"slow"
            with pytest.raises(ttrpc.TtrpcError) as info:
                await stub.Unary(Req())
            assert info.value.code is ttrpc.Code.UNAVAILABLE


async def test_shutdown_cancels_calls_past_grace(tmp_path: Path) -> None:
    """A call still running after the grace period is cancelled; its caller gets UNAVAILABLE."""
    path = tmp_path / "s.sock"
    with _listener(path) as listener:
        server = ttrpc.Server()
        server.register(EchoService())
        server.start(listener)
        async with await ttrpc.Client.connect_unix(str(path)) as client:
            stub = echo_ttrpc.EchoStub(client)
            stuck = asyncio.create_task(stub.Unary(Req(sleep_ms=60_000)))
            await asyncio.sleep(0.1)
            await asyncio.wait_for(server.shutdown(grace=0.2), timeout=10)
            with pytest.raises(ttrpc.TtrpcError) as info:
                await asyncio.wait_for(stuck, timeout=10)
            assert info.value.code is ttrpc.Code.UNAVAILABLE


async def test_serve_single_dialed_connection() -> None:
    """A server can serve one socket it did not accept (the guest dials the host)."""
    ours, theirs = socket.socketpair()
    server = ttrpc.Server()
    server.register(EchoService())
    serving = asyncio.create_task(server.serve_connection(ours))
    async with await ttrpc.Client.connect(theirs) as client:
        resp = await echo_ttrpc.EchoStub(client).Unary(Req(payload=b"dialed"))
        assert resp.payload == b"dialed"
    await asyncio.wait_for(serving, timeout=5)


async def test_handler_exception_is_internal_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A handler bug answers INTERNAL and is logged; the connection keeps working."""

    class Broken(echo_ttrpc.EchoBase):
        async def Unary(
            self, request: echo_pb2.EchoRequest, context: ttrpc.CallContext
        ) -> echo_pb2.EchoResponse:
            if request.payload == b"boom":
                raise RuntimeError("kaput")
            return echo_pb2.EchoResponse(payload=request.payload)

    ours, theirs = socket.socketpair()
    server = ttrpc.Server()
    server.register(Broken())
    serving = asyncio.create_task(server.serve_connection(ours))
    async with await ttrpc.Client.connect(theirs) as client:
        stub = echo_ttrpc.EchoStub(client)
        with pytest.raises(ttrpc.TtrpcError) as info:
            await stub.Unary(Req(payload=b"boom"))
        assert info.value.code is ttrpc.Code.INTERNAL
        assert "kaput" in info.value.message
        assert (await stub.Unary(Req(payload=b"ok"))).payload == b"ok"
        # Methods the subclass does not override answer UNIMPLEMENTED.
        with pytest.raises(ttrpc.TtrpcError) as info:
            async with await stub.ServerStream(Req(count=1)) as stream:
                await stream.recv()
        assert info.value.code is ttrpc.Code.UNIMPLEMENTED
    await asyncio.wait_for(serving, timeout=5)
    assert "handler failed" in caplog.text


async def test_peer_credentials_checked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """require_same_user admits us; a server requiring another uid drops our
    connection before serving anything (the caller sees UNAVAILABLE)."""
    for requirement, admitted in (
        ({"require_same_user": True}, True),
        ({"require_uid_gid": (os.geteuid() + 1, None)}, False),
    ):
        path = tmp_path / f"s{admitted}.sock"
        with _listener(path) as listener:
            server = ttrpc.Server(**requirement)
            server.register(EchoService())
            server.start(listener)
            try:
                async with await ttrpc.Client.connect_unix(str(path)) as client:
                    stub = echo_ttrpc.EchoStub(client)
                    if admitted:
                        assert (await stub.Unary(Req(payload=b"me"))).payload == b"me"
                    else:
                        with pytest.raises(ttrpc.TtrpcError) as info:
                            await asyncio.wait_for(stub.Unary(Req()), timeout=10)
                        assert info.value.code is ttrpc.Code.UNAVAILABLE
            finally:
                await server.shutdown(grace=1)
    assert "does not match required uid" in caplog.text


async def test_stalled_stream_is_closed_without_blocking_others() -> None:
    """A handler that never reads its stream gets that stream closed after ~1 s
    of a full queue; other calls on the connection keep being served."""
    release = asyncio.Event()

    class Stalling(EchoService):
        async def Bidi(
            self, stream: ttrpc.ServerStream[echo_pb2.EchoRequest, echo_pb2.EchoResponse]
        ) -> None:
            await release.wait()

    ours, theirs = socket.socketpair()
    server = ttrpc.Server()
    server.register(Stalling())
    serving = asyncio.create_task(server.serve_connection(ours))
    async with await ttrpc.Client.connect(theirs) as client:
        stub = echo_ttrpc.EchoStub(client)
        async with await stub.Bidi() as stream:
            with pytest.raises((ttrpc.TtrpcError, ttrpc.StreamClosedError)):
                for _ in range(200):
                    await stream.send(Req(payload=b"x"))
                    await asyncio.sleep(0)
                await asyncio.wait_for(stream.recv(), timeout=10)
            assert (await stub.Unary(Req(payload=b"alive"))).payload == b"alive"
        release.set()
    await asyncio.wait_for(serving, timeout=5)


async def test_timeout_nano_alone_ends_the_handler() -> None:
    """A request's timeout_nano is its handler's deadline even when the caller
    keeps no timer of its own: the handler is cancelled, the call is answered
    DEADLINE_EXCEEDED, and the connection serves the next call."""
    cancelled = asyncio.Event()

    class Slow(echo_ttrpc.EchoBase):
        async def Unary(
            self, request: echo_pb2.EchoRequest, context: ttrpc.CallContext
        ) -> echo_pb2.EchoResponse:
            try:
                await asyncio.sleep(request.sleep_ms / 1000)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return echo_pb2.EchoResponse(payload=request.payload)

    ours, theirs = socket.socketpair()
    server = ttrpc.Server()
    server.register(Slow())
    serving = asyncio.create_task(server.serve_connection(ours))
    loop = asyncio.get_running_loop()
    theirs.setblocking(False)
    decoder = FrameDecoder()

    async def call(stream_id: int, request: Req, timeout_nano: int = 0) -> ttrpc_pb2.Response:
        data = ttrpc_pb2.Request(
            service=echo_ttrpc.EchoStub.SERVICE_NAME,
            method="Unary",
            payload=request.SerializeToString(),
            timeout_nano=timeout_nano,
        ).SerializeToString()
        await loop.sock_sendall(theirs, encode_frame(stream_id, 1, 0, data))
        while (frame := decoder.next_frame()) is None:
            decoder.receive_data(await asyncio.wait_for(loop.sock_recv(theirs, 65536), 10))
        assert isinstance(frame, Frame) and frame.stream_id == stream_id
        return ttrpc_pb2.Response.FromString(frame.data)

    late = await call(1, Req(payload=b"late", sleep_ms=60_000), timeout_nano=200_000_000)
    assert late.status.code == ttrpc.Code.DEADLINE_EXCEEDED
    assert cancelled.is_set()
    on_time = await call(3, Req(payload=b"next"), timeout_nano=10_000_000_000)
    assert on_time.status.code == ttrpc.Code.OK
    assert echo_pb2.EchoResponse.FromString(on_time.payload).payload == b"next"
    theirs.close()
    await asyncio.wait_for(serving, timeout=5)


class Immediate(echo_ttrpc.EchoBase):
    """Unary as a plain function: answers at once, or hands back an awaitable
    (a sleep asked for), or fails as asked."""

    def Unary(  # type: ignore[override]  # plain functions are served too (register)
        self, request: echo_pb2.EchoRequest, context: ttrpc.CallContext
    ) -> echo_pb2.EchoResponse | Awaitable[echo_pb2.EchoResponse]:
        if request.fail_code:
            raise ttrpc.TtrpcError(request.fail_code, request.fail_message)
        if request.payload == b"boom":
            raise RuntimeError("boom")
        if request.sleep_ms:
            return self._later(request)
        return echo_pb2.EchoResponse(payload=request.payload, seq=1)

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def _later(self, request: echo_pb2.EchoRequest) -> echo_pb2.EchoResponse:
        try:
            await asyncio.sleep(request.sleep_ms / 1000)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return echo_pb2.EchoResponse(payload=request.payload, seq=2)


async def test_plain_function_unary_handlers_answer_as_coroutines_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A unary handler written as a plain function is served like an async one:
    its answer, its error status, INTERNAL (logged) for a bug, and an awaitable
    it returns awaited with the call's deadline; the connection goes on."""
    ours, theirs = socket.socketpair()
    server = ttrpc.Server()
    service = Immediate()
    server.register(service)
    serving = asyncio.create_task(server.serve_connection(ours))
    async with await ttrpc.Client.connect(theirs) as client:
        stub = echo_ttrpc.EchoStub(client)
        assert (await stub.Unary(Req(payload=b"now"))).seq == 1
        assert (await stub.Unary(Req(payload=b"later", sleep_ms=10))).seq == 2
        with pytest.raises(ttrpc.TtrpcError) as info:
            await stub.Unary(Req(fail_code=5, fail_message="gone"))
        assert (info.value.code, info.value.message) == (ttrpc.Code.NOT_FOUND, "gone")
        with pytest.raises(ttrpc.TtrpcError) as info:
            await stub.Unary(Req(payload=b"boom"))
        assert info.value.code is ttrpc.Code.INTERNAL
        assert "handler failed" in caplog.text
        with pytest.raises(ttrpc.TtrpcError) as info:
            await stub.Unary(Req(payload=b"late", sleep_ms=60_000), timeout=0.2)
        assert info.value.code is ttrpc.Code.DEADLINE_EXCEEDED
        await asyncio.wait_for(service.cancelled.wait(), 10)  # the server's deadline too
        calls = [stub.Unary(Req(payload=b"%d" % i, sleep_ms=i % 2)) for i in range(50)]
        answers = await asyncio.gather(*calls)
        assert [a.payload for a in answers] == [b"%d" % i for i in range(50)]
    await asyncio.wait_for(serving, timeout=5)
