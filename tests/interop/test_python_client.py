"""Our Python client against the Go server (containerd/ttrpc v1.2.9) and against
our own server: the same assertions must hold for both."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import ttrpc_asyncio as ttrpc
from echo import echo_pb2, echo_ttrpc
from tests.interop.peers import peer_server
from ttrpc_asyncio._frame import MAX_DATA_LENGTH, Frame, FrameDecoder, encode_header
from ttrpc_asyncio.proto import ttrpc_pb2

Req = echo_pb2.EchoRequest
SERVICE = echo_ttrpc.EchoStub.SERVICE_NAME


SERVERS = {"go": "go_server", "rust": "rust_server", "python": "echo_server"}


@pytest.fixture(params=list(SERVERS))
def server_path(request: pytest.FixtureRequest) -> Path:
    """The socket of a Go (containerd/ttrpc), Rust (ttrpc-rust) or Python Echo server."""
    path: Path = request.getfixturevalue(SERVERS[request.param])
    return path


@pytest.fixture(params=["go", "python"])
def reference_or_ours(request: pytest.FixtureRequest) -> Path:
    """Go's server or ours: raw-frame cases compare our answers with the reference's."""
    path: Path = request.getfixturevalue(SERVERS[request.param])
    return path


@pytest.fixture
async def stub(server_path: Path) -> AsyncIterator[echo_ttrpc.EchoStub]:
    client = await ttrpc.Client.connect_unix(str(server_path))
    async with client:
        yield echo_ttrpc.EchoStub(client)


async def test_unary(stub: echo_ttrpc.EchoStub) -> None:
    """Unary round trip."""
    resp = await stub.Unary(Req(payload=b"hello"))
    assert (resp.payload, resp.seq) == (b"hello", 1)


async def test_metadata(stub: echo_ttrpc.EchoStub) -> None:
    """Metadata arrives at the server, repeated values kept."""
    resp = await stub.Unary(Req(), metadata={"k1": ["a", "b"], "k2": "c"})
    assert [(p.key, p.value) for p in resp.metadata] == [("k1", "a"), ("k1", "b"), ("k2", "c")]


async def test_metadata_on_streams(stub: echo_ttrpc.EchoStub) -> None:
    """Metadata sent when opening a stream reaches the handler (SocketForward's
    Accept uses it to announce forward ids)."""
    md = {"socketforward-forward-ids": "a,b"}
    want = [("socketforward-forward-ids", "a,b")]
    async with await stub.ClientStream(metadata=md) as stream:
        await stream.close_send()
        resp = await stream.recv()
    assert resp is not None
    assert [(p.key, p.value) for p in resp.metadata] == want
    async with await stub.ServerStream(Req(count=2), metadata=md) as stream:
        assert [[(p.key, p.value) for p in m.metadata] async for m in stream] == [want, want]
    async with await stub.Bidi(metadata=md) as stream:
        await stream.send(Req(payload=b"b"))
        resp = await stream.recv()
        assert resp is not None and [(p.key, p.value) for p in resp.metadata] == want


async def test_server_stream(stub: echo_ttrpc.EchoStub) -> None:
    """Server stream: all messages, in order, then a clean end; zero messages too."""
    async with await stub.ServerStream(Req(payload=b"p", count=5)) as stream:
        assert [m.seq async for m in stream] == [1, 2, 3, 4, 5]
    async with await stub.ServerStream(Req(count=0)) as stream:
        assert await stream.recv() is None


async def test_server_stream_error_after_messages(stub: echo_ttrpc.EchoStub) -> None:
    """A server stream that fails after 2 messages delivers both, then the status."""
    async with await stub.ServerStream(Req(count=2, fail_code=9, fail_message="late")) as stream:
        assert (await stream.recv()) is not None
        assert (await stream.recv()) is not None
        with pytest.raises(ttrpc.TtrpcError) as info:
            await stream.recv()
    assert (info.value.code, info.value.message) == (ttrpc.Code.FAILED_PRECONDITION, "late")


async def test_client_stream(stub: echo_ttrpc.EchoStub) -> None:
    """Client stream: the server sees every message; an empty stream works too."""
    async with await stub.ClientStream() as stream:
        for part in (b"a", b"b", b"c"):
            await stream.send(Req(payload=part))
        await stream.close_send()
        resp = await stream.recv()
    assert resp is not None and (resp.payload, resp.seq) == (b"abc", 3)
    async with await stub.ClientStream() as stream:
        await stream.close_send()
        resp = await stream.recv()
    assert resp is not None and (resp.payload, resp.seq) == (b"", 0)


async def test_bidi_1000_each_way(stub: echo_ttrpc.EchoStub) -> None:
    """1,000 messages each way on one bidi stream, in order."""
    async with await stub.Bidi() as stream:

        async def sender() -> None:
            for i in range(1000):
                await stream.send(Req(payload=i.to_bytes(4, "big")))
            await stream.close_send()

        task = asyncio.create_task(sender())
        got = [(int.from_bytes(m.payload, "big"), m.seq) async for m in stream]
        await task
    assert got == [(i, i + 1) for i in range(1000)]


async def test_bidi_error_ends_stream(stub: echo_ttrpc.EchoStub) -> None:
    """A bidi handler failing mid-stream ends the stream with its status."""
    async with await stub.Bidi() as stream:
        await stream.send(Req(payload=b"ok"))
        assert (await stream.recv()) is not None
        await stream.send(Req(fail_code=5, fail_message="gone"))
        with pytest.raises(ttrpc.TtrpcError) as info:
            await stream.recv()
    assert info.value.code is ttrpc.Code.NOT_FOUND


async def test_deadline(stub: echo_ttrpc.EchoStub) -> None:
    """timeout_nano is the handler's deadline: DEADLINE_EXCEEDED well before the sleep ends."""
    started = time.monotonic()
    with pytest.raises(ttrpc.TtrpcError) as info:
        await stub.Unary(Req(sleep_ms=5000), timeout=0.2)
    assert info.value.code is ttrpc.Code.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 4


async def test_unimplemented(
    stub: echo_ttrpc.EchoStub, server_path: Path, request: pytest.FixtureRequest
) -> None:
    """Unknown service and unknown method: UNIMPLEMENTED (ttrpc-rust 0.8 answers an
    unknown service with INVALID_ARGUMENT instead; the client reports what came)."""
    rust = request.node.callspec.params["server_path"] == "rust"
    unknown_service = ttrpc.Code.INVALID_ARGUMENT if rust else ttrpc.Code.UNIMPLEMENTED
    client = await ttrpc.Client.connect_unix(str(server_path))
    async with client:
        for service, method, code in (
            ("no.such.Service", "Unary", unknown_service),
            (SERVICE, "Nope", ttrpc.Code.UNIMPLEMENTED),
        ):
            with pytest.raises(ttrpc.TtrpcError) as info:
                await client.unary(service, method, Req(), echo_pb2.EchoResponse)
            assert info.value.code is code, info.value


async def test_every_error_code(stub: echo_ttrpc.EchoStub) -> None:
    """Each gRPC code 1..16 round-trips with its message."""
    for code in range(1, 17):
        with pytest.raises(ttrpc.TtrpcError) as info:
            await stub.Unary(Req(fail_code=code, fail_message=f"msg-{code}"))
        assert (int(info.value.code), info.value.message) == (code, f"msg-{code}")


def _request_frame_payload_size() -> int:
    """Payload size that makes the Request envelope exactly MAX_DATA_LENGTH bytes."""
    size = MAX_DATA_LENGTH - 64
    while True:
        inner = Req(payload=b"x" * size).SerializeToString()
        envelope = ttrpc_pb2.Request(service=SERVICE, method="Unary", payload=inner)
        over = envelope.ByteSize() - MAX_DATA_LENGTH
        if over == 0:
            return size
        size -= over


async def test_max_frame_accepted_then_oversize_refused(stub: echo_ttrpc.EchoStub) -> None:
    """A frame of exactly 4 MiB goes through; a bigger one is refused with
    RESOURCE_EXHAUSTED before sending, and the connection keeps working."""
    size = _request_frame_payload_size()
    resp = await stub.Unary(Req(payload=b"x" * size))
    assert len(resp.payload) == size
    with pytest.raises(ttrpc.TtrpcError) as info:
        await stub.Unary(Req(payload=b"x" * MAX_DATA_LENGTH))
    assert info.value.code is ttrpc.Code.RESOURCE_EXHAUSTED
    assert (await stub.Unary(Req(payload=b"still"))).payload == b"still"


async def test_100_concurrent_calls(stub: echo_ttrpc.EchoStub) -> None:
    """100 concurrent calls on one connection, each answered correctly."""
    resps = await asyncio.gather(*(stub.Unary(Req(payload=b"%d" % i)) for i in range(100)))
    assert [r.payload for r in resps] == [b"%d" % i for i in range(100)]


async def test_pending_calls_fail_when_server_goes_away(go_peer: Path, tmp_path: Path) -> None:
    """Calls in flight get UNAVAILABLE when the connection drops; nothing hangs."""
    sock = tmp_path / "dying.sock"
    with peer_server(go_peer, sock, tmp_path / "log") as proc:
        client = await ttrpc.Client.connect_unix(str(sock))
        async with client:
            stub = echo_ttrpc.EchoStub(client)
            calls = [asyncio.create_task(stub.Unary(Req(sleep_ms=10_000))) for _ in range(3)]
            await asyncio.sleep(0.2)
            proc.kill()
            results = await asyncio.wait_for(
                asyncio.gather(*calls, return_exceptions=True), timeout=10
            )
            for result in results:
                assert isinstance(result, ttrpc.TtrpcError)
                assert result.code is ttrpc.Code.UNAVAILABLE
            with pytest.raises(ttrpc.TtrpcError):
                await stub.Unary(Req())


# -- raw frames: what the server does with frames a well-behaved client never sends --


def _raw_request(stream_id: int, flags: int = 0, payload: bytes = b"") -> bytes:
    body = ttrpc_pb2.Request(service=SERVICE, method="Unary", payload=payload).SerializeToString()
    return encode_header(len(body), stream_id, 1, flags) + body


def _read_frames(sock: socket.socket, count: int) -> list[tuple[int, int, int, bytes]]:
    decoder = FrameDecoder()
    frames: list[tuple[int, int, int, bytes]] = []
    while len(frames) < count:
        chunk = sock.recv(1 << 16)
        assert chunk, "server closed the connection"
        decoder.receive_data(chunk)
        while (frame := decoder.next_frame()) is not None:
            assert isinstance(frame, Frame), frame
            frames.append((frame.stream_id, frame.type, frame.flags, frame.data))
    return frames


def _status(data: bytes) -> tuple[int, str]:
    response = ttrpc_pb2.Response.FromString(data)
    return response.status.code, response.status.message


RAW_CASES = [
    # (what is sent, stream id answered, expected code, expected message)
    pytest.param(
        [encode_header(MAX_DATA_LENGTH + 1, 1, 1, 0) + b"\0" * (MAX_DATA_LENGTH + 1)],
        1, 8, "message length 4194305 exceed maximum message size of 4194304", id="oversize",
    ),
    pytest.param([_raw_request(2)], 2, 3, "StreamID must be odd for client initiated streams",
                 id="even-id"),
    pytest.param([_raw_request(5, payload=Req(sleep_ms=300).SerializeToString()),
                  _raw_request(3)],
                 3, 3, "StreamID cannot be re-used and must increment", id="reused-id"),
    pytest.param([encode_header(0, 7, 3, 0)], 7, 3, "StreamID is no longer active",
                 id="data-unknown-stream"),
]  # fmt: skip


@pytest.mark.parametrize(("frames", "answered", "code", "message"), RAW_CASES)
async def test_server_rejects_bad_frame_and_stays_usable(
    reference_or_ours: Path, frames: list[bytes], answered: int, code: int, message: str
) -> None:
    """A bad frame gets a status on its own stream; the next call on the same
    connection still works (Go and our server answer the same)."""

    def exchange() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(reference_or_ours))
            for frame in frames:
                sock.sendall(frame)
            answers = {sid: data for sid, _, _, data in _read_frames(sock, 1)}
            assert _status(answers[answered]) == (code, message)
            follow_up = 101
            sock.sendall(_raw_request(follow_up, payload=Req(payload=b"ok").SerializeToString()))
            frames_back = _read_frames(sock, 2 if answered == 3 else 1)
            by_id = {sid: data for sid, _, _, data in frames_back}
            response = ttrpc_pb2.Response.FromString(by_id[follow_up])
            assert response.status.code == 0
            assert echo_pb2.EchoResponse.FromString(response.payload).payload == b"ok"

    await asyncio.to_thread(exchange)


async def test_close_frame_with_data_rejected(reference_or_ours: Path) -> None:
    """A remote-closed Data frame that carries data is refused with INVALID_ARGUMENT."""

    def exchange() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(reference_or_ours))
            body = ttrpc_pb2.Request(service=SERVICE, method="ClientStream").SerializeToString()
            sock.sendall(encode_header(len(body), 1, 1, 0x2) + body)
            data = Req(payload=b"z").SerializeToString()
            sock.sendall(encode_header(len(data), 1, 3, 0x1) + data)
            sid, type_, _, payload = _read_frames(sock, 1)[0]
            assert (sid, type_) == (1, 2)
            assert _status(payload) == (3, "data close message cannot include data")

    await asyncio.to_thread(exchange)
