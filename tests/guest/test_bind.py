"""Bind and Unbind in the VM: the directories Bind creates go away with the
forwards that needed them, and every failed entry comes back with a clear
status naming the forward and the path, logged in one line (docs/protocol.md
4.3, 4.4)."""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path

import pytest

from socketforward import transport, ttrpc
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
