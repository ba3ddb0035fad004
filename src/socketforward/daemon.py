"""What both programs do as processes, written once: signals, the fd limit,
argparse value types, running until told to stop, telling systemd when the
program is ready and when it stops, and the JSON log format.

Signals (:func:`handle_signals`): SIGTERM and SIGINT stop, SIGUSR1 logs the
statistics, SIGHUP reloads where there is something to reload and is logged
and ignored otherwise (its default action would kill the process and leave
socket files behind).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import datetime
import gc
import json
import logging
import math
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any

__all__ = [
    "JsonFormatter",
    "Notifier",
    "fd_limits",
    "handle_signals",
    "int_in_range",
    "message_fields",
    "non_negative_int",
    "non_negative_seconds",
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
    work: Coroutine[Any, Any, None],
    stop: asyncio.Event,
    *,
    notifier: Notifier | None = None,
    freeze: bool = False,
) -> asyncio.Task[None] | None:
    """Run *work* until *stop* is set. Returns None when stopped; the finished
    task (its result or exception for the caller to read) when *work* ended
    first. *work* is cancelled and awaited either way.

    With a *notifier*, systemd hears ``READY=1`` once *work* has taken its
    first step without failing (a listener bound, a dial loop started: both
    happen before *work* first waits) and ``STOPPING=1`` when the shutdown
    begins, whether *stop* was set or *work* ended.

    *freeze* (for a program that owns its process): once *work* has started,
    what start-up made (modules, tables) goes out of the cyclic collector's
    sight (``gc.freeze``), so its full passes walk only what connections make:
    shorter pauses in the tail of a round trip."""
    task = asyncio.get_running_loop().create_task(work)
    stopping = asyncio.get_running_loop().create_task(stop.wait())
    try:
        await asyncio.sleep(0)  # the task's first step runs before this returns
        if freeze:
            gc.freeze()
        if notifier is not None and not task.done():
            notifier.ready()
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if notifier is not None:
            notifier.stopping()
        stopping.cancel()
        finished = task.done()
        task.cancel()
        await asyncio.gather(task, stopping, return_exceptions=True)
    return task if finished else None


# -- systemd readiness ---------------------------------------------------------------


class Notifier:
    """systemd's readiness protocol (``Type=notify``), without libsystemd: one
    datagram per state to the AF_UNIX socket named by ``NOTIFY_SOCKET`` (a
    leading ``@`` names an abstract socket). Without that variable nothing is
    sent. A datagram that cannot be sent is logged as a warning and the
    program goes on: systemd then reports the unit as failing to start, which
    says more than a program that refuses to run."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._sent: set[str] = set()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier ``NOTIFY_SOCKET`` asks for (one that sends nothing if unset)."""
        return cls((os.environ if environ is None else environ).get("NOTIFY_SOCKET"))

    def send(self, state: str) -> bool:
        """Send *state* (``KEY=VALUE`` lines); True when it was sent."""
        if self.address is None:
            return False
        if self.address.startswith("@"):
            target = "\0" + self.address[1:]
        elif self.address.startswith("/"):
            target = self.address
        else:
            log.warning("systemd notification not sent: unsupported NOTIFY_SOCKET=%r", self.address)
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(state.encode(), target)
        except OSError as exc:
            log.warning(
                "systemd notification not sent state=%r socket=%r error=%r",
                state,
                self.address,
                str(exc),
            )
            return False
        return True

    def ready(self) -> None:
        """``READY=1``, once: the program is listening (or dialing)."""
        self._once("READY=1")

    def stopping(self) -> None:
        """``STOPPING=1``, once: the program has begun to shut down."""
        self._once("STOPPING=1")

    def _once(self, state: str) -> None:
        if state not in self._sent:
            self._sent.add(state)
            self.send(state)


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


def _seconds(text: str) -> float:
    """*text* as finite seconds; -1.0 when it is not a finite number."""
    try:
        value = float(text)
    except ValueError:
        return -1.0
    return value if math.isfinite(value) else -1.0


def positive_seconds(text: str) -> float:
    """A finite duration in seconds, greater than zero."""
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def non_negative_seconds(text: str) -> float:
    """A finite duration in seconds, zero or more."""
    value = _seconds(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from *low* to *high* (None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} must be >= {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text!r} must be from {low} to {high}")
        return value

    return parse


positive_int = int_in_range(1)
"""An integer >= 1."""
non_negative_int = int_in_range(0)
"""An integer >= 0."""


def octal_mode(text: str) -> int:
    """A file mode in octal, 0..777."""
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range 0..777")
    return value


# -- the JSON log format ----------------------------------------------------------


def _scan_value(text: str, i: int) -> int:
    """The end of the value starting at *i*: a quoted string (Python repr,
    escapes included), or characters up to a space outside quotes and
    brackets (so ``error=OSError(104, 'reset by peer')`` is one value)."""
    depth = 0
    quote = ""
    n = len(text)
    while i < n:
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
                if depth == 0:
                    return i + 1
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(depth - 1, 0)
        elif c.isspace() and depth == 0:
            return i
        i += 1
    return n


def _is_key(word: str) -> bool:
    return bool(word) and word.replace("_", "a").replace(".", "a").isalnum() and word.isascii()


def message_fields(message: str) -> dict[str, str]:
    """The ``key=value`` pairs of a log message, each value as a string. A value
    the code quoted with ``repr`` (as :func:`socketforward.logs.escape` quotes
    what a peer supplied) is read back to the text it quotes; anything else is
    kept as written. The first of repeated keys wins."""
    fields: dict[str, str] = {}
    i, n = 0, len(message)
    while i < n:
        if message[i].isspace():
            i += 1
            continue
        start = i
        while i < n and not message[i].isspace() and message[i] != "=":
            i += 1
        if i < n and message[i] == "=":
            key = message[start:i]
            end = _scan_value(message, i + 1)
            value = message[i + 1 : end]
            if len(value) >= 2 and value[0] in "'\"" and value[-1] == value[0]:
                with contextlib.suppress(ValueError, SyntaxError, MemoryError, RecursionError):
                    literal = ast.literal_eval(value)
                    if isinstance(literal, str):
                        value = literal
            if _is_key(key):
                fields.setdefault(key, value)
            i = max(end, i + 1)
        # else: a plain word, skipped up to the next space
    return fields


class JsonFormatter(logging.Formatter):
    """``--log-format json``: one JSON object per line per event, with ``time``
    (UTC, ISO 8601), ``level``, ``logger``, ``message`` (the whole text) and
    each ``key=value`` pair of the message as a field of its own (see
    :func:`message_fields`; a key that would replace one of the four, or
    ``exception`` or ``stack``, is left in ``message`` only). ``json.dumps`` does all the
    quoting, so a line stays one valid JSON object whatever a peer put in a
    value."""

    RESERVED = frozenset({"time", "level", "logger", "message", "exception", "stack"})

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        event: dict[str, str] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for key, value in message_fields(message).items():
            if key not in self.RESERVED:
                event[key] = value
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            event["exception"] = record.exc_text
        if record.stack_info:
            event["stack"] = self.formatStack(record.stack_info)
        return json.dumps(event, ensure_ascii=True)
