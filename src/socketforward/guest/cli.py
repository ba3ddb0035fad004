"""``socketforward guest``: the VM-side agent as a program. With ``--control``
it also serves its status (:mod:`socketforward.guest.control`)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from socketforward import control, daemon, runner, stats, transport
from socketforward.datastream import (
    DEFAULT_MAX_HANDSHAKES,
    DEFAULT_MAX_POOLED,
    DEFAULT_MAX_UNCLAIMED,
    StreamRegistry,
)
from socketforward.guest.agent import Agent
from socketforward.guest.budget import FDS_PER_CONNECTION, FdPlan
from socketforward.guest.control import GuestControl
from socketforward.guest.embed import Guest
from socketforward.guest.service import Service
from socketforward.protocol import DEFAULT_RPC_DIAL, DEFAULT_STREAMS

__all__ = ["AgentConfig", "add_parser", "config_from_args", "main"]

log = logging.getLogger("socketforward.guest")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "guest",
        help="run the VM-side agent (SocketForward service)",
        description="The VM side: serve SocketForward on the RPC connection and accept "
        "data streams; forward container connections to the host. SIGTERM/SIGINT "
        "stop it cleanly; SIGUSR1 logs the statistics; SIGHUP is logged and ignored; "
        "--control serves its status (socketforward status). "
        "Under systemd (NOTIFY_SOCKET set) it reports READY=1 once listening and "
        "dialing, STOPPING=1 when it shuts down. Exit status: 0 clean stop, 1 an "
        "endpoint it cannot use, 2 bad arguments.",
    )
    rpc = parser.add_mutually_exclusive_group()
    rpc.add_argument(
        "--rpc-dial",
        metavar="URI",
        help=f"dial the host and serve ttrpc on that connection (default {DEFAULT_RPC_DIAL})",
    )
    rpc.add_argument("--rpc-listen", metavar="URI", help="listen for the host's RPC connections")
    parser.add_argument(
        "--streams",
        metavar="URI",
        default=DEFAULT_STREAMS,
        help=f"where the host opens data streams (default {DEFAULT_STREAMS})",
    )
    parser.add_argument(
        "--socket-mode",
        type=daemon.octal_mode,
        default=0o600,
        metavar="OCTAL",
        help="mode of the forwarded socket files when the host sets none (default 600: "
        "only the agent's user; the host's per-socket mode and owner take precedence, "
        "and an OCI uds mount gets the container's user)",
    )
    parser.add_argument(
        "--max-unanswered",
        type=daemon.positive_int,
        default=32,
        metavar="N",
        help="ConnectRequests unanswered at once per Accept stream (default 32)",
    )
    parser.add_argument(
        "--pending-limit",
        type=daemon.positive_int,
        default=4096,
        metavar="N",
        help="connections waiting for a free Accept stream (default 4096)",
    )
    parser.add_argument(
        "--pending-timeout",
        type=daemon.positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="close a connection the host has not answered within this (default 30)",
    )
    parser.add_argument(
        "--fail-fast",
        action="store_true",
        help="while no host is connected, close new connections at once (logged as "
        "no_host) instead of letting them wait for one",
    )
    parser.add_argument(
        "--expose-allow",
        metavar="PATTERN",
        action="append",
        help="a VM socket path (a glob pattern, e.g. '/run/containerd/*') the host may "
        "reach with an expose (repeatable); without it, any socket the agent can connect to",
    )
    parser.add_argument(
        "--max-connections",
        type=daemon.positive_int,
        metavar="N",
        help="container connections open at once (waiting for the host or relaying); "
        "more wait in the listen backlog. Default: what the fd limit leaves after the "
        f"agent's reserve, {FDS_PER_CONNECTION} descriptors per connection",
    )
    parser.add_argument(
        "--max-stream-handshakes",
        type=daemon.positive_int,
        metavar="N",
        help="data-stream handshakes in progress at once; more wait in the listen "
        f"backlog (default: the fd limit / 16, at most {DEFAULT_MAX_HANDSHAKES})",
    )
    parser.add_argument(
        "--max-unclaimed-streams",
        type=daemon.positive_int,
        default=DEFAULT_MAX_UNCLAIMED,
        metavar="N",
        help="data streams waiting to be claimed; more are refused "
        f"(default {DEFAULT_MAX_UNCLAIMED})",
    )
    parser.add_argument(
        "--max-pooled-streams",
        type=daemon.non_negative_int,
        default=DEFAULT_MAX_POOLED,
        metavar="N",
        help="data streams the host may open ahead of demand, kept waiting for a "
        f"connection; 0 takes none (default {DEFAULT_MAX_POOLED})",
    )
    parser.add_argument(
        "--control",
        metavar="URI",
        type=control.endpoint_arg,
        help="serve the agent's status here (unix:PATH only; the socket is made 0600 in "
        "a directory only you can enter; none without it)",
    )
    parser.set_defaults(run=main)


@dataclass(frozen=True)
class AgentConfig:
    """What ``socketforward guest`` was asked to do, endpoints parsed."""

    rpc_dial: transport.Endpoint | None
    rpc_listen: transport.Endpoint | None
    streams: transport.Endpoint
    socket_mode: int
    max_unanswered: int
    pending_limit: int
    pending_timeout: float
    fail_fast: bool = False
    max_stream_handshakes: int | None = None
    """None: derived from the fd limit (:class:`FdPlan`)."""
    max_unclaimed_streams: int = DEFAULT_MAX_UNCLAIMED
    max_pooled_streams: int = DEFAULT_MAX_POOLED
    max_connections: int | None = None
    """None: derived from the fd limit (:class:`FdPlan`)."""
    control: transport.UnixEndpoint | None = None
    """Where to serve the Control service (None: nowhere)."""
    expose_allow: tuple[str, ...] | None = None
    """The VM socket paths (glob patterns) exposes may reach; None: any."""


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """Endpoints parsed and checked for their use; EndpointError names the option."""

    def parse(option: str, uri: str, *, listening: bool) -> transport.Endpoint:
        try:
            ep = transport.parse_endpoint(uri)
        except transport.EndpointError as exc:
            raise transport.EndpointError(f"{option}: {exc}") from None
        if listening and isinstance(ep, transport.HvsockEndpoint):
            raise transport.EndpointError(f"{option}: cannot listen on hvsock endpoint {uri!r}")
        if not listening and isinstance(ep, transport.VsockEndpoint) and ep.cid is None:
            raise transport.EndpointError(f"{option}: dialing {uri!r} needs a CID")
        return ep

    rpc_dial = rpc_listen = None
    if args.rpc_listen is not None:
        rpc_listen = parse("--rpc-listen", args.rpc_listen, listening=True)
    else:
        rpc_dial = parse("--rpc-dial", args.rpc_dial or DEFAULT_RPC_DIAL, listening=False)
    return AgentConfig(
        rpc_dial=rpc_dial,
        rpc_listen=rpc_listen,
        streams=parse("--streams", args.streams, listening=True),
        socket_mode=args.socket_mode,
        max_unanswered=args.max_unanswered,
        pending_limit=args.pending_limit,
        pending_timeout=args.pending_timeout,
        fail_fast=args.fail_fast,
        max_stream_handshakes=args.max_stream_handshakes,
        max_unclaimed_streams=args.max_unclaimed_streams,
        max_pooled_streams=args.max_pooled_streams,
        max_connections=args.max_connections,
        control=args.control,
        expose_allow=None if args.expose_allow is None else tuple(args.expose_allow),
    )


def _log_stats(service: Service, registry: StreamRegistry) -> None:
    """One line per forward (SIGUSR1, and at exit), as the host's."""
    streams = registry.stats()
    budget = service.budget()
    stats.log_stats(log, service.expose_stats(), id_key="expose_id")
    stats.log_stats(
        log,
        service.stats(),
        pending=service.pending,
        stream_handshakes=streams.handshakes,
        unclaimed_streams=streams.unclaimed,
        connections=budget.connections,
        max_connections=budget.max_connections,
        held_fds=budget.held_fds,
        accepting=int(budget.accepting),
        accept_pauses=budget.pauses,
    )


class _Fatal(Exception):
    """An endpoint the agent cannot use; the message says which and why."""


def _plan(cfg: AgentConfig, before: tuple[int, int] | None) -> FdPlan:
    """The descriptor budget for the fd limit now in force, logged once."""
    now = daemon.fd_limits()
    plan = FdPlan.derive(
        1024 if now is None else now[0],
        max_handshakes=cfg.max_stream_handshakes,
        max_connections=cfg.max_connections,
    )
    log.info(
        "fd limit soft=%s hard=%s soft_at_start=%s reserve=%d max_stream_handshakes=%d "
        "pipe_pool=%d max_connections=%d fds_per_connection=%d",
        "unknown" if now is None else now[0],
        "unknown" if now is None else now[1],
        "unknown" if before is None else before[0],
        plan.reserve,
        plan.max_handshakes,
        plan.pipe_pool,
        plan.max_connections,
        FDS_PER_CONNECTION,
    )
    if plan.overcommitted:
        log.warning(
            "--max-connections %d can take descriptors the agent keeps for itself "
            "(fd limit %d, reserve %d, %d per connection); the host's answers may "
            "then find no descriptor",
            plan.max_connections,
            plan.fd_limit,
            plan.reserve,
            FDS_PER_CONNECTION,
        )
    return plan


async def _serve(cfg: AgentConfig, plan: FdPlan) -> None:
    guest = Guest(
        rpc_dial=cfg.rpc_dial,
        rpc_listen=cfg.rpc_listen,
        streams=cfg.streams,
        socket_mode=cfg.socket_mode,
        max_unanswered=cfg.max_unanswered,
        pending_limit=cfg.pending_limit,
        pending_timeout=cfg.pending_timeout,
        fail_fast=cfg.fail_fast,
        max_connections=plan.max_connections,
        max_stream_handshakes=plan.max_handshakes,
        max_unclaimed_streams=cfg.max_unclaimed_streams,
        max_pooled_streams=cfg.max_pooled_streams,
        expose_allow=cfg.expose_allow,
    )
    try:
        await guest.start()
    except (OSError, transport.EndpointError) as exc:
        raise _Fatal(f"--streams {cfg.streams}: {exc}") from None
    assert guest.agent is not None and guest.service is not None and guest.registry is not None
    agent, service, registry = guest.agent, guest.service, guest.registry
    notifier = daemon.Notifier.from_environment()
    control_server: control.ControlServer | None = None
    try:
        async with daemon.handle_signals(on_stats=lambda: _log_stats(service, registry)) as stop:
            if cfg.control is not None:
                control_server = await _start_control(cfg, plan, agent, registry)
            log.info(
                "guest started rpc=%s streams=%s",
                f"dial {cfg.rpc_dial}" if cfg.rpc_dial is not None else f"listen {cfg.rpc_listen}",
                cfg.streams,
            )
            ended = await daemon.run_until_stopped(
                guest.wait_stopped(), stop, notifier=notifier, freeze=True
            )
            if ended is not None and not ended.cancelled() and ended.exception() is not None:
                option = "--rpc-dial" if cfg.rpc_dial is not None else "--rpc-listen"
                error = ended.exception()
                raise _Fatal(f"{option} {cfg.rpc_dial or cfg.rpc_listen}: {error}")
            log.info("signal received, shutting down")
    finally:
        notifier.stopping()
        await guest.stop()
        if control_server is not None:
            await control_server.close()
        _log_stats(service, registry)


async def _start_control(
    cfg: AgentConfig, plan: FdPlan, agent: Agent, registry: StreamRegistry
) -> control.ControlServer:
    assert cfg.control is not None
    rpc = f"dial {cfg.rpc_dial}" if cfg.rpc_dial is not None else f"listen {cfg.rpc_listen}"
    service = GuestControl(
        agent,
        registry,
        rpc_endpoint=rpc,
        pending_limit=cfg.pending_limit,
        max_stream_handshakes=plan.max_handshakes,
        max_unclaimed_streams=cfg.max_unclaimed_streams,
    )
    try:
        return await control.ControlServer.start(cfg.control, service)
    except OSError as exc:
        raise _Fatal(f"--control {cfg.control}: {exc}") from None


def main(args: argparse.Namespace) -> int:
    """``socketforward guest``: 0 after a clean shutdown, 2 for bad arguments,
    1 for an endpoint it cannot use. Under systemd (``NOTIFY_SOCKET``) it
    reports ``READY=1`` once the data-stream listener is up and the RPC
    endpoint listening or being dialed (before any host connects), and
    ``STOPPING=1`` when it begins to shut down."""
    try:
        cfg = config_from_args(args)
    except transport.EndpointError as exc:
        print(f"socketforward guest: {exc}", file=sys.stderr)
        return 2
    problem = None if cfg.control is None else transport.private_dir_problem(cfg.control.path)
    if problem is not None:
        print(f"socketforward guest: --control {cfg.control}: {problem}", file=sys.stderr)
        return 2
    before = daemon.fd_limits()
    daemon.raise_fd_limit()
    plan = _plan(cfg, before)
    try:
        runner.run(_serve(cfg, plan))
    except _Fatal as exc:
        print(f"socketforward guest: {exc}", file=sys.stderr)
        return 1
    return 0
