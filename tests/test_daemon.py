"""Process plumbing both programs share: signals, the fd limit, option values."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from socketforward import daemon


async def test_signals_stop_log_stats_and_sighup_is_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGUSR1 asks for the statistics, SIGHUP without a reload is logged and
    ignored (the process lives on), SIGTERM sets the stop event; the default
    handlers are back afterwards."""
    stats: list[int] = []
    caplog.set_level(logging.INFO, "socketforward.daemon")
    async with daemon.handle_signals(on_stats=lambda: stats.append(1)) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            if stats and "SIGHUP ignored" in caplog.text:
                break
            await asyncio.sleep(0.01)
        assert stats == [1]
        assert "SIGHUP ignored: nothing to reload" in caplog.text
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 5)
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


async def test_sighup_reloads_when_there_is_something_to_reload() -> None:
    """With a reload given, SIGHUP calls it."""
    reloaded = asyncio.Event()
    async with daemon.handle_signals(on_stats=lambda: None, on_reload=reloaded.set):
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.wait_for(reloaded.wait(), 5)


async def test_run_until_stopped_tells_which_ended() -> None:
    """Stopping returns None and cancels the work; work that ends first is returned."""
    stop = asyncio.Event()
    started = asyncio.Event()
    cancelled = []

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def stop_soon() -> None:
        await started.wait()
        stop.set()

    stopper = asyncio.create_task(stop_soon())
    assert await daemon.run_until_stopped(forever(), stop) is None
    await stopper
    assert cancelled == [True]

    async def fail() -> None:
        raise OSError("endpoint gone")

    ended = await daemon.run_until_stopped(fail(), asyncio.Event())
    assert ended is not None and isinstance(ended.exception(), OSError)


def test_fd_limit_is_raised_to_the_hard_limit() -> None:
    """The soft descriptor limit is raised to the hard one (bursts need thousands)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        now = daemon.raise_fd_limit()
        assert now == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert now == (hard if hard != resource.RLIM_INFINITY else max(256, 1 << 20))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(
    ("parse", "text", "value"),
    [
        (daemon.positive_seconds, "0.5", 0.5),
        (daemon.non_negative_seconds, "0", 0.0),
        (daemon.positive_int, "7", 7),
        (daemon.octal_mode, "600", 0o600),
    ],
)
def test_option_values(parse: object, text: str, value: float) -> None:
    """Good option values parse to what they say."""
    assert callable(parse) and parse(text) == value


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (daemon.positive_seconds, "0", "not a positive number of seconds"),
        (daemon.positive_seconds, "inf", "not a positive number of seconds"),
        (daemon.positive_seconds, "nan", "not a positive number of seconds"),
        (daemon.non_negative_seconds, "-1", "0 or more"),
        (daemon.non_negative_seconds, "inf", "0 or more"),
        (daemon.positive_int, "0", "must be >= 1"),
        (daemon.positive_int, "x", "not an integer"),
        (daemon.non_negative_int, "-1", "must be >= 0"),
        (daemon.int_in_range(0, 64), "65", "must be from 0 to 64"),
        (daemon.octal_mode, "800", "not an octal mode"),
        (daemon.octal_mode, "1000", "out of range 0..777"),
    ],
)
def test_bad_option_values_say_what_is_wrong(parse: object, text: str, message: str) -> None:
    """A bad value is refused with a message argparse shows next to the option."""
    assert callable(parse)
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse(text)


# -- systemd readiness -------------------------------------------------------------


@contextlib.contextmanager
def notify_socket(path: str) -> Iterator[socket.socket]:
    """A datagram socket bound where NOTIFY_SOCKET will point (systemd's end)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        sock.settimeout(30)
        yield sock
    finally:
        sock.close()


def test_notifier_sends_each_state_once(short_tmp: Path) -> None:
    """READY=1 and STOPPING=1 each reach the socket once, however often asked."""
    with notify_socket(str(short_tmp / "notify")) as sock:
        notifier = daemon.Notifier.from_environment({"NOTIFY_SOCKET": str(short_tmp / "notify")})
        notifier.ready()
        notifier.ready()
        notifier.stopping()
        assert sock.recv(64) == b"READY=1"
        assert sock.recv(64) == b"STOPPING=1"
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(64)


def test_notifier_reaches_an_abstract_socket() -> None:
    """A NOTIFY_SOCKET starting with "@" names an abstract socket."""
    name = f"socketforward-test-{os.getpid()}"
    with notify_socket("\0" + name) as sock:
        assert daemon.Notifier(f"@{name}").send("READY=1")
        assert sock.recv(64) == b"READY=1"


def test_notifier_without_socket_or_with_a_bad_one_is_not_fatal(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No NOTIFY_SOCKET: nothing sent. One that does not answer, or an address
    of an unknown kind: a warning, and the program goes on."""
    assert not daemon.Notifier.from_environment({}).send("READY=1")
    caplog.set_level(logging.WARNING, "socketforward.daemon")
    assert not daemon.Notifier(str(short_tmp / "missing")).send("READY=1")
    assert not daemon.Notifier("vsock:2:999").send("READY=1")
    assert caplog.text.count("systemd notification not sent") == 2


async def test_run_until_stopped_notifies_ready_then_stopping() -> None:
    """READY once the work runs, STOPPING when the stop begins; work that fails
    at its first step never reports READY."""
    sent: list[str] = []

    class Recorder(daemon.Notifier):
        def send(self, state: str) -> bool:
            sent.append(state)
            return True

    stop = asyncio.Event()

    async def serve() -> None:
        assert sent == []
        stop.set()
        await asyncio.sleep(3600)

    assert await daemon.run_until_stopped(serve(), stop, notifier=Recorder(None)) is None
    assert sent == ["READY=1", "STOPPING=1"]

    sent.clear()

    async def fail() -> None:
        raise OSError("cannot listen")

    ended = await daemon.run_until_stopped(fail(), asyncio.Event(), notifier=Recorder(None))
    assert ended is not None and sent == ["STOPPING=1"]


def _start(args: list[str], notify: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "socketforward", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=out,
            env={**os.environ, "NOTIFY_SOCKET": str(notify)},
        )


def _ready_then_stopping(proc: subprocess.Popen[bytes], sock: socket.socket, log: Path) -> None:
    try:
        try:
            assert sock.recv(64) == b"READY=1", log.read_text()
        except TimeoutError:
            raise AssertionError(f"no READY=1; log:\n{log.read_text()}") from None
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(64) == b"STOPPING=1", log.read_text()
        assert proc.wait(timeout=15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("rpc", ["--rpc-listen", "--rpc-dial"])
def test_guest_tells_systemd_it_is_ready_and_stopping(short_tmp: Path, rpc: str) -> None:
    """Under systemd the guest reports READY=1 once it listens (or dials: no
    host needs to be there) and STOPPING=1 on SIGTERM, then exits 0."""
    with notify_socket(str(short_tmp / "notify")) as sock:
        proc = _start(
            ["guest", rpc, f"unix:{short_tmp}/rpc.sock", "--streams",
             f"unix:{short_tmp}/streams.sock"],
            short_tmp / "notify", short_tmp / "guest.log",
        )  # fmt: skip
        _ready_then_stopping(proc, sock, short_tmp / "guest.log")
    if rpc == "--rpc-listen":
        assert not (short_tmp / "rpc.sock").exists()


def test_guest_with_an_unusable_endpoint_is_never_ready(short_tmp: Path) -> None:
    """A guest that cannot listen exits 1 without reporting READY=1."""
    (short_tmp / "file").write_text("")
    with notify_socket(str(short_tmp / "notify")) as sock:
        proc = _start(
            ["guest", "--rpc-listen", f"unix:{short_tmp}/file/rpc.sock", "--streams",
             f"unix:{short_tmp}/streams.sock"],
            short_tmp / "notify", short_tmp / "guest.log",
        )  # fmt: skip
        assert proc.wait(timeout=30) == 1, (short_tmp / "guest.log").read_text()
        sock.setblocking(False)
        states = []
        with contextlib.suppress(BlockingIOError):
            while True:
                states.append(sock.recv(64))
        assert b"READY=1" not in states


def test_host_tells_systemd_it_is_ready_and_stopping(short_tmp: Path) -> None:
    """Under systemd the host reports READY=1 once its RPC endpoint listens and
    STOPPING=1 on SIGTERM, then exits 0."""
    (short_tmp / "host").mkdir(mode=0o700)
    with notify_socket(str(short_tmp / "notify")) as sock:
        proc = _start(
            ["host", "--rpc-listen", f"unix:{short_tmp}/host/rpc.sock", "--streams",
             f"unix:{short_tmp}/streams.sock", "--forward",
             f"fwd-a={short_tmp}/a.sock:/run/socketfwd/a.sock"],
            short_tmp / "notify", short_tmp / "host.log",
        )  # fmt: skip
        _ready_then_stopping(proc, sock, short_tmp / "host.log")
