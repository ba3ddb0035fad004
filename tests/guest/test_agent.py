"""`socketforward guest` as a real process: the test plays the host, listening
for the agent's RPC dial (as nerdbox's shim does) and being the ttrpc client."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import ttrpc_asyncio as ttrpc
from socketforward import guest, transport
from socketforward.api.socketforward_ttrpc import SocketForwardStub
from tests.guest.harness import (
    PATIENCE,
    EchoService,
    HostStream,
    bind,
    roundtrip,
    trailer,
    until,
)


@contextlib.contextmanager
def agent_process(root: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run `python -m socketforward -v guest ARGS`; its log goes to root/agent.log."""
    with (root / "agent.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "socketforward", "-v", "guest", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _log(root: Path) -> str:
    return (root / "agent.log").read_text(errors="replace")


async def _accept(listener: transport.Listener) -> tuple[ttrpc.Client, SocketForwardStub]:
    """Accept the agent's dial; the host is the ttrpc client on it."""
    async with asyncio.timeout(PATIENCE):
        sock = await listener.accept()
    client = await ttrpc.Client.connect(sock)
    return client, SocketForwardStub(client)


async def _dial(path: Path) -> tuple[ttrpc.Client, SocketForwardStub]:
    """Connect to the agent's RPC socket once it exists."""
    async with asyncio.timeout(PATIENCE):
        while True:
            try:
                sock = await transport.connect(transport.UnixEndpoint(str(path)))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(0.02)
    client = await ttrpc.Client.connect(sock)
    return client, SocketForwardStub(client)


async def _wait_exit(proc: subprocess.Popen[bytes]) -> int:
    await until(lambda: proc.poll() is not None)
    return proc.returncode


@contextlib.asynccontextmanager
async def hosted(root: Path, *extra: str) -> AsyncIterator[tuple[transport.Listener, str]]:
    """The host's RPC listener and the agent dialing it (streams at root/streams.sock)."""
    rpc = await transport.listen(transport.UnixEndpoint(str(root / "rpc.sock")))
    try:
        with agent_process(
            root,
            "--rpc-dial",
            f"unix:{root}/rpc.sock",
            "--streams",
            f"unix:{root}/streams.sock",
            *extra,
        ) as proc:
            yield rpc, str(proc.pid)
            proc.send_signal(signal.SIGTERM)
            assert await _wait_exit(proc) == 0, _log(root)
    finally:
        rpc.close()


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="socketforward")
    guest.add_parser(parser.add_subparsers())
    return parser.parse_args(["guest", *argv])


def test_defaults_are_nerdbox_endpoints() -> None:
    """With no endpoint flags the agent dials the host at vsock 2:1025 and takes
    data streams on vsock port 1026, as nerdbox's vminitd (parsed only, not used)."""
    cfg = guest.config_from_args(_parse())
    assert cfg.rpc_dial == transport.VsockEndpoint(2, 1025)
    assert cfg.rpc_listen is None
    assert cfg.streams == transport.VsockEndpoint(None, 1026)
    assert (cfg.socket_mode, cfg.max_unanswered, cfg.pending_limit) == (0o600, 32, 4096)
    assert cfg.pending_timeout == 30.0 and cfg.fail_fast is False
    cfg = guest.config_from_args(
        _parse("--rpc-listen", "unix:/run/sf.sock", "--socket-mode", "660", "--fail-fast")
    )
    assert cfg.rpc_listen == transport.UnixEndpoint("/run/sf.sock") and cfg.rpc_dial is None
    assert cfg.socket_mode == 0o660 and cfg.fail_fast is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rpc-dial", "vsock://:1025"], "needs a CID"),
        (["--rpc-dial", "tcp://x"], "unknown scheme"),
        (["--streams", "hvsock:/tmp/v.sock:5"], "cannot listen on hvsock"),
        (["--rpc-dial", "unix:/a", "--rpc-listen", "unix:/b"], "not allowed with"),
        (["--socket-mode", "999"], "--socket-mode"),
        (["--max-unanswered", "0"], "--max-unanswered"),
        (["--pending-timeout", "-1"], "--pending-timeout"),
    ],
)
def test_bad_arguments_exit_2_with_one_message(argv: list[str], message: str) -> None:
    """A bad flag stops the agent before it does anything, with a message naming it."""
    result = subprocess.run(
        [sys.executable, "-m", "socketforward", "guest", *argv],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("taken", ["--streams", "--rpc-listen"])
def test_unusable_endpoint_exits_1_and_keeps_the_file(root: Path, taken: str) -> None:
    """An endpoint path taken by a regular file: exit 1 with one clear line naming
    the option, the file kept, and no socket file left behind."""
    (root / "taken").write_text("mine")
    paths = {"--streams": root / "streams.sock", "--rpc-listen": root / "rpc.sock"}
    paths[taken] = root / "taken"
    result = subprocess.run(
        [sys.executable, "-m", "socketforward", "guest",
         "--rpc-listen", f"unix:{paths['--rpc-listen']}",
         "--streams", f"unix:{paths['--streams']}"],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if "socketforward guest:" in line]
    assert len(lines) == 1 and taken in lines[0] and "regular file" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert (root / "taken").read_text() == "mine"
    assert [p for p in root.iterdir() if p.is_socket()] == []


async def test_agent_keeps_dialing_until_the_host_listens(root: Path) -> None:
    """Started before the host (VM boots first), the agent retries its dial
    with backoff and is served as soon as the host listens."""
    with agent_process(
        root, "--rpc-dial", f"unix:{root}/rpc.sock", "--streams", f"unix:{root}/streams.sock"
    ) as proc:
        await until(lambda: "rpc dial failed" in _log(root))
        rpc = await transport.listen(transport.UnixEndpoint(str(root / "rpc.sock")))
        try:
            client, stub = await _accept(rpc)
            await bind(stub, {"fwd": root / "fwd.sock"})
            assert (root / "fwd.sock").is_socket()
            await client.close()
        finally:
            rpc.close()
        proc.send_signal(signal.SIGTERM)
        assert await _wait_exit(proc) == 0, _log(root)
    assert not (root / "fwd.sock").exists()


async def test_agent_redials_when_the_host_comes_back(root: Path) -> None:
    """The host goes away and comes back: the agent dials again, the host's
    re-Bind is a no-op, a relay that was running keeps going, a connection
    made meanwhile waits and is served, and SIGTERM removes every socket file."""
    echo = await EchoService.start(root / "target.sock")
    streams_ep = transport.UnixEndpoint(str(root / "streams.sock"))
    vm = root / "vm" / "fwd.sock"
    loop = asyncio.get_running_loop()
    try:
        async with hosted(root, "--pending-timeout", "60") as (rpc, _):
            client, stub = await _accept(rpc)
            await bind(stub, {"fwd": vm})
            host = await HostStream(stub, streams_ep, {"fwd": echo.endpoint}).open()
            assert await roundtrip(vm, b"first") == b"first" + trailer(b"first")
            # A long-lived connection, mid-transfer when the host goes away.
            long_lived = await transport.connect(transport.UnixEndpoint(str(vm)))
            with long_lived:
                await loop.sock_sendall(long_lived, b"part one,")
                assert await loop.sock_recv(long_lived, 9) == b"part one,"
                await host.close()
                await client.close()
                waiting = loop.create_task(roundtrip(vm, b"meanwhile"))
                client, stub = await _accept(rpc)  # the agent dialed again
                await bind(stub, {"fwd": vm})
                host2 = await HostStream(stub, streams_ep, {"fwd": echo.endpoint}).open()
                try:
                    assert await waiting == b"meanwhile" + trailer(b"meanwhile")
                    assert await roundtrip(vm, b"after") == b"after" + trailer(b"after")
                    await loop.sock_sendall(long_lived, b" part two")
                    long_lived.shutdown(socket.SHUT_WR)
                    rest = bytearray()
                    while chunk := await loop.sock_recv(long_lived, 4096):
                        rest += chunk
                    whole = b"part one, part two"
                    assert bytes(rest) == b" part two" + trailer(whole)
                finally:
                    await host2.close()
                    await client.close()
            await host.stop_relays()
            await host2.stop_relays()
        assert "rpc connection lost" in _log(root)
        assert not vm.exists() and not (root / "streams.sock").exists()
    finally:
        await echo.close()


async def test_burst_of_2000_connects_all_served(root: Path) -> None:
    """2,000 container processes connecting at once through the agent are all
    served byte-exact by a host answering one request at a time (none dropped)."""
    echo = await EchoService.start(root / "target.sock")
    streams_ep = transport.UnixEndpoint(str(root / "streams.sock"))
    vm = root / "fwd.sock"
    try:
        async with hosted(root) as (rpc, _):
            client, stub = await _accept(rpc)
            await bind(stub, {"fwd": vm})
            host = await HostStream(stub, streams_ep, {"fwd": echo.endpoint}).open()
            try:
                payloads = [b"%06d" % i * 20 for i in range(2000)]
                answers = await asyncio.gather(*(roundtrip(vm, p) for p in payloads))
                bad = [i for i, (p, a) in enumerate(zip(payloads, answers, strict=True))
                       if a != p + trailer(p)]  # fmt: skip
                assert bad == [], f"{len(bad)} of 2000 connections not served: {bad[:10]}"
                assert len(host.received) == 2000
                assert host.max_unanswered <= 32
            finally:
                await host.close()
                await host.stop_relays()
                await client.close()
    finally:
        await echo.close()


async def test_rpc_listen_mode_serves_a_host_that_dials(root: Path) -> None:
    """With --rpc-listen the host connects to the agent instead; forwarding works."""
    echo = await EchoService.start(root / "target.sock")
    streams_ep = transport.UnixEndpoint(str(root / "streams.sock"))
    rpc_path = root / "rpc.sock"
    try:
        with agent_process(
            root, "--rpc-listen", f"unix:{rpc_path}", "--streams", f"unix:{root}/streams.sock"
        ) as proc:
            client, stub = await _dial(rpc_path)
            await bind(stub, {"fwd": root / "fwd.sock"})
            host = await HostStream(stub, streams_ep, {"fwd": echo.endpoint}).open()
            try:
                assert await roundtrip(root / "fwd.sock", b"x" * 100000) == b"x" * 100000 + trailer(
                    b"x" * 100000
                )
            finally:
                await host.close()
                await host.stop_relays()
                await client.close()
            proc.send_signal(signal.SIGINT)
            assert await _wait_exit(proc) == 0, _log(root)
        assert not (root / "fwd.sock").exists() and not rpc_path.exists()
    finally:
        await echo.close()


def test_agent_needs_only_protobuf_and_the_standard_library() -> None:
    """The VM agent imports nothing beyond protobuf, ttrpc-asyncio (ours, which
    needs only protobuf) and the standard library: it is light enough for a VM
    image."""
    code = (
        "import sys, socketforward.guest;"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=PATIENCE, check=True
    ).stdout.split()
    third_party = {m for m in out if m not in sys.stdlib_module_names and not m.startswith("_")}
    assert third_party <= {"google", "socketforward", "ttrpc_asyncio"}, third_party
