"""argparse value types the subcommands share."""

from __future__ import annotations

import argparse
import math


def positive_seconds(text: str) -> float:
    """A finite duration in seconds, greater than zero."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value
