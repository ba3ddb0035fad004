"""ttrpc benchmark: socketforward's asyncio ttrpc against containerd/ttrpc (Go).

    uv run --locked --all-extras python -m bench.ttrpc_bench [--seconds 3] [--runs 3]
        [--uvloop/--no-uvloop]

Four client -> server pairs (Python -> Python, Go -> Python, Python -> Go,
Go -> Go), each under three workloads: unary calls with 1 and with 16
concurrent callers on one connection (16-byte payload, no timeout), and one
bidi stream echoing 16-byte messages as fast as they can be sent. Every
server and every client load runs in its own process; the Go side is the
interop peer (``peer server`` / ``peer bench``), the Python side this script
(``--serve PATH`` / ``--load PATH``). Runs are interleaved (for each run, each
pair, each workload) and summarised as median and min-max across runs, with
the ratio to Go -> Go. The table is printed and written to
bench/results/ttrpc.md.

This is a measurement, not a test: nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ttrpc_asyncio as ttrpc
from bench import event_loop, machine, markdown, processes
from bench.markdown import RIGHT
from bench.processes import ProcessGroup, python_module
from bench.stats import Samples, nearest_rank, spread

REPO_ROOT = Path(__file__).resolve().parents[1]
# The Echo service lives in ttrpc-asyncio's tests, which pytest puts on the path and `-m` does not.
sys.path.insert(0, str(REPO_ROOT / "ttrpc-asyncio" / "tests"))

from echo import echo_pb2, echo_ttrpc  # noqa: E402
from echo.service import EchoService  # noqa: E402

PAYLOAD = b"b" * 16
WARMUP = 0.2
"""Seconds of load before measuring, in every load process (as ``peer bench``)."""
LOAD_GRACE = 20.0
"""How long a load process may overrun its window before it is killed."""
RESULTS = REPO_ROOT / "bench" / "results" / "ttrpc.md"

Json = dict[str, Any]


# ------------------------------------------------------------------ --serve


async def serve(path: str) -> None:
    """Serve Echo on a UNIX socket at ``path`` until SIGTERM/SIGINT."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(128)
        server = ttrpc.Server()
        server.register(EchoService())
        server.start(listener)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("READY", flush=True)
        try:
            await stop.wait()
        finally:
            await server.shutdown(grace=1.0)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# ------------------------------------------------------------------ --load


async def unary_round(stub: echo_ttrpc.EchoStub, concurrency: int, window: float) -> Json:
    """``concurrency`` workers of sequential Unary calls for ``window`` seconds."""
    clock = time.perf_counter_ns
    start = clock()
    end = start + int(window * 1e9)

    async def worker() -> list[int]:
        request = echo_pb2.EchoRequest(payload=PAYLOAD)
        latencies: list[int] = []
        while True:
            t0 = clock()
            if t0 >= end:
                return latencies
            response = await stub.Unary(request)
            latencies.append(clock() - t0)
            if len(response.payload) != len(PAYLOAD):
                raise RuntimeError(f"echoed {len(response.payload)} bytes, want {len(PAYLOAD)}")

    per_worker = await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = (clock() - start) / 1e9
    latencies = sorted(lat for worker_lats in per_worker for lat in worker_lats)
    return {
        "calls": len(latencies),
        "seconds": elapsed,
        # in microseconds, by the rule of ``peer bench``
        "p50_us": nearest_rank(latencies, 0.50) / 1e3,
        "p99_us": nearest_rank(latencies, 0.99) / 1e3,
    }


async def bidi_round(stub: echo_ttrpc.EchoStub, window: float) -> Json:
    """One Bidi stream: echoes received within ``window``, counted from the
    first echo after the warmup; then close the sending side and drain."""
    stream = await stub.Bidi()
    stop = asyncio.Event()

    async def sender() -> None:
        request = echo_pb2.EchoRequest(payload=PAYLOAD)
        while not stop.is_set():
            await stream.send(request)
        await stream.close_send()

    async with stream:
        task = asyncio.create_task(sender())
        try:
            clock = time.perf_counter
            warm_end = clock() + WARMUP
            counting = False
            messages = 0
            start = now = 0.0
            async for response in stream:
                if len(response.payload) != len(PAYLOAD):
                    raise RuntimeError(f"echoed {len(response.payload)} bytes")
                now = clock()
                if not counting:
                    if now >= warm_end:
                        counting, start = True, now
                    continue
                messages += 1
                if now - start >= window:
                    break
            else:
                raise RuntimeError("the server ended the stream early")
            stop.set()
            async for _ in stream:
                pass
            await task
        finally:
            stop.set()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ttrpc.TtrpcError):
                    await task
    return {"messages": messages, "seconds": now - start}


async def load(path: str, kind: str, seconds: float, concurrency: int) -> Json:
    """Run one workload against the Echo server at ``path`` (a UNIX socket)."""
    client = await ttrpc.Client.connect_unix(path)
    async with client:
        stub = echo_ttrpc.EchoStub(client)
        if kind == "bidi":
            return await bidi_round(stub, seconds)
        await unary_round(stub, concurrency, WARMUP)
        return await unary_round(stub, concurrency, seconds)


# ------------------------------------------------------------------ processes


def run_load(argv: list[str], timeout: float) -> Json:
    """Run a load process; its last stdout line is the result JSON."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=processes.die_with_parent,  # noqa: PLW1509 (no threads here)
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise RuntimeError(
            f"load timed out after {timeout:.0f}s: {shlex.join(argv)}\n"
            + err.decode(errors="replace")[-2000:]
        ) from None
    finally:
        processes.stop_all([proc])
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"load exited with status {proc.returncode}: {shlex.join(argv)}\n"
            + err.decode(errors="replace")
        )
    result: Json = json.loads(lines[-1])
    return result


# ------------------------------------------------------------------ the benchmark


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str
    concurrency: int


@dataclass(frozen=True)
class Metric:
    label: str
    workload: Workload
    unit: str
    value: Callable[[Json], float]
    higher_is_better: bool


@dataclass(frozen=True)
class Pair:
    name: str
    client: str  # "py" or "go"
    server: str  # "py" or "go"


WORKLOADS = (
    Workload("unary c=1", "unary", 1),
    Workload("unary c=16", "unary", 16),
    Workload("bidi", "bidi", 1),
)
METRICS = (
    Metric("unary c=1", WORKLOADS[0], "calls/s", lambda r: r["calls"] / r["seconds"], True),
    Metric("unary c=1 p50", WORKLOADS[0], "µs", lambda r: float(r["p50_us"]), False),
    Metric("unary c=1 p99", WORKLOADS[0], "µs", lambda r: float(r["p99_us"]), False),
    Metric("unary c=16", WORKLOADS[1], "calls/s", lambda r: r["calls"] / r["seconds"], True),
    Metric("bidi", WORKLOADS[2], "msgs/s", lambda r: r["messages"] / r["seconds"], True),
)
PAIRS = (
    Pair("Python → Python", "py", "py"),
    Pair("Go → Python", "go", "py"),
    Pair("Python → Go", "py", "go"),
    Pair("Go → Go", "go", "go"),
)
BASELINE = PAIRS[-1]


@dataclass
class Measured:
    """Each metric's value per run, by pair (Samples keyed by pair and metric
    label), and the loads that failed."""

    samples: Samples = field(default_factory=Samples)
    failures: dict[tuple[Pair, Workload], list[str]] = field(default_factory=dict)

    def add(self, pair: Pair, workload: Workload, result: Json) -> None:
        for metric in METRICS:
            if metric.workload == workload:
                self.samples.add(pair.name, metric.label, metric.value(result))

    def values(self, pair: Pair, metric: Metric) -> list[float]:
        return self.samples.get(pair.name, metric.label)


def python_argv(*args: str, use_uvloop: bool) -> list[str]:
    loop_flag = "--uvloop" if use_uvloop else "--no-uvloop"
    return python_module("bench.ttrpc_bench", *args, loop_flag)


def load_argv(pair: Pair, sock: Path, workload: Workload, args: argparse.Namespace) -> list[str]:
    common = ["--kind", workload.kind, "--seconds", str(args.seconds)]
    common += ["--concurrency", str(workload.concurrency)]
    if pair.client == "go":
        return [str(args.peer), "bench", "--dial", f"unix:{sock}", *common]
    return python_argv("--load", str(sock), *common, use_uvloop=args.uvloop)


def describe(result: Json) -> str:
    if "calls" in result:
        rate = result["calls"] / result["seconds"]
        return f"{rate:,.0f} calls/s p50 {result['p50_us']:.0f}µs p99 {result['p99_us']:.0f}µs"
    return f"{result['messages'] / result['seconds']:,.0f} msgs/s"


def measure(
    args: argparse.Namespace, servers: dict[str, tuple[Path, subprocess.Popen[bytes]]]
) -> Measured:
    samples = Measured()
    timeout = WARMUP + args.seconds + LOAD_GRACE
    for run in range(1, args.runs + 1):
        for pair in PAIRS:
            sock, proc = servers[pair.server]
            for workload in WORKLOADS:
                if proc.poll() is not None:
                    raise RuntimeError(f"the {pair.server} server died (status {proc.returncode})")
                key = (pair, workload)
                label = f"run {run}/{args.runs} {pair.name:<15} {workload.name:<10}"
                try:
                    result = run_load(load_argv(pair, sock, workload, args), timeout)
                except (RuntimeError, ValueError) as exc:
                    samples.failures.setdefault(key, []).append(str(exc))
                    print(f"{label} FAILED: {exc}", file=sys.stderr, flush=True)
                    continue
                samples.add(pair, workload, result)
                print(f"{label} {describe(result)}", file=sys.stderr, flush=True)
    return samples


def fmt(value: float, unit: str) -> str:
    return f"{value:,.1f}" if unit == "µs" else f"{value:,.0f}"


def table(samples: Measured, runs: int) -> str:
    rows = []
    for metric in METRICS:
        base = spread(samples.values(BASELINE, metric))
        for pair in PAIRS:
            label = f"{metric.label} ({metric.unit})"
            values = samples.values(pair, metric)
            s = spread(values)
            if s is None:
                rows.append([label, pair.name, "failed", "", ""])
                continue
            low_high = f"{fmt(s.low, metric.unit)} - {fmt(s.high, metric.unit)}"
            ratio = f"{s.median / base.median:.2f}" if base and base.median else "n/a"
            note = "" if len(values) == runs else f" ({len(values)}/{runs} runs)"
            rows.append([label, pair.name, fmt(s.median, metric.unit) + note, low_high, ratio])
    header = ["workload", "client → server", "median", "min-max", "÷ Go → Go"]
    return "\n".join(markdown.table(header, rows, align="ll" + RIGHT * 3))


def report(args: argparse.Namespace, samples: Measured, started: datetime.datetime) -> str:
    loop = "uvloop" if args.uvloop else "asyncio"
    took = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
    notes = [
        f"- Python {platform.python_version()}, event loop: {loop}; "
        f"{machine.tool_version(['go', 'version'], missing='go (not on PATH)')}, "
        "containerd/ttrpc v1.2.9",
        f"- {os.cpu_count()} CPUs ({machine.cpu_model()}), "
        f"{platform.system()} {platform.release()}",
        f"- {args.runs} interleaved runs of {args.seconds:g}s per workload "
        f"(after {WARMUP:g}s warmup); {took:.0f}s in all",
        "- Every server and every client load is its own process; one connection per load. "
        "Unary: 16-byte payload, no timeout, C callers sharing the connection, each "
        "sequential. Bidi: one stream, a sender sending 16-byte messages as fast as it "
        "can, echoes counted.",
        "- ÷ Go → Go is the median over Go → Go's median: below 1 is slower for rates, "
        "above 1 is slower for latencies.",
    ]
    out = [
        "# ttrpc benchmark",
        "",
        f"Command: `{markdown.command_line('bench.ttrpc_bench')}`",
        "",
        f"Date: {started.strftime('%Y-%m-%d %H:%M:%S UTC')}",
        "",
        *notes,
        "",
        table(samples, args.runs),
    ]
    if samples.failures:
        out += ["", "Failures:", ""]
        for (pair, workload), errors in samples.failures.items():
            for error in errors:
                first = error.strip().splitlines()[0] if error.strip() else "?"
                out.append(f"- {pair.name} {workload.name}: {first}")
    return "\n".join(out) + "\n"


def benchmark(args: argparse.Namespace) -> int:
    from tests.interop.peers import build_peer  # noqa: PLC0415 (imports pytest)

    started = datetime.datetime.now(datetime.UTC)
    processes.exit_on_sigterm()
    print(f"event loop for Python: {'uvloop' if args.uvloop else 'asyncio'}", file=sys.stderr)
    args.peer = build_peer()
    with processes.scratch_dir("ttrpc-bench-") as tmp, ProcessGroup(tmp) as servers:
        py_sock, go_sock = tmp / "py.sock", tmp / "go.sock"
        py_server = servers.start_ready(
            python_argv("--serve", str(py_sock), use_uvloop=args.uvloop),
            "Python server",
            log_name="py-server.log",
            word=b"READY",
        )
        go_server = servers.start_ready(
            [str(args.peer), "server", "--listen", f"unix:{go_sock}"],
            "Go server",
            log_name="go-server.log",
            word=b"READY",
        )
        samples = measure(args, {"py": (py_sock, py_server), "go": (go_sock, go_server)})
    text = report(args, samples, started)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)
    print(f"written to {RESULTS.relative_to(REPO_ROOT)}", file=sys.stderr)
    return 1 if samples.failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window per load")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs")
    parser.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run Python processes on uvloop (default: when importable)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--serve", metavar="PATH", help="internal: serve Echo on a UNIX socket")
    mode.add_argument("--load", metavar="PATH", help="internal: run one load against PATH")
    parser.add_argument("--kind", choices=("unary", "bidi"), default="unary", help="with --load")
    parser.add_argument("--concurrency", type=int, default=1, help="with --load, unary callers")
    args = parser.parse_args()
    if args.seconds <= 0 or args.runs < 1 or args.concurrency < 1:
        parser.error("want --seconds > 0, --runs >= 1 and --concurrency >= 1")
    if args.uvloop is None:
        args.uvloop = event_loop.uvloop_importable()

    if args.serve:
        event_loop.run(serve(args.serve), args.uvloop)
        return 0
    if args.load:
        result = event_loop.run(
            load(args.load, args.kind, args.seconds, args.concurrency), args.uvloop
        )
        print(json.dumps(result), flush=True)
        return 0
    return benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
