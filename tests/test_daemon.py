"""Process plumbing both programs share: signals, the fd limit, option values."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal

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
        (daemon.positive_int, "0", "must be >= 1"),
        (daemon.positive_int, "x", "not an integer"),
        (daemon.octal_mode, "800", "not an octal mode"),
        (daemon.octal_mode, "1000", "out of range 0..777"),
    ],
)
def test_bad_option_values_say_what_is_wrong(parse: object, text: str, message: str) -> None:
    """A bad value is refused with a message argparse shows next to the option."""
    assert callable(parse)
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse(text)
