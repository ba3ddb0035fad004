"""A running host for the tests: a Forwarder accepting the guest's dial, a real
StreamRegistry as the guest's stream endpoint, `socketforward host` as a
subprocess, and the small helpers around them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from socketforward import datastream, transport
from socketforward.host import Forward, Forwarder
from tests.host.fake_guest import (
    AcceptCall,
    FakeGuest,
    HugeAckEndpoint,
    UnixService,
    guest_dialing,
    reverse_after_eof,
    unix_service,
)


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


@contextlib.asynccontextmanager
async def guest_accepting(
    rpc: transport.Endpoint,
    registry: datastream.StreamRegistry | None = None,
    *,
    ends: bool = False,
) -> AsyncIterator[tuple[FakeGuest, AcceptCall]]:
    """A FakeGuest (claiming data streams from *registry*, if given; serving
    StreamEnds with *ends*) dialed in to the host at *rpc*, with the first
    Accept call the host opened."""
    guest = FakeGuest(registry=registry, ends=ends)
    async with guest_dialing(guest, rpc):
        yield guest, await guest.next_accept()


@contextlib.asynccontextmanager
async def host_with_guest(
    tmp: Path,
    handler: Callable[[socket.socket], Awaitable[None]] = reverse_after_eof,
    *,
    guest_ends: bool = False,
    **options: Any,
) -> AsyncIterator[tuple[HostEnv, UnixService, FakeGuest, AcceptCall]]:
    """One forward, `fwd-a`, to a host service running *handler*; a host with
    that forward (and *options*); a guest dialed in (serving StreamEnds with
    *guest_ends*), with its first Accept call."""
    forward = fwd(tmp, "a")
    async with (
        unix_service(Path(forward.host_path), handler) as target,
        running_host(tmp, [forward], **options) as env,
        guest_accepting(env.rpc, env.registry, ends=guest_ends) as (guest, call),
    ):
        yield env, target, guest, call


def host_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "socketforward", "host", *args]


@contextlib.asynccontextmanager
async def host_process(
    *args: str,
    log_path: Path,
    rpc_path: Path,
    preexec_fn: Callable[[], None] | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`socketforward host *args` as a subprocess, its stderr to *log_path*,
    yielded once its RPC socket exists; killed on the way out if still running."""
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *host_command(*args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            preexec_fn=preexec_fn,
        )
    try:
        async with asyncio.timeout(30):
            while not rpc_path.exists():  # noqa: ASYNC240 (a stat of a local file)
                assert proc.returncode is None, log_path.read_text()  # noqa: ASYNC240
                await asyncio.sleep(0.02)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
