"""Identifiers and protocol words both sides share."""

from __future__ import annotations

import base64
import os
import time
from typing import Final

FORWARD_IDS_METADATA: Final = "socketforward-forward-ids"
"""Accept-call metadata key: the forward_ids a host stream serves, comma-separated."""
UNKNOWN_FORWARD_ID: Final = "unknown forward ID: "
"""How a host answers a forward_id it does not know (nerdbox's text, then the id)."""


def generate_stream_id(prefix: str) -> str:
    """``{prefix}-{unix-nanoseconds}-{random}``: 4 random bytes, URL-safe base64
    without padding (as nerdbox's vminitd)."""
    random = base64.urlsafe_b64encode(os.urandom(4)).rstrip(b"=").decode()
    return f"{prefix}-{time.time_ns()}-{random}"
