"""What both programs do as processes, written once: signals, the fd limit,
argparse value types, and running until told to stop.

Signals (:func:`handle_signals`): SIGTERM and SIGINT stop, SIGUSR1 logs the
statistics, SIGHUP reloads where there is something to reload and is logged
and ignored otherwise (its default action would kill the process and leave
socket files behind).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

__all__ = [
    "fd_limits",
    "handle_signals",
    "octal_mode",
    "positive_int",
    "positive_seconds",
    "raise_fd_limit",
    "run_until_stopped",
]

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def handle_signals(
    *, on_stats: Callable[[], None], on_reload: Callable[[], None] | None = None
) -> AsyncIterator[asyncio.Event]:
    """Install the programs' signal handlers for the block; yields the event
    that SIGTERM and SIGINT set."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def hangup() -> None:
        if on_reload is None:
            log.info("SIGHUP ignored: nothing to reload")
        else:
            on_reload()

    handlers: dict[signal.Signals, Callable[[], None]] = {
        signal.SIGTERM: stop.set,
        signal.SIGINT: stop.set,
        signal.SIGUSR1: on_stats,
        signal.SIGHUP: hangup,
    }
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)
    try:
        yield stop
    finally:
        for sig in handlers:
            loop.remove_signal_handler(sig)


async def run_until_stopped(
    work: Coroutine[Any, Any, None], stop: asyncio.Event
) -> asyncio.Task[None] | None:
    """Run *work* until *stop* is set. Returns None when stopped; the finished
    task (its result or exception for the caller to read) when *work* ended
    first. *work* is cancelled and awaited either way."""
    task = asyncio.get_running_loop().create_task(work)
    stopping = asyncio.get_running_loop().create_task(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        finished = task.done()
        task.cancel()
        await asyncio.gather(task, stopping, return_exceptions=True)
    return task if finished else None


def fd_limits() -> tuple[int, int] | None:
    """(soft, hard) RLIMIT_NOFILE, an unlimited one as 2**20; None where unknown."""
    try:
        import resource  # noqa: PLC0415 - not on every platform

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return None
    unlimited = 1 << 20  # what an RLIM_INFINITY limit is taken for
    infinity = resource.RLIM_INFINITY
    return (unlimited if soft == infinity else soft, unlimited if hard == infinity else hard)


def raise_fd_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard one: every forwarded connection
    holds several descriptors and bursts need thousands. Returns the soft limit
    now in force (None where it cannot be read)."""
    try:
        import resource  # noqa: PLC0415 - not on every platform

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            with contextlib.suppress(OSError, ValueError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return None


# -- argparse value types ----------------------------------------------------------


def positive_seconds(text: str) -> float:
    """A finite duration in seconds, greater than zero."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def octal_mode(text: str) -> int:
    """A file mode in octal, 0..777."""
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range 0..777")
    return value
