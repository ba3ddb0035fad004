"""Embedding one side in a program: ``socketforward.Guest`` and
``socketforward.Host`` (README, "Embedding"), in one event loop over ``unix:``
endpoints."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from socketforward import Expose, Forward, Guest, Host
from tests.processes import echo_round_trip, echo_server, embedded_endpoints

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.timeout(60)


def test_the_readme_example_runs() -> None:
    """The README's embedding program runs as printed and forwards its echo."""
    text = README.read_text()
    program = text.split("### Embedding", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["echo: b'hello'", "requests: 1"], result.stdout


def test_importing_the_package_loads_neither_side() -> None:
    """`import socketforward` (as the guest agent's smallest use) loads no side;
    the names load their side on first use."""
    code = (
        "import sys, socketforward\n"
        "assert not any(m.startswith(('socketforward.host', 'socketforward.guest')) "
        "for m in sys.modules), sorted(sys.modules)\n"
        "socketforward.Guest\n"
        "assert 'socketforward.guest.embed' in sys.modules\n"
        "assert 'socketforward.host.embed' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_events_follow_the_guest_coming_and_going(short_tmp: Path) -> None:
    """wait_connected / wait_disconnected on both sides follow the RPC
    connection: a guest that stops and a new one that dials in."""
    rpc, streams = embedded_endpoints(short_tmp)
    target, vm_path = short_tmp / "echo.sock", short_tmp / "vm" / "echo.sock"
    async with (
        await echo_server(target),
        Host(
            rpc_listen=rpc, streams=streams, forwards=[Forward("e", str(target), str(vm_path))]
        ) as host,
    ):
        assert not host.connected
        for round_ in range(2):
            async with Guest(rpc_dial=rpc, streams=streams) as guest:
                async with asyncio.timeout(30):
                    await host.wait_connected()
                    await guest.wait_connected()
                assert host.connected and guest.connected
                assert guest.bound() == {"e": str(vm_path)}
                assert await echo_round_trip(vm_path, b"round %d" % round_) == b"round %d" % round_
            async with asyncio.timeout(30):
                await host.wait_disconnected()
            assert not host.connected
            assert not vm_path.exists()  # the guest removed its socket file on stop
        assert host.stats()["e"].connected == 2


async def test_the_table_changes_at_run_time(short_tmp: Path) -> None:
    """Host.add binds a new forward in the running guest; Host.add_exposes
    listens for a new expose; both serve; remove takes them away."""
    rpc, streams = embedded_endpoints(short_tmp)
    target, vm_path = short_tmp / "echo.sock", short_tmp / "vm" / "late.sock"
    vm_service, exposed = short_tmp / "vm-echo.sock", short_tmp / "host" / "vm-echo.sock"
    async with (
        await echo_server(target),
        await echo_server(vm_service),
        Host(rpc_listen=rpc, streams=streams) as host,
        Guest(rpc_dial=rpc, streams=streams) as guest,
    ):
        async with asyncio.timeout(30):
            await host.wait_connected()
        await host.add([Forward("late", str(target), str(vm_path))])
        assert await echo_round_trip(vm_path, b"added") == b"added"
        await host.add_exposes([Expose("back", str(vm_service), str(exposed))])
        assert await echo_round_trip(exposed, b"exposed") == b"exposed"
        assert guest.expose_stats()["back"].connected == 1
        await host.remove(["late"])
        assert host.remove_exposes(["back"]) == ["back"]
        assert not vm_path.exists() and not exposed.exists()
        assert set(host.forwards) == set() and set(host.exposes) == set()


async def test_a_guest_whose_stream_endpoint_is_taken_fails_to_start(short_tmp: Path) -> None:
    """start() raises, naming the path, when the stream endpoint is not usable."""
    taken = short_tmp / "taken"
    taken.write_text("mine")
    with pytest.raises(OSError, match="regular file"):
        async with Guest(rpc_dial=f"unix:{short_tmp}/rpc.sock", streams=f"unix:{taken}"):
            pass
    assert taken.read_text() == "mine"
