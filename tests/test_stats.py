"""Per-forward counters and their log line, the same on both sides."""

from __future__ import annotations

import logging

import pytest

from socketforward.stats import ForwardStats, log_stats


def test_stats_line_names_every_counter(caplog: pytest.LogCaptureFixture) -> None:
    """One line per forward, sorted, failures by reason, then the totals line."""
    caplog.set_level(logging.INFO)
    b = ForwardStats(requests=3, connected=2, active=1, bytes_to_host=10, bytes_to_vm=20)
    b.fail("timeout")
    b.fail("dial")
    b.fail("timeout")
    log_stats(logging.getLogger("t"), {"b": b, "a": ForwardStats()}, pending=4)
    assert caplog.messages == [
        "stats forward_id=a requests=0 connected=0 active=0 failed=none to_host=0 to_vm=0",
        "stats forward_id=b requests=3 connected=2 active=1 failed=dial:1,timeout:2 "
        "to_host=10 to_vm=20",
        "stats pending=4",
    ]


def test_copy_is_independent() -> None:
    """A snapshot does not change when the live counters do."""
    live = ForwardStats()
    snapshot = live.copy()
    live.fail("dial")
    live.requests += 1
    assert snapshot == ForwardStats()
