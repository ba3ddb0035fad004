"""Our guest driven by nerdbox's host (Go stand-in), and our host driving
nerdbox's VM side (Go stand-in): Bind, byte-exact relays, bursts."""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.interop.nerdbox_peers import Forward, nerdbox_host, nerdbox_vm
from tests.processes import echo_round_trip, echo_server, socketforward, wait_for_socket


@pytest.fixture
async def target(tmp_path: Path) -> AsyncIterator[Path]:
    """A real host service: a UNIX echo server."""
    path = tmp_path / "target.sock"
    server = await echo_server(path)
    async with server:
        yield path


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))


async def test_our_guest_driven_by_nerdbox_host(
    nerdbox_host_bin: Path, target: Path, tmp_path: Path
) -> None:
    """nerdbox's host Binds our guest, forwards byte-exact, and a 2,000-connect
    burst is served in full with its Accept stream still open afterwards."""
    _raise_fd_limit()
    rpc, streams = tmp_path / "rpc.sock", tmp_path / "streams.sock"
    vm_path = tmp_path / "vm" / "echo.sock"
    forwards = [Forward("fwd-echo", target, vm_path)]
    with nerdbox_host(nerdbox_host_bin, rpc, streams, forwards, tmp_path / "host.log") as host:
        args = ["guest", "--rpc-dial", f"unix:{rpc}", "--streams", f"unix:{streams}"]
        with socketforward(args, tmp_path / "guest.log") as guest:
            await asyncio.to_thread(host.wait_ready)
            await asyncio.to_thread(wait_for_socket, vm_path, 30, guest)
            payload = os.urandom(4 << 20)
            # nerdbox's relay ends both directions on the first EOF: read, then close.
            got = await echo_round_trip(vm_path, payload, half_close=False)
            assert got == payload

            async def one(i: int) -> bool:
                data = i.to_bytes(4, "big") * 16
                return await echo_round_trip(vm_path, data, half_close=False) == data

            results = await asyncio.wait_for(
                asyncio.gather(*(one(i) for i in range(2000)), return_exceptions=True), 120
            )
            failures = [r for r in results if r is not True]
            assert not failures, f"{len(failures)} failed, first: {failures[0]!r}"
            assert host.proc.poll() is None, host.log()  # Accept stream still open
            assert await echo_round_trip(vm_path, b"after", half_close=False) == b"after"
            assert guest.stop() == 0, guest.log()
        assert not vm_path.exists()


async def test_our_host_drives_nerdbox_vm(
    nerdbox_vm_bin: Path, target: Path, tmp_path: Path
) -> None:
    """Our host accepts nerdbox's VM dial-back, Binds, and relays byte-exact;
    nerdbox ignoring our metadata and lacking Unbind does not matter."""
    rpc, streams = tmp_path / "rpc.sock", tmp_path / "streams.sock"
    vm_path = tmp_path / "vm" / "echo.sock"
    args = [
        "host", "--rpc-listen", f"unix:{rpc}", "--streams", f"unix:{streams}",
        "--forward", f"fwd-echo={target}:{vm_path}",
    ]  # fmt: skip
    with socketforward(args, tmp_path / "host.log") as host:
        await asyncio.to_thread(wait_for_socket, rpc, 30, host)
        with nerdbox_vm(nerdbox_vm_bin, rpc, streams, tmp_path / "vm.log"):
            await asyncio.to_thread(wait_for_socket, vm_path, 30, host)
            payload = os.urandom(4 << 20)
            assert await echo_round_trip(vm_path, payload, half_close=False) == payload

            async def one(i: int) -> bool:
                data = i.to_bytes(4, "big") * 16
                return await echo_round_trip(vm_path, data, half_close=False) == data

            # nerdbox's VM side drops past its 64-slot queue, so stay under it.
            for start in range(0, 200, 32):
                assert all(await asyncio.gather(*(one(i) for i in range(start, start + 32))))
        assert host.stop() == 0, host.log()
    assert not rpc.exists()


async def test_our_host_exposes_nothing_through_nerdbox_vm(
    nerdbox_vm_bin: Path, target: Path, tmp_path: Path
) -> None:
    """nerdbox's VM side has no Dial: a client of an expose is closed at once
    and the host says once that this VM cannot expose sockets; forwards keep
    working."""
    rpc, streams = tmp_path / "rpc.sock", tmp_path / "streams.sock"
    vm_path, exposed = tmp_path / "vm" / "echo.sock", tmp_path / "host" / "vm-echo.sock"
    args = [
        "host", "--rpc-listen", f"unix:{rpc}", "--streams", f"unix:{streams}",
        "--forward", f"fwd-echo={target}:{vm_path}",
        "--expose", f"vm-echo={vm_path}:{exposed}",
    ]  # fmt: skip
    with socketforward(args, tmp_path / "host.log") as host:
        await asyncio.to_thread(wait_for_socket, rpc, 30, host)
        with nerdbox_vm(nerdbox_vm_bin, rpc, streams, tmp_path / "vm.log"):
            await asyncio.to_thread(wait_for_socket, vm_path, 30, host)
            for _ in range(3):
                reader, writer = await asyncio.open_unix_connection(str(exposed))
                assert await asyncio.wait_for(reader.read(), 10) == b""
                writer.close()
            assert await echo_round_trip(vm_path, b"still", half_close=False) == b"still"
            assert host.log().count("the guest cannot expose sockets (Dial unimplemented)") == 1
        assert host.stop() == 0, host.log()
    assert not exposed.exists()
