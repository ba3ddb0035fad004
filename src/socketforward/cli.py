"""Command line: one subcommand per module; each module offers
``add_parser(subparsers)`` (which sets ``run``, a function taking the parsed
arguments and returning the exit status). :mod:`socketforward.control` adds
two, ``status`` and ``forward``, the client side of the programs' control
endpoint; ``forward add`` reads forwards as ``host --forward`` does.

The logging options (``--log-level``, ``-v``, ``-q``, ``--log-format``) are
taken before the subcommand and after it alike; when several are given, the
last one on the command line wins.
"""

from __future__ import annotations

import argparse
import logging
import sys

from socketforward import __version__, control, daemon, demo, guest, host

# Each entry's add_parser registers one subcommand.
SUBCOMMANDS = [demo, guest, host]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _logging_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The logging options, on the main parser (with the defaults) or on a
    subcommand's (without, so one not given there keeps what came before)."""

    def default(value: str) -> str:
        return value if defaults else argparse.SUPPRESS

    group = parser.add_argument_group("logging")
    group.add_argument(
        "--log-level",
        choices=list(LEVELS),
        default=default("info"),
        help="the least important events written (default info: lifecycle, warnings "
        "and errors; debug adds a line per forwarded connection)",
    )
    group.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const="debug",
        default=default("info"),
        help="log every event (--log-level debug)",
    )
    group.add_argument(
        "-q",
        "--quiet",
        dest="log_level",
        action="store_const",
        const="warning",
        default=default("info"),
        help="log only warnings and errors (--log-level warning)",
    )
    group.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=default("text"),
        help="text (default): one readable line per event; json: one JSON object per "
        "line with time, level, logger, message and the message's key=value fields",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="socketforward",
        description="Forward UNIX domain sockets into virtual machines over vsock.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _logging_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    control.add_parser(sub, parse_forward=host.parse_forward)
    for subparser in _leaf_parsers(sub):
        _logging_options(subparser, defaults=False)
    return parser


def _leaf_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> list[argparse.ArgumentParser]:
    """The parsers that end a command line (``forward add``, not ``forward``)."""
    leaves = []
    for parser in sub.choices.values():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        leaves += [p for n in nested for p in _leaf_parsers(n)] if nested else [parser]
    return leaves


def setup_logging(level: str, log_format: str) -> None:
    """Log to stderr at *level* ("debug" .. "error") in *log_format* ("text" or "json")."""
    # The format uses none of these; skipping them makes each record cheaper
    # (a line per forwarded connection adds up): the logging docs' own advice.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup per record
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        daemon.JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=LEVELS[level], handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    status: int = args.run(args)
    return status
