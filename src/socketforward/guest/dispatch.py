"""Routing container connections to the host's Accept calls, sans-IO.

Each connection accepted in the VM becomes a :class:`Pending`: queued, sent as
a ConnectRequest on one host Accept call (:class:`HostCall`), answered. The
:class:`Dispatcher` decides which call gets it and when to give up; it owns no
socket, stream, clock or loop. It reacts to inputs (a new connection, a call
opening or ending, an answer, a timeout) and tells its :class:`Sink` what to
do: send a request, start a relay, close a connection. Tests drive it with no
sockets at all (tests/guest/test_dispatch.py).

Rules (docs/protocol.md 4.6-4.8):
* a call that announced forward_ids gets only those; calls that announced
  nothing are tried in turn, moving on when one answers ``unknown forward ID``;
* at most *window* requests unanswered per call; the rest wait in a FIFO queue
  of at most *queue_limit* connections;
* when a call ends, its unanswered requests go back to the front of the queue,
  unless their data stream already arrived (the answer was lost, not the
  connection);
* a request answered after its timeout is remembered (bounded), so a late
  success's data stream is closed rather than left to its TTL;
* a connection no host call can serve fails at once (``unknown_forward``):
  every open call announced its forwards, none has this one, and all of them
  opened after the forward was bound (a host Binds before it announces, so a
  call older than the binding may yet be replaced by one that serves it);
* with *fail_fast*, a connection made while no host call is open is closed at
  once instead of waiting for one;
* a connection that waited in the queue is sent only if the sink says its
  container is still there, so a burst of abandoned connections costs the
  host no dials.

A pending connection moves through a small table (:data:`TRANSITIONS`)::

    QUEUED --SEND--> SENT --SUCCESS/CLAIMED--> RELAY
      ^               |--TRY_NEXT/CALL_ENDED--> QUEUED
      |               '--REFUSED/TIMEOUT/SHUTDOWN--> FAILED
      '--QUEUE_FULL/UNSERVED/WITHDRAWN/NO_HOST/TIMEOUT/SHUTDOWN--> FAILED
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
from typing import Any, Final, Generic, Protocol, TypeVar

from socketforward.protocol import HostError, classify

__all__ = [
    "TRANSITIONS",
    "Dispatcher",
    "Failure",
    "HostCall",
    "Input",
    "Pending",
    "RoutingError",
    "Sink",
    "State",
    "advance",
]

log = logging.getLogger("socketforward.guest")


class State(enum.Enum):
    QUEUED = "queued"
    """Waiting in the dispatcher's queue for a call with room."""
    SENT = "sent"
    """Announced on a call, waiting for its answer."""
    RELAY = "relay"
    """Answered with success: handed to the sink to relay. Final here."""
    FAILED = "failed"
    """Closed with a reason. Final."""


class Input(enum.Enum):
    SEND = "send"
    SUCCESS = "success"
    CLAIMED = "claimed"
    """Its call ended unanswered, but the data stream is there already."""
    TRY_NEXT = "try_next"
    """An un-announced call does not know the forward; another may."""
    CALL_ENDED = "call_ended"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    QUEUE_FULL = "queue_full"
    UNSERVED = "unserved"
    """Every open call announced its forwards, none has this one."""
    WITHDRAWN = "withdrawn"
    """The container hung up while its connection waited in the queue."""
    NO_HOST = "no_host"
    """No host call is open and the dispatcher was asked to fail fast."""
    SHUTDOWN = "shutdown"


class Failure(enum.Enum):
    """Why a connection was closed before relaying; the value is its stats key."""

    QUEUE_FULL = "queue_full"
    TIMEOUT = "timeout"
    HOST_ERROR = "host_error"
    UNKNOWN_FORWARD = "unknown_forward"
    WITHDRAWN = "withdrawn"
    """The container hung up before its request was sent: the host is not asked."""
    NO_HOST = "no_host"
    """No host was connected and the guest fails fast (--fail-fast)."""
    NO_STREAM = "no_stream"
    """The host answered success but no data stream came (the service's)."""
    SHUTDOWN = "shutdown"


TRANSITIONS: Final[dict[tuple[State, Input], State]] = {
    (State.QUEUED, Input.SEND): State.SENT,
    (State.QUEUED, Input.QUEUE_FULL): State.FAILED,
    (State.QUEUED, Input.TIMEOUT): State.FAILED,
    (State.QUEUED, Input.UNSERVED): State.FAILED,
    (State.QUEUED, Input.WITHDRAWN): State.FAILED,
    (State.QUEUED, Input.NO_HOST): State.FAILED,
    (State.QUEUED, Input.SHUTDOWN): State.FAILED,
    (State.SENT, Input.SUCCESS): State.RELAY,
    (State.SENT, Input.CLAIMED): State.RELAY,
    (State.SENT, Input.TRY_NEXT): State.QUEUED,
    (State.SENT, Input.CALL_ENDED): State.QUEUED,
    (State.SENT, Input.REFUSED): State.FAILED,
    (State.SENT, Input.TIMEOUT): State.FAILED,
    (State.SENT, Input.SHUTDOWN): State.FAILED,
}


class RoutingError(RuntimeError):
    """An input that the pending connection's state has no transition for (a bug)."""

    def __init__(self, pending: Pending, event: Input) -> None:
        super().__init__(
            f"no transition from {pending.state.name} on {event.name} "
            f"(stream_id={pending.stream_id} forward_id={pending.forward_id})"
        )
        self.state = pending.state
        self.input = event


def advance(pending: Pending, event: Input) -> None:
    """Move *pending* along :data:`TRANSITIONS`; RoutingError when there is no way."""
    try:
        pending.state = TRANSITIONS[pending.state, event]
    except KeyError:
        raise RoutingError(pending, event) from None


_TRIED_NONE: Final[frozenset[Any]] = frozenset()
"""The ``tried`` of every pending connection until a call refuses it: one
object for all (``frozenset()`` makes a new 216-byte one each call since 3.10)."""


class Pending:
    """A container connection on its way to the host. The service subclasses
    it to carry the socket; the dispatcher never touches that."""

    __slots__ = ("call", "forward_id", "state", "stream_id", "tried", "waited")

    def __init__(self, stream_id: str, forward_id: str) -> None:
        self.stream_id = stream_id
        self.forward_id = forward_id
        self.state = State.QUEUED
        self.call: HostCall[Any] | None = None
        # Calls that said they do not know this forward; rarely any, so shared empty.
        self.tried: frozenset[HostCall[Any]] = _TRIED_NONE
        self.waited = False
        """It stayed in the queue: ask the sink before sending it."""

    def __str__(self) -> str:
        return f"stream_id={self.stream_id} forward_id={self.forward_id}"


P = TypeVar("P", bound=Pending)
P_contra = TypeVar("P_contra", bound=Pending, contravariant=True)


class HostCall(Generic[P]):
    """One Accept call of the host, as routing sees it. *announced* is the set
    of forward_ids it serves, None when it did not say."""

    def __init__(self, number: int, announced: frozenset[str] | None) -> None:
        self.number = number
        self.announced = announced
        self.unanswered: dict[str, P] = {}
        self.live = True
        self.opened = -1
        """When it was added, on the dispatcher's own clock of events."""

    def serves(self, forward_id: str) -> bool:
        return self.announced is not None and forward_id in self.announced

    def __str__(self) -> str:
        return f"accept_stream={self.number}"


C = TypeVar("C", bound="HostCall[Any]")
C_contra = TypeVar("C_contra", bound="HostCall[Any]", contravariant=True)


class Sink(Protocol[P_contra, C_contra]):
    """What the dispatcher asks of the side that does the I/O."""

    def send_request(self, call: C_contra, pending: P_contra) -> bool:
        """Send *pending*'s ConnectRequest on *call*; False when the call failed
        (the dispatcher then stops using it; ending it requeues its requests)."""
        ...

    def start_relay(self, pending: P_contra) -> None:
        """The host answered success: claim the data stream and relay."""
        ...

    def claim(self, pending: P_contra) -> bool:
        """Relay *pending* now if its data stream has arrived; False if not."""
        ...

    def close_pending(self, pending: P_contra, reason: Failure, detail: str) -> None:
        """Close a connection that will not be relayed, and say why."""
        ...

    def drop_stream(self, stream_id: str) -> None:
        """Close the data stream of a request that was answered too late."""
        ...

    def wanted(self, pending: P_contra) -> bool:
        """Whether the container behind a connection that waited is still there."""
        ...


class Dispatcher(Generic[P, C]):
    """Routes pending connections to host calls (see the module docstring)."""

    def __init__(
        self,
        sink: Sink[P, C],
        *,
        window: int = 32,
        queue_limit: int = 4096,
        timeout: float = 30.0,
        fail_fast: bool = False,
    ) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        if queue_limit < 0:
            raise ValueError("queue_limit must be >= 0")
        self._sink = sink
        self._window = window
        self._queue_limit = queue_limit
        self._timeout = timeout  # for the failure's text only: the sink keeps time
        self._fail_fast = fail_fast
        self._calls: list[C] = []
        self._queue: collections.OrderedDict[str, P] = collections.OrderedDict()
        self._late: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._late_limit = 4 * queue_limit + 64
        # Order of bindings and calls opening: no clock needed to tell which came first.
        self._events = itertools.count()
        self._bound_at: dict[str, int] = {}
        self.closed = False

    @property
    def pending(self) -> int:
        """Connections waiting for a host answer (queued or sent)."""
        return len(self._queue) + sum(len(c.unanswered) for c in self._calls)

    @property
    def calls(self) -> tuple[C, ...]:
        return tuple(self._calls)

    # -- inputs ------------------------------------------------------------------

    def connection(self, p: P) -> bool:
        """A new connection. False when it was closed at once (queue full,
        shut down); else it waits for an answer and its timeout."""
        if self.closed:
            self._fail(p, Input.SHUTDOWN, Failure.SHUTDOWN, "service shutting down")
            return False
        if self._fail_fast and not self._calls:
            self._fail(p, Input.NO_HOST, Failure.NO_HOST, "no host connected (fail fast)")
            return False
        self._queue[p.stream_id] = p
        self._dispatch()  # may fail it already (unserved)
        if p.state is State.QUEUED and self._unserved(p):
            self._fail_unserved(p)
        elif p.state is State.QUEUED and len(self._queue) > self._queue_limit:
            # No call took it and the waiting room is full.
            detail = f"pending queue full limit={self._queue_limit}"
            self._fail(p, Input.QUEUE_FULL, Failure.QUEUE_FULL, detail)
        p.waited = p.state is State.QUEUED
        return p.state is not State.FAILED

    def forward_bound(self, forward_id: str) -> None:
        """*forward_id* was bound (or bound again): calls opened before this may
        be replaced by ones that serve it, so its connections wait for them."""
        self._bound_at[forward_id] = next(self._events)

    def add_call(self, call: C) -> None:
        """A host Accept call opened."""
        call.opened = next(self._events)
        self._calls.append(call)
        self._dispatch()

    def end_call(self, call: C) -> int:
        """A host Accept call ended: its unanswered requests go back to the
        front of the queue (or relay, when their data stream came). Returns
        how many it held."""
        call.live = False
        if call in self._calls:
            self._calls.remove(call)
        back = list(call.unanswered.values())
        call.unanswered.clear()
        for p in reversed(back):
            p.call = None
            # The host opens the data stream before answering success: if it
            # is there, the answer was lost with the call, not the connection.
            if self._sink.claim(p):
                advance(p, Input.CLAIMED)
            elif self.closed:
                self._fail(p, Input.SHUTDOWN, Failure.SHUTDOWN, "service shutting down")
            else:
                advance(p, Input.CALL_ENDED)
                self._requeue(p)
        self._dispatch()
        return len(back)

    def result(self, call: C, stream_id: str, error: str) -> None:
        """The host's ConnectResult for *stream_id* on *call*."""
        p = call.unanswered.pop(stream_id, None)
        if p is None:
            late = stream_id in self._late
            if late and not error:
                self._sink.drop_stream(stream_id)
            log.warning(
                "connect result for unknown stream ignored %s stream_id=%s error=%r%s",
                call,
                stream_id,
                error,
                " (answered after the timeout)" if late else "",
            )
            return
        p.call = None
        if not error:
            advance(p, Input.SUCCESS)
            self._dispatch()
            self._sink.start_relay(p)
            return
        if classify(error) is HostError.UNKNOWN_FORWARD and not call.serves(p.forward_id):
            p.tried = p.tried | {call}
            if self._candidates(p):
                log.info("host stream does not know forward, trying another %s %s", call, p)
                advance(p, Input.TRY_NEXT)
                self._requeue(p)
                self._dispatch()
                return
            self._fail(p, Input.REFUSED, Failure.UNKNOWN_FORWARD, error)
        else:
            self._fail(p, Input.REFUSED, Failure.HOST_ERROR, error)
        self._dispatch()

    def expire(self, p: P) -> None:
        """*p*'s timeout passed without an answer."""
        if p.state is State.SENT:
            where = f"sent on {p.call}"
            # Remembered, so that a late answer is recognised (and its stream closed).
            self._late[p.stream_id] = None
            while len(self._late) > self._late_limit:
                self._late.popitem(last=False)
        else:
            where = "queued"
        detail = f"no answer from the host within {self._timeout}s ({where})"
        self._fail(p, Input.TIMEOUT, Failure.TIMEOUT, detail)
        self._dispatch()

    def shutdown(self) -> None:
        """Close every waiting connection; from now on new ones are refused and
        ending a call fails its requests instead of requeueing them."""
        self.closed = True
        for call in self._calls:
            for p in list(call.unanswered.values()):
                self._fail(p, Input.SHUTDOWN, Failure.SHUTDOWN, "service shutting down")
            call.live = False
        for p in list(self._queue.values()):
            self._fail(p, Input.SHUTDOWN, Failure.SHUTDOWN, "service shutting down")

    # -- the machinery -------------------------------------------------------------

    def _requeue(self, p: P) -> None:
        p.waited = True
        self._queue[p.stream_id] = p
        self._queue.move_to_end(p.stream_id, last=False)

    def _fail(self, p: P, event: Input, reason: Failure, detail: str) -> None:
        advance(p, event)
        self._queue.pop(p.stream_id, None)
        if p.call is not None:
            p.call.unanswered.pop(p.stream_id, None)
            p.call = None
        self._sink.close_pending(p, reason, detail)

    def _candidates(self, p: Pending) -> list[C]:
        """Calls that may serve *p*: those announcing its forward_id, else the
        un-announced ones that have not yet said they do not know it."""
        live = [c for c in self._calls if c.live]
        announcing = [c for c in live if c.serves(p.forward_id)]
        if announcing:
            return announcing
        return [c for c in live if c.announced is None and c not in p.tried]

    def _unserved(self, p: Pending) -> bool:
        """No open call can serve *p*, and no call it waits for is on its way."""
        if not self._calls:
            return False
        bound = self._bound_at.get(p.forward_id, -1)
        for c in self._calls:
            if c.announced is None or c.serves(p.forward_id) or c.opened < bound:
                return False
        return True

    def _fail_unserved(self, p: P) -> None:
        ids = ",".join(sorted({i for c in self._calls for i in c.announced or ()}))
        detail = f"no host stream serves this forward (announced: {ids})"
        self._fail(p, Input.UNSERVED, Failure.UNKNOWN_FORWARD, detail)

    def _dispatch(self) -> None:
        """Hand queued requests, oldest first, to calls with room."""
        if not self._queue or not self._calls:
            return
        room = {c: self._window - len(c.unanswered) for c in self._calls}
        free = sum(max(0, r) for r in room.values())
        placed: list[tuple[P, C]] = []
        # Forwards whose every candidate is full: later requests for them are
        # skipped without looking (keeps a long queue cheap to walk).
        no_room: set[str] = set()
        unserved: list[P] = []
        withdrawn: list[P] = []
        for p in self._queue.values():
            if free <= 0:
                break
            if p.forward_id in no_room:
                continue
            if p.waited and not self._sink.wanted(p):
                withdrawn.append(p)
                continue
            candidates = self._candidates(p)
            if not candidates and self._unserved(p):
                unserved.append(p)
                continue
            best: C | None = None
            for c in candidates:
                if room[c] > 0 and (best is None or room[c] > room[best]):
                    best = c
            if best is not None:
                room[best] -= 1
                free -= 1
                placed.append((p, best))
            elif not p.tried or (candidates and candidates[0].serves(p.forward_id)):
                no_room.add(p.forward_id)
        for p in unserved:
            self._fail_unserved(p)
        for p in withdrawn:
            detail = "the container hung up while it waited"
            self._fail(p, Input.WITHDRAWN, Failure.WITHDRAWN, detail)
        for p, c in placed:
            del self._queue[p.stream_id]
            advance(p, Input.SEND)
            p.call = c
            c.unanswered[p.stream_id] = p
            if not c.live:
                continue  # failed earlier in this pass: ending it requeues p
            if not self._sink.send_request(c, p):
                c.live = False
                continue
            log.debug("connect request sent %s %s", c, p)
