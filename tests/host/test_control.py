"""The host's control endpoint: forwards added and removed while it runs, all
or nothing, and what a SIGHUP reload of --forwards-file does with them
(docs/control.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from socketforward import control, transport
from socketforward.api import control_pb2 as pb
from socketforward.host import Forward, Forwarder
from socketforward.host.control import CONTROL, FORWARDS_FILE, ForwardTable, HostControl
from tests.processes import echo_round_trip, echo_server, socketforward, wait_for_socket
from tests.test_control import run_cli, stop

pytestmark = pytest.mark.timeout(60)


def entry(fid: str, host: str, vm: str) -> pb.Forward:
    return pb.Forward(forward_id=fid, host_path=host, vm_path=vm)


@contextlib.asynccontextmanager
async def host_control(
    tmp: Path, forwards: list[Forward], sources: dict[str, str], forwards_file: Path | None = None
) -> AsyncIterator[tuple[transport.UnixEndpoint, ForwardTable]]:
    """A Forwarder (no guest connected) with its Control service on a socket."""
    ep = transport.UnixEndpoint(str(tmp / "ctl" / "control.sock"))
    async with Forwarder(forwards, transport.UnixEndpoint(str(tmp / "streams.sock"))) as fw:
        table = ForwardTable(fw, sources, str(forwards_file) if forwards_file else None)
        server = await control.ControlServer.start(ep, HostControl(table, rpc_endpoint="test"))
        try:
            yield ep, table
        finally:
            await server.close()


A = Forward("a", "/h/a.sock", "/run/a.sock")
B = entry("b", "/h/b.sock", "/run/b.sock")


async def test_add_is_all_or_nothing_and_the_error_names_the_bad_entry(short_tmp: Path) -> None:
    """A batch with one bad entry adds nothing, and the error names that entry:
    a path --forward would refuse, an id in use with other paths, an id given
    twice. An entry identical to one in the table is left as it is."""
    async with host_control(short_tmp, [A], {"a": "--forward"}) as (ep, table):
        bad_path = entry("c", "relative.sock", "/run/c.sock")
        with pytest.raises(control.ControlError) as err:
            await control.add_forwards(ep, [B, bad_path])
        assert "forwards[1] 'c=relative.sock:/run/c.sock': host path" in str(err.value)
        assert "nothing added" in str(err.value)
        other_paths = entry("a", "/h/other.sock", "/run/a.sock")
        with pytest.raises(control.ControlError, match="forward ID a is already used by") as err:
            await control.add_forwards(ep, [B, other_paths])
        assert "'a=/h/other.sock:/run/a.sock'" in str(err.value)
        with pytest.raises(control.ControlError, match="forward ID b is given twice"):
            await control.add_forwards(ep, [B, B])
        assert set(table.forwarder.forwards) == {"a"}

        same_a = entry("a", A.host_path, A.vm_path)
        assert await control.add_forwards(ep, [B, same_a]) == ["b"]
        assert table.forwarder.forwards["b"] == Forward("b", "/h/b.sock", "/run/b.sock")
        status = await control.get_status(ep)
        assert [(f.forward_id, f.source) for f in status.forwards] == [
            ("a", "--forward"),
            ("b", CONTROL),
        ]


async def test_remove_is_all_or_nothing(short_tmp: Path) -> None:
    """An unknown id, or one the forwards file holds, removes nothing and is
    named; forwards from the command line or added at run time go, and keep
    their figures in the status, marked removed."""
    listed = short_tmp / "forwards"
    listed.write_text("f=/h/f.sock:/run/f.sock\n")
    f = Forward("f", "/h/f.sock", "/run/f.sock")
    sources = {"a": "--forward", "f": FORWARDS_FILE}
    async with host_control(short_tmp, [A, f], sources, listed) as (ep, table):
        await control.add_forwards(ep, [B])
        with pytest.raises(control.ControlError, match="no forward with ID 'nope'"):
            await control.remove_forwards(ep, ["b", "nope"])
        with pytest.raises(control.ControlError, match=f"f comes from --forwards-file {listed}"):
            await control.remove_forwards(ep, ["b", "f"])
        assert set(table.forwarder.forwards) == {"a", "b", "f"}

        assert await control.remove_forwards(ep, ["a", "b"]) == ["a", "b"]
        assert set(table.forwarder.forwards) == {"f"}
        status = await control.get_status(ep)
        assert [(s.forward_id, s.removed) for s in status.forwards] == [
            ("a", True),
            ("b", True),
            ("f", False),
        ]


async def test_a_reload_keeps_forwards_added_at_run_time(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGHUP re-reads the forwards file and changes only what the file put
    there: a forward added at run time stays. When the file lists it with the
    same paths the file takes it over (and a later reload without it removes
    it); with other paths the reload is refused and nothing changes."""
    listed = short_tmp / "forwards"
    listed.write_text("f1=/h/f1.sock:/run/f1.sock\n")
    f1 = Forward("f1", "/h/f1.sock", "/run/f1.sock")
    sources = {"a": "--forward", "f1": FORWARDS_FILE}
    async with host_control(short_tmp, [A, f1], sources, listed) as (_, table):
        runtime = Forward("r", "/h/r.sock", "/run/r.sock")
        assert await table.add([runtime]) == ["r"]

        listed.write_text("f2=/h/f2.sock:/run/f2.sock\n")
        await table.reload_file()
        assert set(table.forwarder.forwards) == {"a", "f2", "r"}
        assert table.source("r") == CONTROL

        listed.write_text("f2=/h/f2.sock:/run/f2.sock\nr=/h/r.sock:/run/r.sock\n")
        await table.reload_file()
        assert table.source("r") == FORWARDS_FILE
        listed.write_text("f2=/h/f2.sock:/run/f2.sock\n")
        await table.reload_file()
        assert set(table.forwarder.forwards) == {"a", "f2"}

        await table.add([runtime])
        listed.write_text("f3=/h/f3.sock:/run/f3.sock\nr=/h/elsewhere.sock:/run/r.sock\n")
        with caplog.at_level(logging.ERROR, "socketforward.host"):
            await table.reload_file()
        assert "not reloaded, table unchanged" in caplog.text
        assert "added through the control endpoint with other paths: r" in caplog.text
        assert table.forwarder.forwards == {
            "a": A,
            "f2": table.forwarder.forwards["f2"],
            "r": runtime,
        }


async def test_forward_add_serves_a_new_host_socket_through_a_real_guest(short_tmp: Path) -> None:
    """`socketforward forward add` on a running host: the guest listens at the
    new VM path at once and a connection there reaches the new host service.
    A batch naming a forward_id in use adds nothing and the one error line
    names the entry, as does a batch the guest refuses to Bind. A SIGHUP
    reload keeps the new forward; `forward remove` takes it away in the guest
    too; a forward of the file cannot be removed that way."""
    (short_tmp / "host").mkdir(mode=0o700)
    rpc, streams = short_tmp / "host" / "rpc.sock", short_tmp / "streams.sock"
    ctl = short_tmp / "host" / "control.sock"
    ctl_ep = transport.UnixEndpoint(str(ctl))
    first, new = short_tmp / "first.sock", short_tmp / "new.sock"
    vm_first, vm_new, vm_never, vm_file = (
        short_tmp / "vm" / n for n in ("first", "new", "never", "a-file")
    )
    listed = short_tmp / "forwards"
    listed.write_text(f"first={first}:{vm_first}\n")
    host_args = ["host", "--rpc-listen", f"unix:{rpc}", "--streams", f"unix:{streams}",
                 "--forwards-file", str(listed), "--control", f"unix:{ctl}"]  # fmt: skip
    guest_args = ["guest", "--rpc-dial", f"unix:{rpc}", "--streams", f"unix:{streams}"]
    add = ["forward", "add", "--control", f"unix:{ctl}"]
    async with await echo_server(first), await echo_server(new):
        with socketforward(host_args, short_tmp / "host.log") as host:
            await asyncio.to_thread(wait_for_socket, ctl, 30, host)
            with socketforward(guest_args, short_tmp / "guest.log") as guest:
                await asyncio.to_thread(wait_for_socket, vm_first, 30, host, guest)
                code, out, err = await run_cli(*add, f"new={new}:{vm_new}")
                assert (code, out.strip()) == (0, "added new"), err
                assert vm_new.is_socket()  # bound before the command returned
                assert await echo_round_trip(vm_new, b"to the new one") == b"to the new one"

                clash = f"first={new}:{vm_never}"
                code, _, err = await run_cli(*add, f"never={new}:{vm_never}", clash)
                assert code == 1 and err.count("\n") == 1
                assert f"'{clash}'" in err and "nothing added" in err
                vm_file.write_bytes(b"")  # the guest can make no socket there
                never = entry("never", str(new), str(vm_never))
                with pytest.raises(control.ControlError) as refused:
                    await control.add_forwards(ctl_ep, [never, entry("f", str(new), str(vm_file))])
                assert "the guest refused the forwards, nothing added" in str(refused.value)
                assert "forward_id='f'" in str(refused.value)
                assert not vm_never.exists()
                assert set(forward_ids(await control.get_status(ctl_ep))) == {"first", "new"}

                host.proc.send_signal(signal.SIGHUP)  # the file is unchanged
                for _ in range(600):
                    if "forwards file reloaded" in host.log():
                        break
                    await asyncio.sleep(0.05)
                assert "forwards file reloaded path" in host.log()
                assert await echo_round_trip(vm_new, b"still") == b"still"

                with pytest.raises(control.ControlError, match="comes from --forwards-file"):
                    await control.remove_forwards(ctl_ep, ["first"])
                code, out, err = await run_cli(
                    "forward", "remove", "--control", f"unix:{ctl}", "new"
                )
                assert (code, out.strip()) == (0, "removed new"), err
                for _ in range(600):
                    if not vm_new.exists():
                        break
                    await asyncio.sleep(0.05)
                assert not vm_new.exists() and vm_first.is_socket()
                stop(guest)
            stop(host)
    assert not ctl.exists()


def forward_ids(status: pb.StatusResponse) -> list[str]:
    """The forwards in the table (not those removed)."""
    return [f.forward_id for f in status.forwards if not f.removed]


async def test_expose_add_and_remove_through_the_control_endpoint(short_tmp: Path) -> None:
    """`socketforward expose add` on a running host: the host socket appears
    (mode as asked) and a client there reaches the VM service; a batch with an
    id in use adds nothing and the one error line names the entry; `expose
    remove` takes the socket away (status keeps its counters, marked removed);
    an expose of --config cannot be removed that way."""
    (short_tmp / "host").mkdir(mode=0o700)
    rpc, streams = short_tmp / "host" / "rpc.sock", short_tmp / "streams.sock"
    ctl = short_tmp / "host" / "control.sock"
    ctl_ep = transport.UnixEndpoint(str(ctl))
    vm_service, exposed = short_tmp / "vm-echo.sock", short_tmp / "host" / "echo.sock"
    kept = short_tmp / "host" / "kept.sock"
    config = short_tmp / "vm1.toml"
    config.write_text(
        f'rpc_listen = "unix:{rpc}"\nstreams = "unix:{streams}"\n'
        f'control = "unix:{ctl}"\n[[expose]]\nid = "kept"\nvm = "{vm_service}"\n'
        f'host = "{kept}"\n'
    )
    guest_args = ["guest", "--rpc-dial", f"unix:{rpc}", "--streams", f"unix:{streams}"]
    add = ["expose", "add", "--control", f"unix:{ctl}"]
    async with await echo_server(vm_service):
        with socketforward(["host", "--config", str(config)], short_tmp / "host.log") as host:
            await asyncio.to_thread(wait_for_socket, ctl, 30, host)
            with socketforward(guest_args, short_tmp / "guest.log") as guest:
                code, out, err = await run_cli(
                    *add, "--mode", "660", f"echo={vm_service}:{exposed}"
                )
                assert (code, out.strip()) == (0, "added echo"), err
                assert oct(exposed.stat().st_mode & 0o777) == "0o660"
                for _ in range(600):  # the guest may still be dialing in
                    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                        if await echo_round_trip(exposed, b"hello") == b"hello":
                            break
                    await asyncio.sleep(0.05)
                assert await echo_round_trip(exposed, b"to the vm") == b"to the vm"

                clash = f"echo={vm_service}:{short_tmp / 'host' / 'other.sock'}"
                code, _, err = await run_cli(
                    *add, f"new={vm_service}:{short_tmp}/host/n.sock", clash
                )
                assert code == 1 and err.count("\n") == 1, err
                assert f"'{clash}'" in err and "nothing added" in err
                assert not (short_tmp / "host" / "n.sock").exists()

                with pytest.raises(control.ControlError, match="comes from --config"):
                    await control.remove_exposes(ctl_ep, ["kept"])
                code, out, err = await run_cli(
                    "expose", "remove", "--control", f"unix:{ctl}", "echo"
                )
                assert (code, out.strip()) == (0, "removed echo"), err
                assert not exposed.exists() and kept.is_socket()
                status = await control.get_status(ctl_ep)
                assert {e.forward_id: e.removed for e in status.exposes} == {
                    "echo": True,
                    "kept": False,
                }
                stop(guest)
            stop(host)
    assert not ctl.exists() and not kept.exists()
