"""The VM side as one object, for a program that embeds it (README, "Embedding").

``socketforward guest`` is a thin layer over :class:`Guest`: it adds the
command line, signals, systemd readiness and the control endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from types import TracebackType

from socketforward import transport
from socketforward.datastream import DEFAULT_MAX_POOLED, DEFAULT_MAX_UNCLAIMED, StreamRegistry
from socketforward.guest.agent import Agent
from socketforward.guest.budget import FdPlan
from socketforward.guest.service import Service
from socketforward.protocol import DEFAULT_RPC_DIAL, DEFAULT_STREAMS
from socketforward.stats import ForwardStats

__all__ = ["Guest"]

log = logging.getLogger("socketforward.guest")

Endpoint = str | transport.Endpoint


class Guest:
    """The VM-side agent: listens for data streams, serves SocketForward on the
    RPC connection it dials (or accepts), creates the listeners the host asks
    for and relays their connections.

    ::

        async with Guest(rpc_dial="unix:/run/host.sock", streams="unix:/run/s.sock") as guest:
            await guest.wait_connected()
            ...
            print(guest.stats())

    Endpoints are URIs or :mod:`socketforward.transport` endpoints; with
    neither *rpc_dial* nor *rpc_listen* it dials nerdbox's default
    (``vsock://2:1025``), and *streams* defaults to ``vsock://:1026``. The
    other arguments are the ``socketforward guest`` options of the same names
    (``None``: derived from the fd limit).
    """

    def __init__(
        self,
        *,
        rpc_dial: Endpoint | None = None,
        rpc_listen: Endpoint | None = None,
        streams: Endpoint = DEFAULT_STREAMS,
        socket_mode: int = 0o600,
        max_unanswered: int = 32,
        pending_limit: int = 4096,
        pending_timeout: float = 30.0,
        fail_fast: bool = False,
        max_connections: int | None = None,
        max_stream_handshakes: int | None = None,
        max_unclaimed_streams: int = DEFAULT_MAX_UNCLAIMED,
        max_pooled_streams: int = DEFAULT_MAX_POOLED,
        expose_allow: Iterable[str] | None = None,
    ) -> None:
        if rpc_dial is not None and rpc_listen is not None:
            raise ValueError("give rpc_dial or rpc_listen, not both")
        self.rpc_dial = transport.as_endpoint(rpc_dial) if rpc_dial is not None else None
        self.rpc_listen = transport.as_endpoint(rpc_listen) if rpc_listen is not None else None
        if self.rpc_dial is None and self.rpc_listen is None:
            self.rpc_dial = transport.parse_endpoint(DEFAULT_RPC_DIAL)
        self.streams = transport.as_endpoint(streams)
        self.plan = FdPlan.current()
        if max_connections is not None or max_stream_handshakes is not None:
            self.plan = FdPlan.derive(
                self.plan.fd_limit,
                max_connections=max_connections,
                max_handshakes=max_stream_handshakes,
            )
        self.socket_mode = socket_mode
        self.max_unanswered = max_unanswered
        self.pending_limit = pending_limit
        self.pending_timeout = pending_timeout
        self.fail_fast = fail_fast
        self.expose_allow = None if expose_allow is None else tuple(expose_allow)
        self.max_unclaimed_streams = max_unclaimed_streams
        self.max_pooled_streams = max_pooled_streams
        self.registry: StreamRegistry | None = None
        self.service: Service | None = None
        self.agent: Agent | None = None
        self._running: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen for data streams and start serving the RPC endpoint; OSError
        (or EndpointError) when the stream endpoint cannot be listened on."""
        if self._running is not None:
            raise RuntimeError("Guest already started")
        listener = await transport.listen(self.streams, mode=0o600)
        log.debug("data streams listening endpoint=%s", self.streams)
        self.registry = StreamRegistry(
            listener,
            max_handshakes=self.plan.max_handshakes,
            max_unclaimed=self.max_unclaimed_streams,
            max_pooled=self.max_pooled_streams,
        )
        self.service = Service(
            self.registry,
            socket_mode=self.socket_mode,
            max_unanswered_per_stream=self.max_unanswered,
            pending_limit=self.pending_limit,
            pending_timeout=self.pending_timeout,
            fail_fast=self.fail_fast,
            max_connections=self.plan.max_connections,
            pipe_pool=self.plan.pipe_pool,
            expose_allow=self.expose_allow,
            pooled_streams=self.registry,
        )
        self.agent = Agent(self.service, rpc_dial=self.rpc_dial, rpc_listen=self.rpc_listen)
        self.registry.start()
        self._running = asyncio.get_running_loop().create_task(self.agent.run())

    async def stop(self) -> None:
        """Stop: listeners and their files removed, relays ended, RPC closed.
        Idempotent."""
        running, self._running = self._running, None
        if running is None:
            return
        running.cancel()
        # What stopped it by itself was said by wait_stopped; stopping goes on.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running
        assert self.agent is not None
        await self.agent.shutdown()

    async def wait_stopped(self) -> None:
        """Return when the agent stopped by itself: raises what stopped it (an
        RPC endpoint it cannot use: OSError)."""
        if self._running is None:
            raise RuntimeError("Guest not started")
        await asyncio.shield(self._running)

    @property
    def connected(self) -> bool:
        """A host's RPC connection is being served now."""
        return self.agent is not None and self.agent.rpc_connected

    async def wait_connected(self) -> None:
        """Return once a host's RPC connection is being served."""
        await self._agent().wait_connected()

    async def wait_disconnected(self) -> None:
        """Return once no host's RPC connection is being served."""
        await self._agent().wait_disconnected()

    def stats(self) -> dict[str, ForwardStats]:
        """Counts per forward_id (copies)."""
        return self._service().stats()

    def expose_stats(self) -> dict[str, ForwardStats]:
        """Counts per expose_id of the connections the host had dialed (copies)."""
        return self._service().expose_stats()

    def bound(self) -> dict[str, str]:
        """forward_id -> socket path of every listener in place."""
        return self._service().bound()

    def _agent(self) -> Agent:
        if self.agent is None:
            raise RuntimeError("Guest not started")
        return self.agent

    def _service(self) -> Service:
        if self.service is None:
            raise RuntimeError("Guest not started")
        return self.service

    async def __aenter__(self) -> Guest:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
