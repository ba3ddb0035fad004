"""What a peer says reaches a log line escaped and bounded."""

from __future__ import annotations

import logging

import pytest

from socketforward.logs import RateLimitedLog, escape


@pytest.mark.parametrize("plain", ["fwd-a", "socketfwd-1764-AbCd_-", "/run/socketfwd/a.sock"])
def test_plain_values_stay_as_they_are(plain: str) -> None:
    """Ids and paths without odd characters read as they are."""
    assert escape(plain) == plain


@pytest.mark.parametrize(
    "forged",
    ["a\nINFO forged line", "a b", "x=1", "it's", 'say "hi"', "", "\x1b[31mred"],
)
def test_anything_that_could_forge_a_line_or_a_field_is_quoted(forged: str) -> None:
    """Line breaks, spaces, '=' and quotes cannot split a line or add a field:
    the value is quoted, on one line, and reads back as what was sent."""
    shown = escape(forged)
    assert shown == repr(forged)
    assert "\n" not in shown


def test_long_values_are_cut() -> None:
    """A huge value costs the log a bounded number of characters."""
    assert escape("x" * 1_000_000) == "x" * 128 + "..."
    assert len(escape("\n" * 1_000_000)) < 300


def test_a_flood_costs_a_bounded_number_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    """Per kind, the first lines of an interval are written in full, the rest
    counted; the next interval starts with one summary of what was left out."""
    now = [0.0]
    limited = RateLimitedLog(
        logging.getLogger("test.flood"), burst=3, interval=10.0, clock=lambda: now[0]
    )
    caplog.set_level(logging.WARNING, "test.flood")
    for i in range(1000):
        limited.warning("bad_id", "bad id n=%d", i)
    limited.warning("timeout", "timed out")
    assert caplog.messages == ["bad id n=0", "bad id n=1", "bad id n=2", "timed out"]
    now[0] = 10.0
    limited.warning("bad_id", "bad id n=%d", 1000)
    assert caplog.messages[4:] == ["log lines left out interval=10s bad_id=997", "bad id n=1000"]
    limited.flush()
    assert len(caplog.messages) == 6  # nothing left out since: no summary
