"""The guest's RPC connection: dial the host (nerdbox's direction) and serve
SocketForward on that one connection, or listen for hosts that dial
(docs/protocol.md 1.2, 1.4)."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable
from typing import Final

import ttrpc_asyncio as ttrpc
from socketforward import transport
from socketforward.guest.service import Service

__all__ = ["Agent"]

log = logging.getLogger("socketforward.guest")

# Dial errors that retrying cannot fix.
_FATAL_DIAL_ERRNOS: Final = frozenset(
    {errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EINVAL}
)


class _RpcServer(ttrpc.Server):
    """The agent's ttrpc server, telling it when an RPC connection starts and ends."""

    def __init__(self, opened: Callable[[], None], closed: Callable[[], None]) -> None:
        super().__init__()
        self._opened = opened
        self._closed = closed

    async def serve_connection(self, sock: socket.socket) -> None:
        self._opened()
        try:
            await super().serve_connection(sock)
        finally:
            self._closed()


class Agent:
    """Runs a :class:`Service` on its RPC connection(s).

    Dial mode (nerdbox's direction): dial *rpc_dial*, serve ttrpc on that one
    connection, dial again with jittered capped backoff when it drops; the
    Service (listeners, queue, relays) lives on. Listen mode: serve every
    connection accepted on *rpc_listen*.
    """

    def __init__(
        self,
        service: Service,
        *,
        rpc_dial: transport.Endpoint | None = None,
        rpc_listen: transport.Endpoint | None = None,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        connect_timeout: float = 10.0,
    ) -> None:
        if (rpc_dial is None) == (rpc_listen is None):
            raise ValueError("exactly one of rpc_dial and rpc_listen")
        self.service = service
        self._dial = rpc_dial
        self._listen = rpc_listen
        self._backoff = transport.Backoff(backoff_initial, backoff_max)
        self._connect_timeout = connect_timeout
        self._server = _RpcServer(self._rpc_opened, self._rpc_closed)
        service.register(self._server)
        self._rpc_live = 0
        self._rpc_connections = 0
        self._rpc_since = time.time()
        self._up = asyncio.Event()  # set while a host's RPC connection is served
        self._down = asyncio.Event()
        self._down.set()

    @property
    def rpc_connected(self) -> bool:
        """A host's RPC connection is being served now."""
        return self._rpc_live > 0

    @property
    def rpc_since(self) -> float:
        """When :attr:`rpc_connected` last changed (at first: when the agent was
        made), in unix seconds."""
        return self._rpc_since

    @property
    def rpc_connections(self) -> int:
        """RPC connections served so far."""
        return self._rpc_connections

    async def wait_connected(self) -> None:
        """Return once a host's RPC connection is being served."""
        await self._up.wait()

    async def wait_disconnected(self) -> None:
        """Return once no host's RPC connection is being served."""
        await self._down.wait()

    def _rpc_opened(self) -> None:
        self._rpc_connections += 1
        self._rpc_live += 1
        if self._rpc_live == 1:
            self._rpc_since = time.time()
            self._down.clear()
            self._up.set()

    def _rpc_closed(self) -> None:
        self._rpc_live -= 1
        if self._rpc_live == 0:
            self._rpc_since = time.time()
            self._up.clear()
            self._down.set()

    async def run(self) -> None:
        """Serve until cancelled; raises OSError when the RPC endpoint is unusable."""
        if self._dial is not None:
            await self._dial_loop(self._dial)
        else:
            assert self._listen is not None
            await self._listen_loop(self._listen)

    async def _dial_loop(self, ep: transport.Endpoint) -> None:
        async def serve(sock: socket.socket) -> bool:
            started = time.monotonic()
            await self._server.serve_connection(sock)
            # A connection that lived long enough resets the backoff.
            return time.monotonic() - started >= self._backoff.maximum

        await transport.redial(
            ep,
            serve,
            self._backoff,
            connect_timeout=self._connect_timeout,
            log=log,
            fatal_errnos=_FATAL_DIAL_ERRNOS,
        )

    async def _listen_loop(self, ep: transport.Endpoint) -> None:
        listener = await transport.listen(ep, mode=0o600)
        log.info("rpc listening endpoint=%s", ep)
        try:
            await self._server.serve(listener.sock)
        finally:
            listener.close()

    async def shutdown(self, grace: float = 1.0) -> None:
        """Shut the service down (files removed), then the ttrpc server."""
        await self.service.shutdown()
        await self._server.shutdown(grace)
