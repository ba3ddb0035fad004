"""The control endpoint as a user meets it (docs/control.md): the socket file,
who may use it, what `socketforward status` says, and the same status from a
real host and a real guest."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import stat
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import ttrpc_asyncio as ttrpc
from socketforward import __version__, control, transport
from socketforward.api import control_pb2 as pb
from socketforward.stats import ForwardStats
from tests.processes import Running, echo_round_trip, echo_server, socketforward, wait_for_socket

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534


class FixedStatus(control.ControlService):
    """A Control service answering one made-up status."""

    def __init__(self) -> None:
        super().__init__("host")

    async def Status(
        self, request: pb.StatusRequest, context: ttrpc.CallContext
    ) -> pb.StatusResponse:
        status = self.new_status()
        status.rpc.CopyFrom(pb.RpcState(connected=True, since=1.0, connections=2, endpoint="x"))
        stats = ForwardStats(requests=3, connected=2, failed={"dial": 1}, bytes_to_host=5)
        status.forwards.append(
            control.forward_status(
                "a", stats, host_path="/h/a.sock", vm_path="/run/a.sock", source="--forward"
            )
        )
        status.budgets.append(pb.Budget(name="relays", used=1, limit=9))
        return status


@contextlib.asynccontextmanager
async def serving(path: Path) -> AsyncIterator[transport.UnixEndpoint]:
    ep = transport.UnixEndpoint(str(path))
    server = await control.ControlServer.start(ep, FixedStatus())
    try:
        yield ep
    finally:
        await server.close()


@contextlib.contextmanager
def as_user(uid: int) -> Iterator[None]:
    """Act as another user (effective uid only, so root comes back)."""
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)


async def test_control_socket_is_private_answers_and_is_removed_at_close(short_tmp: Path) -> None:
    """The socket file is mode 0600, answers Status, and is gone after close."""
    path = short_tmp / "run" / "control.sock"
    async with serving(path) as ep:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700  # made by listen
        status = await control.get_status(ep)
        assert (status.side, status.version, status.pid) == ("host", __version__, os.getpid())
        assert status.forwards[0].failed["dial"] == 1
    assert not path.exists()


def test_only_a_private_unix_endpoint_is_taken(short_tmp: Path) -> None:
    """--control takes unix:PATH only, in a directory no other user can enter."""
    with pytest.raises(argparse.ArgumentTypeError, match="must be unix:PATH"):
        control.endpoint_arg("vsock://:1024")
    open_dir = short_tmp / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    problem = transport.private_dir_problem(str(open_dir / "c.sock"))
    assert problem is not None
    assert str(open_dir) in problem and "drwxr-xr-x" in problem
    assert transport.private_dir_problem(str(short_tmp / "c.sock")) is None
    assert transport.private_dir_problem(str(short_tmp / "new" / "c.sock")) is None


async def test_nothing_listening_is_one_clear_error(short_tmp: Path) -> None:
    """No file, or a socket file nobody listens on: the error says so."""
    with pytest.raises(control.ControlError, match=r"nothing listens at .*no such file"):
        await control.get_status(transport.UnixEndpoint(str(short_tmp / "absent.sock")))
    stale = short_tmp / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # bound, never listening: as a crashed run leaves it
    with pytest.raises(control.ControlError, match=r"nothing listens at .*connection refused"):
        await control.get_status(transport.UnixEndpoint(str(stale)))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
async def test_another_user_is_turned_away(short_tmp: Path) -> None:
    """Another user cannot reach the socket (mode 0600, private directory); and
    if the file is opened up anyway, the server still serves only its own user."""
    path = short_tmp / "run" / "control.sock"
    async with serving(path) as ep:
        short_tmp.chmod(0o711)  # noqa: ASYNC240 (a local chmod)
        with as_user(NOBODY), pytest.raises(control.ControlError, match="permission denied"):
            await control.get_status(ep)
        path.parent.chmod(0o711)
        path.chmod(0o666)
        with (
            as_user(NOBODY),
            pytest.raises(control.ControlError, match="serves only the user it runs as"),
        ):
            await control.get_status(ep)


def test_status_reads_as_a_table_and_as_json() -> None:
    """The table shows each forward's counters under the log line's names; the
    JSON form is plain values keyed by name."""
    status = pb.StatusResponse(version="9", side="guest", pid=7, uptime_seconds=75)
    status.rpc.CopyFrom(pb.RpcState(connected=False, since=100.0, endpoint="dial vsock://2:1025"))
    status.forwards.append(
        control.forward_status(
            "docker", ForwardStats(requests=4, connected=3, active=1, failed={"timeout": 1})
        )
    )
    status.forwards[0].vm_path = "/run/docker.sock"
    status.budgets.append(pb.Budget(name="connections", used=1, limit=100))
    status.counters["accept_calls"] = 1
    text = control.format_status(status, now=130.0)
    assert "socketforward guest 9, pid 7, up 1m 15s" in text
    assert "rpc: not connected for 30s" in text
    header, row = text.splitlines()[3:5]
    assert header.split() == [
        "forward", "requests", "connected", "active", "failed", "to_host", "to_vm", "paths",
    ]  # fmt: skip
    assert row.split() == ["docker", "4", "3", "1", "timeout:1", "0", "0", "/run/docker.sock"]
    assert "accept_calls=1" in text
    as_json = json.loads(json.dumps(control.status_dict(status)))
    assert as_json["forwards"]["docker"]["failed"] == {"timeout": 1}
    assert as_json["budgets"] == {"connections": {"used": 1, "limit": 100}}
    assert as_json["rpc"]["connected"] is False


# -- a real host and a real guest ----------------------------------------------------------


async def run_cli(*args: str) -> tuple[int, str, str]:
    """`socketforward ARGS` as a user runs it (without blocking this test's loop,
    which serves the forwarded service)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "socketforward", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def json_status(ep: Path) -> dict[str, Any]:
    """`socketforward status --json`: one JSON object on one line."""
    code, out, err = await run_cli("status", "--control", f"unix:{ep}", "--json")
    assert code == 0, err
    assert len(out.splitlines()) == 1
    status: dict[str, Any] = json.loads(out)
    return status


def stop(running: Running) -> None:
    """SIGTERM: a clean stop, exit status 0."""
    assert running.stop() == 0, running.log()


async def test_status_of_a_running_host_and_guest_counts_a_forwarded_connection(
    short_tmp: Path,
) -> None:
    """After one real forwarded connection, `socketforward status` shows it
    counted on both sides, with the same keys in the JSON of either; the RPC
    connection is up; both control sockets are 0600 and gone once stopped."""
    (short_tmp / "host").mkdir(mode=0o700)
    rpc, streams = short_tmp / "host" / "rpc.sock", short_tmp / "streams.sock"
    host_ctl, guest_ctl = short_tmp / "host" / "control.sock", short_tmp / "g" / "control.sock"
    target, vm_path = short_tmp / "echo.sock", short_tmp / "vm" / "echo.sock"
    host_args = ["host", "--rpc-listen", f"unix:{rpc}", "--streams", f"unix:{streams}",
                 "--forward", f"echo={target}:{vm_path}",
                 "--control", f"unix:{host_ctl}"]  # fmt: skip
    guest_args = ["guest", "--rpc-dial", f"unix:{rpc}", "--streams", f"unix:{streams}",
                  "--control", f"unix:{guest_ctl}"]  # fmt: skip
    async with await echo_server(target):
        with socketforward(host_args, short_tmp / "host.log") as host:
            await asyncio.to_thread(wait_for_socket, host_ctl, 30, host)
            with socketforward(guest_args, short_tmp / "guest.log") as guest:
                await asyncio.to_thread(wait_for_socket, vm_path, 30, host, guest)
                assert await echo_round_trip(vm_path, b"counted") == b"counted"
                # The guest adds a relay's bytes when it ends: wait for that.
                for _ in range(300):
                    statuses = [await json_status(host_ctl), await json_status(guest_ctl)]
                    if all(s["forwards"]["echo"]["bytes_to_vm"] == 7 for s in statuses):
                        break
                    await asyncio.sleep(0.05)
                host_status, guest_status = statuses
                for side, status in (("host", host_status), ("guest", guest_status)):
                    assert status["side"] == side
                    assert status["rpc"]["connected"] is True
                    echo = status["forwards"]["echo"]
                    assert (echo["requests"], echo["connected"], echo["active"]) == (1, 1, 0)
                    assert (echo["bytes_to_host"], echo["bytes_to_vm"]) == (7, 7)
                    assert echo["vm_path"] == str(vm_path)
                assert host_status.keys() == guest_status.keys()
                assert host_status["rpc"].keys() == guest_status["rpc"].keys()
                host_echo, guest_echo = (
                    host_status["forwards"]["echo"],
                    guest_status["forwards"]["echo"],
                )
                assert host_echo.keys() == guest_echo.keys()
                code, table, _ = await run_cli("status", "--control", f"unix:{guest_ctl}")
                assert code == 0
                assert "socketforward guest" in table and "rpc: connected" in table
                assert stat.S_IMODE(guest_ctl.stat().st_mode) == 0o600
                assert stat.S_IMODE(host_ctl.stat().st_mode) == 0o600
                stop(guest)
            stop(host)
    assert not host_ctl.exists() and not guest_ctl.exists()
