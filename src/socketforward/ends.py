"""Ends of data-stream directions that travel out of band (docs/protocol.md 5.5).

Some vsock devices lose a half-close. Between two sides of ours, the side
whose local peer sent EOF says so on the RPC connection instead (a
``StreamEnd`` with the byte count, on a ``StreamEnds`` call), and the data
stream is only ever closed whole. :class:`EndRegistry` is one side's table of
the relays that take part, by stream id: it hands each relay the far side's
count, keeps the counts that come before their relay (bounded), and falls back
to a shutdown of the data stream for every relay whose channel is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from socketforward import ttrpc
from socketforward.api import socketforward_pb2 as pb
from socketforward.relay import Announce, Relay

__all__ = ["EARLY_LIMIT", "EndRegistry", "EndSender", "announcer"]

EARLY_LIMIT: Final = 4096
"""Counts kept for relays not started yet (the oldest go first)."""


class EndRegistry:
    """Relays whose direction ends travel out of band, by stream id.

    *early_limit*: how many counts to keep for stream ids with no relay yet
    (the guest may read the host's count before it claims the stream); 0
    keeps none (the host: its relay always exists first)."""

    def __init__(self, *, early_limit: int = EARLY_LIMIT) -> None:
        self._relays: dict[str, tuple[Relay, int]] = {}
        self._early: dict[str, int] = {}
        self._early_limit = early_limit
        self.strays = 0
        """Counts for no relay of ours, dropped (or evicted unclaimed)."""

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._relays

    def __len__(self) -> int:
        return len(self._relays)

    def add(self, stream_id: str, relay: Relay, channel: int) -> None:
        """*relay* (running) takes its ends out of band on *channel*; a count
        that came before it is handed over now."""
        self._relays[stream_id] = (relay, channel)
        early = self._early.pop(stream_id, None)
        if early is not None:
            relay.peer_end(early)

    def discard(self, stream_id: str, relay: Relay) -> None:
        """*relay* ended (only its own entry goes)."""
        entry = self._relays.get(stream_id)
        if entry is not None and entry[0] is relay:
            del self._relays[stream_id]

    def received(self, stream_id: str, total: int) -> bool:
        """The far side's count for *stream_id*; False when no relay has it yet
        (kept for a while when early counts are, else dropped)."""
        entry = self._relays.get(stream_id)
        if entry is not None:
            entry[0].peer_end(total)
            return True
        if self._early_limit:
            self._early.pop(stream_id, None)
            self._early[stream_id] = total
            if len(self._early) > self._early_limit:
                del self._early[next(iter(self._early))]
                self.strays += 1
        else:
            self.strays += 1
        return False

    def channel_lost(self, channel: int) -> int:
        """*channel* is gone, and with it any count sent on it and not read yet:
        every relay on it that announced an end shuts its data stream down
        after all. Returns how many relays were on it."""
        relays = [relay for relay, ch in self._relays.values() if ch == channel]
        for relay in relays:
            relay.end_in_band()
        return len(relays)


class EndSender(Protocol):
    """Our side of a StreamEnds call (either side's stream type)."""

    def send_nowait(self, message: pb.StreamEnd, /) -> None: ...


def announcer(call: Callable[[], EndSender | None], stream_id: str) -> Announce:
    """What a relay calls on its local EOF: a StreamEnd for *stream_id* on the
    call *call* returns, or False (the data stream is shut down instead) when
    that call is gone."""

    def announce(total: int) -> bool:
        sender = call()
        if sender is None:
            return False
        try:
            sender.send_nowait(pb.StreamEnd(stream_id=stream_id, bytes=total))
        except (ttrpc.TtrpcError, ttrpc.ProtocolError):
            return False
        return True

    return announce
