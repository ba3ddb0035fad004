"""``socketforward host``: the command line and the process around a Forwarder.

Signals: SIGTERM/SIGINT stop cleanly, SIGUSR1 logs the statistics, SIGHUP
re-reads --forwards-file (logged and ignored without one). With --control it
serves the Control service (status, forwards added and removed at run time;
:mod:`socketforward.host.control`).

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
import stat
import sys

from socketforward import control, runner, stats, transport
from socketforward.daemon import (
    Notifier,
    fd_limits,
    handle_signals,
    non_negative_seconds,
    positive_int,
    positive_seconds,
    raise_fd_limit,
    run_until_stopped,
)
from socketforward.host import oci
from socketforward.host.control import FORWARDS_FILE, ForwardTable, HostControl
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

__all__ = ["add_parser", "main"]

log = logging.getLogger("socketforward.host")


def _endpoint_arg(text: str) -> transport.Endpoint:
    try:
        return transport.parse_endpoint(text)
    except transport.EndpointError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listen_endpoint_arg(text: str) -> transport.Endpoint:
    ep = _endpoint_arg(text)
    if isinstance(ep, transport.HvsockEndpoint):
        raise argparse.ArgumentTypeError(
            f"cannot listen on {text!r}: guest dials to hybrid vsock port {ep.port} arrive "
            f"on unix:{ep.path}_{ep.port}; listen there"
        )
    return ep


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
        "SIGTERM/SIGINT stop it cleanly; SIGUSR1 logs the statistics; SIGHUP re-reads "
        "--forwards-file; --control serves status and run-time changes of the forwards "
        "(socketforward status, socketforward forward). Under systemd (NOTIFY_SOCKET "
        "set) it reports READY=1 once listening or dialing, STOPPING=1 when it shuts "
        "down. Exit status: 0 clean stop, 1 an unusable RPC endpoint or an unexpected "
        "stop, 2 bad arguments.",
    )
    rpc = parser.add_mutually_exclusive_group(required=True)
    rpc.add_argument(
        "--rpc-listen",
        metavar="URI",
        type=_listen_endpoint_arg,
        help="accept the guest's RPC dial here (nerdbox's direction), "
        "e.g. unix:/run/user/1000/vm1/rpc.sock",
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
        required=True,
        help="the guest's data-stream endpoint, e.g. vsock://3:1026 or unix:/path/vm.sock_1026",
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
        default=5.0,
        help="bound on dialing a host socket (default 5)",
    )
    parser.add_argument(
        "--stream-timeout",
        metavar="SECONDS",
        type=positive_seconds,
        default=10.0,
        help="bound on each data-stream handshake (default 10)",
    )
    parser.add_argument(
        "--stream-retry-for",
        metavar="SECONDS",
        type=positive_seconds,
        default=30.0,
        help="keep retrying a missing stream endpoint this long (VM booting; default 30)",
    )
    parser.add_argument(
        "--drain",
        metavar="SECONDS",
        type=non_negative_seconds,
        default=5.0,
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
        "--control",
        metavar="URI",
        type=control.endpoint_arg,
        help="serve status and run-time changes of the forwards here (unix:PATH only; "
        "the socket is made 0600 in a directory only you can enter; none without it)",
    )
    parser.set_defaults(run=main)


class _UsageError(Exception):
    """A bad command line; the message names the argument."""


class _Unusable(Exception):
    """An endpoint the host cannot use (exit status 1); the message names it."""


def _forwards_from_args(args: argparse.Namespace) -> tuple[list[Forward], dict[str, str]]:
    """Every forward the command line names, and the option each came from
    (a SIGHUP may change those of --forwards-file, never the others)."""
    if args.write_spec and not args.oci_spec:
        raise _UsageError("--write-spec needs --oci-spec")
    if args.oci_spec and not args.container_id:
        raise _UsageError("--oci-spec needs --container-id")
    if args.container_id and not args.oci_spec:
        raise _UsageError("--container-id needs --oci-spec")
    if not args.forward and not args.oci_spec and not args.forwards_file:
        raise _UsageError("nothing to forward: give --forward, --forwards-file or --oci-spec")
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
    return forwards, sources


def _check_private_dir(ep: transport.UnixEndpoint) -> None:
    """The RPC socket's directory must be ours and closed to everyone else: any
    process that can connect to it can play the guest (docs/protocol.md
    9.3)."""
    problem = transport.private_dir_problem(ep.path)
    if problem is not None:
        raise _UsageError(f"--rpc-listen {ep}: {problem}")


def _check_streams_dir(ep: transport.Endpoint, streams_uid: int | None) -> None:
    """Whoever can write the directory of a UNIX stream endpoint can put their own
    socket at its path (a sticky bit does not stop that while the path is still
    missing, as when the VM boots) and receive host connections: refuse a
    directory writable by group or others, or owned by someone not trusted."""
    if isinstance(ep, transport.VsockEndpoint):
        return
    parent = os.path.dirname(ep.path)
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        return  # nothing there yet: the SO_PEERCRED check of each stream still holds
    except OSError as exc:
        raise _UsageError(f"--streams {ep}: directory {parent}: {exc}") from None
    trusted = {os.geteuid(), 0, os.geteuid() if streams_uid is None else streams_uid}
    if st.st_mode & 0o022 or st.st_uid not in trusted:
        raise _UsageError(
            f"--streams {ep}: directory {parent} can be written by other users "
            f"(owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}), who could put "
            "their own socket at that path and receive forwarded connections; use a "
            "directory that only you (or --streams-uid) can write"
        )


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
    """SIGHUP: each signal starts a reload of the forwards file (the table's
    lock runs them one at a time); :meth:`close` cancels those still running."""

    def __init__(self, table: ForwardTable) -> None:
        self.table = table
        self._tasks: set[asyncio.Task[None]] = set()

    def request_reload(self) -> None:
        task = asyncio.get_running_loop().create_task(self.table.reload_file())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _serve(
    args: argparse.Namespace, forwarder: Forwarder, stop: asyncio.Event, count: int
) -> int:
    """Listen or dial until *stop* is set; the exit status."""
    listener: transport.Listener | None = None
    try:
        _check_streams_dir(args.streams, args.streams_uid)
        if args.rpc_listen is not None:
            ep = args.rpc_listen
            if isinstance(ep, transport.UnixEndpoint):
                _check_private_dir(ep)
            try:
                listener = await transport.listen(ep, mode=0o600)
            except OSError as exc:
                raise _Unusable(f"--rpc-listen: {exc}") from None
            work = forwarder.run_listening(listener)
            log.info("host listening rpc=%s streams=%s forwards=%d", ep, args.streams, count)
        else:
            work = forwarder.run_dialing(args.rpc_dial)
            log.info(
                "host dialing rpc=%s streams=%s forwards=%d", args.rpc_dial, args.streams, count
            )
        ended = await run_until_stopped(work, stop, notifier=Notifier.from_environment())
        if ended is not None:
            log.error("host stopped unexpectedly error=%r", ended.exception())
            return 1
        log.info("host stopping")
        return 0
    finally:
        if listener is not None:
            listener.close()


async def _start_exposes(forwarder: Forwarder, exposes: list[Expose]) -> None:
    try:
        await forwarder.add_exposes(exposes)
    except ValueError as exc:
        raise _Unusable(f"--expose: {exc}") from None


async def _start_control(ep: transport.UnixEndpoint, service: HostControl) -> control.ControlServer:
    problem = transport.private_dir_problem(ep.path)
    if problem is not None:
        raise _UsageError(f"--control {ep}: {problem}")
    try:
        return await control.ControlServer.start(ep, service)
    except OSError as exc:
        raise _Unusable(f"--control: {exc}") from None


async def _run(
    args: argparse.Namespace,
    forwards: list[Forward],
    sources: dict[str, str],
    limits_at_start: tuple[int, int] | None,
) -> int:
    forwarder = Forwarder(
        forwards,
        args.streams,
        dial_timeout=args.dial_timeout,
        stream_timeout=args.stream_timeout,
        stream_retry_for=args.stream_retry_for,
        max_relays=args.max_relays,
        streams_uid=args.streams_uid,
    )
    limits = fd_limits()
    log.info(
        "fd limit soft=%s hard=%s soft_at_start=%s max_relays=%d max_pending=%d",
        "unknown" if limits is None else limits[0],
        "unknown" if limits is None else limits[1],
        "unknown" if limits_at_start is None else limits_at_start[0],
        forwarder.max_relays,
        forwarder.max_pending,
    )
    table = ForwardTable(forwarder, sources, args.forwards_file)
    reloads = _Reloads(table) if args.forwards_file else None
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
                if args.expose:
                    await _start_exposes(forwarder, args.expose)
                if host_control is not None:
                    control_server = await _start_control(args.control, host_control)
                    watch = asyncio.get_running_loop().create_task(host_control.watch())
                return await _serve(args, forwarder, stop, len(forwards))
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
                await forwarder.close(drain=args.drain)
                if watch is not None:
                    watch.cancel()
                    await asyncio.gather(watch, return_exceptions=True)
                if control_server is not None:
                    await control_server.close()
    finally:
        _log_stats(forwarder)


def main(args: argparse.Namespace) -> int:
    try:
        forwards, sources = _forwards_from_args(args)
    except _UsageError as exc:
        print(f"socketforward host: error: {exc}", file=sys.stderr)
        return 2
    before = fd_limits()
    raise_fd_limit()
    return runner.run(_run(args, forwards, sources, before))
