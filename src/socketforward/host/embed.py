"""The host side for one VM as one object, for a program that embeds it (a VM
manager; README, "Embedding").

:class:`Host` wraps a :class:`~socketforward.host.forwarder.Forwarder` with
its RPC endpoint: it listens for the guest's dial (nerdbox's direction) or
dials the guest, and keeps doing so while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

from socketforward import transport
from socketforward.host.forwarder import Forwarder
from socketforward.host.forwards import Expose, Forward
from socketforward.stats import ForwardStats

__all__ = ["Host"]

Endpoint = str | transport.Endpoint


class Host:
    """The host side for one VM.

    ::

        forwards = [Forward("docker", "/var/run/docker.sock", "/run/socketfwd/docker.sock")]
        async with Host(rpc_listen="unix:/run/vm1/rpc.sock", streams="unix:/run/vm1/s.sock",
                        forwards=forwards) as host:
            await host.wait_connected()       # the guest dialed in and is bound
            await host.add([Forward(...)])     # Bind in the guest, all or none
            print(host.stats())
            await host.wait_disconnected()     # the guest went (it will dial again)

    Exactly one of *rpc_listen* (the guest dials in, nerdbox's direction) and
    *rpc_dial*. *options* are :class:`Forwarder`'s (``max_relays``,
    ``dial_timeout``...). On leaving, running connections get *drain* seconds
    to finish.
    """

    def __init__(
        self,
        *,
        streams: Endpoint,
        rpc_listen: Endpoint | None = None,
        rpc_dial: Endpoint | None = None,
        forwards: Iterable[Forward] = (),
        exposes: Iterable[Expose] = (),
        drain: float = 0.0,
        **options: Any,
    ) -> None:
        if (rpc_listen is None) == (rpc_dial is None):
            raise ValueError("give exactly one of rpc_listen and rpc_dial")
        self.rpc_listen = transport.as_endpoint(rpc_listen) if rpc_listen is not None else None
        self.rpc_dial = transport.as_endpoint(rpc_dial) if rpc_dial is not None else None
        self.forwarder = Forwarder(forwards, transport.as_endpoint(streams), **options)
        self._exposes = list(exposes)
        self.drain = drain
        self._listener: transport.Listener | None = None
        self._running: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen for the exposes and on the RPC endpoint (or start dialing);
        OSError or ValueError when one cannot be used."""
        if self._running is not None:
            raise RuntimeError("Host already started")
        fw = self.forwarder
        if self._exposes:
            await fw.add_exposes(self._exposes)
        loop = asyncio.get_running_loop()
        try:
            if self.rpc_listen is not None:
                self._listener = await transport.listen(self.rpc_listen, mode=0o600)
                self._running = loop.create_task(fw.run_listening(self._listener))
            else:
                assert self.rpc_dial is not None
                self._running = loop.create_task(fw.run_dialing(self.rpc_dial))
        except BaseException:
            await fw.close()
            raise

    async def wait_stopped(self) -> None:
        """Return when listening or dialing stopped by itself: raises what
        stopped it (an RPC endpoint it cannot use)."""
        if self._running is None:
            raise RuntimeError("Host not started")
        await asyncio.shield(self._running)

    async def stop(self) -> None:
        """Close the RPC endpoint, let running connections drain (``drain``),
        end the rest, remove the socket files. Idempotent."""
        running, self._running = self._running, None
        if running is not None:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await running
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        await self.forwarder.close(drain=self.drain)

    @property
    def connected(self) -> bool:
        """A guest's RPC connection is being served (it may still be binding)."""
        return self.forwarder.connected

    async def wait_connected(self) -> None:
        """Return once a guest is connected, bound, and an Accept call is open."""
        await self.forwarder.wait_ready()

    async def wait_disconnected(self) -> None:
        """Return once the guest's RPC connection is gone (at once when there is none)."""
        await self.forwarder.wait_disconnected()

    async def add(self, forwards: Iterable[Forward]) -> None:
        """Add forwards (Bind in a connected guest), all or none."""
        await self.forwarder.add(forwards)

    async def remove(self, forward_ids: Iterable[str]) -> None:
        """Remove forwards (Unbind); running connections go on."""
        await self.forwarder.remove(forward_ids)

    async def add_exposes(self, exposes: Iterable[Expose]) -> None:
        """Listen for more exposes, all or none (ValueError names the problem)."""
        await self.forwarder.add_exposes(exposes)

    def remove_exposes(self, expose_ids: Iterable[str]) -> list[str]:
        """Stop listening for exposes; running connections go on."""
        return self.forwarder.remove_exposes(expose_ids)

    @property
    def forwards(self) -> Mapping[str, Forward]:
        return self.forwarder.forwards

    @property
    def exposes(self) -> Mapping[str, Expose]:
        return self.forwarder.exposes

    def stats(self) -> dict[str, ForwardStats]:
        """Counts per forward_id (copies)."""
        return self.forwarder.stats()

    def expose_stats(self) -> dict[str, ForwardStats]:
        """Counts per expose_id (copies)."""
        return self.forwarder.expose_stats()

    async def __aenter__(self) -> Host:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
