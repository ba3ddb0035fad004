"""A real Python ttrpc server with the Echo service on a UNIX socket, and a client."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import ttrpc_asyncio as ttrpc
from echo.service import EchoService


@pytest.fixture
async def echo_server(tmp_path: Path) -> AsyncIterator[Path]:
    """Our Server serving Echo on <tmp>/py.sock; yields the socket path."""
    path = tmp_path / "py.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(128)
    server = ttrpc.Server()
    server.register(EchoService())
    server.start(listener)
    try:
        yield path
    finally:
        await server.shutdown(grace=1.0)
        listener.close()


@pytest.fixture
async def client(echo_server: Path) -> AsyncIterator[ttrpc.Client]:
    client = await ttrpc.Client.connect_unix(str(echo_server))
    async with client:
        yield client
