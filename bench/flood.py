"""What a hostile VM can make the host process hold: ConnectRequest floods
against a real ``socketforward host``.

    uv run --locked --all-extras --group bench python -m bench.flood
        [--requests 100000] [--seconds 45] [--scenarios flood,never-reading]

The VM lives in this process and dials the host's --rpc-listen socket, as a
guest agent does. Each scenario starts a fresh host (one forward, never used:
every request names an unknown forward_id, so no target service is needed)
and samples its resident memory (VmRSS) and open descriptors (/proc/PID/fd)
every 50 ms:

  flood          a guest served by socketforward's own ttrpc Server sends
                 --requests ConnectRequests (short stream ids, unknown
                 forward ids) as fast as the host reads them, reading every
                 answer; no guest-side window (protocol.md 4.7)
  never-reading  a guest on a raw socket answers Bind and the Unbind probe,
                 takes the Accept call, then sends ConnectRequests (every
                 fourth with a 1 MB stream_id, all with a 1,200-character
                 unknown forward_id, which the host echoes cut at 256) and
                 never reads its socket again: the host should stop reading
                 past 1 MiB queued toward the VM and drop the connection
                 after vm_read_timeout (30 s, no CLI option), protocol.md 9.2

"before" is taken once the Accept call is open, "after" 1 s after the VM's
connection is gone (closed by us, or dropped by the host). A benchmark, not a
test: it reports figures and never fails on them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import empty_pb2

import ttrpc_asyncio as ttrpc
from bench import event_loop, machine, markdown, processes
from bench.loadgen import MiB
from bench.markdown import RIGHT
from socketforward import transport
from socketforward.api import socketforward_pb2 as pb
from socketforward.api.socketforward_ttrpc import SocketForwardBase
from ttrpc_asyncio.proto import ttrpc_pb2

SAMPLE_INTERVAL = 0.05
SETTLE = 1.0
"""Seconds between the VM's connection going and the "after" figures."""
START_TIMEOUT = 30.0
FLOOD_BOUND = 600.0
"""The flood scenario gives up waiting for answers after this long."""
DROP_LINE = "vm not reading its rpc connection, connection dropped"
FORWARD = "bench"

BIG_STREAM_ID = "x" * 1_000_000
LONG_FORWARD_ID = "unknown-" + "f" * 1192  # 1,200 characters, echoed cut at 256

_HEADER = struct.Struct(">IIBB")  # length, stream id, type, flags (protocol.md 3.1)
_REQUEST, _RESPONSE, _DATA = 1, 2, 3

AcceptServerStream = ttrpc.ServerStream[pb.ConnectResult, pb.ConnectRequest]


# -- the host process and what it holds ---------------------------------------------


@dataclass
class Figures:
    rss: int  # bytes
    fds: int


def host_figures(pid: int) -> Figures | None:
    """VmRSS and open descriptors of ``pid``; None once it is gone."""
    try:
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        return Figures(rss, len(os.listdir(f"/proc/{pid}/fd")))
    except OSError:
        return None


class Sampler:
    """Samples the host every 50 ms in a thread (the VM's event loop is busy
    flooding) and keeps the peaks."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = 0
        self.peak_fds = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _take(self) -> None:
        f = host_figures(self.pid)
        if f is not None:
            self.peak_rss = max(self.peak_rss, f.rss)
            self.peak_fds = max(self.peak_fds, f.fds)
            self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self._take()

    def __enter__(self) -> Sampler:
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()


@dataclass
class Result:
    scenario: str
    sent: int = 0
    answered: int | None = None
    wall: float = 0.0
    before: Figures | None = None
    after: Figures | None = None
    peak_rss: int = 0
    peak_fds: int = 0
    samples: int = 0
    cpu: float = 0.0  # the host's user + system seconds from "before" to "after"
    notes: list[str] = field(default_factory=list)


@dataclass
class Host:
    proc: asyncio.subprocess.Process
    rpc: Path
    log: Path

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines() if self.log.exists() else []

    async def stats_line(self) -> str | None:
        """The host's totals line (SIGUSR1), or None if it did not log one."""
        if self.proc.returncode is not None:
            return None
        count = sum("stats unknown_forward_requests=" in line for line in self.log_lines())
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = [ln for ln in self.log_lines() if "stats unknown_forward_requests=" in ln]
            if len(lines) > count:
                return lines[-1]
            await asyncio.sleep(0.05)
        return None


@contextlib.asynccontextmanager
async def host_process(workdir: Path) -> AsyncIterator[Host]:
    """``socketforward host`` with its sockets in *workdir* (0700), its stderr
    logged there; yielded once its RPC socket exists, stopped on the way out."""
    rpc, streams, log = workdir / "rpc.sock", workdir / "streams.sock", workdir / "host.log"
    argv = processes.python_module(
        "socketforward", "host", "--rpc-listen", f"unix:{rpc}", "--streams", f"unix:{streams}",
        "--forward", f"{FORWARD}={workdir / 'bench.sock'}:/run/socketfwd/bench.sock",
    )  # fmt: skip
    with log.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            preexec_fn=processes.die_with_parent,
        )
    host = Host(proc, rpc, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not rpc.exists():
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"host did not start; log:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.02)
        yield host
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def host_cpu(pid: int) -> float:
    with contextlib.suppress(OSError):
        return sum(processes.user_system_seconds(pid))
    return 0.0


def host_warnings(host: Host) -> str:
    """The host's WARNING and ERROR lines, counted by their text before the first key=value."""
    counts: Counter[str] = Counter()
    for line in host.log_lines():
        parts = line.split(" ", 4)  # date time LEVEL logger: message
        if len(parts) == 5 and parts[2] in ("WARNING", "ERROR"):
            words = []
            for word in parts[4].split():
                if "=" in word:
                    break
                words.append(word)
            counts[" ".join(words)] += 1
    return ", ".join(f"`{text}` {n}x" for text, n in counts.most_common()) or "none"


async def settle_and_measure(host: Host, result: Result, cpu0: float) -> None:
    await asyncio.sleep(SETTLE)
    result.after = host_figures(host.proc.pid)
    result.cpu = host_cpu(host.proc.pid) - cpu0
    line = await host.stats_line()
    if line is not None:
        totals = line.split("stats ", 1)[1]
        result.notes.append(f"{result.scenario}: host totals (SIGUSR1) `{totals}`")


# -- scenario 1: a flood the VM reads ------------------------------------------------


class FloodingGuest(SocketForwardBase):
    """A guest agent on socketforward's ttrpc Server: Bind and Unbind answer
    OK; the first Accept call is flooded with ConnectRequests once ``go`` is
    set, and its answers are counted until ``done``."""

    def __init__(self, requests: int) -> None:
        self.requests = requests
        self.sent = 0
        self.answered = 0
        self.errors: Counter[str] = Counter()
        self.opened = asyncio.Event()
        self.go = asyncio.Event()
        self.done = asyncio.Event()
        self.accept_calls = 0

    async def Bind(self, request: pb.BindRequest, context: ttrpc.CallContext) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    async def Unbind(
        self, request: pb.UnbindRequest, context: ttrpc.CallContext
    ) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    async def Accept(self, stream: AcceptServerStream) -> None:
        self.accept_calls += 1
        if self.opened.is_set():  # a reopened call: held, not flooded
            async for _ in stream:
                pass
            return
        self.opened.set()
        await self.go.wait()
        sender = asyncio.get_running_loop().create_task(self._send(stream))
        try:
            async for result in stream:
                self.answered += 1
                self.errors[result.error.split(":", 1)[0] or "ok"] += 1
                if self.answered >= self.requests:
                    self.done.set()
        finally:
            sender.cancel()
            await asyncio.wait({sender})

    async def _send(self, stream: AcceptServerStream) -> None:
        for i in range(self.requests):
            await stream.send(pb.ConnectRequest(stream_id=f"s{i}", forward_id=f"nope-{i}"))
            self.sent += 1


async def flood(workdir: Path, requests: int) -> Result:
    result = Result("flood")
    async with host_process(workdir) as host:
        guest = FloodingGuest(requests)
        server = ttrpc.Server()
        server.register(guest)
        sock = await transport.connect(transport.UnixEndpoint(str(host.rpc)), timeout=10)
        serving = asyncio.get_running_loop().create_task(server.serve_connection(sock))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await guest.opened.wait()
            await asyncio.sleep(0.2)
            result.before = host_figures(host.proc.pid)
            cpu0 = host_cpu(host.proc.pid)
            with Sampler(host.proc.pid) as sampler:
                t0 = time.perf_counter()
                guest.go.set()
                try:
                    async with asyncio.timeout(FLOOD_BOUND):
                        await guest.done.wait()
                except TimeoutError:
                    result.notes.append(f"flood: gave up waiting for answers after {FLOOD_BOUND} s")
                result.wall = time.perf_counter() - t0
                result.sent, result.answered = guest.sent, guest.answered
                serving.cancel()
                await asyncio.wait({serving})
                await server.shutdown(grace=0)
                await settle_and_measure(host, result, cpu0)
        finally:
            serving.cancel()
            await asyncio.wait({serving})
            await server.shutdown(grace=0)
        result.peak_rss, result.peak_fds, result.samples = (
            sampler.peak_rss, sampler.peak_fds, sampler.samples,
        )  # fmt: skip
        result.notes.append(f"flood: host warnings: {host_warnings(host)}")
        answers = ", ".join(f"{k}: {v:,}" for k, v in guest.errors.most_common())
        result.notes.append(f"flood: answers by error text: {answers}")
        if guest.accept_calls > 1:
            result.notes.append(f"flood: the host opened {guest.accept_calls} Accept calls")
        if result.wall:
            result.notes.append(f"flood: {result.answered / result.wall:,.0f} answers/s")
    return result


# -- scenario 2: a VM that never reads -------------------------------------------------


class RawVM:
    """A guest agent by hand on a raw socket: serves the host's unary calls
    until it opens Accept, then floods and never reads again."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0
        self.sent_bytes = 0

    async def _recv_exactly(self, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        data = bytearray()
        while len(data) < n:
            chunk = await loop.sock_recv(self.sock, n - len(data))
            if not chunk:
                raise ConnectionError("host closed the rpc connection")
            data += chunk
        return bytes(data)

    async def accept_call(self) -> int:
        """Answer Bind and the Unbind probe OK (an empty payload is Empty);
        the Accept call's stream id."""
        loop = asyncio.get_running_loop()
        while True:
            header: tuple[int, int, int, int] = _HEADER.unpack(
                await self._recv_exactly(_HEADER.size)
            )
            length, stream_id, type_, _ = header
            data = await self._recv_exactly(length)
            if type_ != _REQUEST:
                continue
            if ttrpc_pb2.Request.FromString(data).method == "Accept":
                return stream_id
            await loop.sock_sendall(self.sock, _HEADER.pack(0, stream_id, _RESPONSE, 0))

    async def flood(self, accept_id: int) -> None:
        """Until the host hangs up (OSError) or the caller's deadline."""
        loop = asyncio.get_running_loop()

        def frame(request: pb.ConnectRequest) -> bytes:
            data = request.SerializeToString()
            return _HEADER.pack(len(data), accept_id, _DATA, 0) + data

        big = frame(pb.ConnectRequest(stream_id=BIG_STREAM_ID, forward_id=LONG_FORWARD_ID))
        i = 0
        while True:
            if i % 4 == 0:
                data = big
            else:
                data = frame(pb.ConnectRequest(stream_id=f"s-{i}", forward_id=LONG_FORWARD_ID))
            await loop.sock_sendall(self.sock, data)
            self.sent += 1
            self.sent_bytes += len(data)
            i += 1

    def unread_answers(self, accept_id: int) -> tuple[int, int, str]:
        """After the host is gone: the ConnectResults waiting in our socket
        (count, bytes) and what came after them (EOF or an error)."""
        self.sock.setblocking(True)
        self.sock.settimeout(2)
        buf = bytearray()
        end = "EOF"
        try:
            while chunk := self.sock.recv(1 << 20):
                buf += chunk
        except OSError as exc:
            end = type(exc).__name__
        count, offset = 0, 0
        while offset + _HEADER.size <= len(buf):
            length, stream_id, type_, _ = _HEADER.unpack_from(buf, offset)
            offset += _HEADER.size + length
            if offset <= len(buf) and stream_id == accept_id and type_ == _DATA:
                count += 1
        return count, len(buf), end


async def never_reading(workdir: Path, seconds: float) -> Result:
    result = Result("never-reading")
    async with host_process(workdir) as host:
        sock = await transport.connect(transport.UnixEndpoint(str(host.rpc)), timeout=10)
        with sock:
            vm = RawVM(sock)
            async with asyncio.timeout(START_TIMEOUT):
                accept_id = await vm.accept_call()
            await asyncio.sleep(0.2)
            result.before = host_figures(host.proc.pid)
            cpu0 = host_cpu(host.proc.pid)
            with Sampler(host.proc.pid) as sampler:
                t0 = time.perf_counter()
                flooding = asyncio.get_running_loop().create_task(vm.flood(accept_id))
                last_sent, stalled_at = 0, 0.0
                while not flooding.done() and time.perf_counter() - t0 < seconds:
                    await asyncio.wait({flooding}, timeout=0.1)
                    if vm.sent != last_sent:
                        last_sent, stalled_at = vm.sent, time.perf_counter()
                result.wall = time.perf_counter() - t0
                dropped = flooding.done()
                if not dropped:
                    flooding.cancel()
                    result.notes.append(
                        f"never-reading: the host had not dropped the connection after "
                        f"{seconds:g} s; we closed it"
                    )
                await asyncio.wait({flooding})
                error = None if flooding.cancelled() else flooding.exception()
                if dropped:
                    result.notes.append(
                        f"never-reading: the host hung up {result.wall:.1f} s after the flood "
                        f"began (the VM's send failed: {error!r}); the VM's sends last went "
                        f"through at {stalled_at - t0:.1f} s"
                    )
                result.sent = vm.sent
                result.notes.append(
                    f"never-reading: {vm.sent:,} requests ({vm.sent_bytes / MiB:,.1f} MiB, "
                    f"{vm.sent_bytes / MiB / max(result.wall, 1e-9):,.0f} MiB/s) written by the VM"
                )
                if dropped:  # reading earlier would let the host go on
                    count, size, end = vm.unread_answers(accept_id)
                    result.answered = count
                    result.notes.append(
                        f"never-reading: {count:,} answers ({size / 1024:,.0f} KiB) were waiting "
                        f"unread in the VM's socket when the host hung up, then {end}"
                    )
                sock.close()
                await settle_and_measure(host, result, cpu0)
        result.peak_rss, result.peak_fds, result.samples = (
            sampler.peak_rss, sampler.peak_fds, sampler.samples,
        )  # fmt: skip
        result.notes.append(f"never-reading: host warnings: {host_warnings(host)}")
        lines = [ln for ln in host.log_lines() if DROP_LINE in ln]
        if lines:
            result.notes.append(f"never-reading: host log ({len(lines)}x) `{lines[0]}`")
        else:
            result.notes.append(f"never-reading: no `{DROP_LINE}` line in the host log")
    return result


# -- report ---------------------------------------------------------------------------


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.1f}"


def report(results: list[Result], started: datetime.datetime, took: float) -> str:
    rows = []
    for r in results:
        before, after = r.before, r.after
        rows.append([
            r.scenario, f"{r.sent:,}", "-" if r.answered is None else f"{r.answered:,}",
            f"{r.wall:.1f}",
            _mib(before.rss if before else None), _mib(r.peak_rss),
            _mib(after.rss if after else None),
            str(before.fds) if before else "-", str(r.peak_fds),
            str(after.fds) if after else "-", f"{r.cpu:.1f}",
        ])  # fmt: skip
    header = [
        "scenario", "requests sent", "answered", "wall s", "RSS before MiB", "RSS peak MiB",
        "RSS after MiB", "fds before", "fds peak", "fds after", "host CPU s",
    ]  # fmt: skip
    lines = [
        "# What a hostile VM makes `socketforward host` hold",
        "",
        f"{started:%Y-%m-%d %H:%M} UTC, {took:.0f} s; {machine.cpu_model()}, "
        f"{os.cpu_count()} CPUs, {machine.memory_gib():.0f} GiB; Python "
        f"{sys.version.split()[0]}, this process on {event_loop.loop_name()}.",
        "",
        *markdown.table(header, rows, "l" + RIGHT * 10),
        "",
        "RSS is the host's VmRSS, fds its /proc/PID/fd entries, peaks sampled every "
        f'{SAMPLE_INTERVAL * 1000:.0f} ms; "answered" is results the VM read (never-reading: '
        "found unread in its socket after the host hung up); host CPU is its user + system "
        "seconds from before to after.",
        "",
        *(f"* {note}" for r in results for note in r.notes),
        "",
        "```",
        markdown.command_line("bench.flood", "--group bench"),
        "```",
    ]
    return "\n".join(lines) + "\n"


# -- driver ---------------------------------------------------------------------------

SCENARIOS = ["flood", "never-reading"]


async def run(args: argparse.Namespace, scenarios: list[str]) -> list[Result]:
    results = []
    with processes.scratch_dir("fwdflood-") as tmp:
        for name in scenarios:
            workdir = tmp / name
            workdir.mkdir(mode=0o700)
            if name == "flood":
                results.append(await flood(workdir, args.requests))
            else:
                results.append(await never_reading(workdir, args.seconds))
            print(f"{name}: done", file=sys.stderr)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=100_000, help="flood: ConnectRequests (default 100000)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=45.0,
        help="never-reading: seconds the host gets to drop the VM (default 45)",
    )
    parser.add_argument("--scenarios", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    args = parser.parse_args()
    scenarios = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {sorted(unknown)}")
    if args.requests <= 0 or args.seconds <= 0:
        parser.error("--requests and --seconds must be positive")
    processes.exit_on_sigterm()
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    results = event_loop.run(run(args, scenarios))
    print(report(results, started, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
