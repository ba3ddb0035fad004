"""Endpoint URIs, UNIX listeners and hybrid-vsock connects, on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from socketforward import transport
from socketforward.transport import (
    MAX_UNIX_PATH,
    Backoff,
    EndpointError,
    EndpointInUseError,
    HvsockConnectError,
    HvsockEndpoint,
    Listener,
    NotASocketError,
    UnixEndpoint,
    VsockEndpoint,
    connect,
    connect_nonblocking,
    connect_unix_now,
    listen,
    out_of_resources,
    parse_endpoint,
    redial,
)

# -- parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("unix:/run/a.sock", UnixEndpoint("/run/a.sock")),
        ("unix:///run/a.sock", UnixEndpoint("/run/a.sock")),
        ("unix:/" + "a" * (MAX_UNIX_PATH - 1), UnixEndpoint("/" + "a" * (MAX_UNIX_PATH - 1))),
        ("vsock://2:1025", VsockEndpoint(2, 1025)),
        ("vsock://:1026", VsockEndpoint(None, 1026)),
        ("vsock://4294967295:4294967295", VsockEndpoint(2**32 - 1, 2**32 - 1)),
        ("vsock://3:0", VsockEndpoint(3, 0)),
        ("hvsock:/run/v.sock:1025", HvsockEndpoint("/run/v.sock", 1025)),
        ("hvsock:/odd:dir/v.sock:7", HvsockEndpoint("/odd:dir/v.sock", 7)),
    ],
)
def test_parse_good(uri: str, expected: object) -> None:
    """Every documented endpoint spelling is accepted and means what it says."""
    assert parse_endpoint(uri) == expected


def test_endpoint_str_round_trips() -> None:
    """Logs show an endpoint as the URI that configures it."""
    for uri in ("unix:/run/a.sock", "vsock://2:1025", "vsock://:1026", "hvsock:/v.sock:5"):
        assert str(parse_endpoint(uri)) == uri
        assert parse_endpoint(str(parse_endpoint(uri))) == parse_endpoint(uri)


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("tcp://127.0.0.1:80", "unknown scheme 'tcp'"),
        ("/run/a.sock", "missing scheme"),
        ("unix:run/a.sock", "relative"),
        ("unix:", "empty"),
        ("unix:/" + "a" * MAX_UNIX_PATH, "longer than the 107 bytes"),
        ("unix:/a\0b", "NUL"),
        ("vsock://3:99999999999", "out of range"),
        ("vsock://3:-1", "port '-1' is not a number"),
        ("vsock://x:1025", "CID 'x' is not a number"),
        ("vsock://99999999999:1", "CID 99999999999 is out of range"),
        ("vsock://3:abc", "port 'abc' is not a number"),
        ("vsock://3", "missing :PORT"),
        ("vsock:3:1025", "expected vsock://"),
        ("hvsock:/run/v.sock", "missing :PORT"),
        ("hvsock:/run/v.sock:", "missing :PORT"),
        ("hvsock:/run/v.sock:http", "port 'http' is not a number"),
        ("hvsock:/run/v.sock:4294967296", "out of range"),
        ("hvsock:v.sock:5", "relative"),
    ],
)
def test_parse_bad(uri: str, problem: str) -> None:
    """A bad endpoint gives one error naming the URI and what is wrong with it."""
    with pytest.raises(EndpointError) as info:
        parse_endpoint(uri)
    assert isinstance(info.value, ValueError)
    assert repr(uri) in str(info.value)
    assert problem in str(info.value)


# -- UNIX listeners --------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


async def _echo_once(listener: Listener) -> None:
    loop = asyncio.get_running_loop()
    client = await connect(listener.endpoint, timeout=5)
    server = await listener.accept()
    with client, server:
        await loop.sock_sendall(client, b"ping")
        assert await loop.sock_recv(server, 4) == b"ping"


async def test_unix_listen_default_modes(tmp_path: Path) -> None:
    """A new socket is 0600 and a missing parent directory is created 0700."""
    path = tmp_path / "new" / "deeper" / "s.sock"
    async with await listen(UnixEndpoint(str(path))) as listener:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert _mode(path) == 0o600
        assert _mode(path.parent) == 0o700
        await _echo_once(listener)
    assert not path.exists()


async def test_unix_listen_mode_and_owner(tmp_path: Path) -> None:
    """The configured mode and owner are applied to the socket file."""
    path = tmp_path / "s.sock"
    gid = 4242 if os.getuid() == 0 else os.getgid()
    async with await listen(UnixEndpoint(str(path)), mode=0o660, uid=os.getuid(), gid=gid):
        assert _mode(path) == 0o660
        assert os.lstat(path).st_uid == os.getuid()
        assert os.lstat(path).st_gid == gid


async def test_unix_listen_ignores_permissive_umask(tmp_path: Path) -> None:
    """Even with umask 0 the socket is created with the requested mode."""
    path = tmp_path / "s.sock"
    old = os.umask(0)
    try:
        async with await listen(UnixEndpoint(str(path))):
            assert _mode(path) == 0o600
    finally:
        os.umask(old)


async def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    """A socket file left behind by a dead process does not block a restart."""
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(path))  # bound, never listening, then closed: stale
    assert path.exists()
    async with await listen(UnixEndpoint(str(path))) as listener:
        await _echo_once(listener)


async def test_regular_file_is_never_deleted(tmp_path: Path) -> None:
    """A regular file at the socket path is kept, and the error names the path."""
    path = tmp_path / "important.txt"
    path.write_text("keep me")
    with pytest.raises(NotASocketError) as info:
        await listen(UnixEndpoint(str(path)))
    assert str(path) in str(info.value)
    assert "regular file" in str(info.value)
    assert path.read_text() == "keep me"


async def test_directory_is_never_deleted(tmp_path: Path) -> None:
    """A directory at the socket path is kept, and the error names the path."""
    path = tmp_path / "dir"
    path.mkdir()
    (path / "child").write_text("x")
    with pytest.raises(NotASocketError) as info:
        await listen(UnixEndpoint(str(path)))
    assert str(path) in str(info.value)
    assert (path / "child").read_text() == "x"


async def test_live_socket_is_never_replaced(tmp_path: Path) -> None:
    """A second listener on a live socket fails; the first keeps working."""
    path = tmp_path / "s.sock"
    async with await listen(UnixEndpoint(str(path))) as first:
        with pytest.raises(EndpointInUseError) as info:
            await listen(UnixEndpoint(str(path)))
        assert str(path) in str(info.value)
        # The liveness probe shows up as one connection closed without data.
        probe = await first.accept()
        with probe:
            assert await asyncio.get_running_loop().sock_recv(probe, 1) == b""
        await _echo_once(first)


async def test_close_keeps_a_file_someone_else_put_there(tmp_path: Path) -> None:
    """Closing a listener only removes its own socket file, not a replacement."""
    path = tmp_path / "s.sock"
    listener = await listen(UnixEndpoint(str(path)))
    path.unlink()
    path.write_text("someone else's")
    listener.close()
    listener.close()  # idempotent
    assert path.read_text() == "someone else's"


async def test_connect_missing_path_names_it(tmp_path: Path) -> None:
    """Connecting to a missing socket raises FileNotFoundError naming the endpoint."""
    path = tmp_path / "nothing.sock"
    with pytest.raises(FileNotFoundError) as info:
        await connect(UnixEndpoint(str(path)))
    assert str(path) in str(info.value)


async def test_burst_of_connects_is_queued(tmp_path: Path) -> None:
    """2,000 simultaneous connects all succeed before the server accepts any."""
    ep = UnixEndpoint(str(tmp_path / "s.sock"))
    async with await listen(ep) as listener:
        clients = await asyncio.gather(*(connect(ep, timeout=30) for _ in range(2000)))
        try:
            accepted = [await listener.accept() for _ in clients]
            for sock in accepted:
                sock.close()
        finally:
            for sock in clients:
                sock.close()
        assert len(accepted) == 2000


async def test_connect_waits_while_backlog_is_full(tmp_path: Path) -> None:
    """With a tiny backlog, connects wait for room instead of failing or lying."""
    loop = asyncio.get_running_loop()
    ep = UnixEndpoint(str(tmp_path / "s.sock"))
    async with await listen(ep, backlog=1) as listener:

        async def serve() -> None:
            for _ in range(50):
                conn = await listener.accept()
                with conn:
                    await loop.sock_sendall(conn, b"x")
                await asyncio.sleep(0.001)

        async def client() -> bytes:
            sock = await connect(ep, timeout=30)
            with sock:
                return await loop.sock_recv(sock, 1)

        server = asyncio.create_task(serve())
        replies = await asyncio.gather(*(client() for _ in range(50)))
        await server
    assert replies == [b"x"] * 50


async def test_listen_on_hvsock_is_refused() -> None:
    """hvsock cannot be listened on; the error says which unix: path to use."""
    with pytest.raises(EndpointError, match=r"unix:/run/v\.sock_1025"):
        await listen(HvsockEndpoint("/run/v.sock", 1025))


# -- vsock -------------------------------------------------------------------------


async def test_vsock_loopback() -> None:
    """vsock listen/connect works on the loopback CID 1 (only CID ever dialled)."""
    try:
        listener = await listen(VsockEndpoint(1, 0xFFFFFFFF - 7))
    except (OSError, AttributeError) as exc:
        pytest.skip(f"AF_VSOCK loopback (CID 1) not available here: {exc}")
    async with listener:
        await _echo_once(listener)


async def test_vsock_connect_needs_cid() -> None:
    """Connecting to vsock://:PORT is refused before any socket is made."""
    with pytest.raises(EndpointError, match="needs a CID"):
        await connect(VsockEndpoint(None, 1026))


# -- hybrid vsock ------------------------------------------------------------------

Handler = Callable[[socket.socket], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_hvsock(path: Path, handler: Handler) -> AsyncIterator[HvsockEndpoint]:
    """A hybrid-vsock multiplexer stand-in: a UNIX listener running *handler*."""
    listener = await listen(UnixEndpoint(str(path)))
    errors: list[BaseException] = []

    async def serve() -> None:
        conn = await listener.accept()
        with conn:
            try:
                await handler(conn)
            except Exception as exc:  # surfaced in the test below
                errors.append(exc)

    task = asyncio.create_task(serve())
    try:
        yield HvsockEndpoint(str(path), 5000)
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        listener.close()
    if errors:
        raise errors[0]


async def _read_line(conn: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    line = b""
    while not line.endswith(b"\n"):
        chunk = await loop.sock_recv(conn, 1)
        if not chunk:
            break
        line += chunk
    return line


async def test_hvsock_connect_sends_connect_then_data(tmp_path: Path) -> None:
    """hvsock connect sends CONNECT <port>, waits for OK, and only then carries data."""
    loop = asyncio.get_running_loop()

    async def mux(conn: socket.socket) -> None:
        # A large read: if payload had been sent early it would show up here.
        assert await loop.sock_recv(conn, 4096) == b"CONNECT 5000\n"
        await loop.sock_sendall(conn, b"OK 1234\n")
        assert await loop.sock_recv(conn, 4096) == b"payload"
        await loop.sock_sendall(conn, b"answer")

    async with fake_hvsock(tmp_path / "v.sock", mux) as ep:
        sock = await connect(ep, timeout=5)
        with sock:
            await loop.sock_sendall(sock, b"payload")
            assert await loop.sock_recv(sock, 100) == b"answer"


async def test_hvsock_bytes_right_after_ok_are_kept(tmp_path: Path) -> None:
    """Bytes the peer sends in the same packet as OK reach the application."""
    loop = asyncio.get_running_loop()

    async def mux(conn: socket.socket) -> None:
        await _read_line(conn)
        await loop.sock_sendall(conn, b"OK 77\nhello")

    async with fake_hvsock(tmp_path / "v.sock", mux) as ep:
        sock = await connect(ep, timeout=5)
        with sock:
            assert await loop.sock_recv(sock, 100) == b"hello"


async def test_hvsock_close_without_ok_is_refused(tmp_path: Path) -> None:
    """A multiplexer that hangs up (no guest listener) gives a refused error."""

    async def mux(conn: socket.socket) -> None:
        await _read_line(conn)

    async with fake_hvsock(tmp_path / "v.sock", mux) as ep:
        with pytest.raises(HvsockConnectError) as info:
            await connect(ep, timeout=5)
    assert isinstance(info.value, ConnectionRefusedError)
    assert str(ep) in str(info.value)


async def test_hvsock_garbage_reply_is_refused(tmp_path: Path) -> None:
    """A reply other than OK <n> is refused and shown in the error."""
    loop = asyncio.get_running_loop()

    async def mux(conn: socket.socket) -> None:
        await _read_line(conn)
        await loop.sock_sendall(conn, b"ERR no such port\n")

    async with fake_hvsock(tmp_path / "v.sock", mux) as ep:
        with pytest.raises(HvsockConnectError, match="ERR no such port"):
            await connect(ep, timeout=5)


async def test_hvsock_endless_reply_is_bounded(tmp_path: Path) -> None:
    """A peer that never ends its reply line is refused after a few bytes."""
    loop = asyncio.get_running_loop()

    async def mux(conn: socket.socket) -> None:
        await _read_line(conn)
        with contextlib.suppress(ConnectionError):
            await loop.sock_sendall(conn, b"O" * 10_000)

    async with fake_hvsock(tmp_path / "v.sock", mux) as ep:
        with pytest.raises(HvsockConnectError, match="expected 'OK <n>'"):
            await connect(ep, timeout=5)


async def test_hvsock_silent_peer_times_out(tmp_path: Path) -> None:
    """A multiplexer that never answers gives a timeout naming the endpoint."""
    gate = asyncio.Event()

    async def mux(conn: socket.socket) -> None:
        await gate.wait()

    async with fake_hvsock(tmp_path / "v.sock", mux) as ep:
        try:
            with pytest.raises(TimeoutError, match=r"hvsock:.*v\.sock:5000"):
                await connect(ep, timeout=0.2)
        finally:
            gate.set()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_nonblocking_connect_works_on_both_loops(loop_kind: str) -> None:
    """The connect used for vsock (never resolving the address) connects, and
    reports a refusal as ConnectionRefusedError, on asyncio and uvloop alike
    (uvloop's sock_connect would try to resolve a vsock CID as a host name)."""

    async def scenario() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            address = listener.getsockname()
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setblocking(False)
                await connect_nonblocking(sock, address)
                assert sock.getpeername() == address
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            with pytest.raises(ConnectionRefusedError):
                await connect_nonblocking(sock, address)

    factory = uvloop.new_event_loop if loop_kind == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(scenario())


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    """Re-dial waits grow (jittered in [d/2, d]) to the cap, and start small again after reset."""
    backoff = Backoff(0.1, 0.8)
    caps = [0.1, 0.2, 0.4, 0.8, 0.8, 0.8]
    for cap in caps:
        assert cap / 2 <= backoff.next() <= cap
    backoff.reset()
    assert 0.05 <= backoff.next() <= 0.1


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_callback_accepting_hands_over_a_burst_once_each(tmp_path: Path, loop_kind: str) -> None:
    """start_accepting: 500 queued connects each reach the callback exactly once,
    non-blocking, on asyncio's loop and on uvloop; after stop_accepting no more."""

    async def main() -> None:
        ep = UnixEndpoint(str(tmp_path / "s.sock"))
        got: list[socket.socket] = []
        all_in = asyncio.Event()

        def on_connection(conn: socket.socket) -> None:
            got.append(conn)
            if len(got) == 500:
                all_in.set()

        clients: list[socket.socket] = []
        async with await listen(ep) as listener:
            try:
                clients = [await connect(ep, timeout=30) for _ in range(500)]
                listener.start_accepting(on_connection, lambda exc: pytest.fail(repr(exc)))
                await asyncio.wait_for(all_in.wait(), 30)
                listener.stop_accepting()
                late = await connect(ep, timeout=30)
                clients.append(late)
                await asyncio.sleep(0.05)
                assert len(got) == 500  # the late one waits in the backlog
                assert all(conn.gettimeout() == 0.0 for conn in got)
                for conn, client in zip(got, clients, strict=False):
                    conn.send(b"x")
                    assert client.recv(1) == b"x"
            finally:
                for sock in got + clients:
                    sock.close()

    if loop_kind == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())


async def test_callback_accepting_backs_off_on_emfile_and_resumes(tmp_path: Path) -> None:
    """Out of fds, accepting reports the error, pauses instead of spinning, and
    serves the waiting connection once fds are free again."""
    import resource  # noqa: PLC0415

    ep = UnixEndpoint(str(tmp_path / "s.sock"))
    errors: list[OSError] = []
    got: list[socket.socket] = []
    arrived = asyncio.Event()

    def on_connection(conn: socket.socket) -> None:
        got.append(conn)
        arrived.set()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    async with await listen(ep) as listener:
        client = await connect(ep, timeout=5)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
            with contextlib.suppress(OSError):
                while True:  # take every fd the lowered limit leaves
                    fillers.append(os.dup(0))
            listener.start_accepting(on_connection, errors.append, backoff=0.05)
            await asyncio.sleep(0.2)
            assert errors and all(e.errno == errno.EMFILE for e in errors)
            assert len(errors) <= 6  # paused between tries: no busy loop
            assert not got
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        try:
            await asyncio.wait_for(arrived.wait(), 5)
            assert len(got) == 1
        finally:
            for sock in [*got, client]:
                sock.close()


async def test_redial_waits_for_the_peer_and_dials_again_after_a_drop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that is not there yet is dialed again (one warning, then quieter
    lines), each connection is served, and a dropped one is dialed again."""
    caplog.set_level(logging.DEBUG, logger="test.redial")
    path = tmp_path / "peer.sock"
    served: list[socket.socket] = []

    async def serve(sock: socket.socket) -> bool:
        served.append(sock)
        sock.close()
        return True

    task = asyncio.create_task(
        redial(
            UnixEndpoint(str(path)),
            serve,
            Backoff(0.01, 0.02),
            connect_timeout=1,
            log=logging.getLogger("test.redial"),
        )
    )
    try:
        for _ in range(500):
            if caplog.text.count("rpc dial failed") >= 3:
                break
            await asyncio.sleep(0.01)
        levels = [r.levelno for r in caplog.records if "rpc dial failed" in r.message]
        assert levels[0] == logging.WARNING and set(levels[1:]) == {logging.DEBUG}
        async with await listen(UnixEndpoint(str(path))) as listener:
            first = await asyncio.wait_for(listener.accept(), 5)
            second = await asyncio.wait_for(listener.accept(), 5)
            first.close()
            second.close()
        assert len(served) >= 2
        assert "rpc connection lost" in caplog.text
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_redial_gives_up_at_once_on_an_address_that_cannot_work(tmp_path: Path) -> None:
    """A first dial failing with an errno retrying cannot fix is raised, not retried."""
    (tmp_path / "file").write_text("not a directory")
    endpoint = UnixEndpoint(str(tmp_path / "file" / "peer.sock"))

    async def serve(sock: socket.socket) -> bool:
        raise AssertionError("nothing to serve")

    with pytest.raises(NotADirectoryError):
        await asyncio.wait_for(
            redial(
                endpoint,
                serve,
                Backoff(0.01, 0.02),
                connect_timeout=1,
                log=logging.getLogger("test.redial"),
                fatal_errnos={errno.ENOTDIR},
            ),
            5,
        )


# -- running out of descriptors ------------------------------------------------------


async def test_no_socket_to_be_made_is_an_error_naming_the_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the process is out of descriptors, the fast connect raises (instead of
    deferring to a slow path that would fail the same way) and the waiting
    connect fails at once; both keep the errno and name the endpoint."""

    def no_fds(family: int) -> socket.socket:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    async with await listen(UnixEndpoint(str(tmp_path / "s.sock"))):
        monkeypatch.setattr(transport, "_new_socket", no_fds)
        with pytest.raises(OSError) as fast:
            connect_unix_now(str(tmp_path / "s.sock"))
        with pytest.raises(OSError) as slow:
            await connect(UnixEndpoint(str(tmp_path / "s.sock")), timeout=5)
        with pytest.raises(OSError) as hvsock:
            await connect(HvsockEndpoint(str(tmp_path / "s.sock"), 1026), timeout=5)
    for caught in (fast, slow, hvsock):
        assert caught.value.errno == errno.EMFILE and out_of_resources(caught.value)
        assert f"{tmp_path}/s.sock" in str(caught.value)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EMFILE, True),
        (errno.ENFILE, True),
        (errno.ENOBUFS, True),
        (errno.ENOMEM, True),
        (errno.ECONNREFUSED, False),
        (errno.ENOENT, False),
    ],
)
def test_out_of_resources_tells_load_from_peer_problems(code: int, expected: bool) -> None:
    """Only descriptor and memory exhaustion count as running out of resources;
    a refused or missing peer does not."""
    assert out_of_resources(OSError(code, os.strerror(code))) is expected
    assert not out_of_resources(ValueError("not an OSError"))
