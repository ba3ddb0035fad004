"""Command line: ``socketforward demo`` (``guest`` and ``host`` come with issues 9 and 10)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from socketforward import demo


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="socketforward",
        description="Forward UNIX domain sockets into virtual machines over vsock.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every event")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="forward a real host socket end to end on this machine")
    demo.add_argument("--size-mib", type=int, default=256, help="bytes per connection (MiB)")
    demo.add_argument("--connections", type=int, default=8, help="concurrent connections")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "demo":
        if args.size_mib < 0 or args.connections < 1:
            print("socketforward demo: --size-mib must be >= 0 and --connections >= 1",
                  file=sys.stderr)  # fmt: skip
            return 2
        return asyncio.run(demo.run(args.size_mib << 20, args.connections))
    return 2
