"""Client addresses (the forms containerd prints are accepted as they are) and
the client's own timeouts."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

import ttrpc_asyncio as ttrpc
from echo import echo_pb2, echo_ttrpc
from ttrpc_asyncio._frame import Frame, FrameDecoder, encode_frame
from ttrpc_asyncio.proto import ttrpc_pb2


@pytest.mark.parametrize("form", ["unix://{}", "unix:{}", "{}", "path"])
async def test_connect_unix_takes_containerd_addresses(echo_server: Path, form: str) -> None:
    """``unix:///abs/path``, ``unix:path``, a plain path and a Path object all
    reach the same server."""
    address: str | Path = echo_server if form == "path" else form.format(echo_server)
    async with await ttrpc.Client.connect_unix(address) as client:
        response = await echo_ttrpc.EchoStub(client).Unary(echo_pb2.EchoRequest(payload=b"hi"))
    assert response.payload == b"hi"


async def test_connect_unix_relative_unix_address(
    echo_server: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``unix:name`` without slashes is a path relative to the working directory."""
    monkeypatch.chdir(echo_server.parent)
    async with await ttrpc.Client.connect_unix(f"unix:{echo_server.name}") as client:
        response = await echo_ttrpc.EchoStub(client).Unary(echo_pb2.EchoRequest(payload=b"rel"))
    assert response.payload == b"rel"


async def test_connect_unix_missing_socket_raises_oserror(tmp_path: Path) -> None:
    """An address whose socket is not there fails with the OS error (and leaves
    no socket open, which the fd check around every test would notice)."""
    with pytest.raises(FileNotFoundError):
        await ttrpc.Client.connect_unix(f"unix://{tmp_path}/absent.sock")


async def test_unary_timeout_holds_when_the_server_never_answers() -> None:
    """A unary call's timeout is kept by the client too: against a server that
    reads and never answers, DEADLINE_EXCEEDED; the connection stays usable and
    a late answer for the abandoned call is dropped."""
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    theirs.setblocking(False)
    async with await ttrpc.Client.connect(ours) as client:
        stub = echo_ttrpc.EchoStub(client)
        with pytest.raises(ttrpc.TtrpcError) as info:
            await stub.Unary(echo_pb2.EchoRequest(payload=b"late"), timeout=0.2)
        assert info.value.code is ttrpc.Code.DEADLINE_EXCEEDED
        # The silent server answers after all, then serves the next call.
        decoder = FrameDecoder()
        decoder.receive_data(await loop.sock_recv(theirs, 65536))
        first = decoder.next_frame()
        assert isinstance(first, Frame)
        request = ttrpc_pb2.Request.FromString(first.data)
        assert request.timeout_nano == 200_000_000
        answer = echo_pb2.EchoResponse(payload=b"too late").SerializeToString()
        late = ttrpc_pb2.Response(payload=answer).SerializeToString()
        await loop.sock_sendall(theirs, encode_frame(first.stream_id, 2, 0, late))
        call = asyncio.ensure_future(stub.Unary(echo_pb2.EchoRequest(payload=b"next")))
        while (second := decoder.next_frame()) is None:
            decoder.receive_data(await loop.sock_recv(theirs, 65536))
        assert isinstance(second, Frame)
        answer = echo_pb2.EchoResponse(payload=b"next").SerializeToString()
        on_time = ttrpc_pb2.Response(payload=answer).SerializeToString()
        await loop.sock_sendall(theirs, encode_frame(second.stream_id, 2, 0, on_time))
        assert (await asyncio.wait_for(call, 10)).payload == b"next"
    theirs.close()
