"""Bind and Unbind in the VM: the directories Bind creates go away with the
forwards that needed them, and every failed entry comes back with a clear
status naming the forward and the path, logged in one line (docs/protocol.md
4.3, 4.4)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from pathlib import Path

import pytest

import ttrpc_asyncio as ttrpc
from socketforward import transport
from socketforward.api import socketforward_pb2 as pb
from socketforward.guest.bind import code_for
from tests.guest.harness import PATIENCE, Guest, bind, running_guest


def _request(entries: dict[str, Path | str]) -> pb.BindRequest:
    return pb.BindRequest(
        sockets=[pb.Socket(forward_id=k, socket_path=str(v)) for k, v in entries.items()]
    )


async def _unbind(guest: Guest, *forward_ids: str) -> None:
    await guest.service.unbind(pb.UnbindRequest(forward_ids=list(forward_ids)))


async def _bind_error(guest: Guest, entries: dict[str, Path | str]) -> ttrpc.TtrpcError:
    stub = await guest.connect()
    with pytest.raises(ttrpc.TtrpcError) as info:
        await stub.Bind(_request(entries), timeout=PATIENCE)
    return info.value


def _left(root: Path) -> list[Path]:
    """Everything under *root* but the guest's own stream endpoint."""
    return sorted(p for p in root.rglob("*") if p != root / "streams.sock")


def _bind_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("bind failed")]


# -- directories Bind created ---------------------------------------------------


async def test_unbind_removes_the_directories_bind_created() -> None:
    """After Unbind, the parent directories Bind had to create for the socket
    are gone too; a directory that was there before Bind is kept."""
    async with running_guest() as guest:
        (guest.root / "existing").mkdir()
        created = guest.root / "run" / "socketfwd" / "a.sock"
        under_existing = guest.root / "existing" / "new" / "b.sock"
        stub = await guest.connect()
        await bind(stub, {"a": created, "b": under_existing})
        assert created.is_socket() and under_existing.is_socket()
        await stub.Unbind(pb.UnbindRequest(forward_ids=["a", "b"]), timeout=PATIENCE)
        assert not (guest.root / "run").exists()
        assert not (guest.root / "existing" / "new").exists()
        assert _left(guest.root) == [guest.root / "existing"]


async def test_shutdown_leaves_no_directory_bind_created() -> None:
    """After the guest shuts down, neither socket files nor the directories Bind
    created for them are left; directories that were there before stay."""
    async with running_guest() as guest:
        (guest.root / "existing").mkdir()
        stub = await guest.connect()
        await bind(
            stub,
            {
                "a": guest.root / "run" / "a" / "a.sock",
                "b": guest.root / "run" / "b" / "deep" / "b.sock",
                "c": guest.root / "existing" / "c" / "c.sock",
                "d": guest.root / "d.sock",
            },
        )
        await bind(stub, {"e": guest.root / "run" / "e.sock"})
        await guest.service.shutdown()
        assert _left(guest.root) == [guest.root / "existing"]
        assert guest.service.bound() == {}


async def test_shared_created_directory_goes_with_its_last_forward() -> None:
    """A directory Bind created and several forwards use stays while any of
    them is bound (their sockets keep working) and goes with the last one."""
    async with running_guest() as guest:
        run = guest.root / "run"
        # One Bind creates run/ for "a"; "b" in the same call and "c" in a later
        # one land in it without creating it.
        await guest.service.bind(_request({"a": run / "x" / "a.sock", "b": run / "b.sock"}))
        await guest.service.bind(_request({"c": run / "c.sock"}))
        await _unbind(guest, "a")
        assert not (run / "x").exists()
        assert (run / "b.sock").is_socket() and (run / "c.sock").is_socket()
        await _unbind(guest, "b")
        assert (run / "c.sock").is_socket()
        sock = await transport.connect(transport.UnixEndpoint(str(run / "c.sock")), timeout=5)
        sock.close()
        await _unbind(guest, "c")
        assert not run.exists()


async def test_created_directory_holding_a_users_file_is_kept() -> None:
    """A directory Bind created is not removed when someone put a file of their
    own in it: Unbind removes the socket and leaves the directory and the file."""
    async with running_guest() as guest:
        run = guest.root / "run"
        await guest.service.bind(_request({"a": run / "a.sock"}))
        (run / "notes.txt").write_text("mine")
        await _unbind(guest, "a")
        assert not (run / "a.sock").exists()
        assert (run / "notes.txt").read_text() == "mine"


# -- failures --------------------------------------------------------------------


async def test_parent_that_is_a_regular_file_is_a_clear_failed_precondition(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A socket path under a regular file fails with FAILED_PRECONDITION naming
    the entry, its forward_id, its path and the parent at fault, not INTERNAL;
    the file is untouched and the guest logs one key=value line, no traceback."""
    caplog.set_level(logging.INFO, logger="socketforward")
    async with running_guest() as guest:
        blocker = guest.root / "file"
        blocker.write_text("keep me")
        for path in (blocker / "a.sock", blocker / "deeper" / "a.sock"):
            caplog.clear()
            error = await _bind_error(guest, {"fwd-a": path})
            assert error.code == ttrpc.Code.FAILED_PRECONDITION
            assert "sockets[0]" in error.message
            assert "forward_id='fwd-a'" in error.message
            assert str(path) in error.message
            assert f"parent {blocker} is not a directory" in error.message
            assert "regular file" in error.message
            assert blocker.read_text() == "keep me"
            assert guest.service.bound() == {}
            [line] = _bind_failures(caplog)
            text = line.getMessage()
            assert "forward_id=fwd-a" in text and f"socket_path={path}" in text
            assert "code=FAILED_PRECONDITION" in text and "error=" in text
            assert "Traceback" not in caplog.text
            assert all(r.exc_info is None for r in caplog.records)


async def test_failing_second_entry_leaves_no_directory_or_socket() -> None:
    """Bind is all-or-nothing: when the second entry fails, the first entry's
    socket and every directory the call created are gone, and the user's file
    that made it fail is intact."""
    async with running_guest() as guest:
        blocker = guest.root / "file"
        blocker.write_text("keep me")
        error = await _bind_error(
            guest,
            {"a": guest.root / "new" / "deep" / "a.sock", "b": blocker / "sub" / "b.sock"},
        )
        assert error.code == ttrpc.Code.FAILED_PRECONDITION
        assert "sockets[1]" in error.message and "forward_id='b'" in error.message
        assert _left(guest.root) == [blocker]
        assert blocker.read_text() == "keep me"
        assert guest.service.bound() == {}


async def test_too_many_open_files_is_resource_exhausted_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the guest runs out of file descriptors while binding (EMFILE), Bind
    answers RESOURCE_EXHAUSTED naming the entry, logs one line, leaves no socket
    file or directory behind, and succeeds once descriptors are available."""
    caplog.set_level(logging.INFO, logger="socketforward")
    async with running_guest() as guest:
        entries: dict[str, Path | str] = {
            "a": guest.root / "one" / "a.sock",
            "b": guest.root / "two" / "b.sock",
        }
        real = transport._new_socket
        made = 0

        def second_fails(family: int) -> socket.socket:
            nonlocal made
            made += 1
            if made == 2:
                raise OSError(errno.EMFILE, "Too many open files")
            return real(family)

        monkeypatch.setattr(transport, "_new_socket", second_fails)
        with pytest.raises(ttrpc.TtrpcError) as info:
            await guest.service.bind(_request(entries))
        monkeypatch.undo()
        error = info.value
        assert error.code == ttrpc.Code.RESOURCE_EXHAUSTED
        assert "sockets[1]" in error.message and "forward_id='b'" in error.message
        assert "EMFILE" in error.message
        assert _left(guest.root) == []
        assert guest.service.bound() == {}
        [line] = _bind_failures(caplog)
        assert "forward_id=b" in line.getMessage()
        assert "code=RESOURCE_EXHAUSTED" in line.getMessage()
        await guest.service.bind(_request(entries))
        assert set(guest.service.bound()) == {"a", "b"}


@pytest.mark.parametrize(
    ("number", "code"),
    [
        (errno.EACCES, ttrpc.Code.PERMISSION_DENIED),
        (errno.EPERM, ttrpc.Code.PERMISSION_DENIED),
        (errno.EEXIST, ttrpc.Code.ALREADY_EXISTS),
        (errno.EADDRINUSE, ttrpc.Code.ALREADY_EXISTS),
        (errno.ENAMETOOLONG, ttrpc.Code.INVALID_ARGUMENT),
        (errno.ENOTDIR, ttrpc.Code.FAILED_PRECONDITION),
        (errno.ELOOP, ttrpc.Code.FAILED_PRECONDITION),
        (errno.EROFS, ttrpc.Code.FAILED_PRECONDITION),
        (errno.ENOSPC, ttrpc.Code.RESOURCE_EXHAUSTED),
        (errno.EMFILE, ttrpc.Code.RESOURCE_EXHAUSTED),
        (errno.ENFILE, ttrpc.Code.RESOURCE_EXHAUSTED),
        (errno.EIO, ttrpc.Code.FAILED_PRECONDITION),
        (None, ttrpc.Code.FAILED_PRECONDITION),
    ],
)
def test_os_errors_map_to_a_status_by_errno_never_internal(
    number: int | None, code: ttrpc.Code
) -> None:
    """The host sees a status that says what kind of problem the VM had, chosen
    by errno (the documented table); no OSError is reported as INTERNAL."""
    exc = OSError("no errno") if number is None else OSError(number, "whatever the text")
    assert code_for(exc) == code


@pytest.mark.skipif(os.geteuid() == 0, reason="root is never denied")
async def test_unwritable_parent_is_permission_denied() -> None:
    """A socket path in a directory the guest may not write to fails with
    PERMISSION_DENIED naming the entry, and nothing is created."""
    async with running_guest() as guest:
        locked = guest.root / "locked"
        locked.mkdir(mode=0o555)
        try:
            error = await _bind_error(guest, {"p": locked / "sub" / "p.sock"})
        finally:
            locked.chmod(0o755)
        assert error.code == ttrpc.Code.PERMISSION_DENIED
        assert "forward_id='p'" in error.message and str(locked / "sub") in error.message
        assert _left(guest.root) == [locked]


# -- mode and owner, per socket ---------------------------------------------------

ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving a socket to another user needs root"
)
UID, GID = 1234, 5678


def _socket(
    forward_id: str,
    path: Path,
    mode: int | None = None,
    uid: int | None = None,
    gid: int | None = None,
) -> pb.Socket:
    sock = pb.Socket(forward_id=forward_id, socket_path=str(path))
    if mode is not None:
        sock.mode = mode
    if uid is not None:
        sock.uid = uid
    if gid is not None:
        sock.gid = gid
    return sock


def _owner(path: Path) -> tuple[int, int, int]:
    """(mode, uid, gid) of the file itself."""
    st = path.lstat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def _listening_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("listening ")]


# Users who are not root, as (uid, groups): the owner asked for, someone in its
# group, someone in the agent's group, and a stranger.
_USERS = [(UID, {GID}), (4321, {GID}), (4322, {0}), (4323, {4323})]


def _who_may_connect(mode: int, uid: int, gid: int) -> set[int]:
    """The uids in _USERS the kernel lets connect() (write permission on the file)."""
    allowed = set()
    for user, groups in _USERS:
        if user == uid:
            bits = (mode >> 6) & 0o7
        elif gid in groups:
            bits = (mode >> 3) & 0o7
        else:
            bits = mode & 0o7
        if bits & 0o2:
            allowed.add(user)
    return allowed


@ROOT_ONLY
async def test_socket_gets_the_mode_and_owner_bind_asks_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Socket with mode, uid and gid becomes a socket file with exactly that
    mode and owner (so a container running as that user can connect), and the
    guest's log line says so; another entry of the same Bind without them gets
    the defaults."""
    caplog.set_level(logging.INFO, logger="socketforward")
    async with running_guest() as guest:
        owned, plain = guest.root / "run" / "owned.sock", guest.root / "plain.sock"
        await guest.service.bind(
            pb.BindRequest(
                sockets=[_socket("owned", owned, 0o660, UID, GID), _socket("plain", plain)]
            )
        )
        assert _owner(owned) == (0o660, UID, GID)
        assert _owner(plain) == (0o600, os.geteuid(), os.getegid())
        assert _listening_lines(caplog) == [
            f"listening forward_id=owned socket_path={owned} mode=0660 uid={UID} gid={GID}",
            f"listening forward_id=plain socket_path={plain} mode=0600 "
            f"uid={os.geteuid()} gid={os.getegid()}",
        ]


async def test_default_socket_is_owner_only_and_owned_by_the_agent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without mode or owner in the Socket (nerdbox's host sends neither), the
    socket file is mode 0600 and owned by the agent's own user and group: no
    other user of the VM can connect unless the host or --socket-mode says so.
    The log line prints the mode and owner."""
    caplog.set_level(logging.INFO, logger="socketforward")
    async with running_guest() as guest:
        path = guest.root / "a.sock"
        await bind(await guest.connect(), {"a": path})
        assert _owner(path) == (0o600, os.geteuid(), os.getegid())
        [line] = _listening_lines(caplog)
        assert f"mode=0600 uid={os.geteuid()} gid={os.getegid()}" in line


async def test_only_the_mode_or_only_the_owner_keeps_the_other_default() -> None:
    """A Socket that gives only a mode keeps the agent as owner; one that gives
    only a gid keeps the default mode and the agent's uid."""
    async with running_guest() as guest:
        moded, grouped = guest.root / "m.sock", guest.root / "g.sock"
        gid = GID if os.geteuid() == 0 else os.getegid()  # another group needs root
        await guest.service.bind(
            pb.BindRequest(
                sockets=[_socket("m", moded, mode=0o666), _socket("g", grouped, gid=gid)]
            )
        )
        assert _owner(moded) == (0o666, os.geteuid(), os.getegid())
        assert _owner(grouped) == (0o600, os.geteuid(), gid)


@ROOT_ONLY
async def test_new_socket_is_never_reachable_wider_than_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Even under a umask of 0, the socket file is born no wider than the mode
    asked for, has its final mode and owner before it starts listening (until
    then connect() is refused), is exactly that right after Bind returns, and
    no other file (a temporary name) ever appears next to it."""
    async with running_guest() as guest:
        path = guest.root / "run" / "a.sock"
        seen: list[tuple[str, tuple[int, int, int], list[str]]] = []
        real_bind, real_listen = socket.socket.bind, socket.socket.listen

        def watch(what: str, sock: socket.socket) -> None:
            if sock.getsockname() == str(path):
                seen.append((what, _owner(path), sorted(os.listdir(path.parent))))

        def bind_watched(sock: socket.socket, address: str) -> None:
            real_bind(sock, address)
            watch("bind", sock)

        def listen_watched(sock: socket.socket, backlog: int) -> None:
            watch("listen", sock)
            real_listen(sock, backlog)

        monkeypatch.setattr(socket.socket, "bind", bind_watched)
        monkeypatch.setattr(socket.socket, "listen", listen_watched)
        old_umask = os.umask(0)
        try:
            await guest.service.bind(pb.BindRequest(sockets=[_socket("a", path, 0o640, UID, GID)]))
        finally:
            os.umask(old_umask)
            monkeypatch.undo()
        assert _owner(path) == (0o640, UID, GID)
        [(_, born, born_dir), (_, at_listen, listen_dir)] = seen
        assert born[0] & ~0o640 == 0  # no bit beyond the mode asked for
        assert at_listen == (0o640, UID, GID)
        assert born_dir == listen_dir == ["a.sock"]
        assert _left(guest.root) == [guest.root / "run", path]


@ROOT_ONLY
async def test_failing_chown_rolls_back_the_whole_bind(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the socket cannot be given to the user asked for (EPERM, as for an
    agent that is not root), Bind answers PERMISSION_DENIED naming the entry,
    its forward_id, its path, the owner and the errno, logs one line, and
    leaves nothing behind: not the other entry's socket, not the directories
    the call created. The same Bind without the owner then succeeds."""
    caplog.set_level(logging.INFO, logger="socketforward")
    real_chown = os.chown

    def refuse(path: str, uid: int, gid: int, **kwargs: object) -> None:
        if uid == UID:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        real_chown(path, uid, gid, **kwargs)  # type: ignore[arg-type]

    async with running_guest() as guest:
        first, second = guest.root / "one" / "a.sock", guest.root / "two" / "deep" / "b.sock"
        monkeypatch.setattr(os, "chown", refuse)
        with pytest.raises(ttrpc.TtrpcError) as info:
            await guest.service.bind(
                pb.BindRequest(sockets=[_socket("a", first), _socket("b", second, 0o600, UID, GID)])
            )
        monkeypatch.undo()
        error = info.value
        assert error.code == ttrpc.Code.PERMISSION_DENIED
        assert "sockets[1]" in error.message and "forward_id='b'" in error.message
        assert str(second) in error.message
        assert f"uid={UID} gid={GID}" in error.message and "EPERM" in error.message
        assert _left(guest.root) == []
        assert guest.service.bound() == {}
        [line] = _bind_failures(caplog)
        assert "forward_id=b" in line.getMessage() and "code=PERMISSION_DENIED" in line.getMessage()
        await guest.service.bind(
            pb.BindRequest(sockets=[_socket("a", first), _socket("b", second)])
        )
        assert set(guest.service.bound()) == {"a", "b"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root may give a socket to anyone")
async def test_agent_that_is_not_root_cannot_give_a_socket_away() -> None:
    """An agent that is not root asked for a socket owned by another user fails
    that Bind with PERMISSION_DENIED naming the entry, and no file is left."""
    async with running_guest() as guest:
        path = guest.root / "a.sock"
        with pytest.raises(ttrpc.TtrpcError) as info:
            await guest.service.bind(pb.BindRequest(sockets=[_socket("a", path, uid=UID)]))
        assert info.value.code == ttrpc.Code.PERMISSION_DENIED
        assert "forward_id='a'" in info.value.message and "EPERM" in info.value.message
        assert _left(guest.root) == []


@pytest.mark.parametrize(
    ("sock", "problem"),
    [
        (_socket("a", Path("/run/a.sock"), mode=0o10000), "mode 10000 is not a file mode"),
        (_socket("a", Path("/run/a.sock"), uid=0xFFFF_FFFF), "uid 4294967295 is not a user id"),
        (_socket("a", Path("/run/a.sock"), gid=0xFFFF_FFFF), "gid 4294967295 is not a group id"),
    ],
)
async def test_impossible_mode_or_owner_is_invalid_argument(sock: pb.Socket, problem: str) -> None:
    """A mode beyond 7777 or the id chown reads as "unchanged" is refused as
    INVALID_ARGUMENT before anything is created."""
    async with running_guest() as guest:
        with pytest.raises(ttrpc.TtrpcError) as info:
            await guest.service.bind(pb.BindRequest(sockets=[sock]))
        assert info.value.code == ttrpc.Code.INVALID_ARGUMENT
        assert problem in info.value.message and "forward_id='a'" in info.value.message


async def test_identical_rebind_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """Binding the same forward, path, mode and owner again (a host reconnecting)
    leaves the very same socket file in place, logs no new listener, and the
    explicit default and the absent one count as the same."""
    caplog.set_level(logging.INFO, logger="socketforward")
    async with running_guest() as guest:
        path = guest.root / "a.sock"
        await guest.service.bind(pb.BindRequest(sockets=[_socket("a", path)]))
        before = path.lstat()
        same = _socket("a", path, 0o600, os.geteuid(), os.getegid())
        await guest.service.bind(pb.BindRequest(sockets=[same]))
        await guest.service.bind(pb.BindRequest(sockets=[_socket("a", path)]))
        after = path.lstat()
        assert (after.st_ino, after.st_mode, after.st_uid) == (
            before.st_ino,
            before.st_mode,
            before.st_uid,
        )
        assert len(_listening_lines(caplog)) == 1
        assert not [r for r in caplog.records if "changed" in r.getMessage()]


@ROOT_ONLY
async def test_rebind_with_another_mode_or_owner_applies_it_in_place(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A re-Bind of the same forward and path with another mode and owner (the
    host's configuration changed, then it reconnected) applies them to the
    listening socket in place: same file, connections keep working, one log
    line with the old and new values. Leaving them out again goes back to the
    defaults."""
    caplog.set_level(logging.INFO, logger="socketforward")
    async with running_guest() as guest:
        path = guest.root / "a.sock"
        await guest.service.bind(pb.BindRequest(sockets=[_socket("a", path)]))
        inode = path.lstat().st_ino
        await guest.service.bind(pb.BindRequest(sockets=[_socket("a", path, 0o660, UID, GID)]))
        assert _owner(path) == (0o660, UID, GID)
        assert path.lstat().st_ino == inode
        assert guest.service.bound() == {"a": str(path)}
        [line] = [r.getMessage() for r in caplog.records if "changed" in r.getMessage()]
        assert line == (
            f"socket mode and owner changed forward_id=a socket_path={path} mode=0660 "
            f"uid={UID} gid={GID} was_mode=0600 was_uid={os.geteuid()} was_gid={os.getegid()}"
        )
        conn = await transport.connect(transport.UnixEndpoint(str(path)), timeout=PATIENCE)
        conn.close()
        await guest.service.bind(pb.BindRequest(sockets=[_socket("a", path)]))
        assert _owner(path) == (0o600, os.geteuid(), os.getegid())
        assert path.lstat().st_ino == inode


@ROOT_ONLY
async def test_changing_owner_in_place_never_lets_in_a_user_neither_side_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a bound socket goes from one mode and owner to another, every state
    the file passes through lets connect only users that the old or the new
    setting lets connect (here: the new group never sees the old group bits)."""
    async with running_guest() as guest:
        path = guest.root / "a.sock"
        await guest.service.bind(pb.BindRequest(sockets=[_socket("a", path, 0o660, 0, 0)]))
        states: list[tuple[int, int, int]] = []
        real_chmod, real_chown = os.chmod, os.chown

        def chmod(target: str, mode: int, **kwargs: object) -> None:
            real_chmod(target, mode, **kwargs)  # type: ignore[arg-type]
            states.append(_owner(path))

        def chown(target: str, uid: int, gid: int, **kwargs: object) -> None:
            real_chown(target, uid, gid, **kwargs)  # type: ignore[arg-type]
            states.append(_owner(path))

        monkeypatch.setattr(os, "chmod", chmod)
        monkeypatch.setattr(os, "chown", chown)
        await guest.service.bind(pb.BindRequest(sockets=[_socket("a", path, 0o606, UID, GID)]))
        monkeypatch.undo()
        assert states and states[-1] == (0o606, UID, GID)
        may = _who_may_connect(0o660, 0, 0) | _who_may_connect(0o606, UID, GID)
        for state in states:
            assert _who_may_connect(*state) <= may, state


@ROOT_ONLY
async def test_failed_bind_gives_a_changed_socket_its_old_mode_and_owner_back() -> None:
    """A Bind that changes one bound socket's owner and fails on another entry
    changes nothing: the bound socket keeps its old mode and owner, the failing
    entry leaves no file, and a re-Bind of the old setting is still a no-op."""
    async with running_guest() as guest:
        path = guest.root / "a.sock"
        await guest.service.bind(pb.BindRequest(sockets=[_socket("a", path)]))
        blocker = guest.root / "file"
        blocker.write_text("keep me")
        with pytest.raises(ttrpc.TtrpcError) as info:
            await guest.service.bind(
                pb.BindRequest(
                    sockets=[
                        _socket("a", path, 0o660, UID, GID),
                        _socket("b", blocker / "b.sock"),
                    ]
                )
            )
        assert info.value.code == ttrpc.Code.FAILED_PRECONDITION
        assert "forward_id='b'" in info.value.message
        assert _owner(path) == (0o600, os.geteuid(), os.getegid())
        assert _left(guest.root) == [path, blocker]
        assert guest.service.bound() == {"a": str(path)}
        await guest.service.bind(pb.BindRequest(sockets=[_socket("a", path, 0o660, UID, GID)]))
        assert _owner(path) == (0o660, UID, GID)


async def test_change_of_a_socket_file_replaced_meanwhile_fails_and_touches_nothing() -> None:
    """When the bound socket's file was replaced behind the guest's back (here by
    a symlink to a file of the user's), a Bind that changes its mode fails with
    FAILED_PRECONDITION naming the entry, and the file the symlink leads to is
    not chmodded."""
    async with running_guest() as guest:
        path = guest.root / "a.sock"
        await guest.service.bind(pb.BindRequest(sockets=[_socket("a", path)]))
        victim = guest.root / "victim"
        victim.write_text("mine")
        victim.chmod(0o600)
        path.unlink()
        path.symlink_to(victim)
        with pytest.raises(ttrpc.TtrpcError) as info:
            await guest.service.bind(pb.BindRequest(sockets=[_socket("a", path, mode=0o666)]))
        assert info.value.code == ttrpc.Code.FAILED_PRECONDITION
        assert "forward_id='a'" in info.value.message
        assert "no longer the listener's socket file" in info.value.message
        assert stat.S_IMODE(victim.stat().st_mode) == 0o600
        path.unlink()  # the user's symlink, not the guest's to remove


@ROOT_ONLY
async def test_failed_change_gives_the_sockets_changed_before_it_their_old_setting_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Bind that changes two bound sockets' owners, the second refused (EPERM),
    answers PERMISSION_DENIED naming the second and leaves both with their old
    mode and owner: nothing of the call stays."""
    async with running_guest() as guest:
        first, second = guest.root / "a.sock", guest.root / "b.sock"
        await guest.service.bind(
            pb.BindRequest(sockets=[_socket("a", first), _socket("b", second, mode=0o606)])
        )
        real_chown = os.chown

        def refuse(path: str, uid: int, gid: int, **kwargs: object) -> None:
            if gid == 9999:
                raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
            real_chown(path, uid, gid, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "chown", refuse)
        with pytest.raises(ttrpc.TtrpcError) as info:
            await guest.service.bind(
                pb.BindRequest(
                    sockets=[
                        _socket("a", first, 0o660, UID, GID),
                        _socket("b", second, 0o660, UID, 9999),
                    ]
                )
            )
        monkeypatch.undo()
        assert info.value.code == ttrpc.Code.PERMISSION_DENIED
        assert "sockets[1]" in info.value.message and "forward_id='b'" in info.value.message
        assert f"uid={UID} gid=9999" in info.value.message and "EPERM" in info.value.message
        assert _owner(first) == (0o600, os.geteuid(), os.getegid())
        assert _owner(second) == (0o606, os.geteuid(), os.getegid())
        # The table agrees: asking for the old setting again is a no-op, the new one applies.
        await guest.service.bind(pb.BindRequest(sockets=[_socket("a", first, 0o660, UID, GID)]))
        assert _owner(first) == (0o660, UID, GID)
