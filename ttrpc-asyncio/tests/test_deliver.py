"""``deliver``: a stream's messages handed to a callback as the connection reads
them, instead of a task woken per message. Real socket pairs; the Echo stubs
for the client and the Echo service with a Bidi handler of the test's own."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

import ttrpc_asyncio as ttrpc
from echo import echo_pb2, echo_ttrpc
from echo.service import EchoService

pytestmark = pytest.mark.timeout(30)

Req = echo_pb2.EchoRequest
Resp = echo_pb2.EchoResponse
Stream = ttrpc.ServerStream[Req, Resp]
Handler = Callable[[Stream], Awaitable[None]]


class BidiService(EchoService):
    """Echo with its Bidi handled by the test."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def Bidi(self, stream: Stream) -> None:
        await self.handler(stream)


async def serve(handler: Handler) -> tuple[ttrpc.Client, asyncio.Task[None]]:
    ours, theirs = socket.socketpair()
    server = ttrpc.Server()
    server.register(BidiService(handler))
    serving = asyncio.create_task(server.serve_connection(ours))
    return await ttrpc.Client.connect(theirs), serving


def undecodable(exc: ttrpc.MessageDecodeError) -> None:
    pytest.fail(f"every message decodes here: {exc}")


async def bidi(client: ttrpc.Client) -> ttrpc.ClientStream[Req, Resp]:
    return await echo_ttrpc.EchoStub(client).Bidi()


async def test_messages_reach_the_callback_in_order_outside_any_task() -> None:
    """Each message the client sends is handed to the handler's callback in
    order, from the connection's read itself (no task runs it), and ``recv``
    returns None once the client closes its side."""
    seen: list[tuple[bytes, bool]] = []
    delivering = asyncio.Event()

    async def handler(stream: Stream) -> None:
        def on_message(request: Req) -> None:
            seen.append((request.payload, asyncio.current_task() is None))

        stream.deliver(on_message, undecodable)
        delivering.set()
        assert await stream.recv() is None
        await stream.send(Resp(seq=len(seen)))

    client, serving = await serve(handler)
    async with client:
        stream = await bidi(client)
        async with stream:
            await stream.send(Req(payload=b"0"))
            await asyncio.wait_for(delivering.wait(), 5)
            for i in range(1, 100):
                await stream.send(Req(payload=b"%d" % i))
            await stream.close_send()
            answer = await stream.recv()
            assert answer is not None and answer.seq == 100
    await asyncio.wait_for(serving, 5)
    assert [payload for payload, _ in seen] == [b"%d" % i for i in range(100)]
    # The first may have been queued before deliver(), and handed over from the handler.
    assert all(outside for _, outside in seen[1:])


async def test_messages_queued_before_deliver_come_first_and_a_full_queue_reads_again() -> None:
    """Messages that arrived before ``deliver`` (past the 64 a stream queues,
    so the connection stopped reading) are handed over first, in order, and
    the connection reads again: every later message arrives too."""
    seen: list[bytes] = []
    queued = asyncio.Event()

    async def handler(stream: Stream) -> None:
        await queued.wait()
        stream.deliver(lambda request: seen.append(request.payload), undecodable)
        assert await stream.recv() is None
        await stream.send(Resp(seq=len(seen)))

    client, serving = await serve(handler)
    async with client:
        stream = await bidi(client)
        async with stream:
            for i in range(200):
                stream.send_nowait(Req(payload=b"%d" % i))
            await asyncio.sleep(0.2)  # the server's queue fills; it stops reading
            queued.set()
            await stream.close_send()
            answer = await asyncio.wait_for(stream.recv(), 10)
            assert answer is not None and answer.seq == 200
    await asyncio.wait_for(serving, 5)
    assert seen == [b"%d" % i for i in range(200)]


async def test_an_exception_in_the_callback_ends_the_call_with_internal() -> None:
    """A callback that raises ends the stream with that error: the handler's
    ``recv`` raises it and the client's call fails INTERNAL, naming it."""

    async def handler(stream: Stream) -> None:
        def on_message(request: Req) -> None:
            if request.payload == b"bad":
                raise ValueError("no bad payloads")

        stream.deliver(on_message, undecodable)
        await stream.recv()

    client, serving = await serve(handler)
    async with client:
        stream = await bidi(client)
        async with stream:
            await stream.send(Req(payload=b"fine"))
            await stream.send(Req(payload=b"bad"))
            with pytest.raises(ttrpc.TtrpcError) as info:
                await asyncio.wait_for(stream.recv(), 5)
    assert info.value.code == ttrpc.Code.INTERNAL
    assert "no bad payloads" in info.value.message
    await asyncio.wait_for(serving, 5)


@pytest.fixture
async def echo_client() -> AsyncIterator[ttrpc.Client]:
    client, serving = await serve(EchoService().Bidi)
    async with client:
        yield client
    await asyncio.wait_for(serving, 5)


async def test_client_side_delivery_and_back_to_recv(echo_client: ttrpc.Client) -> None:
    """On the client side too: the server's messages reach the callback as they
    are read; an undecodable one goes to its own callback and the next still
    arrives; after ``stop_delivery`` they queue for ``recv`` again."""
    stream: ttrpc.ClientStream[Req, echo_pb2.Pair] = await echo_client.stream(
        echo_ttrpc.EchoStub.SERVICE_NAME,
        "Bidi",
        echo_pb2.Pair,  # field 1 a string where EchoResponse has payload bytes
        client_streaming=True,
        server_streaming=True,
    )
    got: list[str] = []
    bad: list[bytes] = []
    three = asyncio.Event()

    def on_message(pair: echo_pb2.Pair) -> None:
        got.append(pair.key)
        if len(got) == 2:
            three.set()

    async with stream:
        stream.deliver(on_message, lambda exc: bad.append(exc.data))
        for payload in (b"one", b"\xff\xfe", b"two"):
            await stream.send(Req(payload=payload))
        await asyncio.wait_for(three.wait(), 5)
        assert got == ["one", "two"]
        assert len(bad) == 1 and b"\xff\xfe" in bad[0]
        stream.stop_delivery()
        await stream.send(Req(payload=b"three"))
        following = await asyncio.wait_for(stream.recv(), 5)
        assert following is not None and following.key == "three"
        await stream.close_send()
        assert await stream.recv() is None
    assert got == ["one", "two"]


async def test_ended_waits_for_the_end_and_leaves_messages_for_recv(
    echo_client: ttrpc.Client,
) -> None:
    """``ended`` returns once the server has ended the call, without taking the
    messages still queued: ``recv`` gets each of them, then None."""
    stream = await bidi(echo_client)
    async with stream:
        for payload in (b"a", b"b"):
            await stream.send(Req(payload=payload))
        await stream.close_send()
        await asyncio.wait_for(stream.ended(), 5)
        first, second = await stream.recv(), await stream.recv()
        assert first is not None and first.payload == b"a"
        assert second is not None and second.payload == b"b"
        assert await stream.recv() is None


async def test_ended_raises_the_error_the_stream_ended_with() -> None:
    """A call the server fails: ``ended`` raises the status it ended with."""

    async def handler(stream: Stream) -> None:
        raise ttrpc.TtrpcError(ttrpc.Code.PERMISSION_DENIED, "not you")

    client, serving = await serve(handler)
    async with client:
        stream = await bidi(client)
        async with stream:
            with pytest.raises(ttrpc.TtrpcError) as info:
                await asyncio.wait_for(stream.ended(), 5)
    assert info.value.code == ttrpc.Code.PERMISSION_DENIED
    await asyncio.wait_for(serving, 5)
