"""The data-stream endpoint the host connects to must be served by the expected
user (SO_PEERCRED of its listener): another local user who got to a `unix:`
path first must not be handed host connections."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from socketforward import datastream, transport
from tests.host.fake_guest import reverse_after_eof, unix_service
from tests.host.host_env import fwd, guest_accepting, host_with_guest, running_host

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534

# Listens at argv[1] as uid argv[2] (bound as root first: the directory stays
# private) and acks every stream id, as a squatting user's endpoint would.
_SQUATTER = r"""
import os, socket, struct, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
os.setuid(int(sys.argv[2]))
listener.listen(64)  # SO_PEERCRED reports the credentials of listen()
print("ready", flush=True)
held = []
while True:
    conn, _ = listener.accept()
    held.append(conn)
    try:
        size = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))[0]
        stream_id = conn.recv(size, socket.MSG_WAITALL)
        conn.sendall(struct.pack(">I", len(stream_id)) + stream_id)
    except OSError:
        pass
"""


@contextlib.contextmanager
def _endpoint_of_user(path: Path, uid: int) -> Iterator[transport.UnixEndpoint]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SQUATTER, str(path), str(uid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        yield transport.UnixEndpoint(str(path))
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        path.unlink(missing_ok=True)


def _force_task_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def never_now(ep: transport.Endpoint, stream_id: str) -> socket.socket | None:
        return None

    monkeypatch.setattr(datastream, "open_stream_now", never_now)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a listener as another user")
async def test_stream_endpoint_of_another_user_gets_no_connection(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A data-stream endpoint served by another user (uid 65534 here), though it
    acks properly, is hung up on: the request fails with `failed to open data
    stream`, counted `stream_peer`, one warning naming the uid, on both the fast
    and the waiting path. Configured with --streams-uid 65534 the host uses it."""
    caplog.set_level(logging.INFO, logger="socketforward.host")
    forward = fwd(short_tmp, "a")
    (short_tmp / "vm").mkdir(mode=0o700)
    async with unix_service(Path(forward.host_path), reverse_after_eof):
        with _endpoint_of_user(short_tmp / "vm" / "other.sock", NOBODY) as other:
            async with (
                running_host(short_tmp, [forward], streams=other) as env,
                guest_accepting(env.rpc) as (_, call),
            ):
                result = await call.connect("s-1", "fwd-a")
                assert result.error == "failed to open data stream"
                with monkeypatch.context() as patch:
                    _force_task_path(patch)
                    result = await call.connect("s-2", "fwd-a")
                    assert result.error == "failed to open data stream"
                assert env.forwarder.stats()["fwd-a"].failed == {"stream_peer": 2}
                assert env.forwarder.pending == 0
            warnings = [r for r in caplog.records if "served by another user" in r.message]
            assert len(warnings) == 2
            assert all(f"peer_uid={NOBODY}" in r.message for r in warnings)
            assert all(f"expected_uid={os.geteuid()}" in r.message for r in warnings)

            async with (
                running_host(short_tmp, [forward], streams=other, streams_uid=NOBODY) as env,
                guest_accepting(env.rpc) as (_, call),
            ):
                assert (await call.connect("s-3", "fwd-a")).error == ""
                assert env.forwarder.stats()["fwd-a"].failed == {}


async def test_stream_endpoint_of_our_own_user_is_refused_when_another_is_configured(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With streams_uid naming another user, a stream endpoint of this process's
    own user (root's, when the tests run as root: uid 0 is not special) is
    refused on both paths, and the host never answers success for it."""
    other_uid = os.geteuid() + 1
    async with host_with_guest(short_tmp, streams_uid=other_uid) as (env, _, guest, call):
        assert env.forwarder.streams_uid == other_uid
        assert (await call.connect("s-1", "fwd-a")).error == "failed to open data stream"
        with monkeypatch.context() as patch:
            _force_task_path(patch)
            result = await call.connect("s-2", "fwd-a")
            assert result.error == "failed to open data stream"
        assert env.forwarder.stats()["fwd-a"].failed == {"stream_peer": 2}
        assert guest.claimed == {}  # no success, so the guest claimed nothing
        assert env.forwarder.pending == 0
