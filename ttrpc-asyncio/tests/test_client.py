"""Client addresses: the forms containerd prints are accepted as they are."""

from __future__ import annotations

from pathlib import Path

import pytest

import ttrpc_asyncio as ttrpc
from echo import echo_pb2, echo_ttrpc


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
