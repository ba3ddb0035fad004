"""Exposes (docs/protocol.md 4.10) under exhaustion, in one event loop: a Host
and a Guest over ``unix:`` endpoints, with EMFILE injected where sockets are
made. The client that hit it is closed at once and counted; the next one is
served; no count or budget share is left behind."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from socketforward import Expose, Guest, Host, transport
from tests.processes import echo_round_trip, echo_server, embedded_endpoints

pytestmark = pytest.mark.timeout(60)


class Faults:
    """``transport._new_socket`` failing with EMFILE on the calls *fail* picks
    (counted from 1 once armed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: Callable[[int], bool]) -> None:
        self.armed = False
        self.calls = 0
        real = transport._new_socket

        def new_socket(family: int) -> socket.socket:
            if self.armed:
                self.calls += 1
                if fail(self.calls):
                    raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return real(family)

        monkeypatch.setattr(transport, "_new_socket", new_socket)


@asynccontextmanager
async def exposed(tmp: Path, stream_pool: int = 0) -> AsyncIterator[tuple[Host, Guest, Path]]:
    """A host exposing an echo service of the guest's. No pooled streams unless
    asked: each client then makes its sockets in a known order (the data
    stream first, then the guest's dial)."""
    rpc, streams = embedded_endpoints(tmp)
    vm_service, host_path = tmp / "vm-echo.sock", tmp / "host" / "echo.sock"
    async with (
        await echo_server(vm_service),
        Host(
            rpc_listen=rpc,
            streams=streams,
            exposes=[Expose("e", str(vm_service), str(host_path))],
            stream_pool=stream_pool,
        ) as host,
        Guest(rpc_dial=rpc, streams=streams) as guest,
    ):
        async with asyncio.timeout(30):
            await host.wait_connected()
        yield host, guest, host_path


async def _refused(path: Path) -> bool:
    """The client is closed without an answer (EOF, or a reset: it had sent a
    byte nobody read)."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(b"x")
        try:
            return await asyncio.wait_for(reader.read(), 10) == b""
        except ConnectionResetError:
            return True
    finally:
        writer.close()


async def _settled(host: Host, guest: Guest) -> None:
    async with asyncio.timeout(10):
        while host.forwarder.pending or guest.service is None or guest.service.budget().connections:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_emfile_on_the_host_data_stream_fails_that_client_alone(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No descriptor for the host's data stream socket (the first socket an
    exposed connection makes): that client is closed and counted `exhausted`;
    the next one is served."""
    faults = Faults(monkeypatch, lambda n: n == 1)
    async with exposed(short_tmp) as (host, guest, path):
        faults.armed = True
        assert await _refused(path)
        assert await echo_round_trip(path, b"next") == b"next"
        await _settled(host, guest)
        stats = host.expose_stats()["e"]
        assert (stats.requests, stats.connected, stats.failed) == (2, 1, {"exhausted": 1})


async def test_emfile_on_the_guest_dial_fails_that_client_alone(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No descriptor for the guest's dial of the VM socket (the second socket):
    the guest answers RESOURCE_EXHAUSTED and gives its budget share back, the
    host closes the client; the next one is served."""
    faults = Faults(monkeypatch, lambda n: n == 2)
    async with exposed(short_tmp) as (host, guest, path):
        faults.armed = True
        assert await _refused(path)
        assert await echo_round_trip(path, b"next") == b"next"
        await _settled(host, guest)
        assert host.expose_stats()["e"].failed == {"dial": 1}
        assert guest.expose_stats()["e"].failed == {"exhausted": 1}
        assert guest.expose_stats()["e"].connected == 1
