"""What a peer says reaches a log line escaped and bounded."""

from __future__ import annotations

import pytest

from socketforward.logs import escape


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
