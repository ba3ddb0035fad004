"""Runs inside the VM: a container process using the forwarded socket.

``python guest_client.py --target unix:/run/socketfwd/svc.sock --out results.json``
talks to ``tests/vm/service.py`` on the host through the target (a UNIX socket
in the guest, or ``vsock:CID:PORT`` for the raw-vsock baseline) and writes what
it saw and how long it took as JSON. Every part records its own error, so one
failure does not hide the others; the host-side test judges the results.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import statistics
import sys
import time
import traceback
from typing import Any

CHUNK = 1 << 20
MIB = 1 << 20


def parse_target(target: str) -> tuple[int, Any]:
    if target.startswith("unix:"):
        return socket.AF_UNIX, target[5:]
    if target.startswith("vsock:"):
        cid, port = target[6:].split(":")
        return socket.AF_VSOCK, (int(cid), int(port))
    raise SystemExit(f"bad target {target!r}")


def dial(target: str, timeout: float = 120) -> socket.socket:
    family, addr = parse_target(target)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(addr)
    return sock


def recv_all(sock: socket.socket, digest: Any | None = None) -> tuple[int, bytes]:
    """Read to EOF; returns (length, data kept when no digest is given)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    kept = bytearray()
    length = 0
    while n := sock.recv_into(buf):
        length += n
        if digest is not None:
            digest.update(view[:n])
        else:
            kept += view[:n]
    return length, bytes(kept)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        data = sock.recv(n - len(got))
        if not data:
            raise ConnectionError(f"EOF after {len(got)} of {n} bytes")
        got += data
    return bytes(got)


def upload(target: str, size: int, hashing: bool) -> dict[str, Any]:
    """SINK N: send ``size`` bytes, then read the answer (sha256 and length)."""
    block = bytearray(os.urandom(CHUNK))
    digest = hashlib.sha256()
    sock = dial(target)
    try:
        start = time.monotonic()
        sock.sendall(f"SINK {size}\n".encode())
        for i in range(0, size, CHUNK):
            n = min(CHUNK, size - i)
            block[:8] = i.to_bytes(8, "big")  # every chunk differs: reordering shows
            if hashing:
                digest.update(memoryview(block)[:n])
            sock.sendall(memoryview(block)[:n])
        _, answer = recv_all(sock)
        seconds = time.monotonic() - start
    finally:
        sock.close()
    fields = answer.decode(errors="replace").split()
    return {
        "length": size,
        "sha256_sent": digest.hexdigest() if hashing else None,
        "sha256_answer": fields[0] if fields else answer.decode(errors="replace"),
        "length_answer": int(fields[1]) if len(fields) == 2 else None,
        "seconds": seconds,
        "mb_s": size / seconds / 1e6,
    }


def download(target: str, size: int, hashing: bool) -> dict[str, Any]:
    """SOURCE: ask for ``size`` bytes and read them to EOF."""
    digest = hashlib.sha256()
    sock = dial(target)
    try:
        start = time.monotonic()
        sock.sendall(f"SOURCE {size}\n".encode())
        if hashing:
            length, _ = recv_all(sock, digest)
        else:
            length = 0
            buf = bytearray(CHUNK)
            while n := sock.recv_into(buf):
                length += n
        seconds = time.monotonic() - start
    finally:
        sock.close()
    return {
        "length": length,
        "sha256": digest.hexdigest() if hashing else None,
        "seconds": seconds,
        "mb_s": length / seconds / 1e6,
    }


def half_close(target: str, timeout: float) -> dict[str, Any]:
    """ANSWER: send 1 MiB, shut down the write side, still receive a 1 MiB answer.

    The answer only comes once the host service has seen EOF, i.e. once the
    write shutdown crossed the VM boundary; it is derived from what arrived.
    """
    payload = os.urandom(MIB)
    sock = dial(target, timeout=timeout)
    try:
        sock.sendall(f"ANSWER {MIB}\n".encode() + payload)
        sock.shutdown(socket.SHUT_WR)
        try:
            _, answer = recv_all(sock)
        except TimeoutError:
            return {"ok": False, "detail": f"no answer within {timeout}s after SHUT_WR"}
    finally:
        sock.close()
    want = (hashlib.sha256(payload).digest() * (MIB // 32))[:MIB]
    return {
        "ok": answer == want,
        "detail": f"answer {len(answer)} bytes sha256 {hashlib.sha256(answer).hexdigest()}, "
        f"expected {len(want)} bytes sha256 {hashlib.sha256(want).hexdigest()}",
        "sha256_sent": hashlib.sha256(payload).hexdigest(),
    }


def half_close_from_host(target: str, timeout: float) -> dict[str, Any]:
    """SPEAK: the host service sends 1 MiB and shuts down its write side first;
    we read exactly that, then EOF, then send our own 1 MiB and shut down."""
    sock = dial(target, timeout=timeout)
    try:
        sock.sendall(f"SPEAK {MIB}\n".encode())
        heard = hashlib.sha256()
        try:
            length, _ = recv_all(sock, heard)
        except TimeoutError:
            return {"ok": False, "detail": f"no EOF within {timeout}s of the host's shutdown"}
        reply = os.urandom(MIB)
        sock.sendall(reply)
        sock.shutdown(socket.SHUT_WR)
        rest, _ = recv_all(sock)  # the service closes once it read our EOF
    finally:
        sock.close()
    return {
        "ok": length == MIB and rest == 0,
        "detail": f"heard {length} bytes then EOF, then {rest} more",
        "sha256_heard": heard.hexdigest(),
        "sha256_sent": hashlib.sha256(reply).hexdigest(),
    }


async def _one_concurrent(target: str, i: int, gate: asyncio.Event) -> str | None:
    family, addr = parse_target(target)
    payload = f"conn {i} ".encode() + os.urandom(4096)
    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await gate.wait()
        await loop.sock_connect(sock, addr)
        await loop.sock_sendall(sock, b"ECHO\n" + payload)
        got = bytearray()  # no half-close: see half_close()
        while len(got) < len(payload):
            data = await loop.sock_recv(sock, 65536)
            if not data:
                break
            got += data
        if bytes(got) != payload:
            return f"conn {i}: sent {len(payload)} bytes, got {len(got)} different ones"
        return None
    except Exception as exc:
        return f"conn {i}: {exc!r}"
    finally:
        sock.close()


async def concurrent(target: str, n: int) -> dict[str, Any]:
    """``n`` connections opened at once, each echoing its own payload."""
    gate = asyncio.Event()
    tasks = [asyncio.create_task(_one_concurrent(target, i, gate)) for i in range(n)]
    await asyncio.sleep(0)
    start = time.monotonic()
    gate.set()
    async with asyncio.timeout(240):
        errors = [e for e in await asyncio.gather(*tasks) if e]
    return {"n": n, "ok": n - len(errors), "errors": errors[:10],
            "seconds": time.monotonic() - start}  # fmt: skip


def round_trips(target: str, n: int) -> dict[str, Any]:
    """Median time of a 64-byte echo on one open connection."""
    sock = dial(target, timeout=60)
    times = []
    try:
        sock.sendall(b"ECHO\n")
        msg = b"x" * 64
        for _ in range(n):
            start = time.monotonic()
            sock.sendall(msg)
            recv_exactly(sock, len(msg))
            times.append(time.monotonic() - start)
    finally:
        sock.close()
    return {"n": n, "median_ms": statistics.median(times) * 1e3,
            "p90_ms": statistics.quantiles(times, n=10)[-1] * 1e3}  # fmt: skip


def connects(target: str, n: int) -> dict[str, Any]:
    """Median time of connect + 1-byte echo + close (one forwarded connection each)."""
    times = []
    for _ in range(n):
        start = time.monotonic()
        sock = dial(target, timeout=60)
        try:
            sock.sendall(b"ECHO\nx")
            got = recv_exactly(sock, 1)
            if got != b"x":
                raise ConnectionError(f"echo returned {got!r}")
        finally:
            sock.close()
        times.append(time.monotonic() - start)
    return {"n": n, "median_ms": statistics.median(times) * 1e3}


def alive(pid: int) -> bool:
    """False once ``pid`` has exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def wait_for(target: str, timeout: float, agent_pid: int) -> float:
    start = time.monotonic()
    family, addr = parse_target(target)
    if family == socket.AF_UNIX:
        while not os.path.exists(addr):
            if agent_pid and not alive(agent_pid):
                raise RuntimeError(f"the agent (pid {agent_pid}) exited before {addr} appeared")
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{addr} did not appear within {timeout}s")
            time.sleep(0.02)
    return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--concurrent", type=int, default=0)
    ap.add_argument("--rtt", type=int, default=0)
    ap.add_argument("--connects", type=int, default=0)
    ap.add_argument("--no-hash", action="store_true")
    ap.add_argument("--half-close", type=float, default=0, metavar="TIMEOUT")
    ap.add_argument("--wait", type=float, default=120)
    ap.add_argument("--agent-pid", type=int, default=0)
    args = ap.parse_args()
    results: dict[str, Any] = {"target": args.target, "errors": {}}

    def part(name: str, fn: Any, *fargs: Any) -> None:
        print(f"guest_client: {name} ...", flush=True)
        try:
            results[name] = fn(*fargs)
        except BaseException:
            results["errors"][name] = traceback.format_exc()
        print(f"guest_client: {name}: {results.get(name) or results['errors'][name]}", flush=True)

    part("wait_s", wait_for, args.target, args.wait, args.agent_pid)
    if "wait_s" in results:
        size = args.mib * MIB
        hashing = not args.no_hash
        part("upload", upload, args.target, size, hashing)
        part("download", download, args.target, size, hashing)
        if args.concurrent:
            part("concurrent", lambda: asyncio.run(concurrent(args.target, args.concurrent)))
        if args.rtt:
            part("rtt", round_trips, args.target, args.rtt)
        if args.connects:
            part("connect", connects, args.target, args.connects)
        if args.half_close:
            part("half_close", half_close, args.target, args.half_close)
            part("half_close_host", half_close_from_host, args.target, args.half_close)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.rename(tmp, args.out)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
