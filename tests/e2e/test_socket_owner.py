"""End to end: an OCI spec whose container runs as a non-root user gets a VM
socket that user owns, mode 0600; real ``socketforward host`` and ``guest``
processes over ``unix:`` endpoints (docs/protocol.md 4.3, 8)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from socketforward.host import oci
from tests.processes import echo_server, short_tmp_dir, socketforward, wait_for_socket

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root: the guest gives the socket to another user and binds under /run/socketfwd",
)

UID, GID = 1234, 5678
STRANGER = 4321  # another user, in the same group

# A container process: started as root (the interpreter lives under /root),
# it becomes UID:GID before it touches the socket.
_CLIENT = """
import os, socket, sys
path, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
sock = socket.socket(socket.AF_UNIX)
try:
    sock.connect(path)
except PermissionError:
    sys.exit(13)
sock.sendall(b"hello from %d" % uid)
sock.shutdown(socket.SHUT_WR)
data = b""
while chunk := sock.recv(65536):
    data += chunk
sys.stdout.write(data.decode())
"""


async def _connect_as(path: Path, uid: int, gid: int) -> tuple[int, str]:
    """Connect to *path* as *uid*:*gid*, send a greeting, half-close, read to
    EOF: (exit status, what came back); status 13 is "permission denied"."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CLIENT,
        str(path),
        str(uid),
        str(gid),
        stdout=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@contextlib.contextmanager
def _cleaned(vm_path: Path) -> Iterator[None]:
    """Remove what a guest killed mid-test would leave under /run/socketfwd."""
    parent_existed = vm_path.parent.exists()
    try:
        yield
    finally:
        if vm_path.is_socket():
            vm_path.unlink()
        if not parent_existed:
            with contextlib.suppress(OSError):
                vm_path.parent.rmdir()


async def test_oci_container_user_owns_its_vm_socket_and_can_connect() -> None:
    """With an OCI spec whose process.user is 1234:5678, the socket the guest
    creates in the VM is owned by 1234:5678 with mode 0600; a process running as
    that user connects through it to the host's service, another user (even in
    the same group) is refused, and the guest's log line prints the mode and
    owner. Stopping the guest removes the socket."""
    with short_tmp_dir() as tmp:
        (tmp / "host").mkdir(mode=0o700)
        rpc, streams, target = tmp / "host" / "rpc.sock", tmp / "streams.sock", tmp / "echo.sock"
        container_id = f"e2e-owner-{uuid.uuid4().hex[:12]}"
        forward_id = oci.forward_id_for(container_id, "/run/app.sock")
        vm_path = Path(oci.vm_path_for(forward_id))
        spec = {
            "ociVersion": "1.1.0",
            "process": {"user": {"uid": UID, "gid": GID}, "args": ["sh"]},
            "mounts": [{"type": "uds", "source": str(target), "destination": "/run/app.sock"}],
        }
        (tmp / "config.json").write_text(json.dumps(spec))
        host_args = [
            "host", "--rpc-listen", f"unix:{rpc}", "--streams", f"unix:{streams}",
            "--oci-spec", str(tmp / "config.json"), "--container-id", container_id,
            "--write-spec", str(tmp / "out.json"),
        ]  # fmt: skip
        guest_args = ["guest", "--rpc-dial", f"unix:{rpc}", "--streams", f"unix:{streams}"]
        async with await echo_server(target):
            with (
                _cleaned(vm_path),
                socketforward(host_args, tmp / "host.log") as host,
            ):
                await asyncio.to_thread(wait_for_socket, rpc, 30, host)
                with socketforward(guest_args, tmp / "guest.log") as guest:
                    await asyncio.to_thread(wait_for_socket, vm_path, 30, host, guest)
                    st = os.lstat(vm_path)
                    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, UID, GID)
                    assert await _connect_as(vm_path, UID, GID) == (0, f"hello from {UID}")
                    assert await _connect_as(vm_path, STRANGER, GID) == (13, "")
                    assert guest.stop() == 0, guest.log()
                    assert not await asyncio.to_thread(os.path.lexists, vm_path)
                assert host.stop() == 0, host.log()
        [mount] = json.loads((tmp / "out.json").read_text())["mounts"]
        assert mount["source"] == str(vm_path)
        assert (
            f"listening forward_id={forward_id} socket_path={vm_path} "
            f"mode=0600 uid={UID} gid={GID}" in (tmp / "guest.log").read_text()
        )
