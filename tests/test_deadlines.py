"""Deadlines: many equal timeouts on one timer, as pending connections use them."""

from __future__ import annotations

import asyncio

import pytest

from socketforward.deadlines import Deadlines

TIMEOUT = 0.05


async def test_keys_expire_once_in_order_and_discarded_ones_never() -> None:
    """Every key left in place expires once, oldest first; a discarded key never does."""
    expired: list[str] = []
    d: Deadlines[str] = Deadlines(TIMEOUT, expired.append)
    d.add("a")
    await asyncio.sleep(TIMEOUT / 2)
    d.add("b")
    d.add("c")
    d.discard("b")
    d.add("a")  # already there: keeps its first deadline
    assert len(d) == 2 and "a" in d and "b" not in d
    await asyncio.sleep(TIMEOUT * 0.75)
    assert expired == ["a"]  # "c" is not due yet
    await asyncio.sleep(TIMEOUT * 2)
    assert expired == ["a", "c"]
    assert len(d) == 0


async def test_a_key_added_by_the_expiry_callback_expires_too() -> None:
    """A retry scheduled from on_expire gets its own full timeout."""
    expired: list[int] = []

    def on_expire(key: int) -> None:
        expired.append(key)
        if key < 3:
            d.add(key + 1)

    d: Deadlines[int] = Deadlines(TIMEOUT, on_expire)
    d.add(1)
    await asyncio.sleep(TIMEOUT * 5)
    assert expired == [1, 2, 3]


async def test_a_failing_callback_does_not_strand_later_keys() -> None:
    """One on_expire raising (the loop logs it) still lets the next keys expire."""
    expired: list[str] = []

    def on_expire(key: str) -> None:
        expired.append(key)
        if key == "bad":
            raise RuntimeError("boom")

    loop = asyncio.get_running_loop()
    errors: list[object] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception")))
    d: Deadlines[str] = Deadlines(TIMEOUT, on_expire)
    d.add("bad")
    d.add("good")
    await asyncio.sleep(TIMEOUT * 4)
    assert expired == ["bad", "good"]
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)


async def test_drain_hands_back_the_keys_and_stops_everything() -> None:
    """drain() returns what was pending, oldest first; after it nothing expires."""
    expired: list[str] = []
    d: Deadlines[str] = Deadlines(TIMEOUT, expired.append)
    d.add("b")
    d.add("a")
    assert d.drain() == ["b", "a"]
    await asyncio.sleep(TIMEOUT * 2)
    assert expired == [] and len(d) == 0


def test_timeout_must_be_positive() -> None:
    """A zero timeout is a configuration error, said at once."""
    with pytest.raises(ValueError, match="timeout must be > 0"):
        Deadlines(0, print)
