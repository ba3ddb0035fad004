"""The Go load generator and target service (bench/go/cmd/sfload), from Python.

The Python load (bench/loadgen.py) and target (bench/target.py) add
interpreter time to every operation of every path; ``sfload`` does the same
workloads with plain system calls and serves the same wire protocol, so
either target serves either load. It is built
once into build/bench/, under a name keyed by the hash of its sources and the
Go toolchain's version, and each workload runs as one ``sfload`` process that
prints its result as one JSON object.

    from bench import goload
    load = goload.GoLoad(goload.build())
    load.round_trips(path, 5000)   # as bench.loadgen.round_trips
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench import processes
from bench.loadgen import BurstResult
from bench.processes import ProcessGroup

REPO_ROOT = Path(__file__).resolve().parents[1]
GO_DIR = REPO_ROOT / "bench" / "go"
BUILD_DIR = REPO_ROOT / "build" / "bench"
NAME = "sfload"
BUILD_TIMEOUT = 600.0
SLACK = 60.0
"""Seconds a workload process may take past its own bound (start, connects)."""


class GoMissingError(RuntimeError):
    """The go toolchain is not on PATH."""


def _sources() -> list[Path]:
    return sorted([*GO_DIR.rglob("*.go"), *(GO_DIR / f for f in ("go.mod", "go.sum"))])


def source_hash(go: str) -> str:
    """sha256 of the program's sources (names and contents) and ``go version``."""
    h = hashlib.sha256()
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True)
    h.update(version.stdout.encode())
    for path in _sources():
        if path.exists():
            h.update(str(path.relative_to(GO_DIR)).encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def _goflags(go: str) -> str:
    """The machine's GOFLAGS (``go env``: an environment variable replaces the
    config file's) plus -mod=mod, and -buildvcs=false: the source hash already
    names the build, and go need not run git in a tree others are changing."""
    proc = subprocess.run([go, "env", "GOFLAGS"], capture_output=True, text=True, check=False)
    flags = proc.stdout.split()
    for flag in ("-mod=mod", "-buildvcs=false"):
        if not any(f.split("=")[0] == flag.split("=")[0] for f in flags):
            flags.append(flag)
    return " ".join(flags)


def build() -> Path:
    """Build sfload into build/bench/sfload-HASH unless that is there already."""
    go = shutil.which("go")
    if go is None:
        raise GoMissingError("go is not on PATH: the Go load generator cannot be built")
    binary = BUILD_DIR / f"{NAME}-{source_hash(go)[:16]}"
    if binary.exists():
        return binary
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name, then renamed: a concurrent build (a test
    # run and a benchmark) never runs a half-written file.
    tmp = binary.with_name(f".{binary.name}.{os.getpid()}")
    proc = subprocess.run(
        [go, "build", "-o", str(tmp), f"./cmd/{NAME}"],
        cwd=GO_DIR,
        env={**os.environ, "GOFLAGS": _goflags(go)},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"go build of {NAME} failed:\n{proc.stdout}{proc.stderr}")
    tmp.replace(binary)
    for old in BUILD_DIR.glob(f"{NAME}-*"):
        if old != binary:
            old.unlink(missing_ok=True)  # an older source's build (a running one keeps its inode)
    return binary


def start_target(group: ProcessGroup, binary: Path, path: str) -> subprocess.Popen[bytes]:
    """Start the Go target service on ``path`` in ``group``; return once it listens."""
    return group.start_ready([str(binary), "target", path], "Go target service")


def run(binary: Path, workload: str, path: str, timeout: float, **options: float) -> dict[str, Any]:
    """Run one ``sfload WORKLOAD`` against ``path``; its JSON result.

    A failed workload (a byte count off, a lost echo, no progress for 30 s)
    raises RuntimeError with sfload's message."""
    argv = [str(binary), workload, "-path", path, *(f"-{k}={v}" for k, v in options.items())]
    proc = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=processes.die_with_parent,  # SIGTERM it if the benchmark dies
    )
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        result = None
    if not isinstance(result, dict):
        raise RuntimeError(
            f"{NAME} {workload}: no JSON result (status {proc.returncode}):\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    if proc.returncode != 0 or "error" in result:
        raise RuntimeError(f"{NAME} {workload} on {path}: {result.get('error', proc.stderr)}")
    return result


class GoLoad:
    """bench/loadgen.py's workloads (a :class:`bench.loadgen.Load`) run by sfload."""

    name = "Go"

    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def _run(self, workload: str, path: str, timeout: float, **options: float) -> dict[str, Any]:
        return run(self.binary, workload, path, timeout, **options)

    def upload(self, path: str, size: int) -> float:
        """Send ``size`` bytes; the service's count is checked; seconds taken."""
        return float(self._run("upload", path, 600, size=size)["seconds"])

    def download(self, path: str, size: int) -> float:
        """Receive ``size`` bytes (checked); seconds taken."""
        return float(self._run("download", path, 600, size=size)["seconds"])

    def round_trips(self, path: str, count: int, warmup: int = 200) -> list[float]:
        """1-byte round trips on one connection; sorted samples in microseconds."""
        r = self._run("rtt", path, SLACK + count / 100, count=count, warmup=warmup)
        return [float(x) for x in r["samples_us"]]

    def first_bytes(self, path: str, count: int, warmup: int = 20) -> list[float]:
        """Time to first byte of new connections, one after another; sorted µs."""
        r = self._run("ttfb", path, SLACK + count / 10, count=count, warmup=warmup)
        return [float(x) for x in r["samples_us"]]

    def connection_rate(self, path: str, seconds: float, workers: int) -> tuple[float, int]:
        """(completed connections per second, failures), as loadgen.connection_rate."""
        r = self._run("conns", path, SLACK + seconds, seconds=seconds, workers=workers)
        return float(r["rate"]), int(r["failed"])

    def burst(self, path: str, count: int, bound: float) -> BurstResult:
        """``count`` connects at once, answers awaited ``bound`` seconds."""
        r = self._run("burst", path, SLACK + bound, count=count, bound=bound)
        return BurstResult(
            served=int(r["served"]),
            refused=int(r["refused"]),
            reset=int(r["reset"]),
            hung=int(r["hung"]),
            seconds=float(r["seconds"]),
        )
