"""The host's run-time changes and its Control service (``socketforward host
--control``): Status, AddForwards, RemoveForwards.

:class:`ForwardTable` is the one place the table changes once the host runs,
whether by a SIGHUP reload of ``--forwards-file`` or ``--config`` or by a
control call; it knows where each entry came from. :class:`HostControl` serves it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence, Set
from typing import Final, TypeVar

import ttrpc_asyncio as ttrpc
from socketforward.api import control_pb2 as pb
from socketforward.control import ControlService, forward_status
from socketforward.host.config import (
    CONFIG,
    SETTINGS,
    Config,
    Plan,
    entry_id,
    plan_source,
    read_config,
)
from socketforward.host.expose import listen_problem
from socketforward.host.forwarder import Forwarder
from socketforward.host.forwards import (
    EXPOSE_MODE,
    Expose,
    Forward,
    ForwardsClash,
    read_forwards_file,
)

__all__ = ["CONFIG", "CONTROL", "FORWARDS_FILE", "ForwardTable", "HostControl"]

log = logging.getLogger("socketforward.host")

FORWARDS_FILE: Final = "--forwards-file"
CONTROL: Final = "control"
"""The source of a forward added through the control endpoint."""

_RELOADED: Final = (FORWARDS_FILE, CONFIG)
"""Sources re-read on SIGHUP."""

_Code = ttrpc.Code
_E = TypeVar("_E", Forward, Expose)


def _entry(forward: Forward) -> str:
    return repr(f"{forward.forward_id}={forward.host_path}:{forward.vm_path}")


class _NotApplied(Exception):
    """A reload that failed half way (the guest refused a Bind, a listener could
    not be opened); *restored* says whether the table is back as it was."""

    def __init__(self, error: str, restored: bool) -> None:
        super().__init__(error)
        self.restored = restored


class ForwardTable:
    """The forward and expose tables while the host runs, and where each entry
    came from: ``--forward``, ``--expose`` or ``--oci-spec`` (given at start),
    ``--forwards-file`` or ``--config`` (re-read on SIGHUP) or ``control``
    (:meth:`add`). One lock orders every change, so a reload and a control call
    never interleave.

    What a user can count on:

    * :meth:`add` and :meth:`remove` are all or nothing: every entry is checked
      first, and a Bind the guest refuses adds none. An entry identical to one
      in the table is left as it is; an id in use with other paths is refused.
    * :meth:`remove` refuses an id a file holds (the next reload would bring it
      back): take it out of the file and reload. Forwards given on the command
      line or added here can be removed.
    * A reload (:meth:`reload_file`, :meth:`reload_config`) changes only what
      that file put in the table: forwards added here stay. When the file names
      one of them with the same paths, the file takes it over (a later reload
      without it removes it); with other paths the reload is refused, table
      unchanged, as for an id the command line gives. An entry the file changed
      (same id, other paths, mode or owner) is removed, then added.
    * A reload of ``--config`` also refuses, as a whole, a file whose endpoints
      or budgets differ from those the host runs with (keys the command line
      overrides excepted): those need a restart.
    * Nothing is saved: run-time changes last until the host stops.
    """

    def __init__(
        self,
        forwarder: Forwarder,
        sources: Mapping[str, str],
        forwards_file: str | None = None,
        *,
        config: Config | None = None,
        overridden: Set[str] = frozenset(),
    ) -> None:
        """*config*: the configuration file as read at start; *overridden*: its
        settings (:data:`SETTINGS`) the command line gave instead."""
        self.forwarder = forwarder
        self.forwards_file = forwards_file
        self.config = config
        self.overridden = frozenset(overridden)
        self._sources = {fid: sources.get(fid, "") for fid in forwarder.forwards}
        self._expose_sources: dict[str, str] = {}
        # What each re-read file lists now: an entry another source gives
        # identically stays with that source, and passes to the file when the
        # other one drops it.
        self._wanted: dict[str, dict[str, Forward]] = {}
        if forwards_file is not None:
            table = forwarder.forwards
            self._wanted[FORWARDS_FILE] = {
                fid: table[fid] for fid, src in self._sources.items() if src == FORWARDS_FILE
            }
        if config is not None:
            self._wanted[CONFIG] = {f.forward_id: f for f in config.forwards}
        self._lock = asyncio.Lock()

    def source(self, forward_id: str) -> str:
        """Where the forward came from ("" when it is not in the table)."""
        return self._sources.get(forward_id, "")

    def expose_source(self, expose_id: str) -> str:
        """Where the expose came from ("" when it is not in the table)."""
        return self._expose_sources.get(expose_id, "")

    def _describe(self, source: str) -> str:
        if source == FORWARDS_FILE:
            return f"{FORWARDS_FILE} {self.forwards_file}"
        if source == CONFIG and self.config is not None:
            return f"{CONFIG} {self.config.path}"
        return source or "unknown"

    async def start_exposes(self, exposes: Sequence[Expose], sources: Mapping[str, str]) -> None:
        """Listen for the exposes given at start (*sources*: where each came from),
        all or none; ValueError names what cannot be used."""
        async with self._lock:
            # A reload that ran first may have opened the file's ones already.
            table = self.forwarder.exposes
            new = [e for e in exposes if table.get(e.expose_id) != e]
            await self.forwarder.add_exposes(new)
            for expose in new:
                self._expose_sources[expose.expose_id] = sources.get(expose.expose_id, "")

    async def add(self, forwards: Iterable[Forward]) -> list[str]:
        """Add *forwards*, all or none; the forward_ids added (identical entries
        already there are not). TtrpcError: INVALID_ARGUMENT (an id given twice),
        ALREADY_EXISTS (an id in use with other paths), or the guest's refusal."""
        async with self._lock:
            new = _new_entries("forward", forwards, self.forwarder.forwards, self.source, _entry)
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
        id a file re-read on SIGHUP holds)."""
        async with self._lock:
            ids = list(dict.fromkeys(forward_ids))
            _check_known("forward", ids, self.forwarder.forwards, "the table has")
            for source in _RELOADED:
                held = [fid for fid in ids if fid in self._wanted.get(source, {})]
                if held:
                    raise ttrpc.TtrpcError(
                        _Code.FAILED_PRECONDITION,
                        f"forward {', '.join(held)} comes from {self._describe(source)}: "
                        "take it out of the file and reload (SIGHUP); nothing removed",
                    )
            if not ids:
                return []
            await self.forwarder.remove(ids)
            for fid in ids:
                self._sources.pop(fid, None)
            log.info("control removed forward_ids=%s", ",".join(ids))
            return ids

    async def add_exposes(self, exposes: Iterable[Expose]) -> list[str]:
        """Listen for *exposes*, all or none; the expose_ids added (identical
        entries already there are not). TtrpcError: INVALID_ARGUMENT (an id
        given twice), ALREADY_EXISTS (an id in use with other paths),
        FAILED_PRECONDITION (a host path that cannot be listened on)."""
        async with self._lock:
            new = _new_entries(
                "expose", exposes, self.forwarder.exposes, self.expose_source, _expose_entry
            )
            if not new:
                return []
            try:
                await self.forwarder.add_exposes(new)
            except ValueError as exc:
                raise ttrpc.TtrpcError(_Code.FAILED_PRECONDITION, f"{exc}; nothing added") from None
            for expose in new:
                self._expose_sources[expose.expose_id] = CONTROL
            added = [e.expose_id for e in new]
            log.info("control added expose_ids=%s", ",".join(added))
            return added

    async def remove_exposes(self, expose_ids: Iterable[str]) -> list[str]:
        """Stop listening for *expose_ids*, all or none; running connections go
        on. TtrpcError: NOT_FOUND (an id not listened for), FAILED_PRECONDITION
        (an id ``--config`` holds)."""
        async with self._lock:
            ids = list(dict.fromkeys(expose_ids))
            _check_known("expose", ids, self.forwarder.exposes, "listening for")
            held = [eid for eid in ids if self.expose_source(eid) == CONFIG]
            if held:
                raise ttrpc.TtrpcError(
                    _Code.FAILED_PRECONDITION,
                    f"expose {', '.join(held)} comes from {self._describe(CONFIG)}: "
                    "take it out of the file and reload (SIGHUP); nothing removed",
                )
            removed = self.forwarder.remove_exposes(ids)
            for eid in removed:
                self._expose_sources.pop(eid, None)
            log.info("control removed expose_ids=%s", ",".join(removed))
            return removed

    async def reload(self) -> None:
        """SIGHUP: re-read ``--forwards-file``, then ``--config``, each all or nothing."""
        if self.forwards_file is not None:
            await self.reload_file()
        if self.config is not None:
            await self.reload_config()

    def _elsewhere(self, source: str) -> dict[str, dict[str, Forward]]:
        return {src: wanted for src, wanted in self._wanted.items() if src != source}

    async def reload_file(self) -> None:
        """Re-read the forwards file and apply the difference (SIGHUP). A file
        that does not parse, or that clashes with another source, changes nothing."""
        path = self.forwards_file
        if path is None:
            raise RuntimeError("no forwards file")
        async with self._lock:
            try:
                fresh = read_forwards_file(path)
                # As at start, the forwards file may not repeat a command-line
                # entry, even identically (--config may).
                strict = set(self._sources.values()) - {*_RELOADED, CONTROL}
                plan = plan_source(
                    FORWARDS_FILE,
                    self.forwarder.forwards,
                    self._sources,
                    fresh,
                    wanted_elsewhere=self._elsewhere(FORWARDS_FILE),
                    strict=strict,
                    adoptable={CONTROL},
                )
                if plan.clashes:
                    raise ForwardsClash(self._file_clashes(plan.clashes))
            except ValueError as exc:
                log.error(
                    "forwards file not reloaded, table unchanged path=%s error=%r", path, str(exc)
                )
                return
            try:
                await self._apply(FORWARDS_FILE, plan, Plan())
            except _NotApplied as exc:
                log.error(
                    "forwards file reload failed path=%s restored=%s error=%r",
                    path,
                    "yes" if exc.restored else "no",
                    str(exc),
                )
                return
            self._wanted[FORWARDS_FILE] = {f.forward_id: f for f in fresh}
            log.info(
                "forwards file reloaded path=%s added=%d removed=%d adopted=%d forwards=%d",
                path,
                len(plan.add),
                len(plan.remove),
                len(plan.adopt),
                len(self.forwarder.forwards),
            )

    def _file_clashes(self, clashes: Mapping[str, str]) -> str:
        by_source: dict[str, list[str]] = {}
        for fid, source in sorted(clashes.items()):
            by_source.setdefault(source, []).append(fid)
        parts = []
        for source, ids in by_source.items():
            if source == CONTROL:
                what = "forward IDs added through the control endpoint with other paths"
            elif source in _RELOADED:
                what = f"forward IDs given with other paths in {self._describe(source)}"
            else:
                what = "forward IDs also given on the command line"
            parts.append(f"{what}: {','.join(ids)}")
        return "; ".join(parts)

    async def reload_config(self) -> None:
        """Re-read ``--config`` and apply the difference of its forwards and
        exposes (SIGHUP), all or nothing. A file that does not parse, that
        changes an endpoint or a budget, or whose entries clash with another
        source's, changes nothing; the log line names the file, line and key."""
        running = self.config
        if running is None:
            raise RuntimeError("no configuration file")
        path = running.path
        async with self._lock:
            try:
                fresh = read_config(path)
                self._check_settings(running, fresh)
                forwards = plan_source(
                    CONFIG,
                    self.forwarder.forwards,
                    self._sources,
                    fresh.forwards,
                    wanted_elsewhere=self._elsewhere(CONFIG),
                    adoptable={CONTROL},
                )
                exposes = plan_source(
                    CONFIG,
                    self.forwarder.exposes,
                    self._expose_sources,
                    fresh.exposes,
                    adoptable={CONTROL},
                )
                self._check_entries(fresh, forwards, exposes)
            except ValueError as exc:
                log.error("config not reloaded, nothing changed path=%s error=%r", path, str(exc))
                return
            try:
                await self._apply(CONFIG, forwards, exposes)
            except _NotApplied as exc:
                log.error(
                    "config reload failed path=%s restored=%s error=%r",
                    path,
                    "yes" if exc.restored else "no",
                    str(exc),
                )
                return
            self.config = fresh
            self._wanted[CONFIG] = {f.forward_id: f for f in fresh.forwards}
            log.info(
                "config reloaded path=%s forwards_added=%d forwards_removed=%d "
                "exposes_added=%d exposes_removed=%d forwards=%d exposes=%d",
                path,
                len(forwards.add),
                len(forwards.remove),
                len(exposes.add),
                len(exposes.remove),
                len(self.forwarder.forwards),
                len(self.forwarder.exposes),
            )

    def _check_settings(self, running: Config, fresh: Config) -> None:
        """Endpoints and budgets are set up once, at start: a file that changes
        one is refused as a whole (a half-applied file would leave the host
        running otherwise than the file says, unnoticed)."""
        for key in SETTINGS:
            if key in self.overridden:
                continue  # the command line's value is in force whatever the file says
            was, now = running.setting(key), fresh.setting(key)
            if was != now:
                raise fresh.error(
                    key,
                    f"{key} cannot change while the host runs ({_shown(was)} -> "
                    f"{_shown(now)}); restart the host to apply it, or put the old value back",
                )

    def _check_entries(self, fresh: Config, forwards: Plan[Forward], exposes: Plan[Expose]) -> None:
        for section, plan in (("forward", forwards), ("expose", exposes)):
            for ident, owner in sorted(plan.clashes.items()):
                raise fresh.error(
                    f"{section} {ident}",
                    f"[[{section}]] {ident}: {section} ID {ident} is also given with "
                    f"{self._describe(owner)}, with other paths, mode or owner",
                    "id",
                )
        for expose in exposes.add:
            problem = listen_problem(expose.host_path)
            if problem is not None:
                raise fresh.error(
                    f"expose {expose.expose_id}",
                    f"[[expose]] {expose.expose_id}: host {expose.host_path}: {problem}",
                    "host",
                )

    async def _apply(self, source: str, forwards: Plan[Forward], exposes: Plan[Expose]) -> None:
        """Carry out *forwards* and *exposes* for *source*. A step that fails
        undoes those before it (best effort) and raises :class:`_NotApplied`."""
        fw = self.forwarder
        undo: list[Callable[[], Awaitable[object]]] = []
        try:
            if exposes.remove:
                old_exposes = [fw.exposes[eid] for eid in exposes.remove]
                fw.remove_exposes(exposes.remove)
                undo.append(lambda: fw.add_exposes(old_exposes))
            if exposes.add:
                await fw.add_exposes(exposes.add)
                added = [e.expose_id for e in exposes.add]
                undo.append(lambda: _now(fw.remove_exposes, added))
            # An entry that changes only its mode or owner is changed in place
            # (our guest keeps the listener and its connections).
            table = fw.forwards
            in_place = [f for f in forwards.add if _same_paths(table.get(f.forward_id), f)]
            moved = {f.forward_id for f in in_place}
            removing = [fid for fid in forwards.remove if fid not in moved]
            adding = [f for f in forwards.add if f.forward_id not in moved]
            if in_place:
                before = [table[f.forward_id] for f in in_place]
                await fw.replace(in_place)
                undo.append(lambda: fw.replace(before))
            if removing:
                old_forwards = [table[fid] for fid in removing]
                await fw.remove(removing)
                undo.append(lambda: fw.add(old_forwards))
            if adding:
                await fw.add(adding)
        except (ValueError, ttrpc.TtrpcError) as exc:
            restored = True
            for step in reversed(undo):
                try:
                    await step()
                except (ValueError, ttrpc.TtrpcError) as undo_exc:
                    restored = False
                    log.error("reload: undoing a step failed error=%r", str(undo_exc))
            self._settle(self._sources, fw.forwards, source)
            self._settle(self._expose_sources, fw.exposes, source)
            raise _NotApplied(str(exc), restored) from None
        for sources, plan in ((self._sources, forwards), (self._expose_sources, exposes)):
            for ident in plan.remove:
                sources.pop(ident, None)
            sources.update(plan.hand_over)
            sources.update(dict.fromkeys(plan.adopt, source))
            sources.update(dict.fromkeys(map(entry_id, plan.add), source))

    @staticmethod
    def _settle(sources: dict[str, str], table: Mapping[str, _E], source: str) -> None:
        """Sources for what the table holds after a failed reload."""
        kept = {ident: sources.get(ident, source) for ident in table}
        sources.clear()
        sources.update(kept)


def _new_entries(
    kind: str,
    entries: Iterable[_E],
    table: Mapping[str, _E],
    source: Callable[[str], str],
    show: Callable[[_E], str],
) -> list[_E]:
    """The entries of a run-time add that *table* lacks; an entry identical to
    one there is left out. TtrpcError naming the entry: INVALID_ARGUMENT (an
    id given twice), ALREADY_EXISTS (an id in use with another entry)."""
    given: set[str] = set()
    new: list[_E] = []
    for entry in entries:
        ident = entry_id(entry)
        if ident in given:
            raise ttrpc.TtrpcError(
                _Code.INVALID_ARGUMENT, f"{show(entry)}: {kind} ID {ident} is given twice"
            )
        given.add(ident)
        existing = table.get(ident)
        if existing is None:
            new.append(entry)
        elif existing != entry:
            raise ttrpc.TtrpcError(
                _Code.ALREADY_EXISTS,
                f"{show(entry)}: {kind} ID {ident} is already used by {show(existing)} "
                f"(from {source(ident) or 'unknown'}); nothing added",
            )
    return new


def _check_known(kind: str, ids: list[str], table: Mapping[str, object], listing: str) -> None:
    """NOT_FOUND naming the *ids* that *table* lacks (and what it has)."""
    unknown = [ident for ident in ids if ident not in table]
    if unknown:
        raise ttrpc.TtrpcError(
            _Code.NOT_FOUND,
            f"no {kind} with ID {', '.join(map(repr, unknown))} "
            f"({listing}: {', '.join(sorted(table)) or 'none'}); nothing removed",
        )


def _expose_entry(expose: Expose) -> str:
    return repr(f"{expose.expose_id}={expose.vm_path}:{expose.host_path}")


def _same_paths(old: Forward | None, new: Forward) -> bool:
    return old is not None and (old.host_path, old.vm_path) == (new.host_path, new.vm_path)


async def _now(function: Callable[[list[str]], object], ids: list[str]) -> None:
    function(ids)


def _shown(value: object) -> str:
    return "unset" if value is None else str(value)


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
                    source=self.table.expose_source(eid),
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

    async def AddExposes(
        self, request: pb.AddExposesRequest, context: ttrpc.CallContext
    ) -> pb.AddExposesResponse:
        try:
            added = await self.table.add_exposes(_exposes(request.exposes))
        except ttrpc.TtrpcError as exc:
            _log_refusal("expose add", exc)
            raise
        return pb.AddExposesResponse(added=added)

    async def RemoveExposes(
        self, request: pb.RemoveExposesRequest, context: ttrpc.CallContext
    ) -> pb.RemoveExposesResponse:
        try:
            removed = await self.table.remove_exposes(request.expose_ids)
        except ttrpc.TtrpcError as exc:
            _log_refusal("expose remove", exc)
            raise
        return pb.RemoveExposesResponse(removed=removed)


def _exposes(entries: Sequence[pb.Expose]) -> list[Expose]:
    """The entries as exposes, checked as ``--expose`` checks them; an
    INVALID_ARGUMENT names the first bad one."""
    exposes = []
    for index, entry in enumerate(entries):
        try:
            mode = entry.mode if entry.HasField("mode") else EXPOSE_MODE
            exposes.append(Expose(entry.expose_id, entry.vm_path, entry.host_path, mode))
        except ValueError as exc:
            text = f"{entry.expose_id}={entry.vm_path}:{entry.host_path}"
            raise ttrpc.TtrpcError(
                _Code.INVALID_ARGUMENT, f"exposes[{index}] {text!r}: {exc}; nothing added"
            ) from None
    return exposes


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
