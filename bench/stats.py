"""Figures over samples: percentiles of one run, and the median and min-max of
a figure over interleaved rounds."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import NamedTuple


def percentile(sorted_samples: list[float], p: float) -> float:
    """The sample at index floor(p * n) (capped at the last one)."""
    return sorted_samples[min(len(sorted_samples) - 1, int(len(sorted_samples) * p))]


def nearest_rank(sorted_samples: list[int], p: float) -> int:
    """Nearest-rank percentile, the rule of the Go peer's ``peer bench``; 0 if empty."""
    if not sorted_samples:
        return 0
    return sorted_samples[max(math.ceil(p * len(sorted_samples)) - 1, 0)]


class Spread(NamedTuple):
    """A figure over rounds: its median, lowest and highest value."""

    median: float
    low: float
    high: float

    @property
    def varies(self) -> bool:
        return self.low != self.high


def spread(values: list[float]) -> Spread | None:
    if not values:
        return None
    return Spread(statistics.median(values), min(values), max(values))


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``, None when either is missing or ``base`` is 0."""
    if value is None or not base:
        return None
    return value / base


@dataclass
class Samples:
    """Every round's value of each (path, figure), and notes for the report."""

    values: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, path: str, key: str, value: float) -> None:
        self.values.setdefault((path, key), []).append(value)

    def get(self, path: str, key: str) -> list[float]:
        return self.values.get((path, key), [])

    def median(self, path: str, key: str) -> float | None:
        v = self.get(path, key)
        return statistics.median(v) if v else None

    def spread(self, path: str, key: str) -> Spread | None:
        return spread(self.get(path, key))
