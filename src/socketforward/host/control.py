"""The host's run-time changes and its Control service (``socketforward host
--control``): Status, AddForwards, RemoveForwards.

:class:`ForwardTable` is the one place the table changes once the host runs,
whether by a SIGHUP reload of ``--forwards-file`` or by a control call; it
knows where each entry came from. :class:`HostControl` serves it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from socketforward import ttrpc
from socketforward.api import control_pb2 as pb
from socketforward.control import ControlService, forward_status
from socketforward.host.forwarder import Forwarder
from socketforward.host.forwards import (
    Forward,
    ForwardsClash,
    plan_reload,
    read_forwards_file,
)

__all__ = ["CONTROL", "FORWARDS_FILE", "ForwardTable", "HostControl"]

log = logging.getLogger("socketforward.host")

FORWARDS_FILE: Final = "--forwards-file"
CONTROL: Final = "control"
"""The source of a forward added through the control endpoint."""

_Code = ttrpc.Code


def _entry(forward: Forward) -> str:
    return repr(f"{forward.forward_id}={forward.host_path}:{forward.vm_path}")


class ForwardTable:
    """The forward table while the host runs, and where each entry came from:
    ``--forward`` or ``--oci-spec`` (given at start), ``--forwards-file``
    (re-read on SIGHUP) or ``control`` (:meth:`add`). One lock orders every
    change, so a reload and a control call never interleave.

    What a user can count on:

    * :meth:`add` and :meth:`remove` are all or nothing: every entry is checked
      first, and a Bind the guest refuses adds none. An entry identical to one
      in the table is left as it is; an id in use with other paths is refused.
    * :meth:`remove` refuses an id the forwards file holds (the next reload
      would bring it back): take it out of the file and reload. Forwards given
      on the command line or added here can be removed.
    * A reload (:meth:`reload_file`) changes only what the file put in the
      table: forwards added here stay. When the file names one of them with
      the same paths, the file takes it over (a later reload without it
      removes it); with other paths the reload is refused, table unchanged,
      as for an id the command line gives.
    * Nothing is saved: run-time changes last until the host stops.
    """

    def __init__(
        self,
        forwarder: Forwarder,
        sources: Mapping[str, str],
        forwards_file: str | None = None,
    ) -> None:
        self.forwarder = forwarder
        self.forwards_file = forwards_file
        self._sources = {fid: sources.get(fid, "") for fid in forwarder.forwards}
        self._lock = asyncio.Lock()

    def source(self, forward_id: str) -> str:
        """Where the forward came from ("" when it is not in the table)."""
        return self._sources.get(forward_id, "")

    def _ids(self, source: str) -> set[str]:
        return {fid for fid, src in self._sources.items() if src == source}

    async def add(self, forwards: Iterable[Forward]) -> list[str]:
        """Add *forwards*, all or none; the forward_ids added (identical entries
        already there are not). TtrpcError: INVALID_ARGUMENT (an id given twice),
        ALREADY_EXISTS (an id in use with other paths), or the guest's refusal."""
        async with self._lock:
            table = self.forwarder.forwards
            given: set[str] = set()
            new: list[Forward] = []
            for forward in forwards:
                fid = forward.forward_id
                if fid in given:
                    raise ttrpc.TtrpcError(
                        _Code.INVALID_ARGUMENT,
                        f"{_entry(forward)}: forward ID {fid} is given twice",
                    )
                given.add(fid)
                existing = table.get(fid)
                if existing is None:
                    new.append(forward)
                elif existing != forward:
                    raise ttrpc.TtrpcError(
                        _Code.ALREADY_EXISTS,
                        f"{_entry(forward)}: forward ID {fid} is already used by "
                        f"{_entry(existing)} (from {self.source(fid) or 'unknown'}); "
                        "nothing added",
                    )
            if not new:
                return []
            try:
                await self.forwarder.add(new)
            except ValueError as exc:
                raise ttrpc.TtrpcError(_Code.ALREADY_EXISTS, f"{exc}; nothing added") from None
            except ttrpc.TtrpcError as exc:
                raise ttrpc.TtrpcError(
                    exc.code, f"the guest refused the forwards, nothing added: {exc.message}"
                ) from None
            for forward in new:
                self._sources[forward.forward_id] = CONTROL
            added = [f.forward_id for f in new]
            log.info("control added forward_ids=%s", ",".join(added))
            return added

    async def remove(self, forward_ids: Iterable[str]) -> list[str]:
        """Remove *forward_ids*, all or none; running connections go on.
        TtrpcError: NOT_FOUND (an id not in the table), FAILED_PRECONDITION (an
        id the forwards file holds)."""
        async with self._lock:
            ids = list(dict.fromkeys(forward_ids))
            table = self.forwarder.forwards
            unknown = [fid for fid in ids if fid not in table]
            if unknown:
                raise ttrpc.TtrpcError(
                    _Code.NOT_FOUND,
                    f"no forward with ID {', '.join(map(repr, unknown))} "
                    f"(the table has: {', '.join(sorted(table)) or 'none'}); nothing removed",
                )
            held = [fid for fid in ids if self.source(fid) == FORWARDS_FILE]
            if held:
                raise ttrpc.TtrpcError(
                    _Code.FAILED_PRECONDITION,
                    f"forward {', '.join(held)} comes from --forwards-file "
                    f"{self.forwards_file}: take it out of the file and reload (SIGHUP); "
                    "nothing removed",
                )
            if not ids:
                return []
            await self.forwarder.remove(ids)
            for fid in ids:
                self._sources.pop(fid, None)
            log.info("control removed forward_ids=%s", ",".join(ids))
            return ids

    async def reload_file(self) -> None:
        """Re-read the forwards file and apply the difference (SIGHUP). A file
        that does not parse, or that clashes with another source, changes nothing."""
        path = self.forwards_file
        if path is None:
            raise RuntimeError("no forwards file")
        async with self._lock:
            table = self.forwarder.forwards
            try:
                fresh = read_forwards_file(path)
                runtime = self._ids(CONTROL)
                adopt = {f.forward_id for f in fresh if table.get(f.forward_id) == f} & runtime
                other = sorted({f.forward_id for f in fresh} & runtime - adopt)
                if other:
                    raise ForwardsClash(
                        "forward IDs added through the control endpoint with other paths: "
                        + ",".join(other)
                    )
                file_ids = self._ids(FORWARDS_FILE) | adopt
                plan = plan_reload(table, file_ids, set(table) - file_ids, fresh)
            except ValueError as exc:
                log.error(
                    "forwards file not reloaded, table unchanged path=%s error=%r", path, str(exc)
                )
                return
            for fid in adopt:
                self._sources[fid] = FORWARDS_FILE
            try:
                await self.forwarder.remove(plan.remove)
                for fid in plan.remove:
                    self._sources.pop(fid, None)
                await self.forwarder.add(plan.add)
                for forward in plan.add:
                    self._sources[forward.forward_id] = FORWARDS_FILE
            except (ValueError, ttrpc.TtrpcError) as exc:
                log.error("forwards file reload failed path=%s error=%r", path, str(exc))
                return
            log.info(
                "forwards file reloaded path=%s added=%d removed=%d adopted=%d forwards=%d",
                path,
                len(plan.add),
                len(plan.remove),
                len(adopt),
                len(self.forwarder.forwards),
            )


class HostControl(ControlService):
    """The host's Control service over a :class:`ForwardTable`.

    Budgets: ``relays`` (connections the VM holds, relays and requests being
    answered, against ``--max-relays``), ``pending`` (requests being answered),
    ``queued_to_vm`` (bytes the VM has not read on the RPC connection).

    :meth:`watch` follows the RPC connection for ``rpc.since``; run it while
    the host runs."""

    def __init__(self, table: ForwardTable, *, rpc_endpoint: str) -> None:
        super().__init__("host")
        self.table = table
        self.forwarder = table.forwarder
        self.rpc_endpoint = rpc_endpoint
        self._connected = False
        self._since = time.time()

    def _mark(self, connected: bool) -> None:
        if connected != self._connected:
            self._connected = connected
            self._since = time.time()

    async def watch(self) -> None:
        """Follow the RPC connection until cancelled: connected once a guest has
        an Accept call open, until that connection closes."""
        while True:
            await self.forwarder.wait_ready()
            client = self.forwarder.rpc_client
            if client is None:  # closing: its clean-up clears the ready state
                await asyncio.sleep(0.05)
                continue
            self._mark(True)
            await client.wait_closed()
            self._mark(False)

    def status(self) -> pb.StatusResponse:
        """The host's status now."""
        forwarder = self.forwarder
        status = self.new_status()
        status.rpc.CopyFrom(
            pb.RpcState(
                connected=self._connected,
                since=self._since,
                connections=forwarder.sessions,
                endpoint=self.rpc_endpoint,
            )
        )
        stats = forwarder.stats()
        table = forwarder.forwards
        for fid in sorted(set(stats) | set(table)):
            forward = table.get(fid)
            status.forwards.append(
                forward_status(
                    fid,
                    stats.get(fid),
                    host_path=forward.host_path if forward else "",
                    vm_path=forward.vm_path if forward else "",
                    source=self.table.source(fid),
                    removed=forward is None,
                )
            )
        exposes = forwarder.exposes
        expose_stats = forwarder.expose_stats()
        for eid in sorted(set(expose_stats) | set(exposes)):
            expose = exposes.get(eid)
            status.exposes.append(
                forward_status(
                    eid,
                    expose_stats.get(eid),
                    host_path=expose.host_path if expose else "",
                    vm_path=expose.vm_path if expose else "",
                    removed=expose is None,
                )
            )
        relays = sum(max(s.active, 0) for s in (*stats.values(), *expose_stats.values()))
        for name, used, limit in [
            ("pending", forwarder.pending, forwarder.max_pending),
            ("queued_to_vm", forwarder.queued_to_vm, forwarder.max_queued_to_vm),
            ("relays", relays + forwarder.pending, forwarder.max_relays),
        ]:
            status.budgets.append(pb.Budget(name=name, used=used, limit=limit))
        status.counters.update(
            {
                "unknown_forward_requests": forwarder.unknown_requests,
                "undecodable_requests": forwarder.undecodable_requests,
                "unread_drops": forwarder.unread_drops,
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
        try:
            added = await self.table.add(_forwards(request.forwards))
        except ttrpc.TtrpcError as exc:
            _log_refusal("add", exc)
            raise
        return pb.AddForwardsResponse(added=added)

    async def RemoveForwards(
        self, request: pb.RemoveForwardsRequest, context: ttrpc.CallContext
    ) -> pb.RemoveForwardsResponse:
        try:
            removed = await self.table.remove(request.forward_ids)
        except ttrpc.TtrpcError as exc:
            _log_refusal("remove", exc)
            raise
        return pb.RemoveForwardsResponse(removed=removed)


def _log_refusal(what: str, exc: ttrpc.TtrpcError) -> None:
    # One line per refused change (the ttrpc server logs no status a handler chose).
    code = exc.code.name if isinstance(exc.code, ttrpc.Code) else exc.code
    log.warning("control %s refused code=%s error=%r", what, code, exc.message)


def _forwards(entries: Sequence[pb.Forward]) -> list[Forward]:
    """The entries as forwards, checked as ``--forward`` checks them; an
    INVALID_ARGUMENT names the first bad one."""
    forwards = []
    for index, entry in enumerate(entries):
        try:
            forwards.append(Forward(entry.forward_id, entry.host_path, entry.vm_path))
        except ValueError as exc:
            text = f"{entry.forward_id}={entry.host_path}:{entry.vm_path}"
            raise ttrpc.TtrpcError(
                _Code.INVALID_ARGUMENT, f"forwards[{index}] {text!r}: {exc}; nothing added"
            ) from None
    return forwards
