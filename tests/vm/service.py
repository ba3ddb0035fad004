"""The host service the VM test forwards to: ``python service.py SOCKET LOG``.

A UNIX stream socket at SOCKET; each connection starts with one command line:

* ``SINK``      read until EOF, then answer ``<sha256 hex> <length>\\n`` and close
                (the client shuts down its write side and still gets the answer).
* ``SINK N``    the same, but answer after N bytes (no half-close needed).
* ``SOURCE N``  send N random bytes, then close.
* ``ECHO``      echo until EOF, then shut down the write side and close.
* ``ANSWER N``  read until EOF, then answer N bytes: the sha256 digest of what it
                read, repeated (a client half-closes and gets a big answer).
* ``SPEAK N``   send N random bytes and shut down the write side first, then
                read until EOF (the host side's half-close, crossing into the VM).

Every finished SINK/SOURCE appends ``{"op", "sha256", "length"}`` as a JSON line
to LOG, so the test compares the guest's view with the host's. Prints ``ready``
once listening; SIGTERM stops it and removes the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys

CHUNK = 1 << 20


async def main(path: str, log_path: str) -> None:
    log = open(log_path, "a", buffering=1)  # noqa: SIM115, ASYNC230

    def record(op: str, digest: hashlib._Hash, length: int) -> None:
        log.write(json.dumps({"op": op, "sha256": digest.hexdigest(), "length": length}) + "\n")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await reader.readline()).decode(errors="replace").split()
            digest = hashlib.sha256()
            length = 0
            if line and line[0] == "SINK" and len(line) <= 2:
                want = int(line[1]) if len(line) == 2 else None
                while want is None or length < want:
                    data = await reader.read(CHUNK if want is None else min(CHUNK, want - length))
                    if not data:
                        break
                    digest.update(data)
                    length += len(data)
                record("sink", digest, length)
                writer.write(f"{digest.hexdigest()} {length}\n".encode())
            elif len(line) == 2 and line[0] == "SOURCE":
                left = int(line[1])
                while left:
                    data = os.urandom(min(left, CHUNK))
                    digest.update(data)
                    writer.write(data)
                    await writer.drain()
                    left -= len(data)
                record("source", digest, int(line[1]))
            elif len(line) == 2 and line[0] == "ANSWER":
                while data := await reader.read(CHUNK):
                    digest.update(data)
                    length += len(data)
                record("answer", digest, length)
                size = int(line[1])
                writer.write((digest.digest() * (size // 32 + 1))[:size])
            elif len(line) == 2 and line[0] == "SPEAK":
                sent = os.urandom(int(line[1]))
                said = hashlib.sha256(sent)
                writer.write(sent)
                await writer.drain()
                writer.write_eof()
                record("speak", said, len(sent))
                while data := await reader.read(CHUNK):
                    digest.update(data)
                    length += len(data)
                record("heard", digest, length)
            elif line == ["ECHO"]:
                while data := await reader.read(1 << 16):
                    writer.write(data)
                    await writer.drain()
                writer.write_eof()
            else:
                writer.write(f"ERROR unknown command {line!r}\n".encode())
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_unix_server(handle, path=path, backlog=4096, limit=1 << 20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    log.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
