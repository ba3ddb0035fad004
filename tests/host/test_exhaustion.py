"""Running out of descriptors on the host (EMFILE and friends) while answering
ConnectRequests: the request that hit it fails alone, with an answer; the
Accept call, the RPC connection and the pending count come through intact.
First with the failure injected where sockets are made, then with a real
`socketforward host` process under a low descriptor limit."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from socketforward import datastream, transport
from socketforward.api import socketforward_pb2 as pb
from tests.host.fake_guest import (
    AcceptCall,
    FakeGuest,
    exchange,
    recv_all,
    reverse_after_eof,
    unix_service,
)
from tests.host.host_env import (
    HostEnv,
    fwd,
    guest_accepting,
    host_process,
    host_with_guest,
    running_host,
)

pytestmark = pytest.mark.timeout(60)


class SocketFaults:
    """``transport._new_socket`` (where every socket the host dials is made)
    failing with EMFILE on the calls ``fail`` picks, counted from 1."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: Callable[[int], bool]) -> None:
        self.calls = 0
        self.failed = 0
        self.fail = fail
        real = transport._new_socket

        def new_socket(family: int) -> socket.socket:
            self.calls += 1
            if self.fail(self.calls):
                self.failed += 1
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return real(family)

        monkeypatch.setattr(transport, "_new_socket", new_socket)

    def stop(self) -> None:
        self.fail = lambda _: False


def _force_task_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fast path hands a request to the task path when a connect would wait
    # (a full backlog, a VM still booting): make both always so.
    def host_never_now(path: str) -> socket.socket | None:
        return None

    def stream_never_now(ep: transport.Endpoint, stream_id: str) -> socket.socket | None:
        return None

    monkeypatch.setattr(transport, "connect_unix_now", host_never_now)
    monkeypatch.setattr(datastream, "open_stream_now", stream_never_now)


async def _results(call: AcceptCall, stream_ids: list[str]) -> list[str]:
    """Send every request before waiting for any answer; their error texts."""
    futures = [await call.request(stream_id, "fwd-a") for stream_id in stream_ids]
    async with asyncio.timeout(30):
        return [result.error for result in await asyncio.gather(*futures)]


async def _still_served_and_retired(
    tmp: Path, env: HostEnv, guest: FakeGuest, call: AcceptCall
) -> None:
    """The same Accept call still serves a request; then a change of the table
    retires it, which waits for its in-flight count to reach zero."""
    assert (await call.connect("ok-1", "fwd-a")).error == ""
    sock = guest.claimed.pop("ok-1")
    assert sock is not None
    with sock:
        assert await exchange(sock, b"still here") == b"ereh llits"
    assert env.forwarder.pending == 0
    assert env.forwarder.sessions == 1 and guest.accepts.empty()
    await env.forwarder.add([fwd(tmp, "b")])
    async with asyncio.timeout(10):
        await call.ended.wait()


async def test_emfile_on_the_host_dial_fails_only_those_requests(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """While the host cannot make a socket for the host-side dial, each request
    gets `failed to dial host socket` at once, counted `exhausted` and logged;
    once sockets can be made again the same Accept call serves the next one,
    nothing stays pending, and the call can still be retired cleanly."""
    caplog.set_level(logging.INFO, logger="socketforward.host")
    async with host_with_guest(short_tmp) as (env, target, guest, call):
        faults = SocketFaults(monkeypatch, lambda n: n <= 3)
        errors = await _results(call, ["s-1", "s-2", "s-3"])
        assert errors == ["failed to dial host socket"] * 3
        faults.stop()
        assert env.forwarder.stats()["fwd-a"].failed == {"exhausted": 3}
        assert env.forwarder.pending == 0
        assert target.accepted == 0 and len(env.registry) == 0
        assert caplog.text.count("host socket dial failed") == 3
        assert "reason=exhausted" in caplog.text and "Too many open files" in caplog.text
        await _still_served_and_retired(short_tmp, env, guest, call)


async def test_emfile_on_the_data_stream_fails_only_those_requests(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the host-side dial works but no socket can be made for the data
    stream, each request gets `failed to open data stream`, its host connection
    is closed (the service sees EOF), and the Accept call goes on."""
    eofs: list[bytes] = []

    async def note_eof(sock: socket.socket) -> None:
        eofs.append(await recv_all(sock))

    async with host_with_guest(short_tmp, note_eof) as (env, _, _, call):
        # Each request dials (odd calls), then opens its stream (even ones).
        faults = SocketFaults(monkeypatch, lambda n: n % 2 == 0 and n <= 6)
        errors = await _results(call, ["s-1", "s-2", "s-3"])
        assert errors == ["failed to open data stream"] * 3
        assert faults.failed == 3
        faults.stop()
        assert env.forwarder.stats()["fwd-a"].failed == {"exhausted": 3}
        assert env.forwarder.pending == 0
        async with asyncio.timeout(10):
            while len(eofs) < 3:  # noqa: ASYNC110 (no event of its own)
                await asyncio.sleep(0.01)
        assert eofs == [b""] * 3
        assert len(env.registry) == 0


async def test_emfile_on_the_task_path_fails_only_those_requests(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same on the path that waits (a busy service, a VM still booting,
    vsock): a request whose dial, and one whose data stream, finds no socket is
    answered with the matching error and counted; the Accept call goes on and
    nothing stays pending."""
    _force_task_path(monkeypatch)
    async with host_with_guest(short_tmp) as (env, _, guest, call):
        # s-1: task dial (1, fails). s-2: task dial (2), task stream (3, fails).
        faults = SocketFaults(monkeypatch, lambda n: n in (1, 3))
        assert (await call.connect("s-1", "fwd-a")).error == "failed to dial host socket"
        assert (await call.connect("s-2", "fwd-a")).error == "failed to open data stream"
        assert faults.failed == 2
        assert env.forwarder.stats()["fwd-a"].failed == {"exhausted": 2}
        assert env.forwarder.pending == 0
        await _still_served_and_retired(short_tmp, env, guest, call)


async def test_unexpected_error_in_a_request_gives_its_slot_back(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even an error nobody planned for (a bug) escaping a request does not keep
    its place among the pending ones: with max_pending=1, after the guest
    reconnects the next request is served instead of being refused `too many
    pending connections`."""

    def broken(ep: transport.Endpoint, stream_id: str) -> socket.socket | None:
        raise RuntimeError("bug")

    forward = fwd(short_tmp, "a")
    async with (
        unix_service(Path(forward.host_path), reverse_after_eof),
        running_host(short_tmp, [forward], max_pending=1) as env,
    ):
        with monkeypatch.context() as patch:
            patch.setattr(datastream, "open_stream_now", broken)
            async with guest_accepting(env.rpc, env.registry) as (_, call):
                await call.request("s-bug", "fwd-a")
                async with asyncio.timeout(10):
                    await call.ended.wait()  # the bug took the connection down
        assert env.forwarder.pending == 0
        async with guest_accepting(env.rpc, env.registry) as (guest, call):
            assert (await call.connect("s-1", "fwd-a")).error == ""
            guest.close_claimed()


# -- a real host process under a low descriptor limit ---------------------------------

FD_LIMIT = 64


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@contextlib.asynccontextmanager
async def _host_at_64_fds(
    tmp: Path, log_path: Path, *options: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, FakeGuest, AcceptCall]]:
    """`socketforward host` with one forward, its fd limit at FD_LIMIT, a guest
    dialed in with its Accept call."""
    target_path = tmp / "host" / "target.sock"
    rpc_path = tmp / "host" / "rpc" / "rpc.sock"
    streams_ep = transport.UnixEndpoint(str(tmp / "vm" / "streams.sock"))
    async with (
        unix_service(target_path, reverse_after_eof),
        datastream.StreamRegistry(await transport.listen(streams_ep)) as registry,
        host_process(
            "--rpc-listen", f"unix:{rpc_path}", "--streams", str(streams_ep),
            "--forward", f"a={target_path}:/run/a.sock", *options,
            log_path=log_path, rpc_path=rpc_path, preexec_fn=_limit_fds,
        ) as proc,
        guest_accepting(transport.UnixEndpoint(str(rpc_path)), registry) as (guest, call),
    ):  # fmt: skip
        yield proc, guest, call


async def test_host_process_out_of_descriptors_survives_and_serves_again(
    short_tmp: Path,
) -> None:
    """`socketforward host` limited to 64 descriptors, asked for far more
    simultaneous connections than it can hold: every request is answered
    (served, or `failed to dial host socket` / `failed to open data stream`),
    the process stays up with its Accept call open, and once the connections
    end it serves new ones again."""
    log_path = short_tmp / "host.log"
    # Past the default cap (derived from the limit) requests are refused before
    # any descriptor runs out: lift it to reach EMFILE itself.
    async with _host_at_64_fds(short_tmp, log_path, "--max-relays", str(10 * FD_LIMIT)) as (
        proc,
        guest,
        call,
    ):
        futures = [await call.request(f"s-{i}", "a") for i in range(3 * FD_LIMIT)]
        async with asyncio.timeout(30):
            results: list[pb.ConnectResult] = await asyncio.gather(*futures)
        errors = {r.error for r in results}
        served = sum(1 for r in results if not r.error)
        assert errors <= {"", "failed to dial host socket", "failed to open data stream"}
        assert served < len(results), "the limit was never reached"
        assert proc.returncode is None
        assert not call.ended.is_set()
        guest.close_claimed()  # the relays end, their descriptors come back
        # Relays end on their own time: retry a few times for a free descriptor.
        async with asyncio.timeout(30):
            attempt = 0
            while (await call.connect(f"after-{attempt}", "a")).error:
                attempt += 1
                await asyncio.sleep(0.05)
        sock = guest.claimed.pop(f"after-{attempt}")
        assert sock is not None
        with sock:
            assert await exchange(sock, b"served again") == b"niaga devres"
        assert not call.ended.is_set() and guest.accepts.empty()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0, log_path.read_text()
    log = log_path.read_text()
    assert "reason=exhausted" in log
    assert "Traceback" not in log


async def test_default_relay_cap_refuses_before_descriptors_run_out(short_tmp: Path) -> None:
    """With its default cap (from the fd limit, logged at start), a host at 64
    descriptors refuses the connections it could not hold with `too many pending
    connections` before any socket allocation fails, and serves again once they end."""
    log_path = short_tmp / "host.log"
    async with _host_at_64_fds(short_tmp, log_path) as (proc, guest, call):
        futures = [await call.request(f"s-{i}", "a") for i in range(3 * FD_LIMIT)]
        async with asyncio.timeout(30):
            results: list[pb.ConnectResult] = await asyncio.gather(*futures)
        assert {r.error for r in results} == {"", "too many pending connections"}
        guest.close_claimed()
        async with asyncio.timeout(30):
            attempt = 0
            while (await call.connect(f"after-{attempt}", "a")).error:
                attempt += 1
                await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0, log_path.read_text()
    log = log_path.read_text()
    assert "reason=exhausted" not in log and "relays_full" in log
    # Both limits and the cap they give are logged at start: (64 - 64 / 4) / 4.
    assert f"fd limit soft={FD_LIMIT} hard={FD_LIMIT}" in log and "max_relays=12" in log
