"""The host's configuration file: ``socketforward host --config FILE``, one
TOML file per VM (README "Running it with a VM").

It holds the endpoints (``rpc_listen`` or ``rpc_dial``, ``streams``,
``control``), the per-VM budgets and timeouts under the names of their flags
(``max_relays``, ``max_pending``, ``dial_timeout``...), ``[[forward]]`` tables
(host -> VM) and ``[[expose]]`` tables (VM -> host).

Pure like :mod:`.forwards`: it reads and checks a file, with no sockets and no
event loop. Every error is a :class:`ConfigError` whose message starts with
``FILE:LINE:`` and names the key. The only thing looked up outside the file is
a user or group name (``owner``, ``group``, ``streams_uid``), on this host.
"""

from __future__ import annotations

import grp
import math
import pwd
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from socketforward import transport
from socketforward.host.forwards import EXPOSE_MODE, MAX_ID, Expose, Forward
from socketforward.host.pool import MAX_POOL_SIZE
from socketforward.logs import escape

__all__ = [
    "CONFIG",
    "SETTINGS",
    "Config",
    "ConfigError",
    "Plan",
    "entry_id",
    "listen_endpoint",
    "plan_source",
    "read_config",
]

CONFIG: Final = "--config"
"""The source of a forward or an expose the configuration file gives."""

SETTINGS: Final = (
    "rpc_listen",
    "rpc_dial",
    "streams",
    "streams_uid",
    "control",
    "dial_timeout",
    "stream_timeout",
    "stream_retry_for",
    "drain",
    "max_relays",
    "max_pending",
    "stream_pool",
)
"""The top-level keys that mirror a flag of ``socketforward host`` (``--max-relays``
is ``max_relays``). They cannot change while the host runs."""

_FORWARD_KEYS: Final = ("id", "host", "vm", "mode", "owner", "group")
_EXPOSE_KEYS: Final = ("id", "vm", "host", "mode", "owner", "group")
_REQUIRED: Final = ("id", "host", "vm")


class ConfigError(ValueError):
    """A configuration file that cannot be used: ``FILE:LINE: problem`` (the
    line when it is known), the problem naming the key."""

    def __init__(
        self, path: str, line: int | None, problem: str, key: str = "", column: int | None = None
    ) -> None:
        self.path = path
        self.line = line
        self.key = key
        where = f"{path}:{line}" if line else path
        if line and column:
            where += f":{column}"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Config:
    """One configuration file, checked. A setting the file leaves out is None
    (the flag's default applies)."""

    path: str
    rpc_listen: transport.Endpoint | None = None
    rpc_dial: transport.Endpoint | None = None
    streams: transport.Endpoint | None = None
    streams_uid: int | None = None
    control: transport.UnixEndpoint | None = None
    dial_timeout: float | None = None
    stream_timeout: float | None = None
    stream_retry_for: float | None = None
    drain: float | None = None
    max_relays: int | None = None
    max_pending: int | None = None
    stream_pool: int | None = None
    forwards: tuple[Forward, ...] = ()
    exposes: tuple[Expose, ...] = ()
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)
    """Where things are: a top-level key, ``forward ID`` or ``expose ID`` -> its line."""

    def setting(self, key: str) -> Any:
        """The value of the setting *key* (one of :data:`SETTINGS`), None when unset."""
        if key not in SETTINGS:
            raise KeyError(key)
        return getattr(self, key)

    def at(self, name: str) -> str:
        """``FILE:LINE`` of *name* (a top-level key, ``forward ID``, ``expose ID``);
        ``FILE`` when the file does not have it."""
        line = self.lines.get(name)
        return f"{self.path}:{line}" if line else self.path

    def error(self, name: str, problem: str, key: str = "") -> ConfigError:
        """A :class:`ConfigError` at the line of *name*."""
        return ConfigError(self.path, self.lines.get(name), problem, key or name)


def read_config(path: str) -> Config:
    """Read and check the configuration file at *path*; :class:`ConfigError`
    says what is wrong and where."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as exc:
        raise ConfigError(path, None, exc.strerror or str(exc)) from None
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise ConfigError(path, line, f"not UTF-8 ({exc.reason})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(path, text, exc) from None
    return _Reader(path, _scan(text)).config(data)


_AT: Final = re.compile(r"^(?P<what>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$")
_NUMERIC_MODE: Final = re.compile(r"""^\s*["']?mode["']?\s*=\s*0[0-9]""")


def _syntax_error(path: str, text: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    # tomllib puts the position in its message ("... (at line 3, column 9)";
    # attributes come only with Python 3.14): make it FILE:LINE:COLUMN.
    match = _AT.match(str(exc))
    if match is None:
        return ConfigError(path, None, f"not TOML: {exc}")
    line = int(match["line"])
    problem = f"not TOML: {match['what']}"
    lines = text.split("\n")
    if line <= len(lines) and _NUMERIC_MODE.match(lines[line - 1]):
        # `mode = 0660` is not a TOML number (no leading zeros): say what is meant.
        problem += '; a mode is an octal string in quotes, such as mode = "0660"'
    return ConfigError(path, line, problem, column=int(match["col"]))


# -- where things are in the file ------------------------------------------------------
#
# tomllib gives no positions for what it parsed, so a line-based scan of the
# text finds them: it counts the `[[forward]]` and `[[expose]]` headers (the
# Nth header is the Nth table tomllib returns, as TOML keeps their order) and
# notes the first line of each key, at the top level and in each table. It runs
# only on text tomllib accepted, and skips the inside of multi-line strings
# (a line there may look like a header). A key it cannot place (a table
# written inline, `forward = [{...}]`) gets the line of the nearest thing it
# can place: its table, else the top-level key; the message names the key
# anyway.

_ARRAY_HEADER: Final = re.compile(r"""\[\[\s*["']?([A-Za-z0-9_-]+)["']?\s*\]\]""")
_TABLE_HEADER: Final = re.compile(r"""\[\s*["']?([A-Za-z0-9_-]+)""")
_KEY: Final = re.compile(r"""("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*[=.]""")


@dataclass
class _Table:
    line: int
    keys: dict[str, int] = field(default_factory=dict)


@dataclass
class _Positions:
    top: dict[str, int] = field(default_factory=dict)
    tables: dict[str, list[_Table]] = field(default_factory=dict)

    def of(self, section: str, index: int | None = None, key: str | None = None) -> int | None:
        """The line of top-level *section*, of its table *index*, or of *key* in it."""
        tables = self.tables.get(section, [])
        if index is not None and index < len(tables):
            table = tables[index]
            return table.keys.get(key, table.line) if key else table.line
        return self.top.get(section)


def _scan(text: str) -> _Positions:
    positions = _Positions()
    keys = positions.top
    open_string = ""  # the delimiter of the multi-line string being skipped
    for number, line in enumerate(text.split("\n"), 1):
        if open_string:
            if line.count(open_string) % 2:
                open_string = ""
            continue
        stripped = line.strip()
        if match := _ARRAY_HEADER.match(stripped):
            table = _Table(number)
            positions.tables.setdefault(match[1], []).append(table)
            positions.top.setdefault(match[1], number)
            keys = table.keys
        elif match := _TABLE_HEADER.match(stripped):
            positions.top.setdefault(match[1], number)
            keys = {}  # a table of no interest: its keys are not ours to place
        elif match := _KEY.match(stripped):
            keys.setdefault(match[1].strip("\"'"), number)
        for delimiter in ('"""', "'''"):
            if line.count(delimiter) % 2:
                open_string = delimiter
                break
    return positions


# -- checking what tomllib read ----------------------------------------------------------


def _kind(value: object) -> str:
    """What a TOML value is, for a message."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {_quote(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Reader:
    """Checks the parsed document; each error at the line of what it names."""

    def __init__(self, path: str, positions: _Positions) -> None:
        self.path = path
        self.positions = positions
        self.lines: dict[str, int] = {}

    def fail(self, line: int | None, problem: str, key: str = "") -> ConfigError:
        return ConfigError(self.path, line, problem, key)

    def config(self, data: Mapping[str, Any]) -> Config:
        known = (*SETTINGS, "forward", "expose")
        for key in data:
            if key not in known:
                raise self.fail(
                    self.positions.of(key),
                    f"unknown key {_quote(key)} (known: {', '.join(known)})",
                    key,
                )
        for key in (*SETTINGS, "forward", "expose"):
            line = self.positions.of(key)
            if key in data and line is not None:
                self.lines[key] = line
        values = {key: self.setting(key, data[key]) for key in SETTINGS if key in data}
        if "rpc_listen" in values and "rpc_dial" in values:
            line = max(self.lines.get("rpc_listen", 0), self.lines.get("rpc_dial", 0))
            raise self.fail(line or None, "give rpc_listen or rpc_dial, not both", "rpc_dial")
        forwards = self.entries("forward", data.get("forward", []))
        exposes = self.entries("expose", data.get("expose", []))
        return Config(
            self.path,
            **values,
            forwards=tuple(f for f in forwards if isinstance(f, Forward)),
            exposes=tuple(e for e in exposes if isinstance(e, Expose)),
            lines=dict(self.lines),
        )

    # -- settings --------------------------------------------------------------

    def setting(self, key: str, value: object) -> Any:
        line = self.positions.of(key)
        try:
            return _SETTING_CHECKS[key](value)
        except ValueError as exc:
            raise self.fail(line, f"{key} {exc}", key) from None

    # -- [[forward]] and [[expose]] ----------------------------------------------

    def entries(self, section: str, tables: object) -> list[Forward | Expose]:
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise self.fail(
                self.positions.of(section),
                f"{section} must be written as [[{section}]] tables, not {_kind(tables)}",
                section,
            )
        seen: dict[str, int | None] = {}
        entries: list[Forward | Expose] = []
        for index, table in enumerate(tables):
            entry = self.entry(section, index, table)
            ident = table["id"]
            line = self.positions.of(section, index, "id")
            if ident in seen:
                first = seen[ident]
                also = f" (first at line {first})" if first else ""
                raise self.fail(
                    line,
                    f"{self.label(section, index, table)}: {section} ID {ident} is given "
                    f"twice{also}",
                    "id",
                )
            seen[ident] = line
            header = self.positions.of(section, index)
            if header is not None:
                self.lines[f"{section} {ident}"] = header
            entries.append(entry)
        return entries

    def label(self, section: str, index: int, table: Mapping[str, object]) -> str:
        ident = table.get("id")
        name = f" (id {escape(ident)})" if isinstance(ident, str) and ident else ""
        return f"[[{section}]] #{index + 1}{name}"

    def entry(self, section: str, index: int, table: Mapping[str, Any]) -> Forward | Expose:
        allowed = _FORWARD_KEYS if section == "forward" else _EXPOSE_KEYS
        label = self.label(section, index, table)

        def fail(key: str, problem: str) -> ConfigError:
            line = self.positions.of(section, index, key)
            return self.fail(line, f"{label}: {problem}", key)

        for key in table:
            if key not in allowed:
                raise fail(key, f"unknown key {_quote(key)} (known: {', '.join(allowed)})")
        for key in _REQUIRED:
            if key not in table:
                raise fail("", f'missing key "{key}"')
        for key in ("id", "host", "vm"):
            if not isinstance(table[key], str):
                raise fail(key, f"{key} must be a string, not {_kind(table[key])}")
        for key in ("host", "vm"):
            problem = transport.unix_path_problem(table[key])
            if problem is not None:
                raise fail(key, f"{key} {_quote(table[key])} {problem}")
        checked: dict[str, int | None] = {}
        for key, check in (("mode", _mode), ("owner", _user), ("group", _group)):
            if key in table:
                try:
                    checked[key] = check(table[key])
                except ValueError as exc:
                    raise fail(key, f"{key} {exc}") from None
        try:
            if section == "forward":
                return Forward(
                    table["id"],
                    table["host"],
                    table["vm"],
                    mode=checked.get("mode"),
                    uid=checked.get("owner"),
                    gid=checked.get("group"),
                )
            mode = checked.get("mode")
            return Expose(
                table["id"],
                table["vm"],
                table["host"],
                mode=EXPOSE_MODE if mode is None else mode,
                uid=checked.get("owner"),
                gid=checked.get("group"),
            )
        except ValueError as exc:
            # Paths, mode and owner were checked above: what is left is the id.
            raise fail("id", f"id: {exc}") from None


# -- one check per value -----------------------------------------------------------------


def _endpoint(value: object) -> transport.Endpoint:
    if not isinstance(value, str):
        raise ValueError(f"must be an endpoint URI string, not {_kind(value)}")
    try:
        return transport.parse_endpoint(value)
    except transport.EndpointError as exc:
        raise ValueError(f"{_quote(value)}: {exc}") from None


def listen_endpoint(text: str) -> transport.Endpoint:
    """An endpoint the host can listen on for the guest's RPC dial
    (``--rpc-listen``, ``rpc_listen``); ValueError says why not."""
    ep = _endpoint(text)
    if isinstance(ep, transport.HvsockEndpoint):
        raise ValueError(
            f"cannot listen on {text!r}: guest dials to hybrid vsock port {ep.port} arrive "
            f"on unix:{ep.path}_{ep.port}; listen there"
        )
    return ep


def _listen(value: object) -> transport.Endpoint:
    if not isinstance(value, str):
        return _endpoint(value)  # raises, naming the type
    return listen_endpoint(value)


def _control(value: object) -> transport.UnixEndpoint:
    ep = _endpoint(value)
    if not isinstance(ep, transport.UnixEndpoint):
        raise ValueError(f"{_quote(str(value))}: the control endpoint must be unix:PATH")
    return ep


def _seconds(*, zero: bool) -> Callable[[object], float]:
    what = "0 or more" if zero else "more than 0"

    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number of seconds ({what}), not {_kind(value)}")
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise ValueError(f"must be a number of seconds ({what}), not {value}")
        return float(value)

    return check


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a whole number (1 or more), not {_kind(value)}")
    if value < 1:
        raise ValueError(f"must be a whole number (1 or more), not {value}")
    return value


def _pool_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_POOL_SIZE:
        shown = value if isinstance(value, int) and not isinstance(value, bool) else _kind(value)
        raise ValueError(f"must be a whole number from 0 to {MAX_POOL_SIZE}, not {shown}")
    return value


def _id_number(value: object, *, lookup: Callable[[str], int], what: str) -> int:
    """A uid or gid: a number, a string of digits, or a name looked up on this host."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be a number or a {what} name, not {_kind(value)}")
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int):
        if not 0 <= value <= MAX_ID:
            raise ValueError(f"{value} is out of range 0..{MAX_ID}")
        return value
    if not value:
        raise ValueError(f"must be a number or a {what} name, not an empty string")
    try:
        return lookup(value)
    except (KeyError, ValueError):
        raise ValueError(
            f"{_quote(value)}: no such {what} on this host (names are looked up here; "
            "give the number instead)"
        ) from None


def _user(value: object) -> int:
    return _id_number(value, lookup=lambda name: pwd.getpwnam(name).pw_uid, what="user")


def _group(value: object) -> int:
    return _id_number(value, lookup=lambda name: grp.getgrnam(name).gr_gid, what="group")


_OCTAL: Final = re.compile(r"[0-7]{1,5}")


def _mode(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, str):
        got = f"the number {value}" if isinstance(value, int) else _kind(value)
        raise ValueError(
            f'must be an octal string in quotes, such as mode = "0660", not {got} '
            "(a TOML number is decimal)"
        )
    if not _OCTAL.fullmatch(value) or int(value, 8) > 0o7777:
        raise ValueError(f'{_quote(value)} is not an octal file mode (0 to 7777), such as "0660"')
    return int(value, 8)


_SETTING_CHECKS: Final[Mapping[str, Callable[[object], Any]]] = {
    "rpc_listen": _listen,
    "rpc_dial": _endpoint,
    "streams": _endpoint,
    "streams_uid": _user,
    "control": _control,
    "dial_timeout": _seconds(zero=False),
    "stream_timeout": _seconds(zero=False),
    "stream_retry_for": _seconds(zero=False),
    "drain": _seconds(zero=True),
    "max_relays": _count,
    "max_pending": _count,
    "stream_pool": _pool_size,
}


# -- what re-reading a source changes ---------------------------------------------------

E = TypeVar("E", Forward, Expose)


@dataclass(frozen=True)
class Plan(Generic[E]):
    """What re-reading one source (``--config``, ``--forwards-file``) changes in
    a table (the forwards, or the exposes)."""

    remove: list[str] = field(default_factory=list)
    """ids the source put there that it no longer has, or has changed (removed, then added)."""
    add: list[E] = field(default_factory=list)
    """Entries the table does not have, or has otherwise (changed ones)."""
    adopt: list[str] = field(default_factory=list)
    """Identical entries the source takes over (added through the control endpoint)."""
    hand_over: dict[str, str] = field(default_factory=dict)
    """id -> the other source that keeps an entry this one no longer has."""
    clashes: dict[str, str] = field(default_factory=dict)
    """id -> the source that has it otherwise: the source cannot be applied."""


def plan_source(
    source: str,
    table: Mapping[str, E],
    owners: Mapping[str, str],
    fresh: Iterable[E],
    *,
    wanted_elsewhere: Mapping[str, Mapping[str, E]] | None = None,
    strict: Set[str] = frozenset(),
    adoptable: Set[str] = frozenset(),
) -> Plan[E]:
    """The difference between *table* (*owners*: the source of each entry) and
    what *source* now has (*fresh*).

    An entry of *fresh* that another source has otherwise is a clash; with the
    very same entry it is fine (the other keeps it), unless the other is in
    *strict*. Entries of an *adoptable* source that *fresh* has identically
    become *source*'s. *wanted_elsewhere*: what the other re-read sources have
    (source -> id -> entry); one of them keeps an entry *source* drops."""
    elsewhere = wanted_elsewhere or {}
    wanted: dict[str, E] = {entry_id(e): e for e in fresh}
    clashes: dict[str, str] = {}
    adopt: list[str] = []
    for ident, entry in wanted.items():
        have, owner = table.get(ident), owners.get(ident, "")
        if have is not None and owner != source:
            if have != entry or owner in strict:
                clashes[ident] = owner
            elif owner in adoptable:
                adopt.append(ident)
        for other, theirs in elsewhere.items():
            if other != source and ident in theirs and theirs[ident] != entry:
                clashes.setdefault(ident, other)
    hand_over: dict[str, str] = {}
    remove: list[str] = []
    for ident, owner in owners.items():
        if owner != source or table.get(ident) == wanted.get(ident):
            continue
        keeper = next(
            (o for o, theirs in elsewhere.items() if o != source and ident in theirs), None
        )
        if keeper is not None and ident not in wanted:
            hand_over[ident] = keeper
        else:
            remove.append(ident)
    add = [e for ident, e in wanted.items() if table.get(ident) != e and ident not in clashes]
    return Plan(sorted(remove), add, sorted(adopt), hand_over, clashes)


def entry_id(entry: Forward | Expose) -> str:
    """The forward_id or expose_id."""
    return entry.forward_id if isinstance(entry, Forward) else entry.expose_id
