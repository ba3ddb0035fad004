"""The benchmarks' child processes: start, wait until ready, stop and reap, and
what they cost (CPU seconds, resident memory) read from /proc."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import NoReturn

READY_TIMEOUT = 30.0
"""How long a child may take to say it is ready."""


def python_module(module: str, *args: str) -> list[str]:
    """argv running ``module`` on this interpreter (the children find ``bench``
    as their parent did: from the repository root, the working directory)."""
    return [sys.executable, "-m", module, *args]


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory for sockets and logs, removed on exit; under /tmp,
    as a UNIX socket's path must stay short."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir="/tmp", ignore_cleanup_errors=True) as name:
        yield Path(name)


def raise_fd_limit() -> None:
    """Bursts and idle-connection runs hold thousands of fds (children inherit)."""
    import resource  # noqa: PLC0415

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _raise_on_sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the ``finally`` blocks stop the children."""
    signal.signal(signal.SIGTERM, _raise_on_sigterm)


def die_with_parent() -> None:
    """preexec_fn: SIGTERM the child if the benchmark dies (even by SIGKILL)."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def descendants(pid: int) -> list[int]:
    """``pid`` and its descendants (socat forks one child per connection)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                children = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                todo.extend(int(c) for c in children)
    return out


def stop_all(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process, SIGKILL what is still there after 5 s; reap all.

    Their own children (socat forks one per connection) go first, so their
    parent reaps them: orphans would be left to PID 1, which may not reap.
    """
    procs = list(procs)
    children = [pid for proc in procs for pid in descendants(proc.pid)[1:]]
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and any(
        descendants(proc.pid)[1:] for proc in procs if proc.poll() is None
    ):
        time.sleep(0.02)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def wait_for_path(path: str, timeout: float, *procs: subprocess.Popen[bytes]) -> None:
    """Wait until ``path`` exists (socat says nothing when it listens); fail
    early if one of ``procs`` exited."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.01)


def wait_ready(
    proc: subprocess.Popen[bytes], what: str, word: bytes = b"ready", timeout: float = READY_TIMEOUT
) -> None:
    """Wait until ``proc`` prints the line ``word`` on its stdout (a pipe)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    seen = b""
    while word + b"\n" not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{what} not {word.decode()} within {timeout}s")
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"{what} exited before {word.decode()} (status {proc.wait()})")
            seen += chunk


class ProcessGroup:
    """Child processes started together and stopped (and reaped) together on exit.

    Each child's stdout is a pipe (for its ready line); its stderr goes to a
    log file in ``workdir`` when it is given a log name, else to ours. The
    caller keeps the children's sockets in ``workdir`` too.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, argv: list[str], log_name: str | None = None) -> subprocess.Popen[bytes]:
        with contextlib.ExitStack() as stack:
            stderr = None
            if log_name is not None:
                stderr = stack.enter_context((self.workdir / log_name).open("ab"))
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                preexec_fn=die_with_parent,  # noqa: PLW1509 (no threads here)
            )
        self.procs.append(proc)
        return proc

    def start_ready(
        self, argv: list[str], what: str, log_name: str | None = None, word: bytes = b"ready"
    ) -> subprocess.Popen[bytes]:
        """Start a child and wait for its ready line; a failure carries its log."""
        proc = self.start(argv, log_name)
        try:
            wait_ready(proc, what, word)
        except (TimeoutError, RuntimeError) as exc:
            log = f"; log:\n{self.log(log_name)}" if log_name is not None else ""
            raise RuntimeError(f"{exc}{log}") from exc
        return proc

    def log(self, log_name: str) -> str:
        """The end of a child's log (for an error message)."""
        path = self.workdir / log_name
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        stop_all(self.procs)
        self.procs.clear()


# -- what the processes cost -----------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: field 3 (state) is index 0."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def user_system_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` itself (not its reaped children)."""
    fields = _stat_fields(pid)
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU of ``pids``, including their reaped children."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        with contextlib.suppress(OSError):
            total += sum(int(f) for f in _stat_fields(pid)[11:15]) / tick
    return total


def wait_settled(pids: Iterable[int], *, quiet: float = 0.25, bound: float = 15.0) -> float:
    """Wait until *pids* use (almost) no CPU for *quiet* seconds, at most *bound*
    seconds: e.g. until forwarders have closed what a workload left them; how
    long it took."""
    pids = list(pids)
    t0 = time.monotonic()
    last = cpu_seconds(pids)
    while time.monotonic() - t0 < bound:
        time.sleep(quiet)
        now = cpu_seconds(pids)
        if now - last < 0.05 * quiet:  # under 5% of one CPU (at most a clock tick)
            break
        last = now
    return time.monotonic() - t0


def rss_bytes(pids: Iterable[int]) -> int:
    """Resident set of ``pids`` and all their descendants."""
    total = 0
    for root in pids:
        for pid in descendants(root):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
    return total
