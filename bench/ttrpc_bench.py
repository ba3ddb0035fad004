"""ttrpc benchmark: socketforward's asyncio ttrpc against containerd/ttrpc (Go).

    uv run --locked --all-extras python bench/ttrpc_bench.py [--seconds 3] [--runs 3]
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
import ctypes
import datetime
import json
import math
import os
import platform
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # for tests.interop.* when run as a script
    sys.path.insert(0, str(REPO_ROOT))

from socketforward import ttrpc  # noqa: E402
from tests.interop.echo_service import EchoService  # noqa: E402
from tests.interop.gen import echo_pb2, echo_ttrpc  # noqa: E402

PAYLOAD = b"b" * 16
WARMUP = 0.2
"""Seconds of load before measuring, in every load process (as ``peer bench``)."""
READY_TIMEOUT = 30.0
LOAD_GRACE = 20.0
"""How long a load process may overrun its window before it is killed."""
RESULTS = REPO_ROOT / "bench" / "results" / "ttrpc.md"

Json = dict[str, Any]
T = TypeVar("T")


# ------------------------------------------------------------------ event loop


def uvloop_importable() -> bool:
    try:
        import uvloop  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def run_async(main: Coroutine[Any, Any, T], use_uvloop: bool) -> T:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if use_uvloop:
        import uvloop  # noqa: PLC0415

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)


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


def percentile_us(sorted_ns: list[int], p: float) -> float:
    """Nearest-rank percentile in microseconds (as ``peer bench``)."""
    if not sorted_ns:
        return 0.0
    rank = max(math.ceil(p * len(sorted_ns)) - 1, 0)
    return sorted_ns[rank] / 1e3


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
        "p50_us": percentile_us(latencies, 0.50),
        "p99_us": percentile_us(latencies, 0.99),
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


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the child if this script dies (even by SIGKILL)."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate, then kill if it lingers; reap it either way."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def wait_ready(proc: subprocess.Popen[bytes], what: str) -> None:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + READY_TIMEOUT
    seen = b""
    while b"READY\n" not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{what} not READY within {READY_TIMEOUT}s")
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"{what} exited before READY (status {proc.wait()})")
            seen += chunk


@contextlib.contextmanager
def server_process(argv: list[str], what: str, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads here)
        )
    try:
        try:
            wait_ready(proc, what)
        except (TimeoutError, RuntimeError) as exc:
            stop_process(proc)
            log_text = log_path.read_text(errors="replace")
            raise RuntimeError(f"{exc}; log:\n{log_text}") from exc
        yield proc
    finally:
        stop_process(proc)


def run_load(argv: list[str], timeout: float) -> Json:
    """Run a load process; its last stdout line is the result JSON."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads here)
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
        stop_process(proc)
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
class Samples:
    results: dict[tuple[Pair, Workload], list[Json]] = field(default_factory=dict)
    failures: dict[tuple[Pair, Workload], list[str]] = field(default_factory=dict)

    def values(self, pair: Pair, metric: Metric) -> list[float]:
        return [metric.value(r) for r in self.results.get((pair, metric.workload), [])]


def python_argv(*args: str, use_uvloop: bool) -> list[str]:
    loop_flag = "--uvloop" if use_uvloop else "--no-uvloop"
    return [sys.executable, str(Path(__file__).resolve()), *args, loop_flag]


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


def measure(args: argparse.Namespace, servers: dict[str, tuple[Path, Any]]) -> Samples:
    samples = Samples()
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
                samples.results.setdefault(key, []).append(result)
                print(f"{label} {describe(result)}", file=sys.stderr, flush=True)
    return samples


def fmt(value: float, unit: str) -> str:
    return f"{value:,.1f}" if unit == "µs" else f"{value:,.0f}"


def table(samples: Samples, runs: int) -> str:
    lines = [
        "| workload | client → server | median | min-max | ÷ Go → Go |",
        "|---|---|--:|--:|--:|",
    ]
    for metric in METRICS:
        base = samples.values(BASELINE, metric)
        base_median = statistics.median(base) if base else None
        for pair in PAIRS:
            label = f"{metric.label} ({metric.unit})"
            values = samples.values(pair, metric)
            if not values:
                lines.append(f"| {label} | {pair.name} | failed | | |")
                continue
            median = statistics.median(values)
            spread = f"{fmt(min(values), metric.unit)} - {fmt(max(values), metric.unit)}"
            ratio = f"{median / base_median:.2f}" if base_median else "n/a"
            note = "" if len(values) == runs else f" ({len(values)}/{runs} runs)"
            lines.append(
                f"| {label} | {pair.name} | {fmt(median, metric.unit)}{note} | {spread} | {ratio} |"
            )
    return "\n".join(lines)


def go_version() -> str:
    go = shutil.which("go")
    if go is None:
        return "go (not on PATH)"
    proc = subprocess.run([go, "version"], capture_output=True, text=True, check=False)
    return proc.stdout.strip()


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def command_line() -> str:
    argv = [sys.argv[0], *sys.argv[1:]]
    with contextlib.suppress(ValueError):
        argv[0] = str(Path(argv[0]).resolve().relative_to(Path.cwd()))
    prefix = "uv run --locked --all-extras " if os.environ.get("UV_RUN_RECURSION_DEPTH") else ""
    return prefix + shlex.join(["python", *argv])


def report(args: argparse.Namespace, samples: Samples, started: datetime.datetime) -> str:
    loop = "uvloop" if args.uvloop else "asyncio"
    took = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
    notes = [
        f"- Python {platform.python_version()}, event loop: {loop}; {go_version()}, "
        "containerd/ttrpc v1.2.9",
        f"- {os.cpu_count()} CPUs ({cpu_model()}), {platform.system()} {platform.release()}",
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
        f"Command: `{command_line()}`",
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


def _raise_on_sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def benchmark(args: argparse.Namespace) -> int:
    from tests.interop.peers import build_peer  # noqa: PLC0415 (imports pytest)

    started = datetime.datetime.now(datetime.UTC)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    print(f"event loop for Python: {'uvloop' if args.uvloop else 'asyncio'}", file=sys.stderr)
    args.peer = build_peer()
    tmp = Path(tempfile.mkdtemp(prefix="ttrpc-bench-"))
    try:
        py_sock, go_sock = tmp / "py.sock", tmp / "go.sock"
        with (
            server_process(
                python_argv("--serve", str(py_sock), use_uvloop=args.uvloop),
                "Python server",
                tmp / "py-server.log",
            ) as py_server,
            server_process(
                [str(args.peer), "server", "--listen", f"unix:{go_sock}"],
                "Go server",
                tmp / "go-server.log",
            ) as go_server,
        ):
            samples = measure(args, {"py": (py_sock, py_server), "go": (go_sock, go_server)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
        args.uvloop = uvloop_importable()

    if args.serve:
        run_async(serve(args.serve), args.uvloop)
        return 0
    if args.load:
        result = run_async(load(args.load, args.kind, args.seconds, args.concurrency), args.uvloop)
        print(json.dumps(result), flush=True)
        return 0
    return benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
