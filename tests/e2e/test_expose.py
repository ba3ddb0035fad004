"""Exposes (VM -> host, docs/protocol.md 4.10) end to end: our guest and host as
separate processes over ``unix:`` endpoints; the "VM" services are UNIX
sockets in a directory only the guest is told about."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import Running, echo_round_trip, echo_server, socketforward, wait_for_socket

MIB = 1 << 20


@dataclass
class Pair:
    """Paths of one host + guest pair with exposes."""

    tmp: Path
    rpc: Path
    streams: Path
    vm: Path  # the VM's services live here
    host: Path  # exposed sockets appear here

    def host_args(self, *exposes: str) -> list[str]:
        # One forward too: its VM socket appearing says the guest is connected.
        args = ["host", "--rpc-listen", f"unix:{self.rpc}", "--streams", f"unix:{self.streams}"]
        args += ["--forward", f"ready={self.tmp / 'ready.sock'}:{self.vm / 'ready.sock'}"]
        for expose in exposes:
            args += ["--expose", expose]
        return args

    def guest_args(self, *extra: str) -> list[str]:
        return [
            "guest",
            "--rpc-dial",
            f"unix:{self.rpc}",
            "--streams",
            f"unix:{self.streams}",
            *extra,
        ]

    def expose(self, name: str) -> str:
        """``NAME=<vm>/NAME.sock:<host>/NAME.sock``."""
        return f"{name}={self.vm / (name + '.sock')}:{self.host / (name + '.sock')}"


@pytest.fixture
def pair(short_tmp: Path) -> Pair:
    (short_tmp / "rpc").mkdir(mode=0o700)
    (short_tmp / "vm").mkdir()
    (short_tmp / "host").mkdir(mode=0o700)
    return Pair(
        short_tmp, short_tmp / "rpc" / "rpc.sock", short_tmp / "streams.sock",
        short_tmp / "vm", short_tmp / "host",
    )  # fmt: skip


@contextlib.contextmanager
def running(args: list[str], log: Path) -> Iterator[Running]:
    with socketforward(args, log) as proc:
        yield proc
        assert proc.stop() == 0, proc.log()


@contextlib.asynccontextmanager
async def both(pair: Pair, *exposes: str, guest: tuple[str, ...] = ()) -> AsyncIterator[Running]:
    """Host (yielded) and guest running, the guest connected."""
    with running(pair.host_args(*exposes), pair.tmp / "host.log") as host:
        await asyncio.to_thread(wait_for_socket, pair.rpc, 30, host)
        with running(pair.guest_args(*guest), pair.tmp / "guest.log") as g:
            await asyncio.to_thread(wait_for_socket, pair.vm / "ready.sock", 30, host, g)
            yield host


async def _sha_service(path: Path) -> asyncio.Server:
    """Reads to EOF, answers the sha256; or, sent b"GET n", answers n known bytes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(1 << 16)
        if first.startswith(b"GET "):
            count = int(first[4:])
            block = hashlib.sha256(b"seed").digest() * (MIB // 32)
            for _ in range(count // MIB):
                writer.write(block)
                await writer.drain()
        else:
            digest = hashlib.sha256(first)
            while chunk := await reader.read(MIB):
                digest.update(chunk)
            writer.write(digest.hexdigest().encode())
        writer.close()

    return await asyncio.start_unix_server(handle, path=str(path), backlog=4096)


async def _upload(path: Path, size: int) -> tuple[str, str]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    digest = hashlib.sha256()
    block = os.urandom(MIB) if size else b""
    for _ in range(size // MIB):
        digest.update(block)
        writer.write(block)
        await writer.drain()
    writer.write_eof()
    answer = (await reader.read()).decode()
    writer.close()
    return answer, digest.hexdigest()


async def _download(path: Path, size: int) -> tuple[int, str]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b"GET %d" % size)
    await writer.drain()
    digest, count = hashlib.sha256(), 0
    while chunk := await reader.read(MIB):
        digest.update(chunk)
        count += len(chunk)
    writer.close()
    return count, digest.hexdigest()


async def test_exposed_socket_is_byte_exact_both_ways(pair: Pair) -> None:
    """A host client of an exposed VM socket: 0 B and 256 MiB up (answered
    after its half-close) and 256 MiB down at the same time, sha256-exact; the
    host socket is mode 0600."""
    async with await _sha_service(pair.vm / "sha.sock"), both(pair, pair.expose("sha")):
        exposed = pair.host / "sha.sock"
        assert oct(exposed.stat().st_mode & 0o777) == "0o600"
        assert await _upload(exposed, 0) == (hashlib.sha256(b"").hexdigest(),) * 2
        (answer, sent), (count, got) = await asyncio.gather(
            _upload(exposed, 256 * MIB), _download(exposed, 256 * MIB)
        )
        assert answer == sent
        block = hashlib.sha256(b"seed").digest() * (MIB // 32)
        want = hashlib.sha256()
        for _ in range(256):
            want.update(block)
        assert (count, got) == (256 * MIB, want.hexdigest())


async def test_half_close_from_the_vm_service(pair: Pair) -> None:
    """A VM service that answers, then shuts down its write side first: the host
    client reads it all then EOF, and its own bytes still reach the service."""
    heard: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner" * 1000)
        await writer.drain()
        writer.write_eof()
        heard.set_result(await reader.read())
        writer.close()

    async with (
        await asyncio.start_unix_server(handle, path=str(pair.vm / "talk.sock")),
        both(pair, pair.expose("talk")),
    ):
        reader, writer = await asyncio.open_unix_connection(str(pair.host / "talk.sock"))
        assert await asyncio.wait_for(reader.read(), 30) == b"banner" * 1000
        writer.write(b"reply" * 1000)
        writer.write_eof()
        assert await asyncio.wait_for(heard, 30) == b"reply" * 1000
        writer.close()


async def test_a_burst_on_an_exposed_socket_is_served(pair: Pair) -> None:
    """2,000 clients connect at once to an exposed socket: every one is served."""
    async with await echo_server(pair.vm / "echo.sock"), both(pair, pair.expose("echo")):

        async def one(i: int) -> bool:
            data = i.to_bytes(4, "big") * 8
            return await echo_round_trip(pair.host / "echo.sock", data) == data

        results = await asyncio.wait_for(
            asyncio.gather(*(one(i) for i in range(2000)), return_exceptions=True), 120
        )
        failures = [r for r in results if r is not True]
        assert not failures, f"{len(failures)} failed, first: {failures[0]!r}"


async def test_a_missing_vm_socket_closes_the_client_at_once(pair: Pair) -> None:
    """Nothing listens at the VM path: the client is closed promptly, the host
    says why, and nothing is left open on either side."""
    async with both(pair, pair.expose("gone")) as host:
        baseline = await _settled_sockets(host.proc.pid)
        for _ in range(3):
            reader, writer = await asyncio.open_unix_connection(str(pair.host / "gone.sock"))
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            await writer.wait_closed()
        assert "reason=dial" in host.log() and "NOT_FOUND" in host.log(), host.log()
        async with asyncio.timeout(10):
            while _open_sockets(host.proc.pid) > baseline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)


async def test_expose_allow_limits_what_the_host_may_dial(pair: Pair) -> None:
    """A guest with --expose-allow refuses VM paths outside it: the client is
    closed, the allowed expose works."""
    async with (
        await echo_server(pair.vm / "echo.sock"),
        await echo_server(pair.vm / "secret.sock"),
        both(
            pair,
            pair.expose("echo"),
            pair.expose("secret"),
            guest=("--expose-allow", str(pair.vm / "echo*")),
        ) as host,
    ):
        assert await echo_round_trip(pair.host / "echo.sock", b"hi") == b"hi"
        reader, writer = await asyncio.open_unix_connection(str(pair.host / "secret.sock"))
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        await asyncio.sleep(0.2)
        assert "PERMISSION_DENIED" in host.log(), host.log()


async def test_exposes_come_back_after_a_guest_restart(pair: Pair) -> None:
    """The guest restarts: clients are refused meanwhile, then served again."""
    async with await echo_server(pair.vm / "echo.sock"):
        with running(pair.host_args(pair.expose("echo")), pair.tmp / "host.log") as host:
            await asyncio.to_thread(wait_for_socket, pair.rpc, 30, host)
            for round_ in range(2):
                with running(pair.guest_args(), pair.tmp / f"guest{round_}.log") as g:
                    await asyncio.to_thread(wait_for_socket, pair.vm / "ready.sock", 30, host, g)
                    await _until_served(pair.host / "echo.sock")
                    assert await echo_round_trip(pair.host / "echo.sock", b"x" * 999) == b"x" * 999


def _open_sockets(pid: int) -> int:
    return sum(1 for fd in os.listdir(f"/proc/{pid}/fd") if _is_socket(f"/proc/{pid}/fd/{fd}"))


async def _settled_sockets(pid: int) -> int:
    """The sockets *pid* holds once the count stays put (the host fills its
    pool of data streams after connecting)."""
    counts = [-1]
    while len(counts) < 6 or len(set(counts[-6:])) > 1:
        await asyncio.sleep(0.05)
        counts.append(_open_sockets(pid))
    return counts[-1]


def _is_socket(link: str) -> bool:
    with contextlib.suppress(OSError):
        return os.readlink(link).startswith("socket:")
    return False


async def _until_served(path: Path) -> None:
    """The guest's first Accept call may come a moment after its Bind."""
    async with asyncio.timeout(30):
        while True:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                if await echo_round_trip(path, b"?") == b"?":
                    return
            await asyncio.sleep(0.05)


async def test_status_counts_exposed_connections(pair: Pair) -> None:
    """`socketforward status` on both sides lists the expose with the forwards'
    counter names, the connection and its bytes counted on each side."""
    (pair.tmp / "ctl").mkdir(mode=0o700)
    host_ctl, guest_ctl = pair.tmp / "ctl" / "host.sock", pair.tmp / "ctl" / "guest.sock"
    args = [*pair.host_args(pair.expose("echo")), "--control", f"unix:{host_ctl}"]
    async with await echo_server(pair.vm / "echo.sock"):
        with running(args, pair.tmp / "host.log") as host:
            await asyncio.to_thread(wait_for_socket, pair.rpc, 30, host)
            guest_args = pair.guest_args("--control", f"unix:{guest_ctl}")
            with running(guest_args, pair.tmp / "guest.log") as g:
                await asyncio.to_thread(wait_for_socket, pair.vm / "ready.sock", 30, host, g)
                assert await echo_round_trip(pair.host / "echo.sock", b"x" * 300) == b"x" * 300
                for ctl in (host_ctl, guest_ctl):
                    await _until_counted(ctl)


async def _until_counted(ctl: Path) -> None:
    """The expose `echo` shows one finished connection, 300 bytes each way."""
    async with asyncio.timeout(10):
        while True:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "socketforward", "status", "--control", f"unix:{ctl}",
                "--json", stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await proc.communicate()
            assert proc.returncode == 0
            echo = json.loads(out)["exposes"].get("echo")
            if echo is not None and echo["active"] == 0 and echo["connected"] == 1:
                assert (echo["bytes_to_vm"], echo["bytes_to_host"]) == (300, 300), echo
                return
            await asyncio.sleep(0.05)


async def test_exposes_come_back_after_a_host_restart(pair: Pair) -> None:
    """The host restarts: its exposed socket is made again (mode 0600) and,
    once the guest has dialed back, serves as before."""
    async with await echo_server(pair.vm / "echo.sock"):
        with running(pair.guest_args(), pair.tmp / "guest.log") as g:
            for round_ in range(2):
                log = pair.tmp / f"host{round_}.log"
                with running(pair.host_args(pair.expose("echo")), log) as host:
                    # The guest's listeners outlive a host: wait for the host's own socket.
                    await asyncio.to_thread(wait_for_socket, pair.host / "echo.sock", 30, host, g)
                    assert oct((pair.host / "echo.sock").stat().st_mode & 0o777) == "0o600"
                    await _until_served(pair.host / "echo.sock")
                    assert await echo_round_trip(pair.host / "echo.sock", b"y" * 99) == b"y" * 99
                assert not (pair.host / "echo.sock").exists()
