"""Bind's rules: validating a BindRequest, the table of bound sockets and of
the directories Bind created, and creating listeners with each entry's mode
and owner (or changing a bound one's in place) all-or-nothing
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

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

import ttrpc_asyncio as ttrpc
from socketforward import transport
from socketforward.api import socketforward_pb2 as pb
from socketforward.logs import escape

__all__ = [
    "Access",
    "BindError",
    "BindPlan",
    "BindTable",
    "Bound",
    "Changed",
    "CreatedDir",
    "code_for",
    "create_listeners",
    "remove_dirs",
    "requested_access",
    "validate",
]

log = logging.getLogger("socketforward.guest")

_Code = ttrpc.Code

# chown() reads 2**32 - 1 as "leave unchanged": never an owner one can ask for.
_NO_ID: Final = 0xFFFF_FFFF
_MAX_MODE: Final = 0o7777

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


class SocketFileReplacedError(FileNotFoundError):
    """The path no longer holds the listener's socket file (removed or replaced)."""

    def __init__(self, path: str) -> None:
        super().__init__(
            errno.ENOENT, f"{path} is no longer the listener's socket file (removed or replaced)"
        )

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True)
class CreatedDir:
    """A directory Bind created: its normalised path and its (st_dev, st_ino),
    so that only that very directory is ever removed."""

    path: str
    inode: tuple[int, int]


@dataclass(frozen=True)
class Access:
    """A socket file's mode and owner."""

    mode: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"mode={self.mode:04o} uid={self.uid} gid={self.gid}"


def requested_access(sock: pb.Socket, default_mode: int) -> Access:
    """The mode and owner *sock* asks for; each one it leaves out is the
    guest's default: *default_mode*, the agent's own user and group."""
    return Access(
        sock.mode if sock.HasField("mode") else default_mode,
        sock.uid if sock.HasField("uid") else os.geteuid(),
        sock.gid if sock.HasField("gid") else os.getegid(),
    )


@dataclass
class Bound:
    """A listener in place for one forward: its socket file's mode and owner
    and (st_dev, st_ino), and the directories Bind created for it (outermost
    first)."""

    forward_id: str
    path: str
    listener: transport.Listener
    access: Access
    inode: tuple[int, int]
    created_dirs: tuple[CreatedDir, ...] = ()

    @property
    def mode(self) -> int:
        return self.access.mode

    @property
    def uid(self) -> int:
        return self.access.uid

    @property
    def gid(self) -> int:
        return self.access.gid


@dataclass(frozen=True)
class Changed:
    """A bound socket whose mode or owner a Bind changed, and what it was."""

    bound: Bound
    was: Access


@dataclass
class BindPlan:
    """What a valid BindRequest asks of the table."""

    create: list[tuple[int, pb.Socket]] = field(default_factory=list)
    """New listeners: ``(index, entry)``."""
    change: list[tuple[int, pb.Socket, Bound]] = field(default_factory=list)
    """Bound at the same path with another mode or owner: changed in place."""
    same: list[Bound] = field(default_factory=list)
    """Bound exactly so already: nothing to do (Bind is idempotent)."""


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
        elif sock.HasField("mode") and sock.mode > _MAX_MODE:
            problem = f"mode {sock.mode:o} is not a file mode (0 to 7777, octal)"
        elif sock.HasField("uid") and sock.uid == _NO_ID:
            problem = f"uid {_NO_ID} is not a user id"
        elif sock.HasField("gid") and sock.gid == _NO_ID:
            problem = f"gid {_NO_ID} is not a group id"
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
        """True when *sock*'s forward_id is bound at its path (whatever the mode
        and owner); ALREADY_EXISTS when the forward_id or the path is bound
        otherwise."""
        return self._bound_at(index, sock) is not None

    def _bound_at(self, index: int, sock: pb.Socket) -> Bound | None:
        bound = self._by_id.get(sock.forward_id)
        if bound is not None and _path_key(bound.path) == _path_key(sock.socket_path):
            return bound
        if bound is not None:
            problem = f"forward_id is already bound at {bound.path}"
            raise BindError(_Code.ALREADY_EXISTS, index, sock, problem)
        owner = self._by_path.get(_path_key(sock.socket_path))
        if owner is not None:
            problem = f"socket_path is already bound by forward_id {owner}"
            raise BindError(_Code.ALREADY_EXISTS, index, sock, problem)
        return None

    def plan(self, request: pb.BindRequest, default_mode: int) -> BindPlan:
        """Sort a validated request's entries into new, changed and identical
        ones; ALREADY_EXISTS naming the first entry that conflicts."""
        plan = BindPlan()
        for i, sock in enumerate(request.sockets):
            bound = self._bound_at(i, sock)
            if bound is None:
                plan.create.append((i, sock))
            elif bound.access != requested_access(sock, default_mode):
                # Same forward at the same path, another mode or owner: what the
                # host wants now (its configuration changed, then it restarted
                # or re-Bound) is applied in place; connections go on.
                plan.change.append((i, sock, bound))
            else:
                plan.same.append(bound)
        return plan

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


async def create_listeners(plan: BindPlan, default_mode: int) -> tuple[list[Bound], list[Changed]]:
    """Carry out *plan*: create its listeners and change its bound sockets'
    mode and owner (each entry's own, else the defaults: :func:`requested_access`),
    all or nothing: on any failure the listeners and directories made are
    removed, the changed sockets get their mode and owner back, and the error
    is raised (a :class:`BindError` for an OSError). Returns the listeners
    created and the changes made (their :class:`Bound` records already carry
    the new access)."""
    created = await _create(plan.create, default_mode)
    changed: list[Changed] = []
    try:
        for index, sock, bound in plan.change:
            new = requested_access(sock, default_mode)
            try:
                _set_access(bound.path, bound.inode, bound.access, new)
            except OSError as exc:
                problem = _owner_problem(f"changing the socket file to {new}", exc, new)
                raise BindError(code_for(exc), index, sock, problem) from None
            changed.append(Changed(bound, bound.access))
            bound.access = new
    except BaseException:
        for change in reversed(changed):
            _restore(change)
        for bound in created:
            bound.listener.close()
        remove_dirs([d for b in created for d in b.created_dirs], "bind=rollback")
        raise
    return created, changed


def _set_access(path: str, inode: tuple[int, int], old: Access, new: Access) -> None:
    """Take the socket file at *path* (the listener's, *inode*) from *old* to
    *new* mode and owner, in place.

    The file is reached through an O_PATH descriptor checked to be the
    listener's very socket (not a symlink or a file put there since), so a
    user who can write to the directory cannot redirect the chmod or chown.
    The mode is narrowed to the bits the old and the new mode share before
    the owner changes and widened after: at no moment may a user connect who
    may do so neither before nor after (the socket listens throughout).
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) != inode:
            raise SocketFileReplacedError(path)
        # chmod/chown on an O_PATH descriptor itself fail (EBADF); its /proc
        # link reaches the same inode whatever the path holds by now.
        target = f"/proc/self/fd/{fd}"
        if not os.path.exists(target):
            raise FileNotFoundError(errno.ENOENT, "/proc is not mounted (needed for this)")
        os.chmod(target, old.mode & new.mode)
        try:
            if (old.uid, old.gid) != (new.uid, new.gid):
                os.chown(target, new.uid, new.gid)
            os.chmod(target, new.mode)  # after chown, which may clear set-id bits
        except BaseException:
            # Half done (a refused chown): back to the old owner, then the old mode.
            with contextlib.suppress(OSError):
                os.chown(target, old.uid, old.gid)
            with contextlib.suppress(OSError):
                os.chmod(target, old.mode)
            raise
    finally:
        os.close(fd)


def _restore(change: Changed) -> None:
    """Undo one change of a failed Bind; a failure is logged (the Bind fails anyway)."""
    bound = change.bound
    try:
        _set_access(bound.path, bound.inode, bound.access, change.was)
    except OSError as exc:
        log.warning(
            "bind rollback: socket file not restored forward_id=%s socket_path=%s %s error=%r",
            escape(bound.forward_id),
            escape(bound.path),
            change.was,
            exc,
        )
        return
    bound.access = change.was


async def _create(todo: Iterable[tuple[int, pb.Socket]], default_mode: int) -> list[Bound]:
    """Listen at each ``(index, entry)`` with the entry's mode and owner,
    creating missing parents; on any failure close what was made, remove the
    directories made, and raise (a :class:`BindError` for an OSError)."""
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
            access = requested_access(sock, default_mode)
            try:
                # transport.listen gives the socket inode the mode before bind()
                # (so the file is born no wider than asked; the umask can only
                # narrow it), then chmods and chowns the file, and only then
                # calls listen(): until that, connect() is refused, so nobody
                # reaches the socket before its mode and owner are final. No
                # temporary name or rename, no process-wide umask change.
                listener = await transport.listen(
                    transport.UnixEndpoint(sock.socket_path),
                    mode=access.mode,
                    uid=access.uid,
                    gid=access.gid,
                )
            except (transport.NotASocketError, transport.EndpointInUseError) as exc:
                # Their text already says what is at the path and that it stays.
                raise BindError(code_for(exc), index, sock, str(exc.strerror)) from None
            except OSError as exc:
                problem = _owner_problem(f"listening as {access}", exc, access)
                raise BindError(code_for(exc), index, sock, problem) from None
            try:
                st = os.lstat(sock.socket_path)
            except OSError as exc:
                listener.close()
                raise BindError(code_for(exc), index, sock, _problem("listening", exc)) from None
            made = tuple(made_dirs[first:])
            inode = (st.st_dev, st.st_ino)
            created.append(Bound(sock.forward_id, sock.socket_path, listener, access, inode, made))
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


def _owner_problem(what: str, exc: OSError, access: Access) -> str:
    """:func:`_problem`, with why when the owner asked for is what was refused."""
    problem = _problem(what, exc)
    own = (access.uid, access.gid) == (os.geteuid(), os.getegid())
    if exc.errno == errno.EPERM and not own:
        problem += "; only root (CAP_CHOWN) can give a socket to another user or group"
    return problem


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
