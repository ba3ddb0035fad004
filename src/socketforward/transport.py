"""Endpoint URIs -> connected and listening sockets (``unix:``, ``vsock://``, ``hvsock:``).

Every socket handed out is non-blocking and owned by the caller (or by the
:class:`Listener` that wraps it).
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import logging
import os
import random
import socket
import stat
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from types import TracebackType
from typing import Final, NoReturn

__all__ = [
    "MAX_UNIX_PATH",
    "RESOURCE_ERRNOS",
    "VMADDR_CID_ANY",
    "Endpoint",
    "EndpointError",
    "EndpointInUseError",
    "HvsockConnectError",
    "HvsockEndpoint",
    "Listener",
    "NotASocketError",
    "UnixEndpoint",
    "VsockEndpoint",
    "as_endpoint",
    "connect",
    "connect_unix_now",
    "dir_problem",
    "listen",
    "out_of_resources",
    "parse_endpoint",
    "private_dir_problem",
    "redial",
    "unix_path_problem",
    "wait_ready",
]

# sun_path is 108 bytes on Linux; one is kept for the terminating NUL.
MAX_UNIX_PATH: Final = 107
MAX_PORT: Final = 2**32 - 1
MAX_CID: Final = 2**32 - 1
VMADDR_CID_ANY: Final = 0xFFFFFFFF
# The hybrid-vsock reply is "OK <u32>\n": anything longer is not a reply.
HVSOCK_REPLY_MAX: Final = 64
_EAGER_ACCEPTS: Final = 64
# A socket (or what it needs) could not be allocated: the process or the
# system is out of descriptors or memory, not a problem of the peer.
RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# The C-level attributes, plain ints: socket.socket's properties build an enum
# member on every access, a measurable share of a short forwarded connection.
family_of: Final[Callable[[socket.socket], int]] = _socket.socket.family.__get__
type_of: Final[Callable[[socket.socket], int]] = _socket.socket.type.__get__


class Backoff:
    """Capped exponential backoff with jitter, for re-dialing: each wait is drawn
    from [d/2, d], d doubling from *initial* up to *maximum*; reset() starts over."""

    __slots__ = ("_delay", "initial", "maximum")

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self._delay = initial

    def next(self) -> float:
        delay = self._delay
        self._delay = min(delay * 2, self.maximum)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self._delay = self.initial


async def redial(
    endpoint: Endpoint,
    serve: Callable[[socket.socket], Awaitable[bool]],
    backoff: Backoff,
    *,
    connect_timeout: float,
    log: logging.Logger,
    fatal_errnos: Collection[int] = (),
) -> NoReturn:
    """Dial *endpoint* and hand each connection to *serve* (which owns it);
    when the connection drops or cannot be made, wait *backoff* and dial again.

    *serve* returns True when the connection was a good one: the backoff then
    starts over. A first dial failing with an errno in *fatal_errnos* (a wrong
    address, not a peer still booting) is raised. The first failure of a run
    of them is a warning, the rest debug lines with their count."""
    failures = 0
    connected_once = False
    while True:
        try:
            sock = await connect(endpoint, timeout=connect_timeout)
        except OSError as exc:  # TimeoutError included
            if not connected_once and failures == 0 and exc.errno in fatal_errnos:
                raise
            failures += 1
            delay = backoff.next()
            log.log(
                logging.WARNING if failures == 1 else logging.DEBUG,
                "rpc dial failed endpoint=%s attempt=%d error=%r retry_in=%.2fs",
                endpoint,
                failures,
                str(exc),
                delay,
            )
        else:
            connected_once = True
            failures = 0
            log.info("rpc connected endpoint=%s", endpoint)
            if await serve(sock):
                backoff.reset()
            delay = backoff.next()
            log.warning("rpc connection lost endpoint=%s redial_in=%.2fs", endpoint, delay)
        await asyncio.sleep(delay)


class EndpointError(ValueError):
    """An endpoint URI that cannot be used; the message names the URI and the problem."""


class EndpointInUseError(OSError):
    """A live socket already listens at the path; it is left in place."""


class NotASocketError(FileExistsError):
    """Something that is not a socket exists at the path; it is never deleted."""


class HvsockConnectError(ConnectionRefusedError):
    """The hybrid-vsock multiplexer did not answer ``OK <n>`` to ``CONNECT <port>``."""


@dataclass(frozen=True)
class UnixEndpoint:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class VsockEndpoint:
    cid: int | None
    port: int

    def __str__(self) -> str:
        return f"vsock://{'' if self.cid is None else self.cid}:{self.port}"


@dataclass(frozen=True)
class HvsockEndpoint:
    path: str
    port: int

    def __str__(self) -> str:
        return f"hvsock:{self.path}:{self.port}"


Endpoint = UnixEndpoint | VsockEndpoint | HvsockEndpoint


def _bad(uri: str, problem: str) -> EndpointError:
    return EndpointError(f"invalid endpoint {uri!r}: {problem}")


def unix_path_problem(path: str) -> str | None:
    """What makes *path* unusable as a UNIX socket path (absolute, no NUL, fits
    sun_path), said so that it can follow the path's name; None when it is fine.
    The one rule for every socket path the programs take."""
    if not path:
        return "is empty"
    if "\0" in path:
        return "contains a NUL byte"
    if not path.startswith("/"):
        return "is relative; it must be absolute"
    size = len(os.fsencode(path))
    if size > MAX_UNIX_PATH:
        return f"is {size} bytes, longer than the {MAX_UNIX_PATH} bytes sun_path can hold"
    return None


def dir_problem(
    path: str, *, owners: Collection[int], forbidden: int, what: str, advice: str
) -> str | None:
    """Why the directory holding *path* is unfit for a socket: owned by a uid
    not in *owners*, or with a mode bit of *forbidden* set, said as
    ``directory D {what} (owner uid U, mode M){advice}``; None when fit or
    missing (:func:`listen` creates it 0700). The one directory rule of the
    programs' socket paths; callers say what it means for theirs."""
    parent = os.path.dirname(path)
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"directory {parent}: {exc.strerror}"
    if st.st_uid not in owners or st.st_mode & forbidden:
        mode = stat.filemode(st.st_mode)
        return f"directory {parent} {what} (owner uid {st.st_uid}, mode {mode}){advice}"
    return None


def private_dir_problem(path: str) -> str | None:
    """Why the directory of the listening socket *path* is unfit: open to other
    users or not ours (whoever can connect to the socket could play the peer);
    None when fit, or missing."""
    return dir_problem(
        path,
        owners={os.geteuid()},
        forbidden=0o077,
        what="is open to other users",
        advice="; use a directory only you can enter (mode 0700)",
    )


def _check_path(uri: str, path: str) -> str:
    problem = unix_path_problem(path)
    if problem is not None:
        raise _bad(uri, f"the socket path {path!r} {problem}")
    return path


def _parse_u32(uri: str, text: str, what: str) -> int:
    # isdigit() alone accepts non-ASCII digits such as "²".
    if not text or not (text.isascii() and text.isdigit()):
        raise _bad(uri, f"{what} {text!r} is not a number")
    value = int(text)
    if value > MAX_PORT:
        raise _bad(uri, f"{what} {value} is out of range 0..{MAX_PORT}")
    return value


def as_endpoint(value: str | Endpoint) -> Endpoint:
    """*value* as an endpoint, parsing a URI (EndpointError when it is not one)."""
    return parse_endpoint(value) if isinstance(value, str) else value


def parse_endpoint(uri: str) -> Endpoint:
    """Parse ``unix:/path``, ``vsock://CID:PORT`` (``vsock://:PORT``) or ``hvsock:/path:PORT``."""
    scheme, sep, rest = uri.partition(":")
    if not sep:
        raise _bad(uri, "missing scheme (expected unix:, vsock:// or hvsock:)")
    if scheme == "unix":
        # unix:///abs/path (as containerd prints addresses) means unix:/abs/path.
        if rest.startswith("//"):
            rest = rest[2:]
        return UnixEndpoint(_check_path(uri, rest))
    if scheme == "vsock":
        if not rest.startswith("//"):
            raise _bad(uri, "expected vsock://CID:PORT or vsock://:PORT")
        cid_text, sep, port_text = rest[2:].partition(":")
        if not sep:
            raise _bad(uri, "missing :PORT (expected vsock://CID:PORT)")
        cid = None if cid_text == "" else _parse_u32(uri, cid_text, "CID")
        return VsockEndpoint(cid, _parse_u32(uri, port_text, "port"))
    if scheme == "hvsock":
        path, sep, port_text = rest.rpartition(":")
        if not sep or not port_text or not path:
            raise _bad(uri, "missing :PORT (expected hvsock:/path/to/v.sock:PORT)")
        if not (port_text.isascii() and port_text.isdigit()):
            raise _bad(
                uri,
                f"port {port_text!r} is not a number (expected hvsock:/path/to/v.sock:PORT)",
            )
        return HvsockEndpoint(_check_path(uri, path), _parse_u32(uri, port_text, "port"))
    raise _bad(uri, f"unknown scheme {scheme!r} (expected unix:, vsock:// or hvsock:)")


def out_of_resources(exc: BaseException) -> bool:
    """Whether *exc* says descriptors or memory ran out (EMFILE, ENFILE, ENOBUFS,
    ENOMEM): retrying at once fails the same way; it is nobody's fault but load."""
    return isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS


def _new_socket(family: int) -> socket.socket:
    return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)


def _named(exc: OSError, what: str) -> OSError:
    # OSError(errno, ...) builds the matching subclass, so callers keep
    # classifying by type (FileNotFoundError, ConnectionRefusedError...).
    if exc.errno is None:
        return exc
    return OSError(exc.errno, f"{exc.strerror or os.strerror(exc.errno)}: {what}")


def connect_unix_now(path: str) -> socket.socket | None:
    """Connect to a UNIX socket if that needs no waiting: the socket, or None when
    the listener's backlog is full or the connect fails (:func:`connect` then
    waits, retries or names the error). A fast path for per-connection dials.

    Raises OSError (EMFILE, ENFILE, ENOBUFS...) when no socket can be made:
    waiting would not help, so the caller fails that one connection."""
    try:
        sock = _new_socket(socket.AF_UNIX)
    except OSError as exc:
        raise _named(exc, f"socket for unix:{path}") from None
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


async def _connect_unix(path: str, what: str) -> socket.socket:
    try:
        sock = _new_socket(socket.AF_UNIX)
    except OSError as exc:
        raise _named(exc, f"socket for {what}") from None
    try:
        delay = 0.001
        while True:
            try:
                # AF_UNIX connect never returns EINPROGRESS: it succeeds or
                # fails with EAGAIN while the listener's backlog is full, and
                # the socket then polls writable although it is not
                # connected, so loop.sock_connect would report success.
                sock.connect(path)
                return sock
            except (BlockingIOError, InterruptedError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
            except OSError as exc:
                raise _named(exc, f"connect {what}") from None
    except BaseException:
        sock.close()
        raise


async def _read_hvsock_reply(sock: socket.socket, ep: HvsockEndpoint) -> None:
    loop = asyncio.get_running_loop()
    line = bytearray()
    # One byte at a time: bytes after the newline belong to the application.
    while len(line) < HVSOCK_REPLY_MAX:
        chunk = await loop.sock_recv(sock, 1)
        if not chunk:
            raise HvsockConnectError(
                errno.ECONNREFUSED,
                f"{ep}: connection closed before OK (nothing listens on port {ep.port}?)"
                + (f", got {bytes(line)!r}" if line else ""),
            )
        line += chunk
        if chunk == b"\n":
            break
    parts = bytes(line).split(b" ")
    if (
        line.endswith(b"\n")
        and len(parts) == 2
        and parts[0] == b"OK"
        and parts[1][:-1].isdigit()
        and parts[1][:-1].isascii()
    ):
        return
    raise HvsockConnectError(
        errno.ECONNREFUSED, f"{ep}: expected 'OK <n>' after CONNECT, got {bytes(line)!r}"
    )


async def wait_ready(sock: socket.socket, *, write: bool = False) -> None:
    """Wait until *sock* is readable (or writable): for the rare waits of code
    that otherwise works on non-blocking sockets directly."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def connect_nonblocking(
    sock: socket.socket, address: tuple[int, int] | tuple[str, int]
) -> None:
    """connect() a non-blocking socket and wait until it is done. Unlike
    loop.sock_connect this never resolves the address: uvloop's does, and an
    AF_VSOCK (cid, port) pair is not a host name."""
    try:
        sock.connect(address)
        return
    except (BlockingIOError, InterruptedError):
        pass
    await wait_ready(sock, write=True)
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


async def _connect(ep: Endpoint) -> socket.socket:
    loop = asyncio.get_running_loop()
    if isinstance(ep, UnixEndpoint):
        return await _connect_unix(ep.path, str(ep))
    if isinstance(ep, HvsockEndpoint):
        sock = await _connect_unix(ep.path, str(ep))
        try:
            await loop.sock_sendall(sock, f"CONNECT {ep.port}\n".encode())
            await _read_hvsock_reply(sock, ep)
        except HvsockConnectError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise _named(exc, f"connect {ep}") from None
        except BaseException:
            sock.close()
            raise
        return sock
    if ep.cid is None:
        raise EndpointError(f"invalid endpoint {str(ep)!r}: connecting needs a CID")
    try:
        sock = _new_socket(socket.AF_VSOCK)
    except OSError as exc:
        raise _named(exc, f"socket for {ep}") from None
    try:
        await connect_nonblocking(sock, (ep.cid, ep.port))
    except OSError as exc:
        sock.close()
        raise _named(exc, f"connect {ep}") from None
    except BaseException:
        sock.close()
        raise
    return sock


async def connect(ep: Endpoint, *, timeout: float | None = None) -> socket.socket:
    """Connect to *ep*; the returned non-blocking socket belongs to the caller.

    hvsock endpoints are ready for payload when this returns (the ``OK`` line
    has been read). Raises ``TimeoutError`` naming the endpoint on timeout.
    """
    try:
        async with asyncio.timeout(timeout):
            return await _connect(ep)
    except TimeoutError:
        raise TimeoutError(f"connect {ep}: timed out after {timeout}s") from None


class Listener:
    """A listening socket bound to an endpoint; owns the socket and its file."""

    def __init__(self, sock: socket.socket, endpoint: Endpoint, inode: tuple[int, int] | None):
        self._sock = sock
        self._endpoint = endpoint
        self._inode = inode
        self._closed = False
        self._eager = 0
        self._family = family_of(sock)
        self._kind = type_of(sock)
        self._on_connection: Callable[[socket.socket], None] | None = None
        self._on_error: Callable[[OSError], None] | None = None
        self._backoff = 0.1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resume: asyncio.TimerHandle | None = None

    @property
    def sock(self) -> socket.socket:
        return self._sock

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoint

    @property
    def closed(self) -> bool:
        return self._closed

    async def accept(self) -> socket.socket:
        """Accept one connection: a non-blocking socket owned by the caller."""
        # Try at once, so a backlog drains without one event-loop pass per
        # connection; every _EAGER_ACCEPTS-th waits in the loop (others' turn).
        if self._eager < _EAGER_ACCEPTS:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                pass
            else:
                self._eager += 1
                conn.setblocking(False)
                return conn
        self._eager = 0
        conn, _ = await asyncio.get_running_loop().sock_accept(self._sock)
        conn.setblocking(False)
        return conn

    def start_accepting(
        self,
        on_connection: Callable[[socket.socket], None],
        on_error: Callable[[OSError], None],
        *,
        backoff: float = 0.1,
    ) -> None:
        """Accept on callbacks until :meth:`stop_accepting` or :meth:`close`: each
        new connection (non-blocking, owned by *on_connection*) is handed over
        without a task or an event-loop pass of its own. An accept error other
        than "nothing there" (EMFILE, ENOBUFS...) goes to *on_error* and accepting
        pauses for *backoff* seconds instead of spinning."""
        if self._closed:
            raise RuntimeError(f"listener {self._endpoint} is closed")
        if self._on_connection is not None:
            raise RuntimeError(f"listener {self._endpoint} is already accepting")
        self._on_connection = on_connection
        self._on_error = on_error
        self._backoff = backoff
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._accept_ready)

    def stop_accepting(self) -> None:
        """Stop what :meth:`start_accepting` started (idempotent)."""
        if self._on_connection is None:
            return
        self._on_connection = None
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        elif self._loop is not None and not self._closed:
            self._loop.remove_reader(self._sock.fileno())

    def _accept_ready(self) -> None:
        # Drain a burst in one wake-up, bounded so other callbacks get their turn.
        # _accept is what socket.accept() wraps (CPython, since 3.3): it returns
        # the fd, and the wrapper's family/type lookups are not needed here.
        accept = self._sock._accept  # type: ignore[attr-defined]
        family, kind = self._family, self._kind
        for _ in range(_EAGER_ACCEPTS):
            on_connection = self._on_connection
            if on_connection is None:
                return  # stopped by a callback
            try:
                fd, _ = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                assert self._loop is not None and self._on_error is not None
                self._loop.remove_reader(self._sock.fileno())
                self._resume = self._loop.call_later(self._backoff, self._resume_accepting)
                self._on_error(exc)
                return
            # Known family and type: socket.accept() would look both up again.
            conn = socket.socket(family, kind, 0, fd)
            conn.setblocking(False)
            on_connection(conn)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self._on_connection is not None and self._loop is not None and not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept_ready)

    def close(self) -> None:
        """Close the socket and remove its file if it is still ours (idempotent).

        Cancel any pending accept() first: the fd must not be closed while
        the event loop still watches it.
        """
        if self._closed:
            return
        self.stop_accepting()
        self._closed = True
        self._sock.close()
        if isinstance(self._endpoint, UnixEndpoint) and self._inode is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(self._endpoint.path)
                # Someone may have replaced the file since: never remove theirs.
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self._endpoint.path)

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _is_stale_socket(path: str) -> bool:
    probe = _new_socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except BlockingIOError:
        return False  # live, backlog full
    finally:
        probe.close()
    return False


def _prepare_unix_path(ep: UnixEndpoint) -> None:
    path = ep.path
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        with contextlib.suppress(FileExistsError):
            os.makedirs(parent, mode=0o700)
            os.chmod(parent, 0o700)  # makedirs' mode is filtered by the umask
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "a regular file"
            if stat.S_ISREG(st.st_mode)
            else "a symlink"
            if stat.S_ISLNK(st.st_mode)
            else "not a socket"
        )
        raise NotASocketError(
            errno.EEXIST, f"cannot listen on {ep}: {path} exists and is {kind}; not removing it"
        )
    if not _is_stale_socket(path):
        raise EndpointInUseError(
            errno.EADDRINUSE, f"cannot listen on {ep}: a live socket already listens at {path}"
        )
    # Stale socket left by a previous run; only remove the file we probed.
    with contextlib.suppress(FileNotFoundError):
        again = os.lstat(path)
        if (again.st_dev, again.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(path)


def _listen_unix(
    ep: UnixEndpoint, mode: int, uid: int | None, gid: int | None, backlog: int
) -> Listener:
    try:
        _prepare_unix_path(ep)
    except (NotASocketError, EndpointInUseError):
        raise
    except OSError as exc:
        raise _named(exc, f"listen {ep}") from None
    sock = _new_socket(socket.AF_UNIX)
    try:
        # bind() creates the file with the socket inode's mode minus the
        # umask; setting it first means the file is never more open than mode.
        os.fchmod(sock.fileno(), mode)
        try:
            sock.bind(ep.path)
        except OSError as exc:
            raise _named(exc, f"listen {ep}") from None
        st = os.lstat(ep.path)
        inode = (st.st_dev, st.st_ino)
        try:
            os.chmod(ep.path, mode)  # restore bits the umask removed
            if uid is not None or gid is not None:
                os.chown(ep.path, -1 if uid is None else uid, -1 if gid is None else gid)
            sock.listen(backlog)
        except BaseException:
            os.unlink(ep.path)
            raise
    except BaseException:
        sock.close()
        raise
    return Listener(sock, ep, inode)


def _listen_vsock(ep: VsockEndpoint, backlog: int) -> Listener:
    sock = _new_socket(socket.AF_VSOCK)
    try:
        sock.bind((VMADDR_CID_ANY if ep.cid is None else ep.cid, ep.port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise _named(exc, f"listen {ep}") from None
    return Listener(sock, ep, None)


async def listen(
    ep: Endpoint,
    *,
    mode: int = 0o600,
    uid: int | None = None,
    gid: int | None = None,
    backlog: int = 4096,
) -> Listener:
    """Listen on *ep* (``unix:`` or ``vsock://``).

    UNIX: the parent directory is created 0700 if missing, a stale socket
    file is replaced, anything else at the path raises and is left alone.
    hvsock listening is plain ``unix:`` on ``<path>_<port>``.
    """
    if isinstance(ep, UnixEndpoint):
        return _listen_unix(ep, mode, uid, gid, backlog)
    if isinstance(ep, VsockEndpoint):
        return _listen_vsock(ep, backlog)
    raise EndpointError(
        f"invalid endpoint {str(ep)!r}: cannot listen on hvsock; listen on "
        f"unix:{ep.path}_{ep.port} to receive guest connections to port {ep.port}"
    )
