"""The guest's control endpoint (docs/control.md): its status follows the RPC
connection to the host; its forwards are the host's to change."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import ttrpc_asyncio as ttrpc
from socketforward import control, datastream, transport
from socketforward.api import control_pb2 as pb
from socketforward.api.control_ttrpc import ControlStub
from socketforward.guest import Agent, Service
from socketforward.guest.control import GuestControl
from tests.guest.harness import until

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def guest_with_control(
    root: Path,
) -> AsyncIterator[tuple[transport.UnixEndpoint, transport.UnixEndpoint]]:
    """An agent listening for the host's RPC dial, with its control endpoint;
    yields (rpc endpoint, control endpoint)."""
    rpc = transport.UnixEndpoint(str(root / "rpc.sock"))
    ctl = transport.UnixEndpoint(str(root / "ctl" / "control.sock"))
    registry = datastream.StreamRegistry(
        await transport.listen(transport.UnixEndpoint(str(root / "streams.sock")))
    )
    agent = Agent(Service(registry), rpc_listen=rpc)
    service = GuestControl(
        agent,
        registry,
        rpc_endpoint=f"listen {rpc}",
        pending_limit=4096,
        max_stream_handshakes=16,
        max_unclaimed_streams=64,
    )
    server = await control.ControlServer.start(ctl, service)
    running = asyncio.get_running_loop().create_task(agent.run())
    try:
        await until((root / "rpc.sock").exists)
        yield rpc, ctl
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await agent.shutdown()
        await server.close()


async def test_status_follows_the_rpc_connection(root: Path) -> None:
    """Not connected at first; connected, with the time it happened, while a
    host holds an RPC connection; not connected again once it drops. The
    Control service is not served on that RPC connection."""
    async with guest_with_control(root) as (rpc, ctl):
        status = await control.get_status(ctl)
        assert status.side == "guest"
        assert (status.rpc.connected, status.rpc.connections) == (False, 0)
        assert status.rpc.endpoint == f"listen {rpc}"
        assert [b.name for b in status.budgets] == [
            "connections", "fds", "pending", "stream_handshakes", "unclaimed_streams",
        ]  # fmt: skip

        before = time.time()
        host = await ttrpc.Client.connect(await transport.connect(rpc))
        async with host:
            with pytest.raises(ttrpc.TtrpcError) as refused:
                await ControlStub(host).Status(pb.StatusRequest(), timeout=10)
            assert refused.value.code == ttrpc.Code.UNIMPLEMENTED
            status = await control.get_status(ctl)
            assert (status.rpc.connected, status.rpc.connections) == (True, 1)
            assert before <= status.rpc.since <= time.time()
        for _ in range(500):
            status = await control.get_status(ctl)
            if not status.rpc.connected:
                break
            await asyncio.sleep(0.01)
        assert (status.rpc.connected, status.rpc.connections) == (False, 1)


async def test_forward_changes_are_refused_with_a_pointer_to_the_host(root: Path) -> None:
    """AddForwards and RemoveForwards on a guest fail and say where forwards change."""
    async with guest_with_control(root) as (_, ctl):
        with pytest.raises(control.ControlError, match="host's control endpoint"):
            await control.add_forwards(ctl, [pb.Forward(forward_id="a")])
        with pytest.raises(control.ControlError, match="host's control endpoint"):
            await control.remove_forwards(ctl, ["a"])
