"""Log lines a peer can cause: one escaping rule and one rate limit, both sides.

Anything a VM or a container supplies (forward_ids, stream ids, paths in a
BindRequest) goes into a key=value log line through :func:`escape`, so a line
break or a ``key=value`` inside it cannot forge a line or a field. Warnings a
peer can trigger at will go through a :class:`RateLimitedLog`, so a flood of
bad requests costs the log a bounded number of lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

__all__ = ["RateLimitedLog", "escape"]

LIMIT: Final = 128
"""Characters of a peer-supplied string kept in a log line."""


def escape(text: str, limit: int = LIMIT) -> str:
    """*text* for a key=value log line: as it is when plain, quoted (``repr``)
    when it is empty or holds anything else than printable non-space
    characters other than quotes and ``=``; cut after *limit* characters."""
    cut = text[:limit] + ("..." if len(text) > limit else "")
    if cut and cut.isprintable() and not any(c.isspace() or c in "\"'=" for c in cut):
        return cut
    return repr(cut)


class RateLimitedLog:
    """Warnings of kinds a peer can trigger at will. Per kind, the first *burst*
    lines of each *interval* are written in full and the rest only counted; the
    first line after the interval (or :meth:`flush`) writes one summary of what
    was left out, by kind. Kinds are the code's own words, so their number is
    bounded; no timer is needed."""

    def __init__(
        self,
        log: logging.Logger,
        *,
        burst: int = 20,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._start = clock()
        self._written: dict[str, int] = {}
        self._left_out: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args: object) -> None:
        if self._clock() - self._start >= self.interval:
            self.flush()
        written = self._written.get(kind, 0)
        if written < self.burst:
            self._written[kind] = written + 1
            self.log.warning(msg, *args)
        else:
            self._left_out[kind] = self._left_out.get(kind, 0) + 1

    def flush(self) -> None:
        """Write the summary of the lines left out, and start a new interval."""
        if self._left_out:
            self.log.warning(
                "log lines left out interval=%.0fs %s",
                self._clock() - self._start,
                " ".join(f"{kind}={n}" for kind, n in sorted(self._left_out.items())),
            )
        self._start = self._clock()
        self._written.clear()
        self._left_out.clear()
