"""Python client against Python server over a real UNIX socket."""

from __future__ import annotations

import asyncio

import pytest

from socketforward import ttrpc
from tests.interop.gen import echo_pb2, echo_ttrpc

Req = echo_pb2.EchoRequest


async def test_unary_round_trip(client: ttrpc.Client) -> None:
    """A unary call returns the server's answer."""
    stub = echo_ttrpc.EchoStub(client)
    resp = await stub.Unary(Req(payload=b"hello"))
    assert (resp.payload, resp.seq) == (b"hello", 1)


async def test_metadata_reaches_handler(client: ttrpc.Client) -> None:
    """Metadata sent by the client is what the handler sees (keys lower-cased)."""
    stub = echo_ttrpc.EchoStub(client)
    resp = await stub.Unary(Req(), metadata={"K1": ["b", "a"], "k2": "c"})
    assert [(p.key, p.value) for p in resp.metadata] == [("k1", "a"), ("k1", "b"), ("k2", "c")]


async def test_server_stream(client: ttrpc.Client) -> None:
    """A server stream yields every message in order, then ends."""
    stub = echo_ttrpc.EchoStub(client)
    async with await stub.ServerStream(Req(payload=b"p", count=5)) as stream:
        got = [m.seq async for m in stream]
    assert got == [1, 2, 3, 4, 5]


async def test_client_stream(client: ttrpc.Client) -> None:
    """A client stream's messages all reach the handler; its answer comes back."""
    stub = echo_ttrpc.EchoStub(client)
    async with await stub.ClientStream() as stream:
        for part in (b"a", b"b", b"c"):
            await stream.send(Req(payload=part))
        await stream.close_send()
        resp = await stream.recv()
        assert resp is not None
        assert (resp.payload, resp.seq) == (b"abc", 3)
        assert await stream.recv() is None


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


async def test_bidi_many_messages_without_reading(client: ttrpc.Client) -> None:
    """1,000 messages sent before reading any: flow control, not loss or deadlock."""
    stub = echo_ttrpc.EchoStub(client)
    async with await stub.Bidi() as stream:

        async def sender() -> None:
            for i in range(1000):
                await stream.send(Req(payload=i.to_bytes(4, "big")))
            await stream.close_send()

        task = asyncio.create_task(sender())
        got = [int.from_bytes(m.payload, "big") async for m in stream]
        await task
    assert got == list(range(1000))


async def test_error_status_round_trips(client: ttrpc.Client) -> None:
    """A handler's TtrpcError reaches the caller with its code and message."""
    stub = echo_ttrpc.EchoStub(client)
    for code in ttrpc.Code:
        if code is ttrpc.Code.OK:
            continue
        with pytest.raises(ttrpc.TtrpcError) as info:
            await stub.Unary(Req(fail_code=code, fail_message=f"msg-{int(code)}"))
        assert (info.value.code, info.value.message) == (code, f"msg-{int(code)}")


async def test_deadline_exceeded(client: ttrpc.Client) -> None:
    """A call past its timeout fails with DEADLINE_EXCEEDED, and the connection still works."""
    stub = echo_ttrpc.EchoStub(client)
    with pytest.raises(ttrpc.TtrpcError) as info:
        await stub.Unary(Req(sleep_ms=5000), timeout=0.1)
    assert info.value.code is ttrpc.Code.DEADLINE_EXCEEDED
    assert (await stub.Unary(Req(payload=b"after"))).payload == b"after"


async def test_unknown_service_and_method(client: ttrpc.Client) -> None:
    """Unknown service or method: UNIMPLEMENTED."""
    with pytest.raises(ttrpc.TtrpcError) as info:
        await client.unary("no.such.Service", "Unary", Req(), echo_pb2.EchoResponse)
    assert info.value.code is ttrpc.Code.UNIMPLEMENTED
    with pytest.raises(ttrpc.TtrpcError) as info:
        await client.unary(echo_ttrpc.EchoStub.SERVICE_NAME, "Nope", Req(), echo_pb2.EchoResponse)
    assert info.value.code is ttrpc.Code.UNIMPLEMENTED


async def test_concurrent_calls_on_one_connection(client: ttrpc.Client) -> None:
    """100 concurrent calls on one connection each get their own answer."""
    stub = echo_ttrpc.EchoStub(client)
    resps = await asyncio.gather(*(stub.Unary(Req(payload=b"%d" % i)) for i in range(100)))
    assert [r.payload for r in resps] == [b"%d" % i for i in range(100)]
