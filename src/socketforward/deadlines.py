"""Many timeouts of one length on a single event-loop timer.

A forwarder gives every pending connection and every handshake the same
timeout. One ``call_later`` each would put thousands of timers in the loop's
heap (a Python-level comparison per heap step); since entries with one fixed
timeout expire in the order they were added, an insertion-ordered dict and one
timer armed for its oldest entry do the same work in O(1) per entry.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["Deadlines"]

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """Keys that expire *timeout* seconds after :meth:`add`; ``on_expire(key)``
    is called once for each key still present then (after it is removed)."""

    __slots__ = ("_entries", "_loop", "_on_expire", "_timer", "timeout")

    def __init__(self, timeout: float, on_expire: Callable[[K], None]) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.timeout = timeout
        self._on_expire = on_expire
        self._entries: collections.OrderedDict[K, float] = collections.OrderedDict()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        """The keys, oldest first (do not add or discard while iterating)."""
        return iter(self._entries)

    def add(self, key: K) -> None:
        """Start *key*'s timeout (a key already present keeps its first deadline)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if key in self._entries:
            return
        deadline = loop.time() + self.timeout
        self._entries[key] = deadline
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._fire)

    def discard(self, key: K) -> None:
        """Forget *key* (no-op when absent). The timer stays armed: it finds
        nothing due, re-arms for the next oldest key, and costs one wake-up."""
        self._entries.pop(key, None)

    def drain(self) -> list[K]:
        """Forget every key (returned, oldest first) and stop the timer."""
        keys = list(self._entries)
        self._entries.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return keys

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        entries = self._entries
        now = loop.time()
        try:
            while entries:
                key, deadline = next(iter(entries.items()))
                if deadline > now:
                    break
                del entries[key]
                self._on_expire(key)
        finally:
            # on_expire may have added keys (and armed the timer) or raised.
            if entries and self._timer is None:
                self._timer = loop.call_at(next(iter(entries.values())), self._fire)
