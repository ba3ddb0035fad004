"""Command line: one subcommand per module; each module offers
``add_parser(subparsers)`` (which sets ``run``, a function taking the parsed
arguments and returning the exit status)."""

from __future__ import annotations

import argparse
import logging
import sys

from socketforward import demo, guest, host

# Each entry's add_parser registers one subcommand.
SUBCOMMANDS = [demo, guest, host]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="socketforward",
        description="Forward UNIX domain sockets into virtual machines over vsock.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every event")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The format uses none of these; skipping them makes each record cheaper
    # (a line per forwarded connection adds up): the logging docs' own advice.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup per record
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    status: int = args.run(args)
    return status
