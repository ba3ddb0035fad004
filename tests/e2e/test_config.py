"""``socketforward host --config FILE`` end to end: our guest and host as
separate processes over ``unix:`` endpoints, the host configured by one TOML
file that the tests edit and reload with SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import Running, echo_round_trip, echo_server, socketforward, wait_for_socket

pytestmark = pytest.mark.timeout(120)

# The VM socket's owner: another user when we may chown (root), else our own.
OWNER = 1234 if os.geteuid() == 0 else os.geteuid()
GROUP = 5678 if os.geteuid() == 0 else os.getegid()


@dataclass
class Vm:
    """The paths of one host + guest pair and the host's configuration file."""

    tmp: Path

    @property
    def rpc(self) -> Path:
        return self.tmp / "rpc" / "rpc.sock"

    @property
    def config(self) -> Path:
        return self.tmp / "vm1.toml"

    def vm(self, name: str) -> Path:
        """A socket path inside the "VM"."""
        return self.tmp / "vm" / f"{name}.sock"

    def host(self, name: str) -> Path:
        """A socket path on the host."""
        return self.tmp / "host" / f"{name}.sock"

    def write(self, *tables: str, budget: str = "max_relays = 64") -> None:
        head = f'rpc_listen = "unix:{self.rpc}"\nstreams = "unix:{self.tmp / "streams.sock"}"\n'
        self.config.write_text(head + budget + "\n\n" + "\n".join(tables))

    def forward(self, name: str, extra: str = "") -> str:
        return (
            f'[[forward]]\nid = "{name}"\nhost = "{self.host(name)}"\n'
            f'vm = "{self.vm(name)}"\n{extra}'
        )

    def expose(self, name: str, extra: str = "") -> str:
        return (
            f'[[expose]]\nid = "{name}"\nvm = "{self.vm(name)}"\n'
            f'host = "{self.host(name)}"\n{extra}'
        )

    def guest_args(self) -> list[str]:
        # Never the guest's defaults (vsock) on a test machine.
        streams = f"unix:{self.tmp}/streams.sock"
        return ["guest", "--rpc-dial", f"unix:{self.rpc}", "--streams", streams]


@pytest.fixture
def vm(short_tmp: Path) -> Vm:
    (short_tmp / "rpc").mkdir(mode=0o700)
    (short_tmp / "host").mkdir(mode=0o700)
    (short_tmp / "vm").mkdir()
    return Vm(short_tmp)


@contextlib.contextmanager
def running(args: list[str], log: Path) -> Iterator[Running]:
    with socketforward(args, log) as proc:
        yield proc
        assert proc.stop() == 0, proc.log()


@contextlib.asynccontextmanager
async def both(vm: Vm, *host_extra: str, ready: str) -> AsyncIterator[Running]:
    """`socketforward host --config` (yielded) and a guest, once the VM socket of
    the forward *ready* is there."""
    with running(["host", "--config", str(vm.config), *host_extra], vm.tmp / "host.log") as host:
        await asyncio.to_thread(wait_for_socket, vm.rpc, 30, host)
        with running(vm.guest_args(), vm.tmp / "guest.log") as guest:
            await asyncio.to_thread(wait_for_socket, vm.vm(ready), 30, host, guest)
            yield host


async def logged(host: Running, text: str) -> None:
    """Wait (bounded) until the host's log holds *text*."""
    async with asyncio.timeout(30):
        while text not in host.log():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def served(path: Path, payload: bytes = b"ping") -> bool:
    """A round trip through *path* (retried while the far side is being set up)."""
    async with asyncio.timeout(30):
        while True:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                if await echo_round_trip(path, payload) == payload:
                    return True
            await asyncio.sleep(0.05)


async def test_a_config_file_forwards_and_exposes_end_to_end(vm: Vm) -> None:
    """With only `--config`: the forward's VM socket has the file's mode 0640
    and owner, a round trip through it reaches the host service; the expose's
    host socket (0600) reaches the VM service; the file's budget is in force."""
    vm.write(
        vm.forward("web", f'mode = "0640"\nowner = {OWNER}\ngroup = "{GROUP}"\n'),
        vm.expose("svc"),
    )
    async with (
        await echo_server(vm.host("web")),
        await echo_server(vm.vm("svc")),
        both(vm, ready="web") as host,
    ):
        st = os.stat(vm.vm("web"))
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, OWNER, GROUP)
        assert await served(vm.vm("web"), b"to the host" * 1000)
        assert stat.S_IMODE(os.stat(vm.host("svc")).st_mode) == 0o600
        assert await served(vm.host("svc"), b"to the vm" * 1000)
        assert "max_relays=64" in host.log()
    assert not vm.host("svc").exists()


async def test_sighup_after_an_edit_adds_an_expose_and_removes_a_forward(vm: Vm) -> None:
    """Editing the file and sending SIGHUP: the new expose's host socket
    appears and serves, the forward taken out disappears from the VM, the
    forward left in keeps serving."""
    vm.write(vm.forward("keep"), vm.forward("gone"))
    async with (
        await echo_server(vm.host("keep")),
        await echo_server(vm.vm("svc")),
        both(vm, ready="keep") as host,
    ):
        await asyncio.to_thread(wait_for_socket, vm.vm("gone"), 30, host)
        vm.write(vm.forward("keep"), vm.expose("svc"))
        host.proc.send_signal(signal.SIGHUP)
        await logged(host, "config reloaded")
        assert vm.host("svc").is_socket()
        assert await served(vm.host("svc"), b"exposed")
        async with asyncio.timeout(30):
            while vm.vm("gone").exists():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert await served(vm.vm("keep"), b"still here")
        assert "forwards_added=0 forwards_removed=1 exposes_added=1 exposes_removed=0" in (
            host.log()
        )


async def test_a_bad_edit_keeps_the_old_table_and_the_log_names_the_line(vm: Vm) -> None:
    """A SIGHUP after an edit that does not parse (an unquoted mode), or that
    changes a budget, changes nothing: the log names the file, the line and
    what is wrong, no expose appears, and the forward keeps serving."""
    vm.write(vm.forward("keep"))
    async with await echo_server(vm.host("keep")), both(vm, ready="keep") as host:
        vm.write(vm.forward("keep"), vm.expose("svc", "mode = 0660\n"))
        host.proc.send_signal(signal.SIGHUP)
        await logged(host, "config not reloaded")
        line = vm.config.read_text().split("\n").index("mode = 0660") + 1
        assert f"{vm.config}:{line}:9: not TOML" in host.log()

        vm.write(vm.forward("keep"), vm.expose("svc"), budget="max_relays = 65")
        host.proc.send_signal(signal.SIGHUP)
        await logged(host, "max_relays cannot change while the host runs (64 -> 65)")
        assert f"{vm.config}:3: max_relays" in host.log()
        assert not vm.host("svc").exists()
        assert await served(vm.vm("keep"), b"unchanged")


def test_a_bad_file_stops_the_start_with_one_line_naming_file_line_and_key(vm: Vm) -> None:
    """Each mistake makes `socketforward host --config` exit 2 before anything
    listens, with one line on stderr that names the file, the line and the
    key; an id the command line gives with other paths counts as a mistake."""
    a = "[[forward]] #1 (id a)"
    cases: dict[str, tuple[str, list[str], str]] = {
        "mode as a number": (vm.forward("a", "mode = 640\n"), [], f":9: {a}: mode"),
        "unknown key": (vm.forward("a", 'onwer = "root"\n'), [], f':9: {a}: unknown key "onwer"'),
        "relative path": (vm.forward("a").replace(str(vm.vm("a")), "a.sock"), [], f":8: {a}: vm"),
        "an id of --forward": (vm.forward("a"), ["--forward", f"a=/o.sock:{vm.vm('a')}"],
                               ":5: [[forward]] a: forward ID a is also given with --forward"),
        "an id of --expose": (vm.expose("e"), ["--expose", f"e={vm.vm('e')}:/o.sock"],
                              ":5: [[expose]] e: expose ID e is also given with --expose"),
    }  # fmt: skip
    procs = {}
    for name, (table, extra, _) in cases.items():
        path = vm.tmp / f"{name.replace(' ', '-')}.toml"
        vm.write(table)
        vm.config.rename(path)
        command = [sys.executable, "-m", "socketforward", "host", "--config", str(path), *extra]
        procs[name] = (
            path,
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
        )
    for name, (path, proc) in procs.items():
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 2, (name, stderr)
        assert stderr.count("\n") == 1, (name, stderr)
        assert f"socketforward host: error: {path}{cases[name][2]}" in stderr, (name, stderr)
    assert not vm.rpc.exists()


async def test_a_flag_given_on_the_command_line_wins_over_the_file(vm: Vm) -> None:
    """`--rpc-listen` and `--max-relays` on the command line replace the file's
    values; a reload whose file changes only those is applied (its new
    forward is added), since the file's values are not in force anyway."""
    other = vm.tmp / "rpc" / "other.sock"
    vm.write(vm.forward("a"))
    args = ["host", "--config", str(vm.config), "--rpc-listen", f"unix:{other}"]
    args += ["--max-relays", "7"]
    with running(args, vm.tmp / "host.log") as host:
        await asyncio.to_thread(wait_for_socket, other, 30, host)
        assert not vm.rpc.exists()
        assert "max_relays=7 " in host.log()
        vm.write(vm.forward("a"), vm.forward("b"), budget="max_relays = 99")
        host.proc.send_signal(signal.SIGHUP)
        await logged(host, "config reloaded")
        assert "forwards_added=1 forwards_removed=0" in host.log()


async def test_a_mode_change_applies_in_place_and_keeps_connections(vm: Vm) -> None:
    """Only the mode and owner of a forward change in the file: after SIGHUP the
    VM socket has them, it is the same socket file (same inode), and a
    connection open across the reload keeps working."""
    vm.write(vm.forward("web", 'mode = "0600"\n'))
    async with await echo_server(vm.host("web")), both(vm, ready="web") as host:
        before = os.stat(vm.vm("web"))
        reader, writer = await asyncio.open_unix_connection(str(vm.vm("web")))
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"
        vm.write(vm.forward("web", f'mode = "0660"\ngroup = {GROUP}\n'))
        host.proc.send_signal(signal.SIGHUP)
        await logged(host, "forwards changed in place forward_ids=web")
        async with asyncio.timeout(30):
            while stat.S_IMODE(os.stat(vm.vm("web")).st_mode) != 0o660:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        after = os.stat(vm.vm("web"))
        assert (after.st_ino, after.st_gid) == (before.st_ino, GROUP)
        writer.write(b"after")
        assert await reader.readexactly(5) == b"after"
        writer.close()
        assert await served(vm.vm("web"), b"new connection")
