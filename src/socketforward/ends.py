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

import ttrpc_asyncio as ttrpc
from socketforward.api import socketforward_pb2 as pb
from socketforward.relay import Relay

__all__ = ["EARLY_LIMIT", "EndRegistry", "EndSender"]

EARLY_LIMIT: Final = 4096
"""Counts kept for relays not started yet (the oldest go first)."""


class EndSender(Protocol):
    """Our side of a StreamEnds call (either side's stream type)."""

    def send_nowait(self, message: pb.StreamEnd, /) -> None: ...


class EndRegistry:
    """Relays whose direction ends travel out of band, by stream id; also their
    :class:`~socketforward.relay.EndSink`.

    *calls* gives the StreamEnds call open on a channel (None once it is
    gone). *early_limit*: how many counts to keep for stream ids with no relay
    yet (the guest may read the host's count before it claims the stream); 0
    keeps none (the host: its relay always exists first)."""

    def __init__(
        self, calls: Callable[[int], EndSender | None], *, early_limit: int = EARLY_LIMIT
    ) -> None:
        self._calls = calls
        self._relays: dict[str, Relay] = {}
        self._early: dict[str, int] = {}
        self._early_limit = early_limit
        self.strays = 0
        """Counts for no relay of ours, dropped (or evicted unclaimed)."""

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._relays

    def __len__(self) -> int:
        return len(self._relays)

    def add(self, relay: Relay) -> None:
        """*relay* (running, made with this registry as its ``ends``) takes its
        ends out of band; a count that came before it is handed over now."""
        self._relays[relay.ends_id] = relay
        early = self._early.pop(relay.ends_id, None)
        if early is not None:
            relay.peer_end(early)

    def discard(self, relay: Relay) -> None:
        """*relay* ended (only its own entry goes)."""
        if self._relays.get(relay.ends_id) is relay:
            del self._relays[relay.ends_id]

    def announce(self, relay: Relay, total: int) -> bool:
        """A StreamEnd for *relay* on its channel; False when that call is gone."""
        call = self._calls(relay.ends_channel)
        if call is None:
            return False
        try:
            call.send_nowait(pb.StreamEnd(stream_id=relay.ends_id, bytes=total))
        except (ttrpc.TtrpcError, ttrpc.ProtocolError):
            return False
        return True

    def received(self, stream_id: str, total: int) -> bool:
        """The far side's count for *stream_id*; False when no relay has it yet
        (kept for a while when early counts are, else dropped)."""
        relay = self._relays.get(stream_id)
        if relay is not None:
            relay.peer_end(total)
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
        relays = [relay for relay in self._relays.values() if relay.ends_channel == channel]
        for relay in relays:
            relay.end_in_band()
        return len(relays)
