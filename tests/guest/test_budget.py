"""The guest's descriptor budget: container connections can no longer take the
descriptors the agent needs to claim the host's answers. While the budget is
spent, new connections wait in the listen backlog (neither accepted nor
failed) and are served as soon as earlier ones end."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from socketforward import datastream, transport
from socketforward.guest import Service
from socketforward.guest.budget import FDS_PER_CONNECTION, Budget, FdPlan
from tests.guest.harness import (
    PATIENCE,
    EchoService,
    Guest,
    HostStream,
    bind,
    read_to_eof,
    roundtrip,
    short_tmp,
    trailer,
    until,
)
from tests.processes import Running, echo_server, wait_for_socket

# -- the plan ------------------------------------------------------------------


def test_plan_leaves_room_for_connections_even_at_128_descriptors() -> None:
    """With 128 descriptors the agent still serves 14 connections at once and
    keeps 40 for itself; with 4,096 it serves 629 and keeps the full handshake cap."""
    small = FdPlan.derive(128)
    assert (small.max_handshakes, small.pipe_pool, small.reserve) == (8, 0, 40)
    assert small.max_connections == 14 and not small.overcommitted
    large = FdPlan.derive(4096)
    assert (large.max_handshakes, large.pipe_pool, large.reserve) == (256, 16, 320)
    assert large.max_connections == 629 and not large.overcommitted
    assert FdPlan.derive(128, max_connections=100).overcommitted
    assert FdPlan.derive(4096, max_handshakes=16).max_connections == (4096 - 80) // 6


def test_budget_pauses_at_its_cap_and_resumes_when_one_ends() -> None:
    """Reaching the cap pauses accepting once; the first connection that ends
    resumes it; giving back more than was taken is a bug and says so."""
    events: list[str] = []
    budget = Budget(2, pause=lambda: events.append("pause"), resume=lambda: events.append("go"))
    budget.take()
    assert events == [] and budget.accepting
    budget.take()
    assert events == ["pause"] and not budget.accepting
    assert budget.stats().held_fds == 2 * FDS_PER_CONNECTION
    budget.give_back()
    assert events == ["pause", "go"] and budget.accepting
    budget.give_back()
    assert budget.stats().connections == 0 and budget.stats().pauses == 1
    with pytest.raises(RuntimeError):
        budget.give_back()


# -- the service, in this process ------------------------------------------------


@contextlib.asynccontextmanager
async def budget_guest(
    max_connections: int, *, pending_timeout: float = 30.0
) -> AsyncIterator[Guest]:
    """A guest Service allowed *max_connections* container connections at once."""
    with short_tmp() as root:
        listener = await transport.listen(transport.UnixEndpoint(str(root / "streams.sock")))
        registry = datastream.StreamRegistry(listener)
        registry.start()
        service = Service(
            registry, pending_timeout=pending_timeout, max_connections=max_connections
        )
        guest = Guest(root, service, registry)
        try:
            yield guest
        finally:
            await guest.close()


async def _held_open(path: Path) -> socket.socket:
    """A container connection that is relaying: one byte went there and back."""
    sock = await transport.connect(transport.UnixEndpoint(str(path)), timeout=PATIENCE)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, b"x")
    async with asyncio.timeout(PATIENCE):
        assert await loop.sock_recv(sock, 1) == b"x"
    return sock


def _waiting(sock: socket.socket) -> bool:
    """Neither answered nor closed: nothing to read yet."""
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    return False


async def test_spent_budget_leaves_new_connections_in_the_backlog_until_one_ends() -> None:
    """With two connections relaying and a budget of two, a third container's
    connection is not accepted and not closed; once one of the first two ends
    it is served, and every count returns to zero afterwards."""
    async with budget_guest(2) as guest:
        echo = await EchoService.start(guest.root / "target.sock")
        stub = await guest.connect()
        host = await HostStream(stub, guest.streams_ep, {"fwd": echo.endpoint}).open()
        vm_path = guest.root / "vm.sock"
        try:
            await bind(stub, {"fwd": vm_path})
            first = await _held_open(vm_path)
            second = await _held_open(vm_path)
            assert not guest.service.budget().accepting
            third = await transport.connect(transport.UnixEndpoint(str(vm_path)), timeout=PATIENCE)
            with third:
                await asyncio.sleep(0.1)  # a chance to be (wrongly) accepted
                assert _waiting(third)
                assert guest.service.stats()["fwd"].requests == 2
                assert len(host.received) == 2
                assert guest.service.budget().held_fds == 2 * FDS_PER_CONNECTION

                first.close()
                loop = asyncio.get_running_loop()
                await loop.sock_sendall(third, b"late")
                third.shutdown(socket.SHUT_WR)
                async with asyncio.timeout(PATIENCE):
                    assert await read_to_eof(third) == b"late" + trailer(b"late")
            second.close()
            await until(lambda: guest.service.budget().connections == 0)
            budget = guest.service.budget()
            assert budget.accepting and budget.held_fds == 0 and budget.pauses >= 1
            stats = guest.service.stats()["fwd"]
            assert stats.requests == stats.connected == 3 and stats.failed == {}
            await until(lambda: guest.service.stats()["fwd"].active == 0)
        finally:
            await host.close()
            await host.stop_relays()
            await echo.close()


async def test_connections_that_fail_while_pending_give_their_share_back() -> None:
    """A host that never answers: a budget of two still gets all six containers
    their (timed-out) answer, two at a time, and nothing stays counted."""
    async with budget_guest(2, pending_timeout=0.2) as guest:
        stub = await guest.connect()
        host = await HostStream(stub, guest.streams_ep, {}, answer="silent").open()
        vm_path = guest.root / "vm.sock"
        try:
            await bind(stub, {"fwd": vm_path})
            answers = await asyncio.gather(*(roundtrip(vm_path, b"hi") for _ in range(6)))
            assert answers == [b""] * 6
            assert guest.service.stats()["fwd"].failed == {"timeout": 6}
            budget = guest.service.budget()
            assert budget.connections == 0 and budget.accepting and budget.pauses >= 2
            assert guest.service.pending == 0
        finally:
            await host.close()


async def test_forward_bound_while_budget_is_spent_accepts_once_it_is_not() -> None:
    """A forward bound while the budget is spent waits like the others, then serves."""
    async with budget_guest(1) as guest:
        echo = await EchoService.start(guest.root / "target.sock")
        stub = await guest.connect()
        targets = {"a": echo.endpoint, "b": echo.endpoint}
        host = await HostStream(stub, guest.streams_ep, targets).open()
        try:
            await bind(stub, {"a": guest.root / "a.sock"})
            held = await _held_open(guest.root / "a.sock")
            await bind(stub, {"a": guest.root / "a.sock", "b": guest.root / "b.sock"})
            client = asyncio.create_task(roundtrip(guest.root / "b.sock", b"b"))
            await asyncio.sleep(0.1)
            assert not client.done() and guest.service.stats()["b"].requests == 0
            held.close()
            async with asyncio.timeout(PATIENCE):
                assert await client == b"b" + trailer(b"b")
            await until(lambda: guest.service.budget().connections == 0)
        finally:
            await host.close()
            await host.stop_relays()
            await echo.close()


async def test_emfile_on_accept_is_survived(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """accept() failing with EMFILE is logged, accepting backs off briefly, and
    the waiting container is then served; nothing is counted as failed."""
    caplog.set_level(logging.WARNING, logger="socketforward.guest")
    async with budget_guest(4) as guest:
        echo = await EchoService.start(guest.root / "target.sock")
        stub = await guest.connect()
        host = await HostStream(stub, guest.streams_ep, {"fwd": echo.endpoint}).open()
        vm_path = guest.root / "vm.sock"
        real_accept = socket.socket._accept  # type: ignore[attr-defined]
        injected = 0

        def out_of_fds(self: socket.socket) -> tuple[int, object]:
            nonlocal injected
            if (
                injected < 3
                and self.family == socket.AF_UNIX
                and self.getsockname() == str(vm_path)
            ):
                injected += 1
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            result: tuple[int, object] = real_accept(self)
            return result

        try:
            await bind(stub, {"fwd": vm_path})
            monkeypatch.setattr(socket.socket, "_accept", out_of_fds)
            assert await roundtrip(vm_path, b"again") == b"again" + trailer(b"again")
            assert injected == 3
            emfile = os.strerror(errno.EMFILE)
            failed = [r.getMessage() for r in caplog.records if "accept failed" in r.getMessage()]
            assert len(failed) == 3 and all(emfile in line for line in failed)
            assert guest.service.stats()["fwd"].failed == {}
            await until(lambda: guest.service.budget().connections == 0)
        finally:
            monkeypatch.undo()
            await host.close()
            await host.stop_relays()
            await echo.close()


# -- both programs, the guest with 128 descriptors ---------------------------------


# Sets the limit, then becomes the program: a preexec_fn is not safe in a
# process with threads (asyncio.to_thread has some).
_WITH_FD_LIMIT = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
    "os.execv(sys.executable, [sys.executable, '-m', 'socketforward', *sys.argv[2:]])"
)


@contextlib.contextmanager
def _program(args: list[str], log_path: Path, fd_limit: int | None = None) -> Iterator[Running]:
    """``socketforward ARGS`` as a child (with RLIMIT_NOFILE *fd_limit*), always reaped."""
    if fd_limit is None:
        command = [sys.executable, "-m", "socketforward", *args]
    else:
        command = [sys.executable, "-c", _WITH_FD_LIMIT, str(fd_limit), *args]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield Running(proc, log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _one(path: Path, i: int) -> bool:
    data = b"%d" % i
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(data)
        writer.write_eof()
        return await reader.read() == data
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def burst(root: Path, *, fd_limit: int, connects: int, patience: float) -> tuple[int, float]:
    """*connects* simultaneous connections through a real host to an echo
    service, the guest limited to *fd_limit* descriptors: (served, seconds)."""
    (root / "host").mkdir(mode=0o700)
    (root / "vm").mkdir(mode=0o700)
    rpc, streams = root / "host" / "rpc.sock", root / "vm" / "streams.sock"
    target, vm_path = root / "echo.sock", root / "vm" / "echo.sock"
    host_args = ["host", "--rpc-listen", f"unix:{rpc}", "--streams", f"unix:{streams}"]
    host_args += ["--forward", f"echo={target}:{vm_path}"]
    guest_args = ["guest", "--rpc-dial", f"unix:{rpc}", "--streams", f"unix:{streams}"]
    guest_args += ["--pending-timeout", str(patience)]
    async with await echo_server(target):
        with _program(host_args, root / "host.log") as host:
            await asyncio.to_thread(wait_for_socket, rpc, 30, host)
            with _program(guest_args, root / "guest.log", fd_limit) as guest:
                await asyncio.to_thread(wait_for_socket, vm_path, 30, host, guest)
                started = time.monotonic()
                results = await asyncio.wait_for(
                    asyncio.gather(
                        *(_one(vm_path, i) for i in range(connects)), return_exceptions=True
                    ),
                    patience,
                )
                took = time.monotonic() - started
                served = sum(r is True for r in results)
                # Right after the burst a new connection is served at once.
                assert await asyncio.wait_for(_one(vm_path, -1), 5), guest.log()
                guest.proc.send_signal(signal.SIGUSR1)
                await until(lambda: "held_fds=" in guest.log())
                totals = re.search(r"stats pending=.*", guest.log())
                assert totals is not None
                assert "connections=0 " in totals.group() and "held_fds=0 " in totals.group()
                assert "accepting=1" in totals.group(), totals.group()
                assert f"fd limit soft={fd_limit} hard={fd_limit}" in guest.log()
                assert "accepting paused" in guest.log()
                assert guest.stop() == 0, guest.log()
            assert host.stop() == 0, host.log()
    return served, took


async def test_guest_with_128_descriptors_serves_a_burst_of_500() -> None:
    """A guest limited to 128 descriptors gets 500 simultaneous connects: every
    one is served (the rest wait in the backlog while 14 are open), and right
    afterwards a new connection is served at once."""
    with short_tmp() as root:
        served, _ = await burst(root, fd_limit=128, connects=500, patience=90)
    assert served == 500


async def test_guest_with_4096_descriptors_serves_a_burst_of_4000() -> None:
    """4,096 descriptors (a common hard limit in small VMs), 4,000 simultaneous
    connects: every one is served (629 open at a time at most)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # This process holds both ends of every connection: the clients and the echo service.
    want = 2 * 4000 + 512
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"needs {want} descriptors in the test process, hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    try:
        with short_tmp() as root:
            served, _ = await burst(root, fd_limit=4096, connects=4000, patience=100)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert served == 4000
