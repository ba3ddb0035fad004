"""``socketforward demo``: forward a real host UNIX service through the data path.

Until the guest agent and the host side exist (their ttrpc control plane is the
next step), the demo plays both roles' glue itself: each connection to the
VM-side socket gets a stream id, the host side dials the target service and
opens the data stream (the real handshake), the VM side claims it from its
registry, and both relay. The target answers with the sha256 of what it read
once the client half-closes, so the demo checks bytes and half-close end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path

from socketforward import relay, streams, transport
from socketforward.ids import generate_stream_id

log = logging.getLogger("socketforward.demo")


async def _hash_service(sock: socket.socket) -> None:
    """The host's target service: read to EOF, answer with count and sha256."""
    loop = asyncio.get_running_loop()
    digest, count = hashlib.sha256(), 0
    with sock:
        while chunk := await loop.sock_recv(sock, 1 << 20):
            digest.update(chunk)
            count += len(chunk)
        await loop.sock_sendall(sock, f"{count} {digest.hexdigest()}\n".encode())


async def _serve(
    listener: transport.Listener, handler: Callable[[socket.socket], Coroutine[None, None, None]]
) -> None:
    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            conn = await listener.accept()
            task = asyncio.create_task(handler(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run(size: int = 256 << 20, connections: int = 8) -> int:
    """Forward ``connections`` concurrent transfers of ``size`` bytes; 0 when all check out."""
    with tempfile.TemporaryDirectory(prefix="socketforward-demo-") as tmp:
        host_ep = transport.parse_endpoint(f"unix:{tmp}/host/target.sock")
        streams_ep = transport.parse_endpoint(f"unix:{tmp}/vm/streams.sock")
        vm_ep = transport.parse_endpoint(f"unix:{tmp}/vm/run/forward.sock")
        target = await transport.listen(host_ep)
        registry = streams.StreamRegistry(await transport.listen(streams_ep))
        vm_listener = await transport.listen(vm_ep, mode=0o666)
        registry.start()

        async def forward(container: socket.socket) -> None:
            stream_id = generate_stream_id("demo")
            try:
                host_sock = await transport.connect(host_ep)
                data = await streams.open_stream(streams_ep, stream_id)
                vm_side = await registry.wait_for(stream_id, timeout=10)
            except BaseException:
                container.close()
                raise
            stats = await asyncio.gather(
                relay.relay(host_sock, data), relay.relay(container, vm_side)
            )
            log.info("relayed stream_id=%s %s", stream_id, stats[1])

        servers = [
            asyncio.create_task(_serve(target, _hash_service)),
            asyncio.create_task(_serve(vm_listener, forward)),
        ]
        try:
            started = time.monotonic()
            results = await asyncio.gather(*(_client(vm_ep, size) for _ in range(connections)))
            elapsed = time.monotonic() - started
        finally:
            for task in servers:
                task.cancel()
            await asyncio.gather(*servers, return_exceptions=True)
            await registry.close()
            vm_listener.close()
            target.close()
        ok = all(results)
        total = size * connections
        print(
            f"forwarded {connections} connections x {size >> 20} MiB from {vm_ep} to {host_ep}: "
            f"{'every sha256 matches' if ok else 'MISMATCH'}, answers arrived after half-close, "
            f"{total / elapsed / 1e6:.0f} MB/s in total"
        )
        leftovers = _socket_files(Path(tmp))
        print(f"socket files left behind: {len(leftovers)}")
        return 0 if ok and not leftovers else 1


def _socket_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_socket()]


async def _client(ep: transport.Endpoint, size: int) -> bool:
    """A process in the VM: send ``size`` random bytes, half-close, check the answer."""
    loop = asyncio.get_running_loop()
    sock = await transport.connect(ep)
    with sock:
        digest = hashlib.sha256()
        block = os.urandom(1 << 20)
        for offset in range(0, size, len(block)):
            chunk = block[: min(len(block), size - offset)]
            digest.update(chunk)
            await loop.sock_sendall(sock, chunk)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while part := await loop.sock_recv(sock, 4096):
            answer += part
    with contextlib.suppress(ValueError):
        count, hexdigest = answer.decode().split()
        return int(count) == size and hexdigest == digest.hexdigest()
    return False


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo", help="forward a real host socket end to end on this machine"
    )
    parser.add_argument("--size-mib", type=int, default=256, help="bytes per connection (MiB)")
    parser.add_argument("--connections", type=int, default=8, help="concurrent connections")
    parser.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    if args.size_mib < 0 or args.connections < 1:
        print("socketforward demo: --size-mib must be >= 0 and --connections >= 1",
              file=sys.stderr)  # fmt: skip
        return 2
    return asyncio.run(run(args.size_mib << 20, args.connections))
