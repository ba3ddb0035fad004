"""Forwards added and removed while connections keep coming (docs/protocol.md 4.9).

What a user notices: a reload (SIGHUP re-reading --forwards-file, or
:meth:`Forwarder.add` / :meth:`Forwarder.remove`) costs no connection, whatever
the guest. nerdbox's guest feeds every open Accept call from one queue and
never ends an old one, so the host must keep its single call there; our guest
routes by announced forward_ids, so the host replaces the call there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from socketforward import datastream, transport, ttrpc
from socketforward.api import socketforward_pb2 as pb
from socketforward.api.socketforward_ttrpc import SocketForwardBase
from tests.host.fake_guest import exchange, reverse_after_eof, unix_service
from tests.host.host_env import fwd, guest_accepting, running_host

pytestmark = pytest.mark.timeout(60)

AcceptServerStream = ttrpc.ServerStream[pb.ConnectResult, pb.ConnectRequest]

ANSWER_TIMEOUT = 10.0  # a dropped request fails the test here instead of hanging it
WORKERS = 16
STEP = 60  # connections answered between one step of the test and the next


class SharedQueueGuest(SocketForwardBase):
    """nerdbox's VM side where a reload is concerned: only Bind and Accept are
    served (Unbind is UNIMPLEMENTED); every Accept call sends whatever it takes
    first from one shared queue and goes on taking while its stream is open;
    results are matched by stream_id across calls; nothing times out."""

    def __init__(self, registry: datastream.StreamRegistry) -> None:
        self.registry = registry
        self.binds: list[list[str]] = []
        self.unbinds = 0
        self.calls = 0
        """Accept calls the host opened."""
        self.sent_on: dict[str, int] = {}
        """stream_id -> the Accept call (1, 2...) its request was sent on."""
        self.queue: asyncio.Queue[pb.ConnectRequest] = asyncio.Queue()
        self.pending: dict[str, asyncio.Future[pb.ConnectResult]] = {}

    async def Bind(self, request: pb.BindRequest, context: ttrpc.CallContext) -> empty_pb2.Empty:
        self.binds.append([s.forward_id for s in request.sockets])
        return empty_pb2.Empty()

    async def Unbind(
        self, request: pb.UnbindRequest, context: ttrpc.CallContext
    ) -> empty_pb2.Empty:
        self.unbinds += 1
        raise ttrpc.TtrpcError(ttrpc.Code.UNIMPLEMENTED, "method Unbind")

    async def Accept(self, stream: AcceptServerStream) -> None:
        self.calls += 1
        number = self.calls
        results = asyncio.get_running_loop().create_task(self._results(stream))
        try:
            while True:
                request = await self.queue.get()
                self.sent_on[request.stream_id] = number
                await stream.send(request)
        finally:
            results.cancel()
            await asyncio.wait({results})

    async def _results(self, stream: AcceptServerStream) -> None:
        with contextlib.suppress(ttrpc.Error):
            async for result in stream:
                future = self.pending.pop(result.stream_id, None)
                if future is not None and not future.done():
                    future.set_result(result)

    async def connect(self, stream_id: str, forward_id: str) -> pb.ConnectResult:
        """Queue a ConnectRequest, as a container connecting in the VM does, and
        wait (bounded) for the host's answer on whichever call carried it."""
        future: asyncio.Future[pb.ConnectResult] = asyncio.get_running_loop().create_future()
        self.pending[stream_id] = future
        self.queue.put_nowait(pb.ConnectRequest(stream_id=stream_id, forward_id=forward_id))
        async with asyncio.timeout(ANSWER_TIMEOUT):
            return await future

    def claim(self, stream_id: str) -> socket.socket:
        return self.registry.get(stream_id)


@contextlib.asynccontextmanager
async def dialed_in(guest: SocketForwardBase, rpc: transport.Endpoint) -> AsyncIterator[None]:
    """*guest* dials the host's RPC endpoint and serves on that one socket."""
    server = ttrpc.Server()
    server.register(guest)
    sock = await transport.connect(rpc, timeout=10)
    task = asyncio.get_running_loop().create_task(server.serve_connection(sock))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait({task})
        await server.shutdown(grace=0)


class Load:
    """Clients connecting to one forward over and over, each connection checked
    byte-exact through the host service (which answers the bytes reversed)."""

    def __init__(self, guest: SharedQueueGuest, forward_id: str) -> None:
        self.guest = guest
        self.forward_id = forward_id
        self.served = 0
        self.progress = asyncio.Condition()
        self.stop = asyncio.Event()
        self.failed: BaseException | None = None

    async def worker(self, n: int) -> None:
        try:
            await self._connect_until_stopped(n)
        except BaseException as exc:
            async with self.progress:
                self.failed = exc
                self.progress.notify_all()
            raise

    async def _connect_until_stopped(self, n: int) -> None:
        count = 0
        while not self.stop.is_set():
            stream_id = f"w{n}-{count}"
            count += 1
            result = await self.guest.connect(stream_id, self.forward_id)
            assert result.error == "", (stream_id, result.error)
            payload = os.urandom(64) + stream_id.encode()
            with self.guest.claim(stream_id) as vm_side:
                assert await exchange(vm_side, payload) == payload[::-1]
            async with self.progress:
                self.served += 1
                self.progress.notify_all()

    async def goes_on(self) -> None:
        """Wait (bounded) until STEP more connections have been served; a client
        that failed fails this at once."""
        async with asyncio.timeout(30), self.progress:
            goal = self.served + STEP
            await self.progress.wait_for(lambda: self.served >= goal or self.failed is not None)
        if self.failed is not None:
            raise AssertionError(f"a connection failed: {self.failed!r}") from self.failed


async def test_reload_with_nerdbox_guest_answers_every_request_on_one_call(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With a guest that hands requests to whichever Accept call reads first
    (nerdbox's), adding and removing forwards under load answers every
    ConnectRequest: connections to the unchanged forward keep being served, the
    added one is served, the removed one is refused; the host opened only one
    Accept call, so none was left unread."""
    caplog.set_level(logging.INFO, logger="socketforward.host")
    a, b, c = (fwd(short_tmp, name) for name in "abc")
    async with (
        unix_service(Path(a.host_path), reverse_after_eof),
        unix_service(Path(b.host_path), reverse_after_eof),
        unix_service(Path(c.host_path), reverse_after_eof),
        running_host(short_tmp, [a, b]) as env,
    ):
        guest = SharedQueueGuest(env.registry)
        async with dialed_in(guest, env.rpc):
            async with asyncio.timeout(30):
                await env.forwarder.wait_ready()
            load = Load(guest, "fwd-b")
            workers = asyncio.gather(*(load.worker(n) for n in range(WORKERS)))
            try:
                await load.goes_on()
                await env.forwarder.add([c])
                assert guest.binds[-1] == ["fwd-c"]
                assert (await guest.connect("c-1", "fwd-c")).error == ""
                guest.claim("c-1").close()
                await load.goes_on()
                await env.forwarder.remove(["fwd-a"])
                refused = await guest.connect("a-1", "fwd-a")
                assert refused.error == "unknown forward ID: fwd-a"
                await load.goes_on()
            finally:
                load.stop.set()
                async with asyncio.timeout(30):
                    await workers
            assert not guest.pending, "every request is answered"
            assert guest.calls == 1
            assert set(guest.sent_on.values()) == {1}
            assert guest.unbinds == 2  # the probe, then the removal
            assert env.forwarder.pending == 0
    assert "closed accept stream" not in caplog.text
    assert caplog.text.count("guest routes by announced forward ids: no") == 1


async def test_reload_with_our_guest_replaces_the_accept_call(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With a guest that implements Unbind (ours, which routes by the announced
    forward_ids), adding a forward opens a new Accept call announcing it and the
    old call is ended, as before."""
    caplog.set_level(logging.INFO, logger="socketforward.host")
    a, c = fwd(short_tmp, "a"), fwd(short_tmp, "c")
    async with (
        running_host(short_tmp, [a]) as env,
        guest_accepting(env.rpc, env.registry) as (guest, first),
    ):
        assert "guest routes by announced forward ids: yes" in caplog.text
        await env.forwarder.add([c])
        second = await guest.next_accept()
        assert second.announced == ["fwd-a,fwd-c"]
        async with asyncio.timeout(30):
            await first.ended.wait()
