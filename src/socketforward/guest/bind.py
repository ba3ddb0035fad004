"""Bind's rules: validating a BindRequest, the table of bound sockets, and
creating listeners all-or-nothing (docs/protocol.md 4.3).

Errors are ttrpc statuses that name the entry: INVALID_ARGUMENT for a bad
request (nothing touched), ALREADY_EXISTS for a conflict or a path taken by
something that is not a stale socket (a regular file is never deleted),
PERMISSION_DENIED, else INTERNAL.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from socketforward import transport, ttrpc
from socketforward.api import socketforward_pb2 as pb

__all__ = ["BindTable", "Bound", "create_listeners", "validate"]


@dataclass
class Bound:
    """A listener in place for one forward."""

    forward_id: str
    path: str
    listener: transport.Listener


def _path_key(path: str) -> str:
    return os.path.normpath(path)


def _entry_error(code: ttrpc.Code, index: int, sock: pb.Socket, problem: str) -> ttrpc.TtrpcError:
    return ttrpc.TtrpcError(
        code,
        f"sockets[{index}] (forward_id={sock.forward_id!r} socket_path={sock.socket_path!r}): "
        f"{problem}",
    )


def validate(request: pb.BindRequest) -> None:
    """INVALID_ARGUMENT naming the first bad entry; nothing is touched before this passes."""
    ids: dict[str, int] = {}
    paths: dict[str, int] = {}
    for i, sock in enumerate(request.sockets):
        path = sock.socket_path
        problem = None
        if not sock.forward_id:
            problem = "forward_id is empty"
        elif (path_problem := transport.unix_path_problem(path)) is not None:
            problem = f"socket_path {path_problem}"
        elif path.endswith("/"):
            problem = "socket_path names a directory"
        elif sock.forward_id in ids:
            problem = f"forward_id repeats sockets[{ids[sock.forward_id]}]"
        elif _path_key(path) in paths:
            problem = f"socket_path repeats sockets[{paths[_path_key(path)]}]"
        if problem is not None:
            raise _entry_error(ttrpc.Code.INVALID_ARGUMENT, i, sock, problem)
        ids[sock.forward_id] = i
        paths[_path_key(path)] = i


class BindTable:
    """The sockets bound now, by forward_id and by path."""

    def __init__(self) -> None:
        self._by_id: dict[str, Bound] = {}
        self._by_path: dict[str, str] = {}  # normalised path -> forward_id

    def __iter__(self) -> Iterator[Bound]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    def paths(self) -> dict[str, str]:
        """forward_id -> socket path."""
        return {b.forward_id: b.path for b in self._by_id.values()}

    def is_bound(self, index: int, sock: pb.Socket) -> bool:
        """True for an identical entry (Bind is idempotent); ALREADY_EXISTS when
        the forward_id or the path is bound otherwise."""
        bound = self._by_id.get(sock.forward_id)
        if bound is not None and _path_key(bound.path) == _path_key(sock.socket_path):
            return True
        if bound is not None:
            problem = f"forward_id is already bound at {bound.path}"
            raise _entry_error(ttrpc.Code.ALREADY_EXISTS, index, sock, problem)
        owner = self._by_path.get(_path_key(sock.socket_path))
        if owner is not None:
            problem = f"socket_path is already bound by forward_id {owner}"
            raise _entry_error(ttrpc.Code.ALREADY_EXISTS, index, sock, problem)
        return False

    def add(self, bound: Bound) -> None:
        self._by_id[bound.forward_id] = bound
        self._by_path[_path_key(bound.path)] = bound.forward_id

    def pop(self, forward_id: str) -> Bound | None:
        bound = self._by_id.pop(forward_id, None)
        if bound is not None:
            self._by_path.pop(_path_key(bound.path), None)
        return bound


async def create_listeners(todo: Iterable[tuple[str, str]], mode: int) -> list[Bound]:
    """Listen at each ``(forward_id, path)``, creating missing parents; on any
    failure close what was made, remove the directories made, and raise."""
    created: list[Bound] = []
    made_dirs: list[str] = []
    try:
        for forward_id, path in todo:
            made_dirs += _make_parents(os.path.dirname(path))
            created.append(Bound(forward_id, path, await _listen(forward_id, path, mode)))
    except BaseException:
        for bound in created:
            bound.listener.close()
        for d in reversed(made_dirs):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    return created


async def _listen(forward_id: str, path: str, mode: int) -> transport.Listener:
    prefix = f"binding socket forward listener at {path} (forward_id={forward_id})"
    try:
        return await transport.listen(transport.UnixEndpoint(path), mode=mode)
    except (transport.NotASocketError, transport.EndpointInUseError) as exc:
        raise ttrpc.TtrpcError(ttrpc.Code.ALREADY_EXISTS, f"{prefix}: {exc}") from None
    except PermissionError as exc:
        raise ttrpc.TtrpcError(ttrpc.Code.PERMISSION_DENIED, f"{prefix}: {exc}") from None
    except OSError as exc:
        raise ttrpc.TtrpcError(ttrpc.Code.INTERNAL, f"{prefix}: {exc}") from None


def _make_parents(directory: str) -> list[str]:
    """Create missing parents 0755 (container users must reach the socket);
    returns the ones created, outermost first."""
    missing: list[str] = []
    d = directory
    while d and not os.path.isdir(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    created: list[str] = []
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
        except FileExistsError:
            if stat.S_ISDIR(os.stat(d).st_mode):
                continue
            raise
        os.chmod(d, 0o755)  # mkdir's mode is filtered by the umask
        created.append(d)
    return created
