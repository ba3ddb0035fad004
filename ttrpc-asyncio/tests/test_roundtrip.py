"""Python client against Python server over a real UNIX socket (the call kinds,
errors and limits are covered for both our server and Go's in tests/interop)."""

from __future__ import annotations

import asyncio
import socket

import pytest

import ttrpc_asyncio as ttrpc
from echo import echo_pb2, echo_ttrpc
from echo.service import EchoService

Req = echo_pb2.EchoRequest


async def test_metadata_reaches_handler(client: ttrpc.Client) -> None:
    """Metadata sent by the client is what the handler sees (keys lower-cased)."""
    stub = echo_ttrpc.EchoStub(client)
    resp = await stub.Unary(Req(), metadata={"K1": ["b", "a"], "k2": "c"})
    assert [(p.key, p.value) for p in resp.metadata] == [("k1", "a"), ("k1", "b"), ("k2", "c")]


async def test_bidi_interleaved(client: ttrpc.Client) -> None:
    """A bidi stream echoes each message as it is sent, then ends after close_send."""
    stub = echo_ttrpc.EchoStub(client)
    async with await stub.Bidi() as stream:
        for i in range(5):
            await stream.send(Req(payload=str(i).encode()))
            resp = await stream.recv()
            assert resp is not None and resp.payload == str(i).encode()
        await stream.close_send()
        assert await stream.recv() is None


def test_works_on_uvloop() -> None:
    """Client and server run on uvloop too (the fast loop the CLI uses when installed)."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> list[int]:
        ours, theirs = socket.socketpair()
        server = ttrpc.Server()
        server.register(EchoService())
        serving = asyncio.create_task(server.serve_connection(ours))
        async with await ttrpc.Client.connect(theirs) as client:
            stub = echo_ttrpc.EchoStub(client)
            assert (await stub.Unary(Req(payload=b"uv"))).payload == b"uv"
            async with await stub.ServerStream(Req(count=3)) as stream:
                seqs = [m.seq async for m in stream]
        await asyncio.wait_for(serving, timeout=5)
        return seqs

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario()) == [1, 2, 3]


async def test_closing_a_stream_ends_the_server_handler() -> None:
    """Leaving `async with` on an open bidi call tells the server: its handler
    ends (the same connection then serves new calls as before)."""
    ended = asyncio.Event()

    class Watching(EchoService):
        async def Bidi(
            self, stream: ttrpc.ServerStream[echo_pb2.EchoRequest, echo_pb2.EchoResponse]
        ) -> None:
            try:
                await super().Bidi(stream)
            finally:
                ended.set()

    ours, theirs = socket.socketpair()
    server = ttrpc.Server()
    server.register(Watching())
    serving = asyncio.create_task(server.serve_connection(ours))
    async with await ttrpc.Client.connect(theirs) as client:
        stub = echo_ttrpc.EchoStub(client)
        async with await stub.Bidi() as stream:
            await stream.send(Req(payload=b"one"))
            assert (await stream.recv()) is not None
        await asyncio.wait_for(ended.wait(), timeout=10)
        assert (await stub.Unary(Req(payload=b"next"))).payload == b"next"
    await asyncio.wait_for(serving, timeout=5)


async def test_send_nowait_delivers_in_order_both_ways() -> None:
    """send_nowait (no await, as the guest sends ConnectRequests) delivers every
    message in order, from the client and from a server handler; after the
    connection is gone it raises instead of dropping silently."""

    class NowaitEcho(EchoService):
        async def Bidi(
            self, stream: ttrpc.ServerStream[echo_pb2.EchoRequest, echo_pb2.EchoResponse]
        ) -> None:
            async for req in stream:
                stream.send_nowait(echo_pb2.EchoResponse(payload=req.payload))

    ours, theirs = socket.socketpair()
    server = ttrpc.Server()
    server.register(NowaitEcho())
    serving = asyncio.create_task(server.serve_connection(ours))
    async with await ttrpc.Client.connect(theirs) as client:
        stub = echo_ttrpc.EchoStub(client)
        async with await stub.Bidi() as stream:
            for i in range(200):
                stream.send_nowait(Req(payload=b"%d" % i))
            got = [(await stream.recv()) for _ in range(200)]
            assert [m.payload for m in got if m is not None] == [b"%d" % i for i in range(200)]
            await client.close()
            with pytest.raises((ttrpc.TtrpcError, ttrpc.StreamClosedError)):
                stream.send_nowait(Req(payload=b"late"))
    await asyncio.wait_for(serving, timeout=5)


async def test_close_cuts_a_peer_that_stopped_reading() -> None:
    """A server that stopped reading (a frozen VM) cannot hold the client's close
    up: after the close timeout the connection is cut, and the calls still
    waiting fail with UNAVAILABLE instead of hanging."""
    ours, theirs = socket.socketpair()
    with theirs:
        client = await ttrpc.Client.connect(ours)
        stub = echo_ttrpc.EchoStub(client)
        calls = [asyncio.create_task(stub.Unary(Req(payload=bytes(1 << 20)))) for _ in range(8)]
        await asyncio.sleep(0.1)  # 8 MiB written, the peer reads none of it
        assert not any(call.done() for call in calls)
        await asyncio.wait_for(client.close(timeout=0.2), 10)
        for call in calls:
            with pytest.raises(ttrpc.TtrpcError) as info:
                await call
            assert info.value.code == ttrpc.Code.UNAVAILABLE


async def test_an_undecodable_message_fails_alone_and_the_stream_goes_on(
    client: ttrpc.Client,
) -> None:
    """A streamed message that does not decode as the expected type (here a
    string field that is not UTF-8) raises MessageDecodeError, an INTERNAL
    TtrpcError carrying the raw bytes, for that message only: the next receive
    on the same stream returns the next message."""
    stream: ttrpc.ClientStream[echo_pb2.EchoRequest, echo_pb2.Pair] = await client.stream(
        echo_ttrpc.EchoStub.SERVICE_NAME,
        "Bidi",
        echo_pb2.Pair,  # field 1 a string where EchoResponse has payload bytes
        client_streaming=True,
        server_streaming=True,
    )
    async with stream:
        await stream.send(Req(payload=b"\xff\xfe"))
        await stream.send(Req(payload=b"fine"))
        with pytest.raises(ttrpc.MessageDecodeError) as caught:
            await stream.recv()
        assert caught.value.code == ttrpc.Code.INTERNAL
        assert b"\xff\xfe" in caught.value.data
        assert "Pair" in str(caught.value)
        following = await stream.recv()
        assert following is not None and following.key == "fine"
        await stream.close_send()
        assert await stream.recv() is None
