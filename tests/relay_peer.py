"""Helper processes for the relay tests (run as a script, see tests/conftest.py).

``echo PATH``                  echo every connection until EOF, then half-close.
``relay LISTEN TARGET``        relay every connection on LISTEN to TARGET.
Both print ``ready`` once listening and stop on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from socketforward.relay import relay
from socketforward.transport import UnixEndpoint, connect, listen


async def _echo(conn: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    with conn, contextlib.suppress(ConnectionError):
        while data := await loop.sock_recv(conn, 256 * 1024):
            await loop.sock_sendall(conn, data)
        conn.shutdown(socket.SHUT_WR)


async def _serve(path: str, handle: Callable[[socket.socket], Coroutine[Any, Any, None]]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tasks: set[asyncio.Task[None]] = set()
    async with await listen(UnixEndpoint(path)) as listener:

        async def accept_loop() -> None:
            while True:
                conn = await listener.accept()
                task = asyncio.create_task(handle(conn))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        acceptor = asyncio.create_task(accept_loop())
        print("ready", flush=True)
        await stop.wait()
        acceptor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acceptor
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    echo = sub.add_parser("echo")
    echo.add_argument("path")
    rel = sub.add_parser("relay")
    rel.add_argument("listen")
    rel.add_argument("target")
    rel.add_argument("--mode", default="auto", choices=["auto", "splice", "copy"])
    rel.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()

    if args.cmd == "echo":
        asyncio.run(_serve(args.path, _echo))
        return

    target = UnixEndpoint(args.target)

    async def handle(conn: socket.socket) -> None:
        try:
            upstream = await connect(target, timeout=10)
        except BaseException:
            conn.close()
            raise
        await relay(conn, upstream, mode=args.mode)

    if args.uvloop:
        import uvloop  # noqa: PLC0415 - optional, only when asked for

        uvloop.run(_serve(args.listen, handle))
    else:
        asyncio.run(_serve(args.listen, handle))


if __name__ == "__main__":
    main()
