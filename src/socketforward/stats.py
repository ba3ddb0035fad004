"""Per-forward counters, with the same names and the same log line on both sides."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

__all__ = ["ForwardStats", "log_stats"]


@dataclass
class ForwardStats:
    """What happened to the connections of one forward_id."""

    requests: int = 0
    """Connections offered: in the guest, accepted from containers; on the host,
    ConnectRequests read."""
    connected: int = 0
    """Connections that reached the relay."""
    active: int = 0
    """Relays running now."""
    failed: dict[str, int] = field(default_factory=dict)
    """Connections that never reached the relay, by reason (``timeout``,
    ``queue_full``, ``host_error``, ... in the guest; ``dial``, ``stream``,
    ``overload``, ... on the host)."""
    bytes_to_host: int = 0
    bytes_to_vm: int = 0

    def fail(self, reason: str) -> None:
        self.failed[reason] = self.failed.get(reason, 0) + 1

    def copy(self) -> ForwardStats:
        return replace(self, failed=dict(self.failed))


def log_stats(
    log: logging.Logger,
    stats: Mapping[str, ForwardStats],
    *,
    id_key: str = "forward_id",
    **totals: int,
) -> None:
    """One line per forward (or expose: *id_key*), then one with the side's own
    totals, if any."""
    for fid, st in sorted(stats.items()):
        failed = ",".join(f"{k}:{v}" for k, v in sorted(st.failed.items())) or "none"
        log.info(
            "stats %s=%s requests=%d connected=%d active=%d failed=%s to_host=%d to_vm=%d",
            id_key,
            fid,
            st.requests,
            st.connected,
            st.active,
            failed,
            st.bytes_to_host,
            st.bytes_to_vm,
        )
    if totals:
        log.info("stats %s", " ".join(f"{k}={v}" for k, v in totals.items()))
