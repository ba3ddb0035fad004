"""The control endpoint both programs serve with ``--control unix:PATH``, and the
commands that talk to it: ``socketforward status`` and ``socketforward forward
add|remove`` (docs/control.md).

It speaks ttrpc with our ``socketforward.control.v1.Control`` service, on a
UNIX socket only: the file is created 0600 in a directory closed to other
users, the server answers only the user it runs as (SO_PEERCRED), and the file
is removed when the program stops. Without ``--control`` nothing listens.

Each side builds its service from what it runs (``guest/control.py``,
``host/control.py``); this module holds what they share and the client, and
imports neither side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import ttrpc_asyncio as ttrpc
from socketforward import __version__, runner, transport
from socketforward.api import control_pb2 as pb
from socketforward.api.control_ttrpc import ControlBase, ControlStub
from socketforward.daemon import octal_mode, positive_seconds
from socketforward.stats import ForwardStats

__all__ = [
    "ControlError",
    "ControlServer",
    "ControlService",
    "add_exposes",
    "add_forwards",
    "add_parser",
    "endpoint_arg",
    "format_status",
    "forward_status",
    "get_status",
    "remove_exposes",
    "remove_forwards",
    "status_dict",
]

log = logging.getLogger("socketforward.control")

T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0


# -- the endpoint -----------------------------------------------------------------


def endpoint_arg(text: str) -> transport.UnixEndpoint:
    """argparse type of ``--control``: a ``unix:`` endpoint, nothing else."""
    try:
        ep = transport.parse_endpoint(text)
    except transport.EndpointError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(ep, transport.UnixEndpoint):
        raise argparse.ArgumentTypeError(f"{text!r}: the control endpoint must be unix:PATH")
    return ep


class ControlServer:
    """A Control service listening on a UNIX socket: file mode 0600, only the
    same user served; :meth:`close` removes the file."""

    def __init__(self, listener: transport.Listener, server: ttrpc.Server) -> None:
        self._listener = listener
        self._server = server

    @classmethod
    async def start(cls, ep: transport.UnixEndpoint, service: ControlBase) -> ControlServer:
        """Listen on *ep* and serve *service*; OSError when *ep* cannot be used.
        The caller checks :func:`transport.private_dir_problem` first."""
        listener = await transport.listen(ep, mode=0o600)
        server = ttrpc.Server(require_same_user=True)
        server.register(service)
        server.start(listener.sock)
        log.info("control listening endpoint=%s", ep)
        return cls(listener, server)

    @property
    def endpoint(self) -> transport.Endpoint:
        return self._listener.endpoint

    async def close(self) -> None:
        """Stop serving and remove the socket file. Idempotent."""
        await self._server.shutdown(grace=1.0)
        self._listener.close()


# -- what both sides' services share ----------------------------------------------------


class ControlService(ControlBase):
    """The part of a Control service both sides share: the status header."""

    def __init__(self, side: str) -> None:
        self.side = side
        self._started = time.monotonic()

    def new_status(self) -> pb.StatusResponse:
        """A StatusResponse with version, side, pid and uptime filled in."""
        return pb.StatusResponse(
            version=__version__,
            side=self.side,
            pid=os.getpid(),
            uptime_seconds=time.monotonic() - self._started,
        )


def forward_status(
    forward_id: str,
    stats: ForwardStats | None,
    *,
    host_path: str = "",
    vm_path: str = "",
    source: str = "",
    removed: bool = False,
) -> pb.ForwardStatus:
    """One forward's entry, its counters under the names both sides share."""
    st = stats or ForwardStats()
    return pb.ForwardStatus(
        forward_id=forward_id,
        host_path=host_path,
        vm_path=vm_path,
        source=source,
        removed=removed,
        requests=st.requests,
        connected=st.connected,
        active=max(st.active, 0),
        failed=st.failed,
        bytes_to_host=st.bytes_to_host,
        bytes_to_vm=st.bytes_to_vm,
    )


# -- the client ---------------------------------------------------------------------


class ControlError(Exception):
    """A control call that failed; the message is one line for the user."""


def _connect_problem(ep: transport.UnixEndpoint, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"nothing listens at {ep}: no such file (is the program running with --control?)"
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing listens at {ep}: connection refused (a socket file left by a stopped run?)"
    if isinstance(exc, PermissionError):
        return f"cannot reach {ep}: permission denied (it serves only the user it runs as)"
    return f"cannot connect to {ep}: {exc.strerror or exc}"


def _owner_hint(ep: transport.UnixEndpoint) -> str:
    try:
        owner = os.stat(ep.path).st_uid
    except OSError:
        return ""
    return f"; the socket belongs to uid {owner}, you are uid {os.geteuid()}"


async def _call(
    ep: transport.UnixEndpoint,
    timeout: float,
    call: Callable[[ControlStub], Awaitable[T]],
) -> T:
    """Connect to *ep*, make one call; ControlError says what went wrong."""
    try:
        sock = await transport.connect(ep, timeout=timeout)
    except TimeoutError:
        raise ControlError(f"no answer from {ep} within {timeout:g}s") from None
    except OSError as exc:
        raise ControlError(_connect_problem(ep, exc)) from None
    try:
        client = await ttrpc.Client.connect(sock)
    except OSError as exc:
        sock.close()
        raise ControlError(_connect_problem(ep, exc)) from None
    try:
        async with asyncio.timeout(timeout):
            return await call(ControlStub(client))
    except TimeoutError:
        raise ControlError(f"no answer from {ep} within {timeout:g}s") from None
    except ttrpc.TtrpcError as exc:
        if exc.code == ttrpc.Code.UNAVAILABLE:
            raise ControlError(
                f"{ep} closed the connection without answering (it serves only the user "
                f"it runs as{_owner_hint(ep)})"
            ) from None
        raise ControlError(exc.message) from None
    except ttrpc.Error as exc:
        raise ControlError(f"{ep}: {exc}") from None
    except OSError as exc:
        raise ControlError(_connect_problem(ep, exc)) from None
    finally:
        await client.close()


async def get_status(
    ep: transport.UnixEndpoint, *, timeout: float = DEFAULT_TIMEOUT
) -> pb.StatusResponse:
    """The Status of the program serving *ep*."""
    return await _call(ep, timeout, lambda stub: stub.Status(pb.StatusRequest()))


async def add_forwards(
    ep: transport.UnixEndpoint, forwards: Sequence[pb.Forward], *, timeout: float = DEFAULT_TIMEOUT
) -> list[str]:
    """Add *forwards* to the host serving *ep*, all or none; the ids added."""
    request = pb.AddForwardsRequest(forwards=forwards)
    response = await _call(ep, timeout, lambda stub: stub.AddForwards(request))
    return list(response.added)


async def remove_forwards(
    ep: transport.UnixEndpoint, forward_ids: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT
) -> list[str]:
    """Remove *forward_ids* from the host serving *ep*, all or none; the ids removed."""
    request = pb.RemoveForwardsRequest(forward_ids=forward_ids)
    response = await _call(ep, timeout, lambda stub: stub.RemoveForwards(request))
    return list(response.removed)


async def add_exposes(
    ep: transport.UnixEndpoint, exposes: Sequence[pb.Expose], *, timeout: float = DEFAULT_TIMEOUT
) -> list[str]:
    """Listen for *exposes* on the host serving *ep*, all or none; the ids added."""
    request = pb.AddExposesRequest(exposes=exposes)
    response = await _call(ep, timeout, lambda stub: stub.AddExposes(request))
    return list(response.added)


async def remove_exposes(
    ep: transport.UnixEndpoint, expose_ids: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT
) -> list[str]:
    """Stop listening for *expose_ids* on the host serving *ep*, all or none."""
    request = pb.RemoveExposesRequest(expose_ids=expose_ids)
    response = await _call(ep, timeout, lambda stub: stub.RemoveExposes(request))
    return list(response.removed)


# -- showing a status ----------------------------------------------------------------


def status_dict(status: pb.StatusResponse) -> dict[str, Any]:
    """*status* as plain JSON values, with the same keys on both sides; forwards
    and budgets keyed by their names."""
    return {
        "version": status.version,
        "side": status.side,
        "pid": status.pid,
        "uptime_seconds": round(status.uptime_seconds, 3),
        "rpc": {
            "connected": status.rpc.connected,
            "since": round(status.rpc.since, 3),
            "connections": status.rpc.connections,
            "endpoint": status.rpc.endpoint,
        },
        "forwards": {f.forward_id: _forward_dict(f) for f in status.forwards},
        "exposes": {f.forward_id: _forward_dict(f) for f in status.exposes},
        "budgets": {b.name: {"used": b.used, "limit": b.limit} for b in status.budgets},
        "counters": dict(sorted(status.counters.items())),
    }


def _forward_dict(f: pb.ForwardStatus) -> dict[str, Any]:
    return {
        "host_path": f.host_path,
        "vm_path": f.vm_path,
        "source": f.source,
        "removed": f.removed,
        "requests": f.requests,
        "connected": f.connected,
        "active": f.active,
        "failed": dict(sorted(f.failed.items())),
        "bytes_to_host": f.bytes_to_host,
        "bytes_to_vm": f.bytes_to_vm,
    }


def _duration(seconds: float) -> str:
    total = int(max(seconds, 0))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m")]
    shown = [f"{n}{unit}" for n, unit in parts if n] + [f"{secs}s"]
    return " ".join(shown[:3])


def _table(rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(w) if r else cell.ljust(w)
            for cell, w, r in zip(row, widths, right, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _counter_table(kind: str, entries: Sequence[pb.ForwardStatus]) -> list[str]:
    """Forwards or exposes with their counters, one row each (no rows: [])."""
    if not entries:
        return []
    rows = [[kind, "requests", "connected", "active", "failed", "to_host", "to_vm", "paths"]]
    for f in entries:
        failed = ",".join(f"{k}:{v}" for k, v in sorted(f.failed.items())) or "-"
        if kind == "expose":
            paths = f"{f.vm_path} -> {f.host_path}" if f.host_path else f.vm_path or "-"
        else:
            paths = f"{f.host_path} -> {f.vm_path}" if f.host_path else f.vm_path or "-"
        notes = [n for n in (f.source, "removed" if f.removed else "") if n]
        if notes:
            paths += f" ({', '.join(notes)})"
        rows.append(
            [
                f.forward_id,
                str(f.requests),
                str(f.connected),
                str(f.active),
                failed,
                str(f.bytes_to_host),
                str(f.bytes_to_vm),
                paths,
            ]
        )
    return _table(rows, [False, True, True, True, False, True, True, False])


def format_status(status: pb.StatusResponse, *, now: float | None = None) -> str:
    """*status* as a readable table (*now*: unix seconds, for the ``since`` age)."""
    now = time.time() if now is None else now
    rpc = status.rpc
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rpc.since))
    state = "connected" if rpc.connected else "not connected"
    lines = [
        f"socketforward {status.side} {status.version}, pid {status.pid}, "
        f"up {_duration(status.uptime_seconds)}",
        f"rpc: {state} for {_duration(now - rpc.since)} (since {since}), {rpc.endpoint}, "
        f"{rpc.connections} connection{'' if rpc.connections == 1 else 's'} so far",
        "",
    ]
    lines += _counter_table("forward", status.forwards) or ["no forwards"]
    if status.exposes:
        lines.append("")
        lines += _counter_table("expose", status.exposes)
    if status.budgets:
        lines.append("")
        rows = [["budget", "used", "limit"]]
        rows += [[b.name, str(b.used), str(b.limit)] for b in status.budgets]
        lines += _table(rows, [False, True, True])
    if status.counters:
        lines.append("")
        lines.append(" ".join(f"{k}={v}" for k, v in sorted(status.counters.items())))
    return "\n".join(lines)


# -- the commands ---------------------------------------------------------------------


class ForwardEntry(Protocol):
    """What a ``FORWARD_ID=HOST_PATH:VM_PATH`` parser gives."""

    @property
    def forward_id(self) -> str: ...

    @property
    def host_path(self) -> str: ...

    @property
    def vm_path(self) -> str: ...


class ExposeEntry(Protocol):
    """What an ``EXPOSE_ID=VM_PATH:HOST_PATH`` parser gives."""

    @property
    def expose_id(self) -> str: ...

    @property
    def vm_path(self) -> str: ...

    @property
    def host_path(self) -> str: ...


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    parse_forward: Callable[[str], ForwardEntry],
    parse_expose: Callable[[str], ExposeEntry],
) -> None:
    """Register ``status``, ``forward`` and ``expose``; *parse_forward* and
    *parse_expose* read the syntax of ``socketforward host --forward`` and
    ``--expose`` (a ValueError names what is wrong)."""

    def expose_entry(text: str) -> pb.Expose:
        try:
            expose = parse_expose(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return pb.Expose(
            expose_id=expose.expose_id, vm_path=expose.vm_path, host_path=expose.host_path
        )

    def entry(text: str) -> pb.Forward:
        try:
            forward = parse_forward(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return pb.Forward(
            forward_id=forward.forward_id, host_path=forward.host_path, vm_path=forward.vm_path
        )

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--control",
            metavar="URI",
            type=endpoint_arg,
            required=True,
            help="the program's control endpoint (its --control), e.g. unix:/run/sf/control.sock",
        )
        parser.add_argument(
            "--timeout",
            metavar="SECONDS",
            type=positive_seconds,
            default=DEFAULT_TIMEOUT,
            help=f"give up after this long (default {DEFAULT_TIMEOUT:g})",
        )

    status = subparsers.add_parser(
        "status",
        help="show what a running host or guest is doing",
        description="Ask a running `socketforward host` or `socketforward guest` for its "
        "status through its --control endpoint: version, uptime, the RPC connection, "
        "each forward's counters and the budgets in use. Exit status: 0 answered, "
        "1 nothing answered.",
    )
    common(status)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(run=_status_main)

    forward = subparsers.add_parser(
        "forward",
        help="add or remove forwards of a running host",
        description="Change the forward table of a running `socketforward host` through "
        "its --control endpoint, all or nothing. The changes last until the host stops; "
        "a SIGHUP reload of --forwards-file leaves them in place.",
    )
    actions = forward.add_subparsers(dest="action", required=True)
    add = actions.add_parser(
        "add", help="add forwards", description="Add forwards (all or none) to a running host."
    )
    common(add)
    add.add_argument(
        "forwards",
        metavar="FORWARD_ID=HOST_PATH:VM_PATH",
        type=entry,
        nargs="+",
        help="a forward, as `socketforward host --forward` takes it",
    )
    add.set_defaults(run=_add_main)
    remove = actions.add_parser(
        "remove",
        help="remove forwards",
        description="Remove forwards (all or none) from a running host; connections "
        "already running go on.",
    )
    common(remove)
    remove.add_argument("forward_ids", metavar="FORWARD_ID", nargs="+", help="a forward to remove")
    remove.set_defaults(run=_remove_main)

    expose = subparsers.add_parser(
        "expose",
        help="add or remove exposes (VM sockets on the host) of a running host",
        description="Change the exposes of a running `socketforward host` through its "
        "--control endpoint, all or nothing. The changes last until the host stops; a "
        "SIGHUP reload of --config leaves them in place.",
    )
    expose_actions = expose.add_subparsers(dest="action", required=True)
    expose_add = expose_actions.add_parser(
        "add",
        help="add exposes",
        description="Listen for more exposes (all or none) on a running host.",
    )
    common(expose_add)
    expose_add.add_argument(
        "--mode",
        type=octal_mode,
        metavar="OCTAL",
        help="the host sockets' file mode (default 600)",
    )
    expose_add.add_argument(
        "exposes",
        metavar="EXPOSE_ID=VM_PATH:HOST_PATH",
        type=expose_entry,
        nargs="+",
        help="an expose, as `socketforward host --expose` takes it",
    )
    expose_add.set_defaults(run=_expose_add_main)
    expose_remove = expose_actions.add_parser(
        "remove",
        help="remove exposes",
        description="Stop listening for exposes (all or none) on a running host; "
        "connections already running go on.",
    )
    common(expose_remove)
    expose_remove.add_argument(
        "expose_ids", metavar="EXPOSE_ID", nargs="+", help="an expose to remove"
    )
    expose_remove.set_defaults(run=_expose_remove_main)


def _run(command: str, work: Coroutine[Any, Any, T]) -> tuple[T | None, int]:
    """Run one client call; (its result, 0), or (None, 1) with the error printed."""
    try:
        return runner.run(work), 0
    except ControlError as exc:
        print(f"socketforward {command}: error: {exc}", file=sys.stderr)
        return None, 1


def _status_main(args: argparse.Namespace) -> int:
    status, code = _run("status", get_status(args.control, timeout=args.timeout))
    if status is None:
        return code
    if args.json:
        print(json.dumps(status_dict(status), sort_keys=True))
    else:
        print(format_status(status))
    return 0


def _print_added(asked: list[str], added: list[str]) -> int:
    if added:
        print(f"added {','.join(added)}")
    unchanged = [ident for ident in asked if ident not in added]
    if unchanged:
        print(f"already there, unchanged: {','.join(unchanged)}")
    return 0


def _add_main(args: argparse.Namespace) -> int:
    forwards: list[pb.Forward] = args.forwards
    added, code = _run("forward add", add_forwards(args.control, forwards, timeout=args.timeout))
    if added is None:
        return code
    return _print_added([f.forward_id for f in forwards], added)


def _expose_add_main(args: argparse.Namespace) -> int:
    exposes: list[pb.Expose] = args.exposes
    if args.mode is not None:
        for expose in exposes:
            expose.mode = args.mode
    added, code = _run("expose add", add_exposes(args.control, exposes, timeout=args.timeout))
    if added is None:
        return code
    return _print_added([e.expose_id for e in exposes], added)


def _remove_main(args: argparse.Namespace) -> int:
    work = remove_forwards(args.control, args.forward_ids, timeout=args.timeout)
    return _print_removed("forward remove", work)


def _expose_remove_main(args: argparse.Namespace) -> int:
    work = remove_exposes(args.control, args.expose_ids, timeout=args.timeout)
    return _print_removed("expose remove", work)


def _print_removed(command: str, work: Coroutine[Any, Any, list[str]]) -> int:
    removed, code = _run(command, work)
    if removed is None:
        return code
    print(f"removed {','.join(removed)}")
    return 0
