"""The guest's routing of container connections to host Accept calls, driven
without sockets: every transition of a pending connection, and the routing
rules users notice (pacing, queue bound, announced and unannounced calls,
requests moving on when a call ends, late answers, shutdown)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socketforward.guest.dispatch import (
    TRANSITIONS,
    Dispatcher,
    Failure,
    HostCall,
    Input,
    Pending,
    RoutingError,
    State,
    advance,
)
from socketforward.protocol import HostError


class Call(HostCall[Pending]):
    pass


class Recorder:
    """A sink that does nothing but write down what it was told."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, str]] = []
        self.relayed: list[str] = []
        self.closed: dict[str, tuple[Failure, str]] = {}
        self.dropped: list[str] = []
        self.arrived: set[str] = set()  # stream ids whose data stream is there
        self.broken: set[int] = set()  # calls whose sends fail
        self.gone: set[str] = set()  # containers that hung up
        self.asked: list[str] = []

    def send_request(self, call: Call, pending: Pending) -> bool:
        if call.number in self.broken:
            return False
        self.sent.append((call.number, pending.stream_id))
        return True

    def start_relay(self, pending: Pending) -> None:
        self.relayed.append(pending.stream_id)

    def claim(self, pending: Pending) -> bool:
        if pending.stream_id not in self.arrived:
            return False
        self.relayed.append(pending.stream_id)
        return True

    def close_pending(self, pending: Pending, reason: Failure, detail: str) -> None:
        assert pending.stream_id not in self.closed, "closed twice"
        self.closed[pending.stream_id] = (reason, detail)

    def drop_stream(self, stream_id: str) -> None:
        self.dropped.append(stream_id)

    def wanted(self, pending: Pending) -> bool:
        self.asked.append(pending.stream_id)
        return pending.stream_id not in self.gone

    def sent_on(self, number: int) -> list[str]:
        return [sid for n, sid in self.sent if n == number]


class Routing:
    """A dispatcher, its recorder, and numbered connections and calls."""

    def __init__(self, *, window: int = 32, queue_limit: int = 4096) -> None:
        self.sink = Recorder()
        self.d: Dispatcher[Pending, Call] = Dispatcher(
            self.sink, window=window, queue_limit=queue_limit, timeout=30.0
        )
        self._ids = itertools.count(1)
        self._calls = itertools.count(1)

    def connect(self, forward_id: str = "f") -> Pending:
        p = Pending(f"s{next(self._ids)}", forward_id)
        self.d.connection(p)
        return p

    def call(self, *announced: str) -> Call:
        c = Call(next(self._calls), frozenset(announced) or None)
        self.d.add_call(c)
        return c


def unknown(forward_id: str) -> str:
    return HostError.UNKNOWN_FORWARD.text(forward_id)


# -- the transition table ------------------------------------------------------------


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Input))
def test_every_state_and_input_moves_by_the_table_or_raises_naming_both(
    state: State, event: Input
) -> None:
    """A pending connection moves exactly as TRANSITIONS says; an input its state
    has no entry for raises a RoutingError naming the state, input and ids."""
    p = Pending("s1", "f")
    p.state = state
    if (state, event) in TRANSITIONS:
        advance(p, event)
        assert p.state is TRANSITIONS[state, event]
    else:
        with pytest.raises(RoutingError, match=f"{state.name} on {event.name}.*stream_id=s1"):
            advance(p, event)
        assert p.state is state


def test_final_states_have_no_way_out() -> None:
    """RELAY and FAILED are final: no input moves a connection out of them."""
    assert not [key for key in TRANSITIONS if key[0] in (State.RELAY, State.FAILED)]


# -- pacing and the queue ------------------------------------------------------------


def test_requests_are_paced_by_the_window_and_answers_open_it() -> None:
    """At most *window* requests are unanswered on a call; each answer lets the
    next queued connection go, oldest first."""
    r = Routing(window=2)
    c = r.call()
    ps = [r.connect() for _ in range(5)]
    assert r.sink.sent_on(1) == ["s1", "s2"]
    assert [p.state for p in ps] == [State.SENT] * 2 + [State.QUEUED] * 3
    assert r.d.pending == 5
    r.d.result(c, "s1", "")
    assert r.sink.relayed == ["s1"] and ps[0].state is State.RELAY
    assert r.sink.sent_on(1) == ["s1", "s2", "s3"]
    assert r.d.pending == 4


def test_connections_wait_for_a_call_to_open() -> None:
    """Connections made before any host call opened are sent once one opens."""
    r = Routing()
    r.connect()
    r.connect()
    assert r.sink.sent == []
    r.call()
    assert r.sink.sent_on(1) == ["s1", "s2"]


def test_queue_bound_refuses_the_newest_with_its_reason() -> None:
    """Past the queue bound a new connection is closed at once (queue_full);
    the ones already waiting keep their place."""
    r = Routing(queue_limit=2)
    r.connect()
    r.connect()
    third = Pending("s3", "f")
    assert r.d.connection(third) is False
    assert third.state is State.FAILED
    assert r.sink.closed == {"s3": (Failure.QUEUE_FULL, "pending queue full limit=2")}
    r.call()
    assert r.sink.sent_on(1) == ["s1", "s2"]


def test_sent_requests_do_not_count_against_the_queue() -> None:
    """Only connections still waiting for a call count toward the queue bound."""
    r = Routing(window=2, queue_limit=1)
    r.call()
    for _ in range(3):
        r.connect()
    assert r.sink.closed == {}
    assert r.d.pending == 3


def test_a_full_forward_does_not_hold_up_another() -> None:
    """Requests for a forward whose calls are full are skipped, not blocking
    the next forward's requests behind them."""
    r = Routing(window=1)
    r.call("fa")
    r.connect("fa")
    r.connect("fa")
    r.call("fb")
    r.connect("fb")
    assert r.sink.sent_on(1) == ["s1"]
    assert r.sink.sent_on(2) == ["s3"]


# -- announced and unannounced calls ------------------------------------------------


def test_announced_calls_get_only_their_forwards() -> None:
    """A call that announced its forward_ids receives requests for those only."""
    r = Routing()
    r.call("fa")
    r.call("fb")
    for fid in ("fa", "fb", "fa", "fb"):
        r.connect(fid)
    assert r.sink.sent_on(1) == ["s1", "s3"]
    assert r.sink.sent_on(2) == ["s2", "s4"]


def test_forward_no_open_call_announced_fails_at_once() -> None:
    """When every open call announced its forwards and none has this one (a host
    restarted without it), the connection is closed at once as unknown_forward
    instead of waiting for its timeout, and nothing is sent."""
    r = Routing()
    r.d.forward_bound("gone")
    r.call("fa")
    p = Pending("s1", "gone")
    assert r.d.connection(p) is False
    assert p.state is State.FAILED and r.sink.sent == []
    reason, detail = r.sink.closed["s1"]
    assert reason is Failure.UNKNOWN_FORWARD and "announced: fa" in detail


def test_forward_bound_after_the_calls_opened_waits_for_a_call_that_serves_it() -> None:
    """A host Binds a new forward before it opens the Accept call announcing it:
    a connection made in between waits for that call instead of failing, and
    fails fast only once every older call is gone."""
    r = Routing()
    old = r.call("fa")
    r.d.forward_bound("fb")
    p = r.connect("fb")
    assert p.state is State.QUEUED
    r.call("fa", "fb")
    assert r.sink.sent == [(2, "s1")]
    late = r.connect("fc")  # bound before both calls opened: nobody will serve it
    assert late.state is State.FAILED
    r.d.forward_bound("fd")
    waiting = r.connect("fd")
    assert waiting.state is State.QUEUED
    r.d.end_call(old)
    r.d.result(r.d.calls[0], "s1", "")  # a window opens: the queue is walked again
    assert waiting.state is State.QUEUED  # the newest call predates fd's binding too


def test_unannounced_calls_keep_a_forward_waiting() -> None:
    """A call that announced nothing (nerdbox's host) might serve any forward:
    nothing fails fast while one is open."""
    r = Routing(window=1)
    c = r.call()
    r.call("fa")
    r.connect("x")
    p = r.connect("x")
    assert c.unanswered and p.state is State.QUEUED


def test_waiting_connections_share_one_empty_tried_set() -> None:
    """Connections no call has refused hold no set of their own (since Python
    3.10 each ``frozenset()`` is a new 216-byte object, kept while the
    connection is relayed): idle connections cost that much less."""
    a, b = Pending("s1", "fa"), Pending("s2", "fa")
    assert a.tried is b.tried and not a.tried


def test_unannounced_calls_are_tried_in_turn() -> None:
    """A call that announced nothing and answers "unknown forward ID" passes
    the request to the next such call, which serves it."""
    r = Routing()
    c1, c2 = r.call(), r.call()
    p = r.connect("fb")
    assert r.sink.sent == [(1, "s1")]
    r.d.result(c1, "s1", unknown("fb"))
    assert r.sink.sent == [(1, "s1"), (2, "s1")]
    assert p.tried == frozenset({c1})
    r.d.result(c2, "s1", "")
    assert r.sink.relayed == ["s1"] and r.sink.closed == {}


def test_forward_no_call_knows_is_closed_with_the_hosts_words() -> None:
    """When every unannounced call said it does not know the forward, the
    connection is closed as unknown_forward with the host's answer."""
    r = Routing()
    c1, c2 = r.call(), r.call()
    r.connect("ghost")
    r.d.result(c1, "s1", unknown("ghost"))
    r.d.result(c2, "s1", unknown("ghost"))
    assert r.sink.closed == {"s1": (Failure.UNKNOWN_FORWARD, unknown("ghost"))}


def test_announcing_call_that_disowns_its_forward_is_a_host_error() -> None:
    """A call that announced a forward and then calls it unknown is not asked
    again: the connection fails as host_error."""
    r = Routing()
    c = r.call("fa")
    r.connect("fa")
    r.d.result(c, "s1", unknown("fa"))
    assert r.sink.closed == {"s1": (Failure.HOST_ERROR, unknown("fa"))}


def test_error_answer_closes_the_connection_and_opens_the_window() -> None:
    """Any other error text closes that connection (host_error) and the next
    queued request takes its place."""
    r = Routing(window=1)
    c = r.call()
    r.connect()
    r.connect()
    r.d.result(c, "s1", HostError.DIAL.text())
    assert r.sink.closed == {"s1": (Failure.HOST_ERROR, "failed to dial host socket")}
    assert r.sink.sent_on(1) == ["s1", "s2"]


# -- calls ending ------------------------------------------------------------------------


def test_unanswered_requests_move_to_the_front_in_order_when_a_call_ends() -> None:
    """A call that ends hands its unanswered requests back ahead of the queue,
    in their order; the next call gets them first."""
    r = Routing(window=2)
    c1 = r.call()
    for _ in range(3):
        r.connect()
    assert r.d.end_call(c1) == 2
    assert r.d.pending == 3
    r.call()
    assert r.sink.sent_on(2) == ["s1", "s2"]


def test_request_whose_data_stream_came_relays_when_its_call_ends() -> None:
    """If the data stream is there when the call ends, the success answer was
    lost with the call: the connection is relayed, not requeued."""
    r = Routing()
    c = r.call()
    p1, p2 = r.connect(), r.connect()
    r.sink.arrived.add("s2")
    r.d.end_call(c)
    assert p2.state is State.RELAY and r.sink.relayed == ["s2"]
    assert p1.state is State.QUEUED


def test_a_call_whose_send_fails_is_used_no_more() -> None:
    """When sending on a call fails, no further request goes to it, and ending
    it hands the request to another call."""
    r = Routing()
    r.sink.broken.add(1)
    c1 = r.call()
    r.connect()
    r.connect()
    assert not c1.live and r.sink.sent == []
    r.d.end_call(c1)
    r.call()
    assert r.sink.sent_on(2) == ["s1", "s2"]


# -- timeouts and late answers ---------------------------------------------------------


def test_late_success_closes_the_data_stream_nobody_claims() -> None:
    """A request that timed out after it was sent is remembered: a late success
    answer gets its data stream closed; a late error or an unknown id is ignored."""
    r = Routing()
    c = r.call()
    p = r.connect()
    r.d.expire(p)
    assert r.sink.closed["s1"][0] is Failure.TIMEOUT
    assert "sent on accept_stream=1" in r.sink.closed["s1"][1]
    r.d.result(c, "s1", "")
    assert r.sink.dropped == ["s1"]
    r.d.result(c, "never-sent", "")
    assert r.sink.dropped == ["s1"] and r.sink.relayed == []


def test_late_answer_memory_is_bounded() -> None:
    """The ids remembered for late answers are bounded by the queue bound."""
    r = Routing(window=100, queue_limit=1)
    c = r.call()
    ps = [r.connect() for _ in range(80)]
    assert all(p.state is State.SENT for p in ps)
    for p in ps:
        r.d.expire(p)
    r.d.result(c, "s1", "")  # the oldest was forgotten (bound 4 * 1 + 64)
    r.d.result(c, "s80", "")
    assert r.sink.dropped == ["s80"]


# -- shutdown -----------------------------------------------------------------------------


def test_shutdown_closes_every_waiting_connection_and_refuses_new_ones() -> None:
    """Shutdown closes queued and sent connections (shutdown), and any later
    connection is closed at once."""
    r = Routing(window=1)
    c = r.call()
    r.connect()
    r.connect()
    r.d.shutdown()
    assert {k: v[0] for k, v in r.sink.closed.items()} == {
        "s1": Failure.SHUTDOWN,
        "s2": Failure.SHUTDOWN,
    }
    assert not c.live and r.d.pending == 0
    late = Pending("s3", "f")
    assert r.d.connection(late) is False and late.state is State.FAILED
    assert r.d.end_call(c) == 0


def test_window_and_queue_limit_are_checked() -> None:
    """A window below 1 or a negative queue bound is refused at construction."""
    with pytest.raises(ValueError, match="window"):
        Dispatcher(Recorder(), window=0)
    with pytest.raises(ValueError, match="queue_limit"):
        Dispatcher(Recorder(), queue_limit=-1)


# -- any sequence of inputs ----------------------------------------------------------------

_OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["connect", "call", "end", "ok", "error", "unknown", "expire", "arrive", "hangup"]
        ),
        st.integers(0, 7),
        st.sampled_from(["fa", "fb"]),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=_OPS, window=st.integers(1, 3), queue_limit=st.integers(0, 4))
def test_any_sequence_keeps_every_connection_accounted_for(
    ops: list[tuple[str, int, str]], window: int, queue_limit: int
) -> None:
    """Whatever the host and the clock do, every connection is in exactly one
    place (queued, unanswered on one live call, relayed or closed once), no
    call holds more than its window, and what waits stays within the bounds."""
    r = Routing(window=window, queue_limit=queue_limit)
    conns: list[Pending] = []
    calls: list[Call] = []
    for op, n, fid in ops:
        live = [c for c in calls if c in r.d.calls]
        if op == "connect":
            conns.append(r.connect(fid))
        elif op == "call":
            calls.append(r.call(*([fid] if n % 2 else [])))
        elif op == "end" and live:
            r.d.end_call(live[n % len(live)])
        elif op in ("ok", "error", "unknown") and live:
            c = live[n % len(live)]
            if c.unanswered:
                sid = list(c.unanswered)[n % len(c.unanswered)]
                error = {"ok": "", "error": "boom", "unknown": unknown(fid)}[op]
                r.d.result(c, sid, error)
        elif op == "expire" and conns:
            p = conns[n % len(conns)]
            if p.state in (State.QUEUED, State.SENT):
                r.d.expire(p)
        elif op == "arrive" and conns:
            r.sink.arrived.add(conns[n % len(conns)].stream_id)
        elif op == "hangup" and conns:
            r.sink.gone.add(conns[n % len(conns)].stream_id)
        for c in r.d.calls:
            assert len(c.unanswered) <= window
        # New connections are refused past the bound; only handed-back ones exceed it.
        assert r.d.pending <= queue_limit + window * len(calls)
    for p in conns:
        relayed = p.stream_id in r.sink.relayed
        closed = p.stream_id in r.sink.closed
        holders = [c for c in r.d.calls if p.stream_id in c.unanswered]
        if p.state is State.SENT:
            assert holders == [p.call] and not relayed and not closed
        elif p.state is State.QUEUED:
            assert holders == [] and not relayed and not closed
        elif p.state is State.RELAY:
            assert r.sink.relayed.count(p.stream_id) == 1 and not closed and holders == []
        else:
            assert closed and not relayed and holders == []
    assert r.d.pending == sum(p.state in (State.QUEUED, State.SENT) for p in conns)


def test_a_connection_abandoned_while_it_waited_is_not_sent() -> None:
    """A container that hung up while its connection waited in the queue costs
    the host nothing: it is closed as withdrawn instead of being sent, and the
    next one takes its place. Connections sent at once are not asked about."""
    r = Routing(window=1)
    c = r.call()
    first, gone, kept = r.connect(), r.connect(), r.connect()
    assert r.sink.asked == []  # nothing asked for a connection sent at once
    r.sink.gone.add(gone.stream_id)
    r.d.result(c, first.stream_id, "")
    assert gone.state is State.FAILED
    assert r.sink.closed[gone.stream_id][0] is Failure.WITHDRAWN
    assert r.sink.sent_on(1) == ["s1", "s3"] and kept.state is State.SENT
    assert r.sink.asked == ["s2", "s3"]


def test_fail_fast_closes_connections_while_no_host_is_there() -> None:
    """With fail_fast, a connection made while no host call is open is closed at
    once (no_host) instead of waiting; once a call is open, connections go to it."""
    r = Routing()
    r.d = Dispatcher(r.sink, fail_fast=True)
    early = Pending("s1", "f")
    assert r.d.connection(early) is False
    assert r.sink.closed["s1"][0] is Failure.NO_HOST
    r.call()
    assert r.connect().state is State.SENT
