"""The guest's Control service (``socketforward guest --control``): the status
of its agent. Its forwards are the host's to change, so only Status is served."""

from __future__ import annotations

import ttrpc_asyncio as ttrpc
from socketforward.api import control_pb2 as pb
from socketforward.control import ControlService, forward_status
from socketforward.datastream import StreamRegistry
from socketforward.guest.agent import Agent

__all__ = ["GuestControl"]


class GuestControl(ControlService):
    """Status from an :class:`Agent`, its Service and the data-stream registry.

    Budgets: ``connections`` (container connections open, ``--max-connections``),
    ``fds`` (descriptors they hold), ``pending`` (waiting for a host answer,
    ``--pending-limit``), ``stream_handshakes`` and ``unclaimed_streams``."""

    def __init__(
        self,
        agent: Agent,
        registry: StreamRegistry,
        *,
        rpc_endpoint: str,
        pending_limit: int,
        max_stream_handshakes: int,
        max_unclaimed_streams: int,
    ) -> None:
        super().__init__("guest")
        self.agent = agent
        self.registry = registry
        self.rpc_endpoint = rpc_endpoint
        self.pending_limit = pending_limit
        self.max_stream_handshakes = max_stream_handshakes
        self.max_unclaimed_streams = max_unclaimed_streams

    def status(self) -> pb.StatusResponse:
        """The guest's status now."""
        agent = self.agent
        service = agent.service
        status = self.new_status()
        status.rpc.CopyFrom(
            pb.RpcState(
                connected=agent.rpc_connected,
                since=agent.rpc_since,
                connections=agent.rpc_connections,
                endpoint=self.rpc_endpoint,
            )
        )
        stats = service.stats()
        bound = service.bound()
        for fid in sorted(set(stats) | set(bound)):
            status.forwards.append(
                forward_status(
                    fid, stats.get(fid), vm_path=bound.get(fid, ""), removed=fid not in bound
                )
            )
        for eid, st in sorted(service.expose_stats().items()):
            status.exposes.append(forward_status(eid, st))
        budget = service.budget()
        streams = self.registry.stats()
        for name, used, limit in sorted(
            [
                ("connections", budget.connections, budget.max_connections),
                ("fds", budget.held_fds, budget.max_fds),
                ("pending", service.pending, self.pending_limit),
                ("stream_handshakes", streams.handshakes, self.max_stream_handshakes),
                ("unclaimed_streams", streams.unclaimed, self.max_unclaimed_streams),
            ]
        ):
            status.budgets.append(pb.Budget(name=name, used=used, limit=limit))
        status.counters.update(
            {
                "accept_calls": service.accept_calls,
                "accepting": int(budget.accepting),
                "accept_pauses": budget.pauses,
                "streams_expired": streams.expired,
                "streams_refused": sum(streams.refused.values()),
            }
        )
        return status

    async def Status(
        self, request: pb.StatusRequest, context: ttrpc.CallContext
    ) -> pb.StatusResponse:
        return self.status()

    async def AddForwards(
        self, request: pb.AddForwardsRequest, context: ttrpc.CallContext
    ) -> pb.AddForwardsResponse:
        raise ttrpc.TtrpcError(ttrpc.Code.UNIMPLEMENTED, _HOST_ONLY)

    async def RemoveForwards(
        self, request: pb.RemoveForwardsRequest, context: ttrpc.CallContext
    ) -> pb.RemoveForwardsResponse:
        raise ttrpc.TtrpcError(ttrpc.Code.UNIMPLEMENTED, _HOST_ONLY)

    async def AddExposes(
        self, request: pb.AddExposesRequest, context: ttrpc.CallContext
    ) -> pb.AddExposesResponse:
        raise ttrpc.TtrpcError(ttrpc.Code.UNIMPLEMENTED, _HOST_ONLY)

    async def RemoveExposes(
        self, request: pb.RemoveExposesRequest, context: ttrpc.CallContext
    ) -> pb.RemoveExposesResponse:
        raise ttrpc.TtrpcError(ttrpc.Code.UNIMPLEMENTED, _HOST_ONLY)


_HOST_ONLY = (
    "this is a guest: its forwards and exposes come from the host; add and remove "
    "them through the host's control endpoint"
)
