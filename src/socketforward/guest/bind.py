"""Bind's rules: validating a BindRequest, the table of bound sockets and of
the directories Bind created, and creating listeners all-or-nothing
(docs/protocol.md 4.3, 4.4).

Every failure is a :class:`BindError` naming the entry (index, forward_id,
socket_path) with a status chosen by type or errno, never by message text
(:func:`code_for`): INVALID_ARGUMENT for a bad request (nothing touched),
ALREADY_EXISTS for a conflict or a path taken by something that is not a
stale socket (a regular file is never deleted), FAILED_PRECONDITION when the
VM's filesystem is not in a state that allows it (a parent that is not a
directory...), PERMISSION_DENIED, RESOURCE_EXHAUSTED (EMFILE, ENOSPC...).
An OSError is never INTERNAL.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from socketforward import transport, ttrpc
from socketforward.api import socketforward_pb2 as pb
from socketforward.logs import escape

__all__ = [
    "BindError",
    "BindTable",
    "Bound",
    "CreatedDir",
    "code_for",
    "create_listeners",
    "remove_dirs",
    "validate",
]

log = logging.getLogger("socketforward.guest")

_Code = ttrpc.Code

# errno -> status of a Bind entry that failed with it (docs/protocol.md 4.3).
# INVALID_ARGUMENT: wrong whatever the VM's state; FAILED_PRECONDITION: the
# VM's filesystem does not allow it now (also for errnos not listed here).
_CODE_BY_ERRNO: dict[int, _Code] = {
    errno.EACCES: _Code.PERMISSION_DENIED,
    errno.EPERM: _Code.PERMISSION_DENIED,
    errno.EEXIST: _Code.ALREADY_EXISTS,
    errno.EADDRINUSE: _Code.ALREADY_EXISTS,
    errno.ENAMETOOLONG: _Code.INVALID_ARGUMENT,
    errno.ENOTDIR: _Code.FAILED_PRECONDITION,
    errno.ELOOP: _Code.FAILED_PRECONDITION,
    errno.ENOENT: _Code.FAILED_PRECONDITION,
    errno.EROFS: _Code.FAILED_PRECONDITION,
    errno.EMFILE: _Code.RESOURCE_EXHAUSTED,
    errno.ENFILE: _Code.RESOURCE_EXHAUSTED,
    errno.ENOBUFS: _Code.RESOURCE_EXHAUSTED,
    errno.ENOMEM: _Code.RESOURCE_EXHAUSTED,
    errno.ENOSPC: _Code.RESOURCE_EXHAUSTED,
    errno.EDQUOT: _Code.RESOURCE_EXHAUSTED,
}


def code_for(exc: OSError) -> ttrpc.Code:
    """The status of a Bind entry that failed with *exc*, by its errno."""
    if exc.errno is None:
        return _Code.FAILED_PRECONDITION
    return _CODE_BY_ERRNO.get(exc.errno, _Code.FAILED_PRECONDITION)


class BindError(ttrpc.TtrpcError):
    """A Bind entry that failed; the message names it, the attributes are for
    the guest's log line."""

    def __init__(self, code: ttrpc.Code, index: int, sock: pb.Socket, problem: str) -> None:
        self.index = index
        self.forward_id = sock.forward_id
        self.socket_path = sock.socket_path
        super().__init__(
            code,
            f"sockets[{index}] (forward_id={sock.forward_id!r} "
            f"socket_path={sock.socket_path!r}): {problem}",
        )


class ParentNotADirectoryError(NotADirectoryError):
    """Something that is not a directory is where a parent directory must be."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(errno.ENOTDIR, f"parent {path} is not a directory: it is {kind}", path)

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True)
class CreatedDir:
    """A directory Bind created: its normalised path and its (st_dev, st_ino),
    so that only that very directory is ever removed."""

    path: str
    inode: tuple[int, int]


@dataclass
class Bound:
    """A listener in place for one forward, with the directories Bind created
    for it (outermost first)."""

    forward_id: str
    path: str
    listener: transport.Listener
    created_dirs: tuple[CreatedDir, ...] = ()


@dataclass
class _DirUse:
    dir: CreatedDir
    users: set[str] = field(default_factory=set)  # forward_ids under it


def _path_key(path: str) -> str:
    return os.path.normpath(path)


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
            raise BindError(_Code.INVALID_ARGUMENT, i, sock, problem)
        ids[sock.forward_id] = i
        paths[_path_key(path)] = i


class BindTable:
    """The sockets bound now, by forward_id and by path, and the directories
    Bind created with the forwards under each: a directory goes when the last
    forward under it goes."""

    def __init__(self) -> None:
        self._by_id: dict[str, Bound] = {}
        self._by_path: dict[str, str] = {}  # normalised path -> forward_id
        self._dirs: dict[str, _DirUse] = {}  # normalised path -> users
        self._dirs_of: dict[str, list[str]] = {}  # forward_id -> its keys in _dirs

    def __iter__(self) -> Iterator[Bound]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    def paths(self) -> dict[str, str]:
        """forward_id -> socket path."""
        return {b.forward_id: b.path for b in self._by_id.values()}

    def created_dirs(self) -> list[str]:
        """The directories Bind created that are still in use, sorted."""
        return sorted(self._dirs)

    def is_bound(self, index: int, sock: pb.Socket) -> bool:
        """True for an identical entry (Bind is idempotent); ALREADY_EXISTS when
        the forward_id or the path is bound otherwise."""
        bound = self._by_id.get(sock.forward_id)
        if bound is not None and _path_key(bound.path) == _path_key(sock.socket_path):
            return True
        if bound is not None:
            problem = f"forward_id is already bound at {bound.path}"
            raise BindError(_Code.ALREADY_EXISTS, index, sock, problem)
        owner = self._by_path.get(_path_key(sock.socket_path))
        if owner is not None:
            problem = f"socket_path is already bound by forward_id {owner}"
            raise BindError(_Code.ALREADY_EXISTS, index, sock, problem)
        return False

    def add(self, bound: Bound) -> None:
        self._by_id[bound.forward_id] = bound
        self._by_path[_path_key(bound.path)] = bound.forward_id
        for made in bound.created_dirs:
            use = self._dirs.setdefault(made.path, _DirUse(made))
            use.dir = made  # one removed behind our back and made again: this one
        # Its own directories, and those an earlier Bind created above its path.
        keys = {made.path for made in bound.created_dirs}
        d = os.path.dirname(_path_key(bound.path))
        while True:
            if d in self._dirs:
                keys.add(d)
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent
        for key in keys:
            self._dirs[key].users.add(bound.forward_id)
        self._dirs_of[bound.forward_id] = sorted(keys)

    def remove(self, forward_id: str) -> Bound | None:
        """Unbind *forward_id*: close its listener (which removes its socket
        file), then remove the directories Bind created that no bound forward
        is under any more, if empty. None when it is not bound."""
        bound = self._by_id.pop(forward_id, None)
        if bound is None:
            return None
        self._by_path.pop(_path_key(bound.path), None)
        bound.listener.close()
        released: list[CreatedDir] = []
        for key in self._dirs_of.pop(forward_id, []):
            use = self._dirs[key]
            use.users.discard(forward_id)
            if not use.users:
                del self._dirs[key]
                released.append(use.dir)
        remove_dirs(released, f"forward_id={escape(forward_id)}")
        return bound


def remove_dirs(dirs: Iterable[CreatedDir], ids: str) -> None:
    """Remove each directory innermost first, only if it is still the one
    created and is empty; a directory that cannot go is kept and logged."""
    for made in sorted(dirs, key=lambda d: len(d.path), reverse=True):
        try:
            st = os.lstat(made.path)
            if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) != made.inode:
                log.info("directory replaced, kept %s directory=%s", ids, escape(made.path))
                continue
            os.rmdir(made.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                log.info("directory not empty, kept %s directory=%s", ids, escape(made.path))
            else:
                log.warning(
                    "directory not removed %s directory=%s error=%r", ids, escape(made.path), exc
                )
            continue
        log.debug("directory removed %s directory=%s", ids, escape(made.path))


async def create_listeners(todo: Iterable[tuple[int, pb.Socket]], mode: int) -> list[Bound]:
    """Listen at each ``(index, entry)``, creating missing parents; on any
    failure close what was made, remove the directories made, and raise
    (a :class:`BindError` for an OSError)."""
    created: list[Bound] = []
    made_dirs: list[CreatedDir] = []
    try:
        for index, sock in todo:
            first = len(made_dirs)
            try:
                _make_parents(os.path.dirname(sock.socket_path), made_dirs)
            except ParentNotADirectoryError as exc:
                raise BindError(code_for(exc), index, sock, str(exc)) from None
            except OSError as exc:
                what = f"creating directory {exc.filename or os.path.dirname(sock.socket_path)}"
                raise BindError(code_for(exc), index, sock, _problem(what, exc)) from None
            try:
                listener = await transport.listen(
                    transport.UnixEndpoint(sock.socket_path), mode=mode
                )
            except (transport.NotASocketError, transport.EndpointInUseError) as exc:
                # Their text already says what is at the path and that it stays.
                raise BindError(code_for(exc), index, sock, str(exc.strerror)) from None
            except OSError as exc:
                raise BindError(code_for(exc), index, sock, _problem("listening", exc)) from None
            made = tuple(made_dirs[first:])
            created.append(Bound(sock.forward_id, sock.socket_path, listener, made))
    except BaseException:
        for bound in created:
            bound.listener.close()
        remove_dirs(made_dirs, "bind=rollback")
        raise
    return created


def _problem(what: str, exc: OSError) -> str:
    if exc.errno is None:
        return f"{what}: {exc}"
    detail = exc.strerror or os.strerror(exc.errno)
    return f"{what}: {detail} ({errno.errorcode.get(exc.errno, exc.errno)})"


def _kind(path: str) -> str:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "not reachable"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISLNK(mode):
        return "a symlink that does not lead to a directory"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a directory"


def _make_parents(directory: str, made: list[CreatedDir]) -> None:
    """Create missing parents 0755 (container users must reach the socket),
    appending each one created to *made*, outermost first, as soon as it exists
    (so a failure further down still leaves it to be removed)."""
    missing: list[str] = []
    d = directory
    while d and not os.path.isdir(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
        except FileExistsError:
            try:
                is_dir = stat.S_ISDIR(os.stat(d).st_mode)
            except OSError:
                is_dir = False  # a dangling or looping symlink
            if is_dir:
                continue
            raise ParentNotADirectoryError(d, _kind(d)) from None
        st = os.lstat(d)
        made.append(CreatedDir(_path_key(d), (st.st_dev, st.st_ino)))
        os.chmod(d, 0o755)  # mkdir's mode is filtered by the umask
