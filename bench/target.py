"""The target service: what every benchmarked path forwards to, in a process
of its own (``python -m bench.target PATH``, uvloop when installed).

Its protocol is chosen so that no workload needs a half-close (nerdbox's
relay tears a connection down at the first EOF): first byte ``U`` + u64 size:
read exactly that many bytes, answer the count as u64; ``D`` + u64 size: send
that many bytes, then close; anything else: echo until EOF.
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
from typing import cast

from bench import event_loop
from bench.processes import ProcessGroup, python_module

COUNT = struct.Struct(">Q")
UPLOAD = b"U"
DOWNLOAD = b"D"
ECHO = b"x"
BLOCK = 1 << 20
"""Bytes of one write, and of the receive buffer all connections share."""


class _Target(asyncio.BufferedProtocol):
    """One target-service connection; protocol callbacks, uvloop's fast path."""

    def __init__(self, block: memoryview, buf: memoryview) -> None:
        self.block = block
        # Shared by every connection: each buffer_updated consumes it at once
        # (one MiB per connection cost the service more than the forwarders).
        self.buf = buf
        self.transport: asyncio.Transport | None = None
        self.mode = b""
        self.header = b""
        self.size = self.count = self.left = 0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        data = self.buf[:nbytes]
        assert self.transport is not None
        if self.mode == b"":
            self.mode = bytes(data[:1])
            if self.mode not in (UPLOAD, DOWNLOAD):
                self.mode = ECHO
            else:
                data = data[1:]
        if self.mode == ECHO:
            self.transport.write(bytes(data))
            return
        if len(self.header) < COUNT.size:
            take = COUNT.size - len(self.header)
            self.header += bytes(data[:take])
            data = data[take:]
            if len(self.header) < COUNT.size:
                return
            (self.size,) = COUNT.unpack(self.header)
            if self.mode == DOWNLOAD:
                self.left = self.size
                self._send()
                return
        self.count += len(data)
        if self.mode == UPLOAD and self.count >= self.size:
            self.transport.write(COUNT.pack(self.count))

    def _send(self) -> None:
        assert self.transport is not None
        while self.left and not self.paused:
            n = min(self.left, BLOCK)
            self.transport.write(self.block[:n])
            self.left -= n
        if not self.left:
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == DOWNLOAD and self.left:
            self._send()

    def eof_received(self) -> bool:
        return False  # close


async def serve(path: str) -> None:
    """The target service on ``path``: upload counter, download source, echo."""
    loop = asyncio.get_running_loop()
    block = memoryview(os.urandom(BLOCK))
    buf = memoryview(bytearray(BLOCK))
    server = await loop.create_unix_server(lambda: _Target(block, buf), path=path, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def start(group: ProcessGroup, path: str) -> subprocess.Popen[bytes]:
    """Start the service on ``path`` in ``group``; return once it listens."""
    return group.start_ready(python_module("bench.target", path), "target service")


def main() -> None:
    event_loop.run(serve(sys.argv[1]))


if __name__ == "__main__":
    main()
