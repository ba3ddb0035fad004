"""Forwards added and removed while connections keep coming (docs/protocol.md 4.9),
and what a SIGHUP re-reading --config changes.

What a user notices: a reload (SIGHUP re-reading --forwards-file, or
:meth:`Forwarder.add` / :meth:`Forwarder.remove`) costs no connection, whatever
the guest. nerdbox's guest feeds every open Accept call from one queue and
never ends an old one, so the host must keep its single call there; our guest
routes by announced forward_ids, so the host replaces the call there.

A reload of --config applies the difference of its forwards and exposes, all
or nothing; a file that does not parse, clashes with another source, or
changes an endpoint or a budget changes nothing, and one log line names the
file, the line and the key.
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

import ttrpc_asyncio as ttrpc
from socketforward import datastream, transport
from socketforward.api import socketforward_pb2 as pb
from socketforward.api.socketforward_ttrpc import SocketForwardBase
from socketforward.host.config import CONFIG, Config, read_config
from socketforward.host.control import FORWARDS_FILE, ForwardTable, HostControl
from socketforward.host.forwarder import Forwarder
from socketforward.host.forwards import Forward
from tests.host.fake_guest import (
    FakeGuest,
    exchange,
    guest_dialing,
    reverse_after_eof,
    unix_service,
)
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


# -- --config ---------------------------------------------------------------------------


class ConfigFile:
    """A configuration file the test edits: endpoints and a budget, then the
    given [[forward]] and [[expose]] tables."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.path = tmp / "vm1.toml"
        (tmp / "host").mkdir(mode=0o700, exist_ok=True)

    def forward(self, fid: str, **extra: str) -> str:
        lines = [f'id = "{fid}"', f'host = "/h/{fid}.sock"', f'vm = "/run/{fid}.sock"']
        lines += [f"{key} = {value}" for key, value in extra.items()]
        return "[[forward]]\n" + "\n".join(lines) + "\n"

    def expose(self, eid: str) -> str:
        return (
            f'[[expose]]\nid = "{eid}"\nvm = "/run/{eid}.sock"\n'
            f'host = "{self.tmp}/host/{eid}.sock"\n'
        )

    def write(
        self, *tables: str, head: str = 'streams = "vsock://3:1026"\nmax_relays = 50\n'
    ) -> None:
        self.path.write_text(head + "\n".join(tables))

    def read(self) -> Config:
        return read_config(str(self.path))


@contextlib.asynccontextmanager
async def config_table(
    tmp: Path,
    config: Config,
    *,
    sources: dict[str, str] | None = None,
    forwards: tuple[Forward, ...] = (),
    forwards_file: Path | None = None,
    overridden: frozenset[str] = frozenset(),
) -> AsyncIterator[ForwardTable]:
    """A Forwarder (no guest) with the file's forwards and exposes, as
    `socketforward host --config` starts it."""
    streams = transport.UnixEndpoint(str(tmp / "streams.sock"))
    table_sources = {f.forward_id: CONFIG for f in config.forwards} | (sources or {})
    async with Forwarder([*forwards, *config.forwards], streams) as forwarder:
        table = ForwardTable(
            forwarder,
            table_sources,
            str(forwards_file) if forwards_file else None,
            config=config,
            overridden=overridden,
        )
        await table.start_exposes(config.exposes, dict.fromkeys(
            (e.expose_id for e in config.exposes), CONFIG
        ))  # fmt: skip
        yield table


async def test_config_reload_applies_the_difference_of_forwards_and_exposes(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Editing the file and reloading adds the new forward and expose, removes
    those taken out (the expose's host socket goes), and applies a forward
    whose mode changed as a removal and an addition; the status shows each
    entry's source."""
    caplog.set_level(logging.INFO, logger="socketforward.host")
    cfg = ConfigFile(short_tmp)
    cfg.write(cfg.forward("a"), cfg.forward("b"), cfg.expose("e1"))
    async with config_table(short_tmp, cfg.read()) as table:
        e1, e2 = short_tmp / "host" / "e1.sock", short_tmp / "host" / "e2.sock"
        assert e1.is_socket()
        cfg.write(cfg.forward("a", mode='"0640"'), cfg.forward("c"), cfg.expose("e2"))
        await table.reload_config()
        forwards = table.forwarder.forwards
        assert sorted(forwards) == ["a", "c"]
        assert forwards["a"].mode == 0o640
        assert list(table.forwarder.exposes) == ["e2"]
        assert e2.is_socket() and not e1.exists()
        assert (table.source("a"), table.source("c"), table.expose_source("e2")) == (CONFIG,) * 3
        assert (
            f"config reloaded path={cfg.path} forwards_added=2 forwards_removed=2 "
            "exposes_added=1 exposes_removed=1 forwards=2 exposes=1" in caplog.text
        )
        status = HostControl(table, rpc_endpoint="test").status()
        assert [(x.forward_id, x.source, x.removed) for x in status.exposes] == [
            ("e1", "", True),
            ("e2", CONFIG, False),
        ]


async def test_config_reload_refuses_a_changed_budget_or_a_bad_file_as_a_whole(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file that changes a budget (or an endpoint) is refused as a whole, the
    log naming FILE:LINE and the key, even when it also adds a forward; so is
    a file that does not parse, and one whose forward clashes with a --forward
    entry. A key the command line overrides may change: it is not in force."""
    cfg = ConfigFile(short_tmp)
    cfg.write(cfg.forward("a"))
    fixed = Forward("x", "/h/x.sock", "/run/x.sock")
    async with config_table(
        short_tmp, cfg.read(), sources={"x": "--forward"}, forwards=(fixed,),
        overridden=frozenset({"streams"}),
    ) as table:  # fmt: skip
        cases = [
            ('streams = "vsock://3:1026"\nmax_relays = 51\n',
             f"{cfg.path}:2: max_relays cannot change while the host runs (50 -> 51)"),
            ('streams = "vsock://3:1026"\nmax_relays = 50\nrpc_dial = "vsock://3:1025"\n',
             f"{cfg.path}:3: rpc_dial cannot change while the host runs (unset -> vsock://3:1025)"),
            ('streams = "vsock://3:1026"\n', f"{cfg.path}: max_relays cannot change"),
            ('streams = "vsock://3:1026"\nmax_relays = 50\nmode = 0660\n',
             f"{cfg.path}:3:9: not TOML"),
        ]  # fmt: skip
        for head, error in cases:
            caplog.clear()
            cfg.write(cfg.forward("b"), head=head)
            with caplog.at_level(logging.ERROR, "socketforward.host"):
                await table.reload_config()
            assert f"config not reloaded, nothing changed path={cfg.path} error='{error}" in (
                caplog.text
            )
            assert sorted(table.forwarder.forwards) == ["a", "x"]
        caplog.clear()
        cfg.write(cfg.forward("a"), cfg.forward("x"))  # the very same entry: fine
        await table.reload_config()
        assert table.source("x") == "--forward"
        cfg.write(cfg.forward("a"), cfg.forward("x", mode='"0640"'))
        with caplog.at_level(logging.ERROR, "socketforward.host"):
            await table.reload_config()
        assert (
            f"{cfg.path}:8: [[forward]] x: forward ID x is also given with --forward, with "
            "other paths, mode or owner" in caplog.text
        )
        cfg.write(cfg.forward("a"), head='streams = "unix:/other.sock"\nmax_relays = 50\n')
        await table.reload_config()
        assert table.config is not None and table.config.streams == transport.UnixEndpoint(
            "/other.sock"
        )


async def test_config_and_forwards_file_share_an_entry_and_control_add_is_adopted(
    short_tmp: Path,
) -> None:
    """An entry both files list stays while either lists it (it passes from
    one to the other); a forward added at run time that the file then lists
    becomes the file's; a forward the file holds cannot be removed through
    the control endpoint."""
    cfg = ConfigFile(short_tmp)
    cfg.write(cfg.forward("shared"))
    listed = short_tmp / "forwards"
    listed.write_text("shared=/h/shared.sock:/run/shared.sock\n")
    shared = Forward("shared", "/h/shared.sock", "/run/shared.sock")
    async with config_table(
        short_tmp, cfg.read(), sources={"shared": FORWARDS_FILE}, forwards_file=listed
    ) as table:
        cfg.write()
        await table.reload_config()
        assert (table.forwarder.forwards, table.source("shared")) == (
            {"shared": shared},
            FORWARDS_FILE,
        )
        cfg.write(cfg.forward("shared"))
        await table.reload_config()
        listed.write_text("")
        await table.reload_file()
        assert table.source("shared") == CONFIG and "shared" in table.forwarder.forwards

        with pytest.raises(ttrpc.TtrpcError, match=f"comes from --config {cfg.path}"):
            await table.remove(["shared"])
        assert await table.add([Forward("r", "/h/r.sock", "/run/r.sock")]) == ["r"]
        cfg.write(cfg.forward("shared"), cfg.forward("r"))
        await table.reload()
        assert table.source("r") == CONFIG
        cfg.write()
        await table.reload()
        assert table.forwarder.forwards == {}


class RefusingGuest(FakeGuest):
    """Refuses to Bind a socket path holding "refused", as a guest does when a
    regular file sits there."""

    async def Bind(self, request: pb.BindRequest, context: ttrpc.CallContext) -> empty_pb2.Empty:
        if any("refused" in s.socket_path for s in request.sockets):
            raise ttrpc.TtrpcError(ttrpc.Code.ALREADY_EXISTS, "a regular file is there")
        return await super().Bind(request, context)


async def test_config_reload_the_guest_refuses_puts_the_old_table_back(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When the guest refuses a forward of the new file, the reload is undone:
    the forward it removed is bound again, the expose it removed listens
    again, and the log says the table was restored."""
    caplog.set_level(logging.INFO, logger="socketforward.host")
    cfg = ConfigFile(short_tmp)
    cfg.write(cfg.forward("a"), cfg.expose("e1"))
    config = cfg.read()
    async with running_host(short_tmp, list(config.forwards)) as env:
        table = ForwardTable(env.forwarder, {"a": CONFIG}, config=config)
        await table.start_exposes(config.exposes, {"e1": CONFIG})
        guest = RefusingGuest(registry=env.registry)
        async with guest_dialing(guest, env.rpc):
            await guest.next_accept()
            cfg.write(
                cfg.forward("b").replace("/run/b.sock", "/run/refused.sock"), cfg.expose("e2")
            )
            await table.reload_config()
            assert "config reload failed path=" in caplog.text and "restored=yes" in caplog.text
            assert guest.binds[-1] == [("a", "/run/a.sock")]
            assert guest.unbinds[-1] == ["a"]
            assert list(env.forwarder.forwards) == ["a"]
            assert list(env.forwarder.exposes) == ["e1"]
            assert (short_tmp / "host" / "e1.sock").is_socket()
            assert not (short_tmp / "host" / "e2.sock").exists()
            assert (table.source("a"), table.expose_source("e1")) == (CONFIG, CONFIG)
