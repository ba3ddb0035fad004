"""Relay benchmark: direct vs our relay (splice, copy) vs socat, over UNIX sockets.

Run: uv run --locked --all-extras python -m bench.relay_bench [--size BYTES] [--rounds N]

Every relayed path has two hops (client -> relay -> relay -> server), like a
forwarded connection (one relay in the VM, one on the host); each relay is
its own process (uvloop if importable). Runs are interleaved (round-robin over
the paths) and each figure is the median over the rounds. A benchmark, not a
test: it reports figures and never fails on a time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from bench import event_loop, loadgen, processes, target
from bench.loadgen import GiB, MiB
from bench.markdown import RIGHT, table
from bench.processes import ProcessGroup, python_module
from bench.stats import Samples, percentile, ratio
from socketforward.relay import BULK_SNDBUF, relay
from socketforward.transport import UnixEndpoint, connect, listen

# -- child processes ----------------------------------------------------------------


async def _relay(path: str, upstream: str, mode: str, sndbuf: int | None) -> None:
    tasks: set[asyncio.Task[Any]] = set()
    ep = UnixEndpoint(upstream)

    async def handle(conn: socket.socket) -> None:
        try:
            peer = await connect(ep, timeout=10)
        except BaseException:
            conn.close()
            raise
        await relay(conn, peer, mode="splice" if mode == "splice" else "copy", sndbuf=sndbuf)

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


def measure_throughput(p: Path_, size: int, chunk: bytes, out: Samples) -> None:
    cpu0 = processes.cpu_seconds(p.relay_pids)
    elapsed = loadgen.upload(p.entry, size, chunk)
    time.sleep(0.1)  # let a forking relay reap its child so its CPU time is counted
    out.add(p.name, "mbps", size / elapsed / 1e6)
    if p.relay_pids:
        cpu = processes.cpu_seconds(p.relay_pids) - cpu0
        out.add(p.name, "cpu_per_gib", cpu / (size / GiB))


def measure_rtt(p: Path_, count: int, out: Samples) -> None:
    samples = loadgen.round_trips(p.entry, count)
    out.add(p.name, "p50", percentile(samples, 0.5))
    out.add(p.name, "p99", percentile(samples, 0.99))


def measure_conns(p: Path_, seconds: float, workers: int, out: Samples) -> None:
    rate, _failed = loadgen.connection_rate(p.entry, seconds, workers)
    out.add(p.name, "conns", rate)


def _ratio(value: float | None, base: float | None) -> str:
    r = ratio(value, base)
    return "-" if r is None else f"{r:.2f}x"


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_relay":
        sndbuf = int(sys.argv[5]) if sys.argv[5] != "-" else None
        event_loop.run(_relay(sys.argv[2], sys.argv[3], sys.argv[4], sndbuf))
        return

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--size", type=int, default=GiB, help="bytes per throughput run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rtt-count", type=int, default=2000)
    parser.add_argument("--conn-seconds", type=float, default=1.5)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()

    socat = shutil.which("socat")
    samples = Samples()
    with processes.scratch_dir("relaybench-") as tmp, ProcessGroup(tmp) as group:
        server = f"{tmp}/server.sock"
        target.start(group, server)
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
            upstream, pids = server, list[int]()
            for hop in range(hops, 0, -1):
                sock_path = f"{tmp}/r{i}-{hop}.sock"
                argv = python_module(
                    "bench.relay_bench", "_relay", sock_path, upstream, mode, sndbuf_arg
                )
                pids.append(group.start_ready(argv, f"relay {sock_path}").pid)
                upstream = sock_path
            paths.append(Path_(name, upstream, pids))
        if socat is None:
            print("socat not installed: skipping the socat row", file=sys.stderr)
        else:
            s2, s1 = f"{tmp}/socat2.sock", f"{tmp}/socat1.sock"
            socat2 = group.start([socat, f"UNIX-LISTEN:{s2},fork", f"UNIX-CONNECT:{server}"])
            processes.wait_for_path(s2, 10, socat2)
            socat1 = group.start([socat, f"UNIX-LISTEN:{s1},fork", f"UNIX-CONNECT:{s2}"])
            processes.wait_for_path(s1, 10, socat1)
            paths.append(Path_("socat (2 hops)", s1, [socat1.pid, socat2.pid]))

        chunk = os.urandom(MiB)
        t_start = time.perf_counter()
        for r in range(args.rounds):
            for p in paths:  # interleaved: every path once per round
                measure_throughput(p, args.size, chunk, samples)
                measure_rtt(p, args.rtt_count, samples)
                measure_conns(p, args.conn_seconds, args.workers, samples)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        elapsed = time.perf_counter() - t_start

    def med(p: Path_, key: str) -> float | None:
        return samples.median(p.name, key)

    base = paths[0]
    print(
        f"\nRelay benchmark: {platform.system()} {platform.release()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {event_loop.loop_name()}; {args.size / GiB:g} GiB "
        f"per throughput run, median of {args.rounds} interleaved rounds ({elapsed:.0f} s)\n"
    )
    header = ["path", "MB/s", "vs direct", "relay CPU s/GiB", "RTT p50 us", "RTT p99 us"]
    header += ["p50 vs direct", "conn/s", "vs direct"]
    rows = [
        [
            p.name,
            _cell(med(p, "mbps"), "{:,.0f}"),
            _ratio(med(p, "mbps"), med(base, "mbps")),
            _cell(med(p, "cpu_per_gib"), "{:.2f}"),
            _cell(med(p, "p50"), "{:.1f}"),
            _cell(med(p, "p99"), "{:.1f}"),
            _ratio(med(p, "p50"), med(base, "p50")),
            _cell(med(p, "conns"), "{:,.0f}"),
            _ratio(med(p, "conns"), med(base, "conns")),
        ]
        for p in paths
    ]
    print("\n".join(table(header, rows, align="l" + RIGHT * 8)))


if __name__ == "__main__":
    main()
