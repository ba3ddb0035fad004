"""Log lines carrying what a peer said: one escaping rule for both sides.

Anything a VM or a container supplies (forward_ids, stream ids, paths in a
BindRequest) goes into a key=value log line through :func:`escape`, so a line
break or a ``key=value`` inside it cannot forge a line or a field.
"""

from __future__ import annotations

from typing import Final

__all__ = ["escape"]

LIMIT: Final = 128
"""Characters of a peer-supplied string kept in a log line."""


def escape(text: str, limit: int = LIMIT) -> str:
    """*text* for a key=value log line: as it is when plain, quoted (``repr``)
    when it is empty or holds anything else than printable non-space
    characters other than quotes and ``=``; cut after *limit* characters."""
    cut = text[:limit] + ("..." if len(text) > limit else "")
    if cut and cut.isprintable() and not any(c.isspace() or c in "\"'=" for c in cut):
        return cut
    return repr(cut)
