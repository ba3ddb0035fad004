"""Forward-path benchmark: socketforward against nerdbox's Go path, socat and a direct socket.

    uv run --locked --all-extras --group bench python -m bench.forward_bench [--quick]
        [--rounds 3] [--paths DIRECT,OURS,...] [--load go|python] [--target go|python]
        [--max-noise 5] [--nerdbox HOST_BIN,VM_BIN]

Paths, all over UNIX sockets, each forwarding side its own process:
  DIRECT   the load connects to the target service itself
  SOCAT    two chained ``socat UNIX-LISTEN,fork UNIX-CONNECT`` relays (a forward's hop count)
  GO       nerdbox-vm + nerdbox-host, the Go stand-ins of tests/interop (io.Copy relays)
  OURS     ``socketforward guest`` + ``socketforward host`` (uvloop when installed)
  OURS>GO  our guest + the Go host;  GO>OURS  the Go guest + our host
  EXPOSE   OURS the other way: the load connects to the host's socket of an
           expose and the target is "in the VM" (docs/protocol.md 4.10)
  NERDBOX  only with --nerdbox: two other programs with the stand-ins' command
           line, e.g. nerdbox's own code built elsewhere, to calibrate GO against
Workloads: throughput (1 GiB up, 1 GiB down, byte counts checked), 1-byte round
trip (p50/p99), time to first byte of a new connection (connect, send 1 byte,
receive it; p50/p99 over new connections one after another, so a path's
per-connection setup shows alone), connection rate (connect, one echo, close;
32 concurrent), burst (2,000 simultaneous connects: served / refused / reset /
hung within a bound), memory (RSS of the forwarding processes with 1,000 idle forwarded
connections, minus the idle baseline, per connection), CPU seconds per GiB
relayed (from /proc of the forwarding processes during the throughput runs).

The load generator and the target service are Go by default (bench/goload.py,
bench/go/cmd/sfload: plain system calls, so DIRECT is the ceiling of the
machine's sockets); ``--load python`` and ``--target python`` use
bench/loadgen.py and bench/target.py instead, whose interpreter time every path
then carries. The memory workload holds its idle connections from Python either
way (it measures the forwarders' RSS, not the load's speed).

Each round starts every path's processes afresh, then runs each workload on
every path in turn (the path order rotates per round), so machine noise hits
all paths alike; the report gives the median and min-max over the rounds and
writes bench/results/latest.md and latest.png. A benchmark, not a test:
it reports figures and never fails on a time.

Each round also records what else used the CPUs meanwhile: other processes'
CPU time (the machine's busy time in /proc/stat minus the benchmark's own
process tree, the biggest named from /proc/PID/stat) and the hypervisor's
steal. A round above ``--max-noise`` percent of the CPU there was makes the run
too noisy to publish: the report says so at its top and the README's table is
not written.

The GO path's ratios to DIRECT are checked against those of nerdbox's own code
(issue 17, section 1): a calibration table gives each ratio, its per-round
min-max, and whether it lands within 15% of nerdbox's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import goload, loadgen, machine, markdown, processes
from bench.event_loop import loop_name
from bench.loadgen import GiB, MiB
from bench.machine import Noise, NoiseMeter
from bench.markdown import RIGHT
from bench.processes import ProcessGroup
from bench.stats import Samples, percentile, ratio
from bench.target import ECHO
from bench.target import start as start_python_target

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = REPO_ROOT / "bench" / "results" / "latest.md"
README = REPO_ROOT / "README.md"
README_BEGIN = "<!-- forward_bench.py writes this table; do not edit -->"
README_END = "<!-- end of forward_bench.py's table -->"
RESULTS_PNG = REPO_ROOT / "bench" / "results" / "latest.png"
START_TIMEOUT = 30.0

ALL_PATHS = ["DIRECT", "SOCAT", "GO", "OURS", "OURS>GO", "GO>OURS", "EXPOSE", "NERDBOX"]
DEFAULT_PATHS = ALL_PATHS[:-1]  # NERDBOX runs only when --nerdbox names its programs
MAX_NOISE = 5.0
"""Percent of the CPU there was that other work and steal may take in any round
of a run whose figures are published (the README's table)."""
PATH_HELP = {
    "DIRECT": "load -> target service, no forwarder",
    "SOCAT": "two chained socat relays (fork per connection, backlog=4096)",
    "GO": "nerdbox-vm + nerdbox-host (Go stand-ins, io.Copy)",
    "OURS": "socketforward guest + socketforward host",
    "OURS>GO": "our guest + the Go host",
    "GO>OURS": "the Go guest + our host",
    "EXPOSE": "our guest + our host, VM -> host (an expose)",
    "NERDBOX": "the --nerdbox programs (host, VM), as GO",
}

# Issue 17, section 1: nerdbox's own code (containerd/nerdbox d50bdab, vsock
# replaced by UNIX sockets), a Go load generator, two runs on a quiet 2-core
# machine: each figure's ratio to DIRECT in the same run, lowest and highest of
# the two runs. The GO stand-ins must land within CALIBRATION_TOLERANCE of them.
NERDBOX_RATIOS: dict[str, tuple[float, float]] = {
    "up": (0.25, 0.28),
    "down": (0.25, 0.28),
    "p50": (3.9, 4.1),
    "p99": (3.0, 3.0),
    "conns": (0.12, 0.13),
    "served": (0.25, 0.30),  # the share of the burst served (DIRECT serves all)
}
CALIBRATION_TOLERANCE = 0.15

# What "no worse than today" means for CPU and idle memory: socketforward's own
# figures when issue 17 was filed (two runs, the higher of each).
BEFORE_CPU_PER_GIB = 0.31
BEFORE_KIB_PER_IDLE = 4.0


# -- one path's processes ----------------------------------------------------------------


@dataclass
class Path_:
    name: str
    entry: str = ""
    pids: list[int] = field(default_factory=list)


@dataclass
class Settings:
    load: loadgen.Load
    size: int
    rtt_count: int
    ttfb_count: int
    conn_seconds: float
    workers: int
    burst: int
    burst_bound: float
    idle: int


def _ours(*args: str) -> list[str]:
    return [sys.executable, "-m", "socketforward", *args]


def start_path(
    procs: ProcessGroup,
    name: str,
    target: str,
    go_bins: dict[str, tuple[Path, Path]] | tuple[Path, Path] | None,
    socat: str | None,
) -> Path_:
    """Start one path's forwarding processes; return it once a round trip works.

    ``go_bins``: the (host, VM) programs of GO (a pair), or of GO and NERDBOX
    by path name; None when no Go path runs."""
    d = procs.workdir / name.lower().replace(">", "-")
    d.mkdir()
    (d / "host").mkdir(mode=0o700)
    rpc, streams, vm_path = d / "host" / "rpc.sock", d / "streams.sock", d / "vm" / "fwd.sock"
    p = Path_(name)
    if name == "DIRECT":
        p.entry = target
        return p
    if name == "SOCAT":
        assert socat is not None
        s2, s1 = d / "socat2.sock", d / "socat1.sock"
        a = procs.start(
            [socat, f"UNIX-LISTEN:{s2},fork,backlog=4096", f"UNIX-CONNECT:{target}"], "socat2.log"
        )
        processes.wait_for_path(str(s2), START_TIMEOUT, a)
        b = procs.start(
            [socat, f"UNIX-LISTEN:{s1},fork,backlog=4096", f"UNIX-CONNECT:{s2}"], "socat1.log"
        )
        processes.wait_for_path(str(s1), START_TIMEOUT, b)
        p.entry, p.pids = str(s1), [a.pid, b.pid]
        _check(p)
        return p
    # GO's programs for GO, OURS>GO and GO>OURS; --nerdbox's for NERDBOX.
    by_path = go_bins if isinstance(go_bins, dict) else {"GO": go_bins} if go_bins else {}
    bins = by_path.get("NERDBOX" if name == "NERDBOX" else "GO")
    go_guest = name.startswith("GO") or name == "NERDBOX"
    go_host = name.endswith("GO") or name == "NERDBOX"
    forward = f"bench={target}:{vm_path}"
    exposed = d / "host" / "exposed.sock"
    log_host, log_guest = f"{name}-host.log", f"{name}-guest.log"
    if go_host:
        assert bins is not None
        argv = [str(bins[0]), "--rpc-listen", f"unix:{rpc}", "--streams", f"unix:{streams}"]
        host = procs.start([*argv, "--forward", forward], log_host)
    else:
        # EXPOSE: the forward's VM socket appearing says the guest is connected.
        expose = ["--expose", f"bench-x={target}:{exposed}"] if name == "EXPOSE" else []
        host = procs.start(
            _ours(
                "host", "--rpc-listen", f"unix:{rpc}", "--streams", f"unix:{streams}",
                "--forward", forward, *expose,
            ),
            log_host,
        )  # fmt: skip
    processes.wait_for_path(str(rpc), START_TIMEOUT, host)
    if go_guest:
        assert bins is not None
        guest = procs.start(
            [str(bins[1]), "--rpc-dial", f"unix:{rpc}", "--streams", f"unix:{streams}"],
            log_guest,
        )
    else:
        guest = procs.start(
            _ours("guest", "--rpc-dial", f"unix:{rpc}", "--streams", f"unix:{streams}"),
            log_guest,
        )
    try:
        processes.wait_for_path(str(vm_path), START_TIMEOUT, host, guest)
        entry = exposed if name == "EXPOSE" else vm_path
        p.entry, p.pids = str(entry), [guest.pid, host.pid]
        _check(p)
    except Exception as exc:
        raise RuntimeError(
            f"{name} did not start: {exc}\nhost log:\n{procs.log(log_host)}\n"
            f"guest log:\n{procs.log(log_guest)}"
        ) from exc
    return p


def _check(p: Path_) -> None:
    """One echo through the path (the Accept stream may open just after Bind)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with loadgen.connect(p.entry, timeout=5) as sock:
                sock.sendall(ECHO)
                if sock.recv(1) == ECHO:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{p.name}: no echo through {p.entry}")
        time.sleep(0.05)


# -- samples ------------------------------------------------------------------------


@dataclass
class Metric:
    key: str
    label: str  # table header
    unit: str
    higher_is_better: bool
    fmt: str = "{:,.0f}"
    ratios: bool = True  # a column of the ratio table


METRICS = [
    Metric("up", "up MB/s", "MB/s", True),
    Metric("down", "down MB/s", "MB/s", True),
    Metric("cpu", "CPU s/GiB", "s/GiB", False, "{:.2f}"),
    Metric("p50", "RTT p50 µs", "µs", False, "{:.1f}"),
    Metric("p99", "RTT p99 µs", "µs", False, "{:.1f}"),
    Metric("ttfb50", "TTFB p50 µs", "µs", False, "{:,.1f}"),
    Metric("ttfb99", "TTFB p99 µs", "µs", False, "{:,.1f}"),
    Metric("conns", "conns/s", "conns/s", True),
    Metric("rss", "KiB/idle conn", "KiB", False, "{:.1f}"),
    Metric("served", "burst served", "of burst", True, ratios=False),
    Metric("refused", "burst refused", "", False, ratios=False),
    Metric("reset", "burst reset", "", False, ratios=False),
    Metric("hung", "burst hung", "", False, ratios=False),
]
RATIO_METRICS = [m for m in METRICS if m.ratios]


def w_memory(p: Path_, s: Settings, out: Samples) -> None:
    if not p.pids:
        return
    time.sleep(0.3)
    base = processes.rss_bytes(p.pids)
    with loadgen.idle_connections(p.entry, s.idle, 32, bound=60) as held:
        time.sleep(0.5)
        rss = processes.rss_bytes(p.pids)
    # The next workload must not share the CPU with closing them all.
    processes.wait_settled(p.pids)
    if held < s.idle:
        out.notes.append(f"{p.name}: memory run held {held} of {s.idle} connections")
    if held:
        out.add(p.name, "rss", (rss - base) / held / 1024)


def w_throughput(p: Path_, s: Settings, out: Samples) -> None:
    cpu0 = processes.cpu_seconds(p.pids)
    out.add(p.name, "up", s.size / s.load.upload(p.entry, s.size) / 1e6)
    out.add(p.name, "down", s.size / s.load.download(p.entry, s.size) / 1e6)
    if p.pids:
        time.sleep(0.2)  # a forking relay reaps its child: its CPU time then counts
        out.add(p.name, "cpu", (processes.cpu_seconds(p.pids) - cpu0) / (2 * s.size / GiB))


def w_rtt(p: Path_, s: Settings, out: Samples) -> None:
    samples = s.load.round_trips(p.entry, s.rtt_count)
    out.add(p.name, "p50", percentile(samples, 0.5))
    out.add(p.name, "p99", percentile(samples, 0.99))


def w_ttfb(p: Path_, s: Settings, out: Samples) -> None:
    samples = s.load.first_bytes(p.entry, s.ttfb_count)
    out.add(p.name, "ttfb50", percentile(samples, 0.5))
    out.add(p.name, "ttfb99", percentile(samples, 0.99))


def w_conns(p: Path_, s: Settings, out: Samples) -> None:
    rate, failed = s.load.connection_rate(p.entry, s.conn_seconds, s.workers)
    out.add(p.name, "conns", rate)
    if failed:
        out.notes.append(f"{p.name}: {failed} connections failed in the connection-rate run")


def w_burst(p: Path_, s: Settings, out: Samples) -> None:
    r = s.load.burst(p.entry, s.burst, s.burst_bound)
    for key in ("served", "refused", "reset", "hung"):
        out.add(p.name, key, getattr(r, key))


# Memory first (on fresh processes), burst last (it may break nerdbox's Accept stream).
WORKLOADS: list[tuple[str, Callable[[Path_, Settings, Samples], None]]] = [
    ("memory", w_memory),
    ("throughput", w_throughput),
    ("round trip", w_rtt),
    ("first byte", w_ttfb),
    ("connection rate", w_conns),
    ("burst", w_burst),
]


# -- report ---------------------------------------------------------------------------


def _fmt(metric: Metric, value: float | None) -> str:
    return "-" if value is None else metric.fmt.format(value)


def cell(samples: Samples, path: str, metric: Metric) -> str:
    s = samples.spread(path, metric.key)
    if s is None:
        return "-"
    med = _fmt(metric, s.median)
    if not s.varies:
        return med
    return f"{med} <sub>{_fmt(metric, s.low)}-{_fmt(metric, s.high)}</sub>"


def ratio_cell(samples: Samples, a: str, b: str, key: str) -> str:
    r = ratio(samples.median(a, key), samples.median(b, key))
    return "-" if r is None else f"{r:.2f}"


Check = Callable[["Samples"], tuple[str, bool | None]]


@dataclass
class Target:
    what: str
    against: str
    check: Check


def _m(samples: Samples, path: str, key: str) -> float | None:
    return samples.median(path, key)


def _ratio(s: Samples, key: str, base: str) -> tuple[float, float, float] | None:
    """(OURS, base, OURS/base) of the medians of *key*; None when one is missing."""
    ours, other = _m(s, "OURS", key), _m(s, base, key)
    if ours is None or other is None or not other:
        return None
    return ours, other, ours / other


def _t_throughput(s: Samples) -> tuple[str, bool | None]:
    r = [_ratio(s, k, "DIRECT") for k in ("up", "down")]
    if r[0] is None or r[1] is None:
        return "-", None
    return f"up {r[0][2]:.2f}x, down {r[1][2]:.2f}x", min(r[0][2], r[1][2]) >= 0.6


def _t_vs_go(key: str, unit: str, limit: float, *, at_least: bool = False) -> Check:
    def check(s: Samples) -> tuple[str, bool | None]:
        r = _ratio(s, key, "GO")
        if r is None:
            return "-", None
        ours, go, ratio = r
        met = ratio >= limit if at_least else ratio <= limit
        return f"{ours:,.1f} vs GO {go:,.1f} {unit} ({ratio:.2f}x)", met

    return check


def _t_burst_for(total: int) -> Check:
    def check(s: Samples) -> tuple[str, bool | None]:
        v = s.get("OURS", "served")
        if not v:
            return "-", None
        return f"served {min(v):,.0f}-{max(v):,.0f} of {total:,}", min(v) == total

    return check


def _t_at_most(key: str, unit: str, limit: float) -> Check:
    def check(s: Samples) -> tuple[str, bool | None]:
        ours = _m(s, "OURS", key)
        if ours is None:
            return "-", None
        return f"{ours:.2f} {unit}", ours <= limit

    return check


def targets(settings: Settings) -> list[Target]:
    """Issue 17, section 2: socketforward against the calibrated nerdbox path
    (GO) and DIRECT, in the same run."""
    return [
        Target("RTT p50 <= 0.9x GO", "GO", _t_vs_go("p50", "µs", 0.9)),
        Target("RTT p99 <= 1.0x GO", "GO", _t_vs_go("p99", "µs", 1.0)),
        Target("new connections/s >= 1.5x GO", "GO", _t_vs_go("conns", "/s", 1.5, at_least=True)),
        Target("time to first byte p50 <= 0.7x GO", "GO", _t_vs_go("ttfb50", "µs", 0.7)),
        Target("throughput >= 0.6x DIRECT each way", "DIRECT", _t_throughput),
        Target(
            "CPU per GiB no worse than before",
            f"{BEFORE_CPU_PER_GIB} s/GiB (issue 17)",
            _t_at_most("cpu", "s/GiB", BEFORE_CPU_PER_GIB),
        ),
        Target(
            "idle memory no worse than before",
            f"{BEFORE_KIB_PER_IDLE} KiB per connection (issue 17)",
            _t_at_most("rss", "KiB per connection", BEFORE_KIB_PER_IDLE),
        ),
        Target(f"burst: all {settings.burst:,} served", "-", _t_burst_for(settings.burst)),
    ]


def report(
    samples: Samples,
    *,
    paths: list[str],
    settings: Settings,
    rounds: int,
    started: datetime.datetime,
    took: float,
    socat: str | None,
    noise: list[Noise],
    max_noise: float,
    target: str,
) -> str:
    size = f"{settings.size / GiB:g} GiB" if settings.size >= GiB else f"{settings.size // MiB} MiB"
    go_load = settings.load.name == "Go"
    load_line = (
        "- Load generator: Go (bench/go/cmd/sfload through bench/goload.py, one process per "
        "workload run): blocking system calls for bulk transfers, round trips and first "
        "bytes, one epoll loop for many connections. DIRECT with it is **the ceiling**: "
        "what the machine's sockets and the target service do with nothing between them."
        if go_load
        else "- Load generator: Python (bench/loadgen.py), this script's own process "
        "(blocking sockets for bulk and round trips, one epoll loop for many connections); "
        "its DIRECT figures are its own ceiling, which every path carries."
    )
    target_line = (
        "Target service: Go (`sfload target`, a goroutine per connection), one process "
        "shared by all paths."
        if target == "go"
        else f"Target service: Python (bench/target.py, {loop_name()}), one process shared "
        "by all paths."
    )
    out = [
        "# Forward-path benchmark",
        "",
        f"Command: `{markdown.command_line('bench.forward_bench', '--group bench')}`",
        "",
        f"Date: {started.strftime('%Y-%m-%d %H:%M:%S UTC')}; {rounds} interleaved rounds, "
        f"{took:.0f} s in all.",
        "",
        *noise_verdict(noise, max_noise),
        "",
        f"- Machine: {os.cpu_count()} CPUs ({machine.cpu_model()}), "
        f"{machine.memory_gib():.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}; other work and steal per round: see "
        "*Machine noise* below",
        f"- Python {platform.python_version()}, {loop_name()} (our guest and host"
        f"{', the target service' if target == 'python' else ''}); "
        f"{machine.tool_version(['go', 'version'])}; "
        f"{machine.tool_version([socat, '-V']) if socat else 'socat not installed'}",
        f"- Workloads: throughput {size} up then {size} down on one connection each (byte "
        f"counts checked); {settings.rtt_count:,} 1-byte round trips after 200 warm-up; "
        f"time to first byte: {settings.ttfb_count:,} new connections one after another "
        "after 20 warm-up, each timed from connect to its 1-byte echo; "
        f"connection rate: {settings.workers} concurrent loops of connect, 1-byte echo, close, "
        f"for {settings.conn_seconds:g} s; burst: {settings.burst:,} connects as fast as one "
        f"thread can, each sends 1 byte, answers awaited {settings.burst_bound:g} s; memory: "
        f"{settings.idle:,} connections each answered once and held open, RSS of the "
        "forwarding processes (and their children) minus the same processes' RSS just "
        "before; CPU: user+system seconds of the forwarding processes over both throughput "
        "transfers (the memory run's connections come from Python with either load).",
        f"{load_line} {target_line}",
        "- Cells: median, with min-max over the rounds in small print.",
        "",
        "Paths:",
        "",
        *[
            f"- **{p}**: {PATH_HELP[p]}{' (the ceiling)' if go_load and p == 'DIRECT' else ''}"
            for p in paths
        ],
        "",
        *markdown.table(
            ["path", *(m.label for m in METRICS)],
            [[p, *(cell(samples, p, m) for m in METRICS)] for p in paths],
            align="l" + RIGHT * len(METRICS),
        ),
    ]
    ratio_paths: list[str] = [p for p in ("OURS", "OURS>GO", "GO>OURS", "EXPOSE") if p in paths]
    if "NERDBOX" in paths:
        ratio_paths += ["GO", "NERDBOX"]
    if ratio_paths:
        # EXPOSE against OURS: the two directions side by side (issue 18's goal);
        # the stand-ins against the --nerdbox programs they stand in for.
        bases = {
            "OURS": ("GO", "DIRECT"),
            "EXPOSE": ("OURS", "DIRECT"),
            "GO": ("NERDBOX", "DIRECT"),
            "NERDBOX": ("DIRECT",),
        }
        rows = [
            [f"{p} / {base}", *(ratio_cell(samples, p, base, m.key) for m in RATIO_METRICS)]
            for p in ratio_paths
            for base in bases.get(p, ("GO",))
            if base in paths
        ]
        out += [
            "",
            "Ratios of medians (for µs, s/GiB and KiB lower is better):",
            "",
            *markdown.table(
                ["ratio", *(m.label for m in RATIO_METRICS)],
                rows,
                align="l" + RIGHT * len(RATIO_METRICS),
            ),
        ]
    if "OURS" in paths:
        rows = []
        for t in targets(settings):
            text, ok = t.check(samples)
            mark = "-" if ok is None else ("yes" if ok else "**no**")
            rows.append([t.what, t.against, text, mark])
        out += [
            "",
            "Targets (OURS):",
            "",
            *markdown.table(["target", "against", "measured", "met"], rows),
        ]
    if "GO" in paths and "DIRECT" in paths:
        out += ["", *calibration(samples, settings, paths)]
    out += ["", *noise_table(noise, max_noise)]
    notes = [
        "- The Go stand-ins reproduce nerdbox's code (containerd/nerdbox d50bdab): io.Copy "
        "relays, one goroutine a direction, that tear a connection down at the first EOF "
        "(so no workload half-closes; each reads its answer first); a goroutine per accepted "
        "connection on the VM side, which queues ConnectRequests in a 64-slot channel and "
        "closes connections that find it full (the burst's reset column); the host answers "
        "ConnectRequests one at a time on its Accept stream; the Go runtime settings of "
        "the containerd shim (GC at 40%, GOMAXPROCS 4 as the shim manager starts it) and "
        "of vminitd (GOMAXPROCS 2).",
        "- socat forks one process per connection: its RSS is summed over the children, "
        "shared pages counted in each.",
        *[f"- {n}" for n in dict.fromkeys(samples.notes)],
    ]
    out += ["", "Notes:", "", *notes]
    return "\n".join(out) + "\n"


def _per_round(samples: Samples, path: str, base: str, key: str, total: int) -> list[float]:
    """``path``'s figure over ``base``'s round by round (the burst: share served)."""
    if key == "served":
        return [v / total for v in samples.get(path, key)]
    rounds = zip(samples.get(path, key), samples.get(base, key), strict=False)
    return [a / b for a, b in rounds if b]


def _ratio_of_medians(samples: Samples, path: str, key: str, total: int) -> float | None:
    if key == "served":
        m = samples.median(path, key)
        return None if m is None else m / total
    return ratio(samples.median(path, key), samples.median("DIRECT", key))


def calibration(samples: Samples, settings: Settings, paths: list[str]) -> list[str]:
    """GO's ratios to DIRECT against nerdbox's own code's (NERDBOX_RATIOS)."""
    tol = CALIBRATION_TOLERANCE
    labels = {
        "up": "throughput up",
        "down": "throughput down",
        "p50": "1-byte round trip p50",
        "p99": "1-byte round trip p99",
        "conns": "new connections/s",
        "served": f"burst of {settings.burst:,}: share served",
    }
    real = "NERDBOX" in paths
    rows, misses = [], []
    for key, (lo, hi) in NERDBOX_RATIOS.items():
        r = _ratio_of_medians(samples, "GO", key, settings.burst)
        per_round = _per_round(samples, "GO", "DIRECT", key, settings.burst)
        ref = f"{lo:.2f}" if lo == hi else f"{lo:.2f}-{hi:.2f}"
        band = f"{lo * (1 - tol):.2f}-{hi * (1 + tol):.2f}"
        inside = None if r is None else lo * (1 - tol) <= r <= hi * (1 + tol)
        if inside is False:
            misses.append(labels[key])
        row = [
            labels[key],
            ref,
            band,
            "-" if r is None else f"**{r:.2f}**",
            f"{min(per_round):.2f}-{max(per_round):.2f}" if per_round else "-",
            "-" if inside is None else ("yes" if inside else "**no**"),
        ]
        if real:
            n = _ratio_of_medians(samples, "NERDBOX", key, settings.burst)
            row.append("-" if n is None else f"{n:.2f}")
        rows.append(row)
    header = [
        "GO / DIRECT",
        "nerdbox's code (issue 17)",
        f"±{tol:.0%}",
        "GO, this run",
        "GO, per round",
        "within",
    ]
    if real:
        header.append("NERDBOX, this run")
    verdict = (
        "The GO stand-ins are calibrated: every ratio within the band."
        if not misses
        else f"**Outside the band**: {', '.join(misses)}."
    )
    return [
        "Calibration: GO's ratios to DIRECT (for the burst, the share of connects served) "
        "against those of nerdbox's own code measured with a Go load generator "
        f"(issue 17, two runs); median ratio and its min-max over the rounds. {verdict}",
        "",
        *markdown.table(header, rows, align="l" + RIGHT * (len(header) - 1)),
    ]


def too_noisy(noise: list[Noise], max_noise: float) -> list[int]:
    """The rounds (numbered from 1) whose other work and steal exceeded ``max_noise``%."""
    return [i + 1 for i, n in enumerate(noise) if n.percent > max_noise]


def noise_verdict(noise: list[Noise], max_noise: float) -> list[str]:
    bad = too_noisy(noise, max_noise)
    worst = max((n.percent for n in noise), default=0.0)
    if not bad:
        return [
            f"Machine noise: at most {worst:.1f}% of the CPU went to other work and steal "
            f"in any round (limit {max_noise:g}%): publishable."
        ]
    return [
        f"> **Too noisy to publish**: other work and steal took more than {max_noise:g}% of "
        f"the CPU in round{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} "
        f"(worst {worst:.1f}%). Read these figures with that in mind; the README's table "
        "was not written from this run."
    ]


def noise_table(noise: list[Noise], max_noise: float) -> list[str]:
    rows = [
        [
            str(i + 1),
            f"{n.seconds:.0f}",
            f"{n.other:.1f} ({n.other_percent:.1f}%)",
            f"{n.steal:.1f} ({n.steal_percent:.1f}%)",
            f"{n.percent:.1f}%" + (" **over**" if n.percent > max_noise else ""),
            n.describe_top(),
        ]
        for i, n in enumerate(noise)
    ]
    return [
        "Machine noise per round, in CPU seconds and percent of the CPU there was (the "
        f"round's seconds times {os.cpu_count()} CPUs): other processes' CPU time is the "
        "machine's busy time (/proc/stat: user, nice, system) minus that of the "
        "benchmark's own process tree; steal is the hypervisor's (/proc/stat); the "
        "biggest other users are named from /proc/PID/stat (kernel threads too: "
        "ksoftirqd's time is interrupt work, mostly for the benchmark's own traffic, and "
        "not in the other-processes figure).",
        "",
        *markdown.table(
            ["round", "seconds", "other processes", "steal", "noise", "biggest other users"],
            rows,
            align="l" + RIGHT * 4,
        ),
    ]


def readme_table(samples: Samples, rounds: int, load: str, target: str) -> str:
    """The README's summary: direct, nerdbox's path and ours, medians only."""
    cols = [("DIRECT", "direct"), ("GO", "nerdbox (Go)"), ("OURS", "socketforward")]

    def pair(path: str, a: str, b: str, fmt: str) -> str:
        x, y = samples.median(path, a), samples.median(path, b)
        return "-" if x is None or y is None else f"{fmt.format(x)} / {fmt.format(y)}"

    def one(path: str, key: str, fmt: str) -> str:
        x = samples.median(path, key)
        return "-" if x is None else fmt.format(x)

    rows: list[tuple[str, Callable[[str], str]]] = [
        ("throughput up / down, MB/s", lambda p: pair(p, "up", "down", "{:,.0f}")),
        ("CPU seconds per GiB relayed", lambda p: one(p, "cpu", "{:.2f}")),
        ("1-byte round trip p50 / p99, µs", lambda p: pair(p, "p50", "p99", "{:.0f}")),
        (
            "new connection's first byte p50 / p99, µs",
            lambda p: pair(p, "ttfb50", "ttfb99", "{:.0f}"),
        ),
        ("new connections per second", lambda p: one(p, "conns", "{:,.0f}")),
        ("burst of 2,000 connects served", lambda p: one(p, "served", "{:,.0f}")),
        ("memory per idle connection, KiB", lambda p: one(p, "rss", "{:.1f}")),
    ]
    lines = [
        f"Median of {rounds} interleaved rounds, {datetime.date.today().isoformat()} "
        f"({load} load generator, {target} target service):",
        "",
        *markdown.table(
            ["", *(title for _, title in cols)],
            [[label, *(f(p) for p, _ in cols)] for label, f in rows],
            align="l" + RIGHT * len(cols),
        ),
    ]
    return "\n".join(lines)


def update_readme(table: str) -> bool:
    """Replace the table between the README's markers; False if they are missing."""
    text = README.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        return False
    README.write_text(text[: begin + len(README_BEGIN)] + "\n" + table + "\n" + text[end:])
    return True


def _target_line(samples: Samples, key: str) -> float | None:
    """Where OURS should be, in the panel's unit (the targets of issue 6)."""
    go = samples.median("GO", key)
    direct = samples.median("DIRECT", key)
    if key in ("up", "down") and direct is not None:
        return 0.5 * direct
    if key == "p50" and go is not None:
        return go
    if key == "conns" and go is not None:
        return 1.5 * go
    if key == "rss":
        return 6.0
    if key == "cpu" and go is not None:
        return go
    return None


def plot(samples: Samples, paths: list[str], settings: Settings, png: Path) -> bool:
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
    except ImportError:
        print("matplotlib not installed (uv's bench group): no PNG written", file=sys.stderr)
        return False
    colors = {
        "DIRECT": "#999999",
        "SOCAT": "#c9a227",
        "GO": "#3b7dd8",
        "OURS": "#2ca25f",
        "OURS>GO": "#8fd19e",
        "GO>OURS": "#9ecae1",
        "EXPOSE": "#756bb1",
        "NERDBOX": "#1f4e8c",
    }
    panels = [
        ("Throughput up (MB/s, higher is better)", "up"),
        ("Throughput down (MB/s, higher is better)", "down"),
        ("1-byte round trip p50 (µs, lower is better)", "p50"),
        ("1-byte round trip p99 (µs, lower is better)", "p99"),
        ("New connection's first byte p50 (µs, lower is better)", "ttfb50"),
        ("New connection's first byte p99 (µs, lower is better)", "ttfb99"),
        ("Connection rate (conns/s, higher is better)", "conns"),
        (f"Burst of {settings.burst:,}: served / refused+reset / hung", "burst"),
        ("RSS per idle connection (KiB, lower is better)", "rss"),
        ("CPU seconds per GiB relayed (lower is better)", "cpu"),
    ]
    fig, axes = plt.subplots(2, 5, figsize=(25, 8.5))
    for ax, (title, key) in zip(axes.flat, panels, strict=True):
        ax.set_title(title, fontsize=10)
        xs = list(range(len(paths)))
        wide = False
        if key == "burst":
            served = [samples.median(p, "served") or 0 for p in paths]
            dropped = [
                (samples.median(p, "refused") or 0) + (samples.median(p, "reset") or 0)
                for p in paths
            ]
            hung = [samples.median(p, "hung") or 0 for p in paths]
            ax.bar(xs, served, color=[colors[p] for p in paths], label="served")
            ax.bar(xs, dropped, bottom=served, color="#d9534f", label="refused / reset")
            bottoms = [a + b for a, b in zip(served, dropped, strict=True)]
            ax.bar(xs, hung, bottom=bottoms, color="#333333", label="hung")
            ax.legend(fontsize=8, loc="upper center", ncol=3, framealpha=0.9)
            ax.set_ylim(0, settings.burst * 1.25)
            for x, v in zip(xs, served, strict=True):
                ax.annotate(f"{v:,.0f}", (x, v), ha="center", va="bottom", fontsize=8)
        else:
            meds, lo, hi = [], [], []
            for p in paths:
                s = samples.spread(p, key)
                meds.append(s.median if s else 0.0)
                lo.append(s.median - s.low if s else 0.0)
                hi.append(s.high - s.median if s else 0.0)
            ax.bar(xs, meds, color=[colors[p] for p in paths], yerr=[lo, hi], capsize=3)
            for x, med, up in zip(xs, meds, hi, strict=True):
                if med:
                    label = (
                        f"{med:,.0f}" if med >= 100 else f"{med:.1f}" if med >= 1 else f"{med:.2f}"
                    )
                    # Above the error bar, not on it.
                    ax.annotate(label, (x, med + up), ha="center", va="bottom", fontsize=8)
            shown = [m for m in meds if m > 0]
            # One path far above the rest (DIRECT's connection rate) flattens
            # them: a log scale keeps every bar readable.
            wide = bool(shown) and max(shown) > 8 * min(shown)
        target = _target_line(samples, key)
        if target is not None and "OURS" in paths:
            ax.axhline(target, color="#2ca25f", linestyle="--", linewidth=1)
            ax.annotate("OURS target", (len(paths) - 0.5, target), ha="right", va="bottom",
                        fontsize=7, color="#2ca25f")  # fmt: skip
        if key != "burst" and (key == "rss" or wide):
            ax.set_yscale("log")  # e.g. socat's forked children, DIRECT's conns/s
            ax.set_title(title + " (log scale)", fontsize=10)
        elif key != "burst":
            ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
        ax.set_xticks(xs)
        ax.set_xticklabels(paths, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        "socketforward forward path vs nerdbox (Go), socat and a direct socket — "
        f"median of rounds, bars show min-max ({settings.load.name} load generator)",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return True


# -- driver ---------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (1 round, small)")
    parser.add_argument("--rounds", type=int, help="rounds (default 5; --quick 1)")
    parser.add_argument(
        "--paths",
        help=f"comma-separated subset of {','.join(ALL_PATHS)} (default: all but NERDBOX, "
        "which --nerdbox adds)",
    )
    parser.add_argument(
        "--workloads", help=f"comma-separated subset of {','.join(w for w, _ in WORKLOADS)}"
    )
    parser.add_argument("--size", type=int, help="bytes each way per throughput run")
    parser.add_argument(
        "--load",
        choices=["go", "python"],
        default="go",
        help="load generator: bench/go/cmd/sfload (default) or bench/loadgen.py",
    )
    parser.add_argument(
        "--target",
        choices=["go", "python"],
        default="go",
        help="target service: sfload target (default) or bench/target.py",
    )
    parser.add_argument(
        "--max-noise",
        type=float,
        default=MAX_NOISE,
        metavar="PERCENT",
        help="other work and steal (percent of the CPU) above which a round makes the run "
        f"too noisy to publish: no README table (default {MAX_NOISE:g})",
    )
    parser.add_argument(
        "--nerdbox",
        metavar="HOST_BIN,VM_BIN",
        help="also run the NERDBOX path: these two programs, with the Go stand-ins' command "
        "line (e.g. nerdbox's own code built elsewhere), to calibrate GO against",
    )
    parser.add_argument("--out", type=Path, help="report file (default: latest.md unless --quick)")
    parser.add_argument("--png", type=Path, help="plot file (default: latest.png unless --quick)")
    args = parser.parse_args()
    quick = args.quick
    settings = Settings(
        load=loadgen.PythonLoad(),
        size=args.size or (128 * MiB if quick else GiB),
        rtt_count=500 if quick else 5000,
        ttfb_count=200 if quick else 1000,
        conn_seconds=0.5 if quick else 2.0,
        workers=32,
        burst=500 if quick else 2000,
        burst_bound=5.0 if quick else 15.0,
        # Enough that pymalloc's 1 MiB arenas (a jump of up to 0.25 KiB per
        # connection and process at 1,000) blur the figure little, and under the
        # guest's connection budget at a 20,000-descriptor limit (about 3,300).
        idle=200 if quick else 3000,
    )
    rounds = args.rounds or (1 if quick else 5)
    out_md = args.out or (None if quick else RESULTS_MD)
    out_png = args.png or (None if quick else RESULTS_PNG)
    paths = args.paths.split(",") if args.paths else list(DEFAULT_PATHS)
    if args.nerdbox and "NERDBOX" not in paths:
        paths.append("NERDBOX")
    workloads = [
        (w, f) for w, f in WORKLOADS if not args.workloads or w in args.workloads.split(",")
    ]
    unknown = set(paths) - set(ALL_PATHS)
    if unknown:
        parser.error(f"unknown paths: {sorted(unknown)}")
    go_bins: dict[str, tuple[Path, Path]] = {}
    if "NERDBOX" in paths:
        if not args.nerdbox or len(args.nerdbox.split(",")) != 2:
            parser.error("the NERDBOX path needs --nerdbox HOST_BIN,VM_BIN")
        host_bin, vm_bin = (Path(b).resolve() for b in args.nerdbox.split(","))
        for b in (host_bin, vm_bin):
            if not os.access(b, os.X_OK):
                parser.error(f"--nerdbox: {b} is not an executable")
        go_bins["NERDBOX"] = (host_bin, vm_bin)

    processes.exit_on_sigterm()
    processes.raise_fd_limit()
    started = datetime.datetime.now(datetime.UTC)
    socat = shutil.which("socat")
    if "SOCAT" in paths and socat is None:
        print("socat is not installed (make bench installs it): SOCAT row skipped", file=sys.stderr)
        paths.remove("SOCAT")
    if any("GO" in p for p in paths):
        from tests.interop.nerdbox_peers import (  # noqa: PLC0415 (imports pytest)
            build_nerdbox_host,
            build_nerdbox_vm,
        )

        try:
            go_bins["GO"] = (build_nerdbox_host(), build_nerdbox_vm())
        except RuntimeError as exc:
            print(f"Go stand-ins unavailable ({exc}): Go paths skipped", file=sys.stderr)
            paths = [p for p in paths if "GO" not in p]

    samples = Samples()
    sfload: Path | None = None
    if "go" in (args.load, args.target):
        try:
            sfload = goload.build()
        except RuntimeError as exc:
            why = f"Go load generator unavailable ({exc}): Python load and target ran"
            print(why, file=sys.stderr)
            args.load = args.target = "python"
            samples.notes.append(why.replace("\n", " "))
    if args.load == "go":
        assert sfload is not None
        settings.load = goload.GoLoad(sfload)

    noise: list[Noise] = []
    meter = NoiseMeter()
    t0 = time.perf_counter()
    with processes.scratch_dir("fwdbench-") as tmp:
        target = str(tmp / "target.sock")
        with ProcessGroup(tmp) as services:
            if args.target == "go":
                assert sfload is not None
                goload.start_target(services, sfload, target)
            else:
                start_python_target(services, target)
            for r in range(rounds):
                order = paths[r % len(paths) :] + paths[: r % len(paths)]
                round_dir = tmp / f"round{r}"
                round_dir.mkdir()
                meter.start()
                with ProcessGroup(round_dir) as procs:
                    running = [start_path(procs, n, target, go_bins, socat) for n in order]
                    for wname, workload in workloads:
                        for p in running:
                            t = time.perf_counter()
                            workload(p, settings, samples)
                            print(
                                f"round {r + 1}/{rounds} {wname:<16} {p.name:<8} "
                                f"{time.perf_counter() - t:5.1f} s",
                                file=sys.stderr,
                            )
                noise.append(meter.stop())
                n = noise[-1]
                print(
                    f"round {r + 1}/{rounds} noise: other {n.other_percent:.1f}%, steal "
                    f"{n.steal_percent:.1f}% of the CPU ({n.describe_top()})",
                    file=sys.stderr,
                )
    took = time.perf_counter() - t0
    text = report(
        samples,
        paths=paths,
        settings=settings,
        rounds=rounds,
        started=started,
        took=took,
        socat=socat,
        noise=noise,
        max_noise=args.max_noise,
        target=args.target,
    )
    print(text)
    if out_md is not None:
        out_md.parent.mkdir(parents=True, exist_ok=True)
        out_md.write_text(text)
        print(f"written to {out_md}", file=sys.stderr)
    if out_png is not None and plot(samples, paths, settings, out_png):
        print(f"written to {out_png}", file=sys.stderr)
    # A full default run also refreshes the README's summary (never typed by hand),
    # unless other work or steal made it too noisy to publish.
    full = out_md == RESULTS_MD and {"DIRECT", "GO", "OURS"} <= set(paths)
    table = readme_table(samples, rounds, settings.load.name, args.target.capitalize())
    if full and len(workloads) == len(WORKLOADS):
        bad = too_noisy(noise, args.max_noise)
        if bad:
            print(
                f"too noisy to publish (rounds {bad} over {args.max_noise:g}%): "
                f"the table in {README} was not updated",
                file=sys.stderr,
            )
        elif update_readme(table):
            print(f"updated the table in {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
