"""Command line: one subcommand per module, registered lazily.

Each subcommand's module offers ``add_parser(subparsers)`` (which sets
``run``, a function taking the parsed arguments and returning the exit
status). :mod:`socketforward.control` adds two, ``status`` and ``forward``,
the client side of the programs' control endpoint; ``forward add`` reads
forwards as ``host --forward`` does.

Only the module of the subcommand on the command line is imported: the guest
agent in a small VM starts without loading the host, the demo or their
imports. :data:`COMMANDS` lists each subcommand with the one line
``socketforward --help`` shows for it, so that listing needs none of them;
argparse picks the subcommand, and at that moment :class:`_LazySubcommands`
imports its module and lets its ``add_parser`` register it for real, so
``socketforward guest --help`` and the parsing of its options are the
module's own.

The logging options (``--log-level``, ``-v``, ``-q``, ``--log-format``) are
taken before the subcommand and after it alike; when several are given, the
last one on the command line wins.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from socketforward import __version__

if TYPE_CHECKING:
    from socketforward.control import ExposeEntry, ForwardEntry

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:  # generic only to type checkers
    Subparsers = argparse._SubParsersAction


def _register_demo(sub: Subparsers) -> None:
    from socketforward import demo  # noqa: PLC0415 - lazy: see the module's docstring

    demo.add_parser(sub)


def _register_guest(sub: Subparsers) -> None:
    from socketforward.guest import cli  # noqa: PLC0415 - lazy

    cli.add_parser(sub)


def _register_host(sub: Subparsers) -> None:
    from socketforward.host import cli  # noqa: PLC0415 - lazy

    cli.add_parser(sub)


def _parse_forward(text: str) -> ForwardEntry:
    """``host --forward``'s syntax, imported when ``forward add`` reads one (not
    for ``status``, which needs nothing of the host)."""
    from socketforward.host.forwards import parse_forward  # noqa: PLC0415 - lazy

    return parse_forward(text)


def _parse_expose(text: str) -> ExposeEntry:
    """``host --expose``'s syntax, imported when ``expose add`` reads one."""
    from socketforward.host.forwards import parse_expose  # noqa: PLC0415 - lazy

    return parse_expose(text)


def _register_control(sub: Subparsers) -> None:
    from socketforward import control  # noqa: PLC0415 - lazy

    control.add_parser(sub, parse_forward=_parse_forward, parse_expose=_parse_expose)


class Command(NamedTuple):  # not a dataclass: that imports inspect, 5 ms of every start
    summary: str
    """What ``socketforward --help`` lists; the same as the ``help`` its
    ``add_parser`` gives (a test compares them)."""
    register: Callable[[Subparsers], None]
    """Imports the module and registers the subcommand (and any other that
    shares the function: ``status`` and ``forward``)."""


COMMANDS = {
    "demo": Command(
        "forward a real host HTTP service into a pretend VM, on this machine", _register_demo
    ),
    "guest": Command("run the VM-side agent (SocketForward service)", _register_guest),
    "host": Command(
        "the host side: serve forwards to host UNIX sockets for one VM", _register_host
    ),
    "status": Command("show what a running host or guest is doing", _register_control),
    "forward": Command("add or remove forwards of a running host", _register_control),
    "expose": Command(
        "add or remove exposes (VM sockets on the host) of a running host", _register_control
    ),
}


class _LazySubcommands(Subparsers):
    """The subcommands as placeholders (a name and a summary) until argparse
    reaches the one on the command line; that one is then registered by its
    module, with ``--version`` and the logging options added to each parser
    that ends a command line (they work after the subcommand too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name, command in COMMANDS.items():
            self.add_parser(name, help=command.summary, add_help=False)
        self._loaded: set[str] = set()

    def load(self, name: str) -> None:
        """Register *name* for real (and what shares its module), once."""
        command = COMMANDS.get(name)
        if command is None or name in self._loaded:
            return
        names = [n for n, c in COMMANDS.items() if c.register is command.register]
        # The placeholders make way: argparse refuses a name registered twice.
        for n in names:
            del self._name_parser_map[n]
        self._choices_actions[:] = [a for a in self._choices_actions if a.dest not in names]
        command.register(self)
        self._loaded.update(names)
        # Usage lines and listings keep the table's order (the map is also
        # argparse's `choices`, so it is reordered in place).
        order = list(COMMANDS)
        self._choices_actions.sort(key=lambda a: order.index(a.dest))
        parsers = sorted(self._name_parser_map.items(), key=lambda item: order.index(item[0]))
        self._name_parser_map.clear()
        self._name_parser_map.update(parsers)
        for n in names:
            for parser in _leaf_parsers(self._name_parser_map[n]):
                parser.add_argument(
                    "--version", action="version", version=f"socketforward {__version__}"
                )
                _logging_options(parser, defaults=False)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        # argparse has checked the name against the choices; values[0] is it.
        assert values is not None and not isinstance(values, str)
        self.load(values[0])
        super().__call__(parser, namespace, values, option_string)


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


def _parser(*, eager: bool = False) -> argparse.ArgumentParser:
    """The command line. *eager* registers every subcommand up front instead of
    on demand: what ``--help`` lists can then be compared with what each
    module says of its subcommand."""
    parser = argparse.ArgumentParser(
        prog="socketforward",
        description="Forward UNIX domain sockets into virtual machines over vsock.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _logging_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, action=_LazySubcommands)
    if eager:
        assert isinstance(sub, _LazySubcommands)
        for name in COMMANDS:
            sub.load(name)
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers under *parser* that end a command line (``forward add``, not
    ``forward``); *parser* itself when it has no subcommands."""
    nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not nested:
        return [parser]
    return [leaf for n in nested for p in n.choices.values() for leaf in _leaf_parsers(p)]


def setup_logging(level: str, log_format: str) -> None:
    """Log to stderr at *level* ("debug" .. "error") in *log_format* ("text" or "json")."""
    # The format uses none of these; skipping them makes each record cheaper
    # (a line per forwarded connection adds up): the logging docs' own advice.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup per record
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        from socketforward.daemon import JsonFormatter  # noqa: PLC0415 - asyncio & co: lazy

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=LEVELS[level], handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    status: int = args.run(args)
    return status
