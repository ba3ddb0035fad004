"""A running host for the tests: a Forwarder accepting the guest's dial, a real
StreamRegistry as the guest's stream endpoint, and the small helpers around it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from socketforward import datastream, transport
from socketforward.host import Forward, Forwarder
from tests.host.fake_guest import HugeAckEndpoint


@dataclass
class HostEnv:
    rpc: transport.UnixEndpoint
    registry: datastream.StreamRegistry
    forwarder: Forwarder
    listener: transport.Listener


@contextlib.asynccontextmanager
async def running_host(
    tmp: Path, forwards: list[Forward], **options: Any
) -> AsyncIterator[HostEnv]:
    """A Forwarder accepting the guest's dial on a 0600 UNIX socket, with a real
    StreamRegistry as the guest's stream endpoint."""
    rpc = transport.UnixEndpoint(str(tmp / "host" / "rpc.sock"))
    streams_ep = transport.UnixEndpoint(str(tmp / "vm" / "streams.sock"))
    registry = datastream.StreamRegistry(await transport.listen(streams_ep))
    registry.start()
    listener = await transport.listen(rpc, mode=0o600)
    forwarder = Forwarder(forwards, options.pop("streams", streams_ep), **options)
    task = asyncio.get_running_loop().create_task(forwarder.run_listening(listener))
    try:
        yield HostEnv(rpc, registry, forwarder, listener)
    finally:
        task.cancel()
        await asyncio.wait({task})
        await forwarder.close()
        listener.close()
        await registry.close()


def fwd(tmp: Path, name: str) -> Forward:
    return Forward(f"fwd-{name}", str(tmp / "host" / f"{name}.sock"), f"/run/socketfwd/{name}.sock")


async def wait_until(predicate: Any) -> None:
    """Poll a figure that has no event of its own (stats), with a bound."""
    async with asyncio.timeout(30):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def misbehaving_streams(tmp: Path) -> AsyncIterator[HugeAckEndpoint]:
    evil = HugeAckEndpoint(
        await transport.listen(transport.UnixEndpoint(str(tmp / "vm" / "evil.sock")))
    )
    serving = asyncio.get_running_loop().create_task(evil.serve())
    try:
        yield evil
    finally:
        serving.cancel()
        await asyncio.wait({serving})
        await evil.close()
