"""Stream identifiers, in the reference's format."""

from __future__ import annotations

import base64
import os
import time


def generate_stream_id(prefix: str) -> str:
    """``{prefix}-{unix-nanoseconds}-{random}``: 4 random bytes, URL-safe base64
    without padding (as nerdbox's vminitd)."""
    random = base64.urlsafe_b64encode(os.urandom(4)).rstrip(b"=").decode()
    return f"{prefix}-{time.time_ns()}-{random}"
