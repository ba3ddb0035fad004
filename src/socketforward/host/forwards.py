"""The forward table: what a forward is, where forwards come from, and what a
re-read forwards file changes.

Everything here is pure: no sockets, no event loop. The table maps a
forward_id to a host socket path and a VM socket path; it comes from host
configuration only (``--forward``, ``--forwards-file``, OCI ``uds`` mounts),
and the VM names a forward by its id and nothing else (docs/protocol.md
9.1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Final

from socketforward.protocol import MAX_FORWARD_ID_LEN
from socketforward.transport import unix_path_problem

__all__ = [
    "Expose",
    "Forward",
    "ForwardsClash",
    "Reload",
    "Source",
    "merge_sources",
    "parse_expose",
    "parse_forward",
    "plan_reload",
    "read_forwards_file",
]


def _check_socket_path(what: str, path: str) -> None:
    problem = unix_path_problem(path)
    if problem is not None:
        raise ValueError(f"{what} {path!r} {problem}")


MAX_ID: Final = 0xFFFF_FFFE
"""The largest uid or gid (2**32 - 1 means "none" to chown)."""


def _check_id(what: str, ident: str) -> None:
    if not ident:
        raise ValueError(f"{what} must not be empty")
    if len(ident) > MAX_FORWARD_ID_LEN:
        raise ValueError(f"{what} is longer than {MAX_FORWARD_ID_LEN} characters")
    # The Accept metadata lists forward_ids comma-separated.
    if not ident.isprintable() or any(c in ident for c in ", =") or not ident.isascii():
        raise ValueError(
            f"{what} {ident!r} may hold printable ASCII only, without ',', '=' or spaces"
        )


def _check_owner(mode: int | None, uid: int | None, gid: int | None) -> None:
    if mode is not None and not 0 <= mode <= 0o7777:
        raise ValueError(f"mode {mode:o} is not a file mode (0 to 7777, octal)")
    for what, value in (("uid", uid), ("gid", gid)):
        if value is not None and not 0 <= value <= MAX_ID:
            raise ValueError(f"{what} {value} is out of range 0..{MAX_ID}")


@dataclass(frozen=True)
class Forward:
    """One forward: the VM listens at *vm_path*; connections reach *host_path*.

    *mode*, *uid*, *gid*: the VM socket's file mode and owner; None leaves
    each to the guest's default (docs/protocol.md 4.3)."""

    forward_id: str
    host_path: str
    vm_path: str
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None

    def __post_init__(self) -> None:
        _check_id("forward ID", self.forward_id)
        _check_socket_path("host path", self.host_path)
        _check_socket_path("VM path", self.vm_path)
        _check_owner(self.mode, self.uid, self.gid)


EXPOSE_MODE: Final = 0o600
"""The mode of an exposed socket on the host unless configured."""


@dataclass(frozen=True)
class Expose:
    """One expose (VM -> host): the host listens at *host_path*; connections
    reach the VM socket *vm_path*. *mode*, *uid*, *gid*: the host socket's file
    mode and owner (None: this process's user and group)."""

    expose_id: str
    vm_path: str
    host_path: str
    mode: int = EXPOSE_MODE
    uid: int | None = None
    gid: int | None = None

    def __post_init__(self) -> None:
        _check_id("expose ID", self.expose_id)
        _check_socket_path("VM path", self.vm_path)
        _check_socket_path("host path", self.host_path)
        _check_owner(self.mode, self.uid, self.gid)


def parse_forward(text: str) -> Forward:
    """``FORWARD_ID=HOST_PATH:VM_PATH``; the paths split at the last ``:/``."""
    fid, sep, paths = text.partition("=")
    cut = paths.rfind(":/")
    if not sep or cut < 0:
        raise ValueError(f"{text!r} is not FORWARD_ID=HOST_PATH:VM_PATH (both paths absolute)")
    try:
        return Forward(fid, paths[:cut], paths[cut + 1 :])
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


def parse_expose(text: str) -> Expose:
    """``EXPOSE_ID=VM_PATH:HOST_PATH`` (the mirror of ``--forward``); the paths
    split at the last ``:/``."""
    eid, sep, paths = text.partition("=")
    cut = paths.rfind(":/")
    if not sep or cut < 0:
        raise ValueError(f"{text!r} is not EXPOSE_ID=VM_PATH:HOST_PATH (both paths absolute)")
    try:
        return Expose(eid, paths[:cut], paths[cut + 1 :])
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


def read_forwards_file(path: str) -> list[Forward]:
    """Forwards from a file: one ``FORWARD_ID=HOST_PATH:VM_PATH`` per line, blank
    lines and ``#`` comments skipped. A ValueError names the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    forwards: dict[str, Forward] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            forward = parse_forward(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
        if forward.forward_id in forwards:
            raise ValueError(f"{path}:{number}: forward ID {forward.forward_id} is given twice")
        forwards[forward.forward_id] = forward
    return list(forwards.values())


# -- the command line's sources ---------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """The forwards one command-line option gave (*detail*: the file it named)."""

    option: str
    forwards: Sequence[Forward]
    detail: str = ""

    @property
    def label(self) -> str:
        return f"{self.option} {self.detail}" if self.detail else self.option


def merge_sources(sources: Sequence[Source]) -> list[Forward]:
    """One table from every source, in order. A forward_id given twice, in one
    source or in two, is a ValueError naming the option (and the earlier ones)."""
    merged: dict[str, Forward] = {}
    for index, source in enumerate(sources):
        earlier = " or ".join(s.option for s in sources[:index])
        own: set[str] = set()
        for forward in source.forwards:
            fid = forward.forward_id
            if fid in own:
                raise ValueError(f"{source.label}: forward ID {fid} is given twice")
            if fid in merged:
                raise ValueError(f"{source.label}: forward ID {fid} is also given with {earlier}")
            own.add(fid)
            merged[fid] = forward
    return list(merged.values())


# -- re-reading a forwards file -----------------------------------------------------------


class ForwardsClash(ValueError):
    """A re-read forwards file names forward_ids that other options own."""


@dataclass(frozen=True)
class Reload:
    """What re-reading a forwards file changes in the table."""

    remove: list[str]
    """forward_ids the file put there that it no longer has (or has with other paths)."""
    add: list[Forward]
    """Forwards the file has that the table does not (or has with other paths)."""


def plan_reload(
    table: Mapping[str, Forward],
    file_ids: Set[str],
    fixed: Set[str],
    fresh: Iterable[Forward],
) -> Reload:
    """The difference between the table (*file_ids*: the entries the file put
    there; *fixed*: those other options gave) and the file's *fresh* contents.
    A fresh entry under a fixed forward_id raises :class:`ForwardsClash`: the
    file may never replace what the command line gave."""
    wanted = {f.forward_id: f for f in fresh}
    clash = sorted(set(wanted) & fixed)
    if clash:
        raise ForwardsClash(f"forward IDs also given on the command line: {','.join(clash)}")
    remove = sorted(fid for fid in file_ids if table.get(fid) != wanted.get(fid))
    add = [f for fid, f in wanted.items() if table.get(fid) != f]
    return Reload(remove, add)
