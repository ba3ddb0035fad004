"""``socketforward host``: the command line and the process around a Forwarder.

Signals: SIGTERM/SIGINT stop cleanly, SIGUSR1 logs the statistics, SIGHUP
re-reads --forwards-file and --config (logged and ignored without either). With
--control it serves the Control service (status, forwards added and removed at
run time; :mod:`socketforward.host.control`).

``--config FILE`` (:mod:`socketforward.host.config`) gives endpoints, budgets,
forwards and exposes; every setting in it has a flag of the same name, and a
flag on the command line wins over the file.

Under systemd (``NOTIFY_SOCKET`` set) it reports ``READY=1`` once its RPC
endpoint listens (or dialing it has started) and ``STOPPING=1`` when it begins
to shut down. Exit status: 0 after a clean stop, 1 when the RPC endpoint
cannot be used or the host stopped unexpectedly, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TypeVar

from socketforward import control, runner, stats, transport
from socketforward.daemon import (
    Notifier,
    fd_limits,
    handle_signals,
    int_in_range,
    non_negative_seconds,
    positive_int,
    positive_seconds,
    raise_fd_limit,
    run_until_stopped,
)
from socketforward.host import oci
from socketforward.host.config import (
    CONFIG,
    SETTINGS,
    Config,
    ConfigError,
    entry_id,
    listen_endpoint,
    plan_source,
    read_config,
)
from socketforward.host.control import FORWARDS_FILE, ForwardTable, HostControl
from socketforward.host.embed import Host
from socketforward.host.forwarder import Forwarder
from socketforward.host.forwards import (
    Expose,
    Forward,
    Source,
    merge_sources,
    parse_expose,
    parse_forward,
    read_forwards_file,
)
from socketforward.host.pool import DEFAULT_POOL_SIZE, MAX_POOL_SIZE

__all__ = ["add_parser", "main"]

log = logging.getLogger("socketforward.host")

_E = TypeVar("_E", Forward, Expose)


def _endpoint_arg(text: str) -> transport.Endpoint:
    try:
        return transport.parse_endpoint(text)
    except transport.EndpointError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listen_endpoint_arg(text: str) -> transport.Endpoint:
    try:
        return listen_endpoint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _uid_arg(text: str) -> int:
    # isdigit() alone accepts non-ASCII digits such as "²".
    if not (text.isascii() and text.isdigit()) or int(text) > 2**32 - 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not a numeric user id")
    return int(text)


def _forward_arg(text: str) -> Forward:
    try:
        return parse_forward(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _expose_arg(text: str) -> Expose:
    try:
        return parse_expose(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "host",
        help="the host side: serve forwards to host UNIX sockets for one VM",
        description="Forward connections made in a VM to UNIX sockets on this host. "
        "--config FILE holds what the flags give (a flag on the command line wins). "
        "SIGTERM/SIGINT stop it cleanly; SIGUSR1 logs the statistics; SIGHUP re-reads "
        "--forwards-file and --config; --control serves status and run-time changes of the "
        "forwards (socketforward status, socketforward forward). Under systemd (NOTIFY_SOCKET "
        "set) it reports READY=1 once listening or dialing, STOPPING=1 when it shuts "
        "down. Exit status: 0 clean stop, 1 an unusable RPC endpoint or an unexpected "
        "stop, 2 bad arguments.",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML file for this VM: endpoints, budgets, [[forward]] and [[expose]] "
        "tables; SIGHUP re-reads its forwards and exposes (README, 'Running it with a VM')",
    )
    rpc = parser.add_mutually_exclusive_group()
    rpc.add_argument(
        "--rpc-listen",
        metavar="URI",
        type=_listen_endpoint_arg,
        help="accept the guest's RPC dial here (nerdbox's direction), "
        "e.g. unix:/run/user/1000/vm1/rpc.sock (this or --rpc-dial, here or in --config)",
    )
    rpc.add_argument(
        "--rpc-dial",
        metavar="URI",
        type=_endpoint_arg,
        help="dial the guest's RPC endpoint (again when it drops)",
    )
    parser.add_argument(
        "--streams",
        metavar="URI",
        type=_endpoint_arg,
        help="the guest's data-stream endpoint, e.g. vsock://3:1026 or unix:/path/vm.sock_1026 "
        "(here or in --config)",
    )
    parser.add_argument(
        "--streams-uid",
        metavar="UID",
        type=_uid_arg,
        help="the user whose process listens at a unix: or hvsock: --streams endpoint "
        "(default: this process's own); a data stream served by anyone else is closed",
    )
    parser.add_argument(
        "--forward",
        metavar="FORWARD_ID=HOST_PATH:VM_PATH",
        type=_forward_arg,
        action="append",
        default=[],
        help="a forward (repeatable)",
    )
    parser.add_argument(
        "--expose",
        metavar="EXPOSE_ID=VM_PATH:HOST_PATH",
        type=_expose_arg,
        action="append",
        default=[],
        help="a VM socket to reach from the host: the host listens at HOST_PATH (mode "
        "0600) and connects each client to VM_PATH in the VM (repeatable)",
    )
    parser.add_argument(
        "--forwards-file",
        metavar="FILE",
        help="forwards, one FORWARD_ID=HOST_PATH:VM_PATH per line (# comments); "
        "SIGHUP re-reads it, adding and removing forwards while running",
    )
    parser.add_argument(
        "--oci-spec", metavar="CONFIG_JSON", help="take forwards from this OCI spec's uds mounts"
    )
    parser.add_argument("--container-id", metavar="ID", help="the container of --oci-spec")
    parser.add_argument(
        "--write-spec", metavar="OUT", help="write the rewritten spec (uds -> bind mounts) here"
    )
    parser.add_argument(
        "--dial-timeout",
        metavar="SECONDS",
        type=positive_seconds,
        help="bound on dialing a host socket (default 5)",
    )
    parser.add_argument(
        "--stream-timeout",
        metavar="SECONDS",
        type=positive_seconds,
        help="bound on each data-stream handshake (default 10)",
    )
    parser.add_argument(
        "--stream-retry-for",
        metavar="SECONDS",
        type=positive_seconds,
        help="keep retrying a missing stream endpoint this long (VM booting; default 30)",
    )
    parser.add_argument(
        "--drain",
        metavar="SECONDS",
        type=non_negative_seconds,
        help="on SIGTERM/SIGINT, stop taking connections and let running ones finish "
        "for up to this long before closing them (default 5; 0 closes at once)",
    )
    parser.add_argument(
        "--max-relays",
        metavar="N",
        type=positive_int,
        help="connections the VM may hold at once; more are refused (default: a quarter "
        "of the descriptors left after a reserve)",
    )
    parser.add_argument(
        "--max-pending",
        metavar="N",
        type=positive_int,
        help="the VM's connection requests being answered at once; more are refused "
        f"(default {_DEFAULTS['max_pending']})",
    )
    parser.add_argument(
        "--stream-pool",
        metavar="N",
        type=int_in_range(0, MAX_POOL_SIZE),
        help="data streams kept open ahead of demand, so a new connection need not "
        f"wait for one (a guest of ours only; 0 to {MAX_POOL_SIZE}, "
        f"default {_DEFAULTS['stream_pool']})",
    )
    parser.add_argument(
        "--control",
        metavar="URI",
        type=control.endpoint_arg,
        help="serve status and run-time changes of the forwards here (unix:PATH only; "
        "the socket is made 0600 in a directory only you can enter; none without it)",
    )
    parser.set_defaults(run=main)


_DEFAULTS: dict[str, object] = {
    "dial_timeout": 5.0,
    "stream_timeout": 10.0,
    "stream_retry_for": 30.0,
    "drain": 5.0,
    "max_pending": 1024,
    "stream_pool": DEFAULT_POOL_SIZE,
}
"""Settings the command line and the file both leave out (the others: None)."""


class _UsageError(Exception):
    """A bad command line; the message names the argument."""


def _settings(args: argparse.Namespace, config: Config | None) -> frozenset[str]:
    """Fill in *args* from the file where the command line gave nothing, then the
    defaults; the settings the command line overrides. ``--rpc-listen`` or
    ``--rpc-dial`` replaces both of the file's ``rpc_listen`` and ``rpc_dial``."""
    given = {key for key in SETTINGS if getattr(args, key) is not None}
    if given & {"rpc_listen", "rpc_dial"}:
        given |= {"rpc_listen", "rpc_dial"}
    args.from_config = set()
    if config is not None:
        for key in SETTINGS:
            if key not in given and config.setting(key) is not None:
                setattr(args, key, config.setting(key))
                args.from_config.add(key)
    for key, value in _DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    hint = " (or its key in --config)" if config is None else f" (or in {config.path})"
    if args.rpc_listen is None and args.rpc_dial is None:
        raise _UsageError(f"give --rpc-listen or --rpc-dial{hint}")
    if args.streams is None:
        raise _UsageError(f"give --streams{hint}")
    return frozenset(given)


def _named(args: argparse.Namespace, key: str) -> str:
    """How to name the setting *key* in a message: its flag, or FILE:LINE: key."""
    config: Config | None = args.loaded_config
    if config is not None and key in args.from_config:
        return f"{config.at(key)}: {key}"
    return "--" + key.replace("_", "-")


class _Unusable(Exception):
    """An endpoint the host cannot use (exit status 1); the message names it."""


def _forwards_from_args(
    args: argparse.Namespace, config: Config | None = None
) -> tuple[list[Forward], dict[str, str]]:
    """Every forward the command line and *config* name, and the option each came
    from (a SIGHUP may change those of --forwards-file and --config, never the
    others)."""
    if args.write_spec and not args.oci_spec:
        raise _UsageError("--write-spec needs --oci-spec")
    if args.oci_spec and not args.container_id:
        raise _UsageError("--oci-spec needs --container-id")
    if args.container_id and not args.oci_spec:
        raise _UsageError("--container-id needs --oci-spec")
    if not (args.forward or args.oci_spec or args.forwards_file or args.expose or config):
        raise _UsageError(
            "nothing to forward: give --forward, --forwards-file, --oci-spec, --expose or --config"
        )
    from_file: list[Forward] = []
    if args.forwards_file:
        try:
            from_file = read_forwards_file(args.forwards_file)
        except ValueError as exc:
            raise _UsageError(f"--forwards-file {exc}") from None
    from_spec: list[Forward] = []
    spec = None
    if args.oci_spec:
        try:
            spec = oci.load_spec(args.oci_spec)
            from_spec, _ = oci.forwards_from_oci_spec(spec, args.container_id)
        except (OSError, ValueError) as exc:
            raise _UsageError(f"--oci-spec {args.oci_spec}: {exc}") from None
        if not from_spec:
            log.warning("no uds mounts in the spec oci_spec=%s", args.oci_spec)
    try:
        forwards = merge_sources(
            [
                Source("--forward", args.forward),
                Source("--forwards-file", from_file, args.forwards_file or ""),
                Source("--oci-spec", from_spec, args.oci_spec or ""),
            ]
        )
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    if spec is not None and args.write_spec:
        try:
            oci.write_spec(args.write_spec, spec)
        except OSError as exc:
            raise _UsageError(f"--write-spec {args.write_spec}: {exc}") from None
        log.info("wrote rewritten spec path=%s", args.write_spec)
    sources = {f.forward_id: "--forward" for f in args.forward}
    sources.update({f.forward_id: FORWARDS_FILE for f in from_file})
    sources.update({f.forward_id: "--oci-spec" for f in from_spec})
    if config is not None:
        table = {f.forward_id: f for f in forwards}
        forwards += _merge_config(config, "forward", table, config.forwards, sources)
    return forwards, sources


def _exposes_from_args(
    args: argparse.Namespace, config: Config | None
) -> tuple[list[Expose], dict[str, str]]:
    """Every expose of ``--expose`` and *config*, and the option each came from."""
    exposes: dict[str, Expose] = {}
    for expose in args.expose:
        if expose.expose_id in exposes:
            raise _UsageError(f"--expose: expose ID {expose.expose_id} is given twice")
        exposes[expose.expose_id] = expose
    sources = dict.fromkeys(exposes, "--expose")
    if config is not None:
        for expose in _merge_config(config, "expose", exposes, config.exposes, sources):
            exposes[expose.expose_id] = expose
    return list(exposes.values()), sources


def _merge_config(
    config: Config,
    section: str,
    table: Mapping[str, _E],
    entries: Sequence[_E],
    sources: dict[str, str],
) -> list[_E]:
    """The file's *entries* to add to *table*; an id the command line gives too
    must be the very same entry (the command line keeps it). *sources* gets
    the ones added."""
    plan = plan_source(CONFIG, table, sources, entries)
    if plan.clashes:
        ident, owner = min(plan.clashes.items())
        error = config.error(
            f"{section} {ident}",
            f"[[{section}]] {ident}: {section} ID {ident} is also given with {owner}, "
            "with other paths, mode or owner",
            "id",
        )
        raise _UsageError(str(error))
    sources.update(dict.fromkeys(map(entry_id, plan.add), CONFIG))
    return plan.add


def _check_private_dir(ep: transport.UnixEndpoint, name: str) -> None:
    """The RPC socket's directory must be ours and closed to everyone else: any
    process that can connect to it can play the guest (docs/protocol.md
    9.3)."""
    problem = transport.private_dir_problem(ep.path)
    if problem is not None:
        raise _UsageError(f"{name} {ep}: {problem}")


def _check_streams_dir(ep: transport.Endpoint, streams_uid: int | None, name: str) -> None:
    """Whoever can write the directory of a UNIX stream endpoint can put their own
    socket at its path (a sticky bit does not stop that while the path is still
    missing, as when the VM boots) and receive host connections: refuse a
    directory writable by group or others, or owned by someone not trusted."""
    if isinstance(ep, transport.VsockEndpoint):
        return
    # A missing directory passes: the SO_PEERCRED check of each stream still holds.
    problem = transport.dir_problem(
        ep.path,
        owners={os.geteuid(), 0, os.geteuid() if streams_uid is None else streams_uid},
        forbidden=0o022,
        what="can be written by other users",
        advice=", who could put their own socket at that path and receive forwarded "
        "connections; use a directory that only you (or --streams-uid) can write",
    )
    if problem is not None:
        raise _UsageError(f"{name} {ep}: {problem}")


def _log_stats(forwarder: Forwarder) -> None:
    stats.log_stats(log, forwarder.expose_stats(), id_key="expose_id")
    stats.log_stats(
        log,
        forwarder.stats(),
        unknown_forward_requests=forwarder.unknown_requests,
        undecodable_requests=forwarder.undecodable_requests,
        unread_drops=forwarder.unread_drops,
    )


class _Reloads:
    """SIGHUP: each signal starts a reload of the forwards file and the
    configuration file (the table's lock runs them one at a time);
    :meth:`close` cancels those still running."""

    def __init__(self, table: ForwardTable) -> None:
        self.table = table
        self._tasks: set[asyncio.Task[None]] = set()

    def request_reload(self) -> None:
        task = asyncio.get_running_loop().create_task(self.table.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _serve(args: argparse.Namespace, host: Host, stop: asyncio.Event, count: int) -> int:
    """Listen or dial until *stop* is set; the exit status."""
    _check_streams_dir(args.streams, args.streams_uid, _named(args, "streams"))
    if args.rpc_listen is not None and isinstance(args.rpc_listen, transport.UnixEndpoint):
        _check_private_dir(args.rpc_listen, _named(args, "rpc_listen"))
    try:
        await host.start()
    except OSError as exc:
        raise _Unusable(f"{_named(args, 'rpc_listen')}: {exc}") from None
    if args.rpc_listen is not None:
        log.info(
            "host listening rpc=%s streams=%s forwards=%d", args.rpc_listen, args.streams, count
        )
    else:
        log.info("host dialing rpc=%s streams=%s forwards=%d", args.rpc_dial, args.streams, count)
    ended = await run_until_stopped(
        host.wait_stopped(), stop, notifier=Notifier.from_environment(), freeze=True
    )
    if ended is not None:
        log.error("host stopped unexpectedly error=%r", ended.exception())
        return 1
    log.info("host stopping")
    return 0


async def _start_exposes(
    table: ForwardTable, exposes: list[Expose], sources: dict[str, str]
) -> None:
    try:
        await table.start_exposes(exposes, sources)
    except ValueError as exc:
        # The message names the expose; say which option or file it may come from.
        options = sorted(set(sources.values()))
        if table.config is not None and CONFIG in options:
            options[options.index(CONFIG)] = f"{CONFIG} {table.config.path}"
        raise _Unusable(f"{' or '.join(options) or '--expose'}: {exc}") from None


async def _start_control(
    ep: transport.UnixEndpoint, service: HostControl, name: str
) -> control.ControlServer:
    problem = transport.private_dir_problem(ep.path)
    if problem is not None:
        raise _UsageError(f"{name} {ep}: {problem}")
    try:
        return await control.ControlServer.start(ep, service)
    except OSError as exc:
        raise _Unusable(f"{name}: {exc}") from None


async def _run(
    args: argparse.Namespace,
    forwards: list[Forward],
    sources: dict[str, str],
    exposes: tuple[list[Expose], dict[str, str]],
    limits_at_start: tuple[int, int] | None,
) -> int:
    # The program is a Host; its exposes start through the table (which knows
    # where each came from), so the Host is given none of its own.
    host = Host(
        streams=args.streams,
        rpc_listen=args.rpc_listen,
        rpc_dial=args.rpc_dial,
        forwards=forwards,
        drain=args.drain,
        dial_timeout=args.dial_timeout,
        stream_timeout=args.stream_timeout,
        stream_retry_for=args.stream_retry_for,
        max_pending=args.max_pending,
        max_relays=args.max_relays,
        stream_pool=args.stream_pool,
        streams_uid=args.streams_uid,
    )
    forwarder = host.forwarder
    limits = fd_limits()
    log.info(
        "fd limit soft=%s hard=%s soft_at_start=%s max_relays=%d max_pending=%d",
        "unknown" if limits is None else limits[0],
        "unknown" if limits is None else limits[1],
        "unknown" if limits_at_start is None else limits_at_start[0],
        forwarder.max_relays,
        forwarder.max_pending,
    )
    config: Config | None = args.loaded_config
    table = ForwardTable(
        forwarder, sources, args.forwards_file, config=config, overridden=args.overridden
    )
    reloads = _Reloads(table) if args.forwards_file or config is not None else None
    rpc = f"listen {args.rpc_listen}" if args.rpc_listen is not None else f"dial {args.rpc_dial}"
    host_control = HostControl(table, rpc_endpoint=rpc) if args.control else None
    control_server: control.ControlServer | None = None
    watch: asyncio.Task[None] | None = None
    try:
        async with handle_signals(
            on_stats=lambda: _log_stats(forwarder),
            on_reload=reloads.request_reload if reloads is not None else None,
        ) as stop:
            try:
                if exposes[0]:
                    await _start_exposes(table, *exposes)
                if host_control is not None:
                    control_server = await _start_control(
                        args.control, host_control, _named(args, "control")
                    )
                    watch = asyncio.get_running_loop().create_task(host_control.watch())
                return await _serve(args, host, stop, len(forwards))
            except _UsageError as exc:
                print(f"socketforward host: error: {exc}", file=sys.stderr)
                return 2
            except _Unusable as exc:
                print(f"socketforward host: error: {exc}", file=sys.stderr)
                return 1
            finally:
                if reloads is not None:
                    await reloads.close()
                # Status stays available while running connections drain.
                await host.stop()
                if watch is not None:
                    watch.cancel()
                    await asyncio.gather(watch, return_exceptions=True)
                if control_server is not None:
                    await control_server.close()
    finally:
        _log_stats(forwarder)


def main(args: argparse.Namespace) -> int:
    try:
        config = _read_config(args.config) if args.config else None
        args.loaded_config = config
        args.overridden = _settings(args, config)
        forwards, sources = _forwards_from_args(args, config)
        exposes = _exposes_from_args(args, config)
    except _UsageError as exc:
        print(f"socketforward host: error: {exc}", file=sys.stderr)
        return 2
    before = fd_limits()
    raise_fd_limit()
    return runner.run(_run(args, forwards, sources, exposes, before))


def _read_config(path: str) -> Config:
    try:
        return read_config(path)
    except ConfigError as exc:
        # The message starts with the file's name (and line): no option name needed.
        raise _UsageError(str(exc)) from None
