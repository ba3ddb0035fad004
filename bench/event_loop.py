"""The event loop of the benchmarks' Python processes: uvloop when it is
installed (as socketforward's own programs), unless a benchmark says otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def uvloop_importable() -> bool:
    try:
        import uvloop  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def loop_name() -> str:
    """For reports: which loop the Python processes run on by default."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return "asyncio (uvloop not installed)"
    return f"uvloop {getattr(uvloop, '__version__', '?')}"


def run(main: Coroutine[Any, Any, T], use_uvloop: bool | None = None) -> T:
    """Run ``main`` on uvloop if ``use_uvloop`` (None: when it is importable)."""
    if use_uvloop is None:
        use_uvloop = uvloop_importable()
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if use_uvloop:
        import uvloop  # noqa: PLC0415

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)
