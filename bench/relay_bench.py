"""Relay benchmark: direct vs our relay (splice, copy) vs socat, over UNIX sockets.

Run: uv run --locked --all-extras python bench/relay_bench.py [--size BYTES] [--rounds N]

Every relayed path has two hops (client -> relay -> relay -> server), like a
forwarded connection (one relay in the VM, one on the host); each relay is
its own process (uvloop if importable). Runs are interleaved (round-robin over
the paths) and each figure is the median over the rounds. A benchmark, not a
test: it reports figures and never fails on a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import loadgen
from loadgen import GiB, MiB

from socketforward.relay import BULK_SNDBUF, relay
from socketforward.transport import UnixEndpoint, connect, listen

# -- child processes ----------------------------------------------------------------


async def _relay(path: str, target: str, mode: str, sndbuf: int | None) -> None:
    tasks: set[asyncio.Task[Any]] = set()
    ep = UnixEndpoint(target)

    async def handle(conn: socket.socket) -> None:
        try:
            upstream = await connect(ep, timeout=10)
        except BaseException:
            conn.close()
            raise
        await relay(conn, upstream, mode="splice" if mode == "splice" else "copy", sndbuf=sndbuf)

    async with await listen(UnixEndpoint(path)) as listener:
        print("ready", flush=True)
        while True:
            conn = await listener.accept()
            task = asyncio.create_task(handle(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


# -- harness --------------------------------------------------------------------------


@dataclass
class Path_:
    name: str
    entry: str  # socket the client connects to
    relay_pids: list[int] = field(default_factory=list)
    mbps: list[float] = field(default_factory=list)
    cpu_per_gib: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    conns: list[float] = field(default_factory=list)


@contextlib.contextmanager
def _spawn(procs: list[subprocess.Popen[bytes]], *argv: str, wait_for: str | None) -> Iterator[int]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    procs.append(proc)
    assert proc.stdout is not None
    if wait_for is None:
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"{argv} did not start: {line!r}")
    else:
        # socat prints nothing: wait for its socket file instead.
        deadline = time.monotonic() + 10
        while not os.path.exists(wait_for):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{argv} did not start")
            time.sleep(0.01)
    yield proc.pid


def measure_throughput(p: Path_, size: int, chunk: bytes) -> None:
    cpu0 = loadgen.cpu_seconds(p.relay_pids)
    elapsed = loadgen.upload(p.entry, size, chunk)
    time.sleep(0.1)  # let a forking relay reap its child so its CPU time is counted
    p.mbps.append(size / elapsed / 1e6)
    if p.relay_pids:
        p.cpu_per_gib.append((loadgen.cpu_seconds(p.relay_pids) - cpu0) / (size / GiB))


def measure_rtt(p: Path_, count: int) -> None:
    samples = loadgen.round_trips(p.entry, count)
    p.p50.append(loadgen.percentile(samples, 0.5))
    p.p99.append(loadgen.percentile(samples, 0.99))


def measure_conns(p: Path_, seconds: float, workers: int) -> None:
    rate, _failed = loadgen.connection_rate(p.entry, seconds, workers)
    p.conns.append(rate)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_server":
        loadgen.run_async(lambda: loadgen.serve(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_relay":
        sndbuf = int(sys.argv[5]) if sys.argv[5] != "-" else None
        loadgen.run_async(lambda: _relay(sys.argv[2], sys.argv[3], sys.argv[4], sndbuf))
        return

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=GiB, help="bytes per throughput run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rtt-count", type=int, default=2000)
    parser.add_argument("--conn-seconds", type=float, default=1.5)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()

    try:
        import uvloop  # noqa: PLC0415

        loop_name = f"uvloop {getattr(uvloop, '__version__', '?')}"
    except ImportError:
        loop_name = "asyncio (uvloop not installed)"
    socat = shutil.which("socat")
    me = [sys.executable, os.path.abspath(__file__)]
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="relaybench-") as tmp, contextlib.ExitStack() as stack:
        stack.callback(loadgen.stop_all, procs)
        server = f"{tmp}/server.sock"
        stack.enter_context(_spawn(procs, *me, "_server", server, wait_for=None))
        paths = [Path_("direct", server)]
        # (name, mode, hops, SO_SNDBUF)
        # The relay's default grows a full socket's SO_SNDBUF; "-" keeps the kernel's.
        variants: list[tuple[str, str, int, str]] = [
            ("relay splice (1 hop)", "splice", 1, str(BULK_SNDBUF)),
            ("relay splice (2 hops)", "splice", 2, str(BULK_SNDBUF)),
            ("relay splice, kernel SO_SNDBUF (2 hops)", "splice", 2, "-"),
            ("relay copy (2 hops)", "copy", 2, str(BULK_SNDBUF)),
        ]
        for i, (name, mode, hops, sndbuf_arg) in enumerate(variants):
            target, pids = server, list[int]()
            for hop in range(hops, 0, -1):
                sock_path = f"{tmp}/r{i}-{hop}.sock"
                pids.append(
                    stack.enter_context(
                        _spawn(
                            procs, *me, "_relay", sock_path, target, mode, sndbuf_arg, wait_for=None
                        )
                    )
                )
                target = sock_path
            paths.append(Path_(name, target, pids))
        if socat is None:
            print("socat not installed: skipping the socat row", file=sys.stderr)
        else:
            s2, s1 = f"{tmp}/socat2.sock", f"{tmp}/socat1.sock"
            pid2 = stack.enter_context(
                _spawn(
                    procs, socat, f"UNIX-LISTEN:{s2},fork", f"UNIX-CONNECT:{server}", wait_for=s2
                )
            )
            pid1 = stack.enter_context(
                _spawn(procs, socat, f"UNIX-LISTEN:{s1},fork", f"UNIX-CONNECT:{s2}", wait_for=s1)
            )
            paths.append(Path_("socat (2 hops)", s1, [pid1, pid2]))

        chunk = os.urandom(MiB)
        t_start = time.perf_counter()
        for r in range(args.rounds):
            for p in paths:  # interleaved: every path once per round
                measure_throughput(p, args.size, chunk)
                measure_rtt(p, args.rtt_count)
                measure_conns(p, args.conn_seconds, args.workers)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        elapsed = time.perf_counter() - t_start

    med = statistics.median
    base = paths[0]
    print(
        f"\nRelay benchmark: {platform.system()} {platform.release()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {loop_name}; {args.size / GiB:g} GiB per "
        f"throughput run, median of {args.rounds} interleaved rounds ({elapsed:.0f} s)\n"
    )
    print(
        "| path | MB/s | vs direct | relay CPU s/GiB | RTT p50 us | RTT p99 us "
        "| p50 vs direct | conn/s | vs direct |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in paths:
        cpu = f"{med(p.cpu_per_gib):.2f}" if p.cpu_per_gib else "-"
        print(
            f"| {p.name} | {med(p.mbps):,.0f} | {_ratio(med(p.mbps), med(base.mbps))} | {cpu} "
            f"| {med(p.p50):.1f} | {med(p.p99):.1f} | {_ratio(med(p.p50), med(base.p50))} "
            f"| {med(p.conns):,.0f} | {_ratio(med(p.conns), med(base.conns))} |"
        )


if __name__ == "__main__":
    main()
