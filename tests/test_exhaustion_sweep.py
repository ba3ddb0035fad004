"""Out of descriptors or buffers at every allocation point (issue 16): with
EMFILE, ENFILE or ENOBUFS injected on every third socket or accept, or on
every splice pipe, a host and a guest (one event loop, ``unix:`` endpoints)
carry 40 forwarded and 40 exposed connections at once. Each one either answers
right or is closed; none hangs, and with no pipe to be had none is cut at all.
Afterwards no count is left behind (pending, relays, the guest's budget) and
both directions serve again once the fault is gone."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from socketforward import Expose, Forward, Guest, Host, relay, transport
from tests.processes import echo_server

pytestmark = pytest.mark.timeout(120)

N = 40


class Fault:
    """Every *every*-th call of one allocation fails with *code* while armed."""

    def __init__(self, code: int, every: int) -> None:
        self.code = code
        self.every = every
        self.armed = False
        self.calls = 0
        self.failed = 0

    def hit(self) -> None:
        if self.armed:
            self.calls += 1
            if self.calls % self.every == 0:
                self.failed += 1
                raise OSError(self.code, os.strerror(self.code))


def _inject(monkeypatch: pytest.MonkeyPatch, point: str, fault: Fault) -> None:
    if point == "socket":  # every socket dialed: host target, data stream, VM socket
        real_socket = transport._new_socket

        def new_socket(family: int) -> socket.socket:
            fault.hit()
            return real_socket(family)

        monkeypatch.setattr(transport, "_new_socket", new_socket)
    elif point == "accept":  # every listener: forwards, exposes, the stream port
        real_accept: Callable[..., Any] = socket.socket._accept  # type: ignore[attr-defined]

        def accept(self: socket.socket) -> Any:
            fault.hit()
            return real_accept(self)

        monkeypatch.setattr(socket.socket, "_accept", accept)
    elif point == "pipe":  # splice pipes of established relays
        real_open = relay._open_pipe

        def open_pipe(size: int) -> tuple[int, int]:
            fault.hit()
            return real_open(size)

        monkeypatch.setattr(relay, "_open_pipe", open_pipe)


async def _exchange(path: Path, payload: bytes) -> str:
    """'ok' when the echo came back whole, 'closed' when the connection was
    closed or refused; a hang raises TimeoutError."""
    try:
        async with asyncio.timeout(20):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                writer.write(payload)
                await writer.drain()
                writer.write_eof()
                got = await reader.read()
            finally:
                writer.close()
    except (ConnectionError, OSError):
        return "closed"
    if got == payload:
        return "ok"
    assert got == b"", f"a wrong answer: {len(got)} of {len(payload)} bytes"
    return "closed"


async def _settled(host: Host, guest: Guest) -> None:
    assert guest.service is not None
    service = guest.service
    async with asyncio.timeout(30):
        while (  # noqa: ASYNC110
            host.forwarder.pending
            or sum(s.active for s in host.stats().values())
            or sum(s.active for s in host.expose_stats().values())
            or service.budget().connections
            or service.pending
        ):
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS])
@pytest.mark.parametrize("point", ["socket", "accept", "pipe"])
async def test_every_allocation_failing_loses_nothing(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, point: str, code: int
) -> None:
    # Pipes are pooled and reused, so few are made: then every one fails.
    fault = Fault(code, every=1 if point == "pipe" else 3)
    _inject(monkeypatch, point, fault)
    (short_tmp / "host").mkdir(mode=0o700)
    rpc, streams = f"unix:{short_tmp}/host/rpc.sock", f"unix:{short_tmp}/streams.sock"
    target, vm_path = short_tmp / "echo.sock", short_tmp / "vm" / "echo.sock"
    vm_service, exposed = short_tmp / "vm-echo.sock", short_tmp / "host" / "exposed.sock"
    payload = os.urandom(256 * 1024)  # enough to take splice pipes
    async with (
        await echo_server(target),
        await echo_server(vm_service),
        Host(
            rpc_listen=rpc,
            streams=streams,
            forwards=[Forward("f", str(target), str(vm_path))],
            exposes=[Expose("e", str(vm_service), str(exposed))],
        ) as host,
        Guest(rpc_dial=rpc, streams=streams) as guest,
    ):
        async with asyncio.timeout(30):
            await host.wait_connected()
        fault.armed = True
        outcomes = await asyncio.gather(
            *(_exchange(vm_path, payload) for _ in range(N)),
            *(_exchange(exposed, payload) for _ in range(N)),
        )
        fault.armed = False
        assert fault.failed > 0, f"the fault was never hit ({fault.calls} calls)"
        assert outcomes.count("ok") > 0
        if point == "pipe":
            # Established relays copy instead: not one connection is cut.
            assert outcomes.count("ok") == 2 * N, outcomes
        await _settled(host, guest)
        # Both directions serve again, and the RPC connection lived through it.
        assert await _exchange(vm_path, b"after") == "ok"
        assert await _exchange(exposed, b"after") == "ok"
        assert host.connected and guest.connected
