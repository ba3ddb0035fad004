"""Our host driving nerdbox's VM side (Go stand-in) through a forwards reload.

nerdbox's guest hands every ConnectRequest to whichever Accept call reads it
first and never times a pending connection out, so a host that opened a second
Accept call on a reload and stopped answering the first would leave about half
of the new connections hanging for good. These tests are what a user of the
pair notices: a SIGHUP that adds and then removes a forward, while clients keep
connecting to a forward that did not change, costs no connection.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.interop.nerdbox_peers import nerdbox_vm
from tests.processes import Running, echo_round_trip, echo_server, socketforward, wait_for_socket

WORKERS = 8  # concurrent clients: well under nerdbox's 64-slot notify queue
ROUND_TRIP_TIMEOUT = 10.0  # a hung connection fails the test instead of stalling it
AFTER_RELOADS = 10  # round trips each worker still makes once both reloads are done
BETWEEN_STEPS = 40  # round trips served (by all workers) before each next step


@pytest.fixture
async def targets(tmp_path: Path) -> AsyncIterator[tuple[Path, Path]]:
    """Two host services (UNIX echo servers): the unchanged forward's and the added one's."""
    paths = tmp_path / "echo.sock", tmp_path / "extra.sock"
    servers = [await echo_server(path) for path in paths]
    try:
        yield paths
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


async def _wait_for_log(host: Running, text: str, count: int) -> None:
    """Wait (bounded) until *text* is in the host's log *count* times."""
    deadline = time.monotonic() + 30
    while host.log().count(text) < count:
        assert host.proc.poll() is None, host.log()
        assert time.monotonic() < deadline, f"{text!r} x{count} not logged:\n{host.log()}"
        await asyncio.sleep(0.02)


async def test_reload_under_load_serves_every_connection(
    nerdbox_vm_bin: Path, targets: tuple[Path, Path], tmp_path: Path
) -> None:
    """A SIGHUP that adds a forward, then one that removes it, while clients keep
    connecting to an unchanged forward: every connection is served byte-exact
    and none hangs; the added forward works in between and, once removed, is
    refused at once (nerdbox's listener stays: it has no Unbind)."""
    echo_target, extra_target = targets
    rpc, streams = tmp_path / "rpc.sock", tmp_path / "streams.sock"
    echo_vm, extra_vm = tmp_path / "vm" / "echo.sock", tmp_path / "vm" / "extra.sock"
    table = tmp_path / "forwards"
    unchanged = f"fwd-echo={echo_target}:{echo_vm}\n"
    table.write_text(unchanged)
    args = [
        "host", "--rpc-listen", f"unix:{rpc}", "--streams", f"unix:{streams}",
        "--forwards-file", str(table),
    ]  # fmt: skip
    with socketforward(args, tmp_path / "host.log") as host:
        await asyncio.to_thread(wait_for_socket, rpc, 30, host)
        with nerdbox_vm(nerdbox_vm_bin, rpc, streams, tmp_path / "vm.log") as vm:
            await asyncio.to_thread(wait_for_socket, echo_vm, 30, host)
            await _wait_for_log(host, "accept stream opened", 1)
            reloaded = asyncio.Event()
            served: list[int] = []
            progress = asyncio.Condition()
            total = 0

            async def load_goes_on() -> None:
                """Wait (bounded) until the workers have made BETWEEN_STEPS more round trips."""
                async with asyncio.timeout(60), progress:
                    goal = total + BETWEEN_STEPS
                    await progress.wait_for(lambda: total >= goal)

            async def one(path: Path, tag: bytes) -> bytes:
                data = tag * 64 + os.urandom(256)
                # nerdbox's relay ends both directions on the first EOF: read, then close.
                got = await asyncio.wait_for(
                    echo_round_trip(path, data, half_close=False), ROUND_TRIP_TIMEOUT
                )
                assert got == data
                return got

            async def worker(n: int) -> None:
                nonlocal total
                count = after = 0
                while after < AFTER_RELOADS:
                    await one(echo_vm, n.to_bytes(2, "big") + count.to_bytes(4, "big"))
                    count += 1
                    after += reloaded.is_set()
                    async with progress:
                        total += 1
                        progress.notify_all()
                served.append(count)

            workers = asyncio.gather(*(worker(n) for n in range(WORKERS)))
            try:
                await load_goes_on()
                table.write_text(unchanged + f"fwd-extra={extra_target}:{extra_vm}\n")
                host.proc.send_signal(signal.SIGHUP)
                await _wait_for_log(host, "forwards file reloaded", 1)
                await asyncio.to_thread(wait_for_socket, extra_vm, 30, host)
                await asyncio.gather(*(one(extra_vm, b"extra%d" % i) for i in range(8)))
                await load_goes_on()

                table.write_text(unchanged)
                host.proc.send_signal(signal.SIGHUP)
                await _wait_for_log(host, "forwards file reloaded", 2)
                reloaded.set()
                # The removed forward is answered `unknown forward ID`: closed, not left waiting.
                reader, writer = await asyncio.open_unix_connection(str(extra_vm))
                try:
                    assert await asyncio.wait_for(reader.read(), ROUND_TRIP_TIMEOUT) == b""
                finally:
                    writer.close()
            finally:
                await asyncio.wait_for(workers, 60)
            assert len(served) == WORKERS and min(served) >= AFTER_RELOADS
            assert vm.proc.poll() is None, vm.log()
        log = host.log()
        assert host.stop() == 0, log
    assert "guest routes by announced forward ids: no" in log
    assert log.count("accept stream opened") == 1, log
    assert "closed accept stream not answered" not in log
    assert "unknown forward ID rejected" in log
