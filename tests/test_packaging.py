"""What a user gets from the packages: the wheels installed by plain pip into a
fresh venv work from their own scripts (``socketforward``, and ttrpc-asyncio's
``protoc-gen-python_ttrpc``), ttrpc-asyncio installs and runs alone, and each
subcommand loads only its own modules (``socketforward guest`` in a small VM
starts without the host's or the demo's).

The wheels are built and installed once per test session (``uv build``; pip
takes our two wheels from the build and fetches protobuf and uvloop from the
package registry, through its cache). Without the registry the install fails,
and says so: CI has it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from google.protobuf import empty_pb2
from google.protobuf.compiler import plugin_pb2

from bench.footprint import InstallError, Venv, Wheels, build_wheels, installed_env, make_venv
from socketforward import cli
from tests.processes import (
    Running,
    echo_round_trip,
    echo_server,
    short_tmp_dir,
    wait_for_socket,
)

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
T = TypeVar("T")

# Building the wheel and a venv and pip-installing into it take a few seconds
# with warm caches, a minute or so with cold ones.
pytestmark = pytest.mark.timeout(300)


def _or_fail(make: Callable[[], T]) -> T:
    """``make()``, or the test fails with uv's or pip's words."""
    try:
        return make()
    except InstallError as exc:
        problem = str(exc)
    pytest.fail(problem, pytrace=False)  # outside `except`: pip's words once, no traceback


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Wheels:
    """This tree's two wheels, socketforward and ttrpc-asyncio."""
    return _or_fail(lambda: build_wheels(tmp_path_factory.mktemp("dist")))


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory, wheels: Wheels) -> Venv:
    """A fresh venv with ``pip install socketforward[fast]`` of this tree's wheels."""
    where = tmp_path_factory.mktemp("packaging") / "venv"
    return _or_fail(lambda: make_venv(where, wheels.socketforward_requirements(["fast"])))


@pytest.fixture(scope="session")
def installed_ttrpc(tmp_path_factory: pytest.TempPathFactory, wheels: Wheels) -> Venv:
    """A fresh venv with ``pip install ttrpc-asyncio`` of this tree's wheel alone."""
    where = tmp_path_factory.mktemp("packaging-ttrpc") / "venv"
    return _or_fail(lambda: make_venv(where, [wheels.ttrpc_asyncio_requirement()]))


@contextlib.contextmanager
def installed_cli(env: Venv, args: list[str], log_path: Path) -> Iterator[Running]:
    """The venv's ``socketforward ARGS``, run away from the repository (its
    working directory and environment point nowhere near it)."""
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [str(env.script()), "-v", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=installed_env(),
            cwd=log_path.parent,
        )
    running = Running(proc, log_path)
    try:
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_installed_cli_prints_the_version_and_runs_the_installed_package(installed: Venv) -> None:
    """`socketforward --version` of the pip-installed script prints pyproject's
    version, the package it runs is the venv's copy, and pip brought along only
    the runtime dependencies (ttrpc-asyncio, protobuf, and uvloop for the fast
    extra)."""
    result = subprocess.run(
        [str(installed.script()), "--version"],
        capture_output=True, text=True, env=installed_env(), cwd="/", timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"socketforward {VERSION}"
    where = _python(installed, "import socketforward; print(socketforward.__file__)")
    assert Path(where.strip()).is_relative_to(installed.root), where
    assert _distributions(installed) == {"socketforward", "ttrpc-asyncio", "protobuf", "uvloop"}


def _python(env: Venv, code: str) -> str:
    """What the venv's Python prints running *code*, away from the repository."""
    result = subprocess.run(
        [str(env.python), "-c", code],
        capture_output=True, text=True, env=installed_env(), cwd="/", timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def _distributions(env: Venv) -> set[str]:
    """The normalized names of what pip installed in *env*, pip itself aside."""
    listed = subprocess.run(
        [str(env.python), "-m", "pip", "list", "--format", "freeze"],
        capture_output=True, text=True, env=installed_env(), timeout=60, check=True,
    ).stdout  # fmt: skip
    names = {re.sub(r"[-_.]+", "-", line.split("==")[0]).lower() for line in listed.split()}
    return names - {"pip", "setuptools"}


def test_installed_ttrpc_asyncio_and_its_protoc_plugin_work(installed: Venv) -> None:
    """socketforward's install brings ttrpc-asyncio: the venv's copy imports, and
    its ``protoc-gen-python_ttrpc`` script, fed a request as protoc sends it,
    writes stubs that import ``ttrpc_asyncio``."""
    where = _python(installed, "import ttrpc_asyncio; print(ttrpc_asyncio.__file__)")
    assert Path(where.strip()).is_relative_to(installed.root), where
    request = plugin_pb2.CodeGeneratorRequest(file_to_generate=["ping.proto"])
    empty_pb2.DESCRIPTOR.CopyToProto(request.proto_file.add())
    ping = request.proto_file.add(
        name="ping.proto", package="ping", dependency=[empty_pb2.DESCRIPTOR.name]
    )
    ping.service.add(name="Ping").method.add(
        name="Ping", input_type=".google.protobuf.Empty", output_type=".google.protobuf.Empty"
    )
    plugin = installed.script("protoc-gen-python_ttrpc")
    result = subprocess.run(
        [str(plugin)], input=request.SerializeToString(),
        capture_output=True, env=installed_env(), cwd="/", timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    response = plugin_pb2.CodeGeneratorResponse.FromString(result.stdout)
    assert not response.error
    [out] = response.file
    assert out.name == "ping_ttrpc.py"
    assert "import ttrpc_asyncio as ttrpc" in out.content.splitlines()
    assert "class PingStub:" in out.content


# Run by a venv with ttrpc-asyncio alone: a call to a service nobody registered,
# then which modules of socketforward got imported (none may be).
_TTRPC_ALONE = """
import asyncio, socket, sys
from google.protobuf import empty_pb2
import ttrpc_asyncio as ttrpc, ttrpc_asyncio.plugin

async def main():
    ours, theirs = socket.socketpair()
    server = ttrpc.Server()
    serving = asyncio.ensure_future(server.serve_connection(ours))
    async with await ttrpc.Client.connect(theirs) as client:
        try:
            await client.unary("no.Such", "Call", empty_pb2.Empty(), empty_pb2.Empty, timeout=10)
        except ttrpc.TtrpcError as exc:
            print(exc.code.name)
    await serving
    await server.shutdown()

asyncio.run(main())
print(sorted(m for m in sys.modules if m.partition(".")[0] == "socketforward"))
"""


def test_ttrpc_asyncio_alone_installs_with_protobuf_only_and_answers_a_call(
    installed_ttrpc: Venv,
) -> None:
    """``pip install ttrpc-asyncio`` brings protobuf and nothing else, and the
    library serves and calls on its own: a call to an unknown service comes
    back UNIMPLEMENTED, with no module of socketforward imported."""
    assert _distributions(installed_ttrpc) == {"ttrpc-asyncio", "protobuf"}
    assert installed_ttrpc.script("protoc-gen-python_ttrpc").exists()
    assert _python(installed_ttrpc, _TTRPC_ALONE).split("\n") == ["UNIMPLEMENTED", "[]", ""]


def test_both_wheels_carry_the_license(wheels: Wheels) -> None:
    """Each wheel ships the repository's LICENSE (ttrpc-asyncio/LICENSE is a
    copy of it: a symlink would reach neither its sdist nor a wheel built from that)."""
    for wheel in (wheels.socketforward, wheels.ttrpc_asyncio):
        with zipfile.ZipFile(wheel) as archive:
            [name] = [n for n in archive.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
            assert archive.read(name) == (ROOT / "LICENSE").read_bytes(), wheel.name


async def test_installed_cli_forwards_a_host_socket_into_the_vm(installed: Venv) -> None:
    """The installed host and guest, over unix: endpoints, forward a host echo
    service to a VM path: bytes come back as sent, and both stop cleanly."""
    with short_tmp_dir() as run:
        echo = await echo_server(run / "echo.sock")
        try:
            rpc, streams = f"unix:{run}/rpc.sock", f"unix:{run}/streams.sock"
            host_args = ["host", "--rpc-listen", rpc, "--streams", streams,
                         "--forward", f"echo={run}/echo.sock:{run}/vm/echo.sock"]  # fmt: skip
            guest_args = ["guest", "--rpc-dial", rpc, "--streams", streams]
            with (
                installed_cli(installed, host_args, run / "host.log") as host,
                installed_cli(installed, guest_args, run / "guest.log") as guest,
            ):
                wait_for_socket(run / "vm/echo.sock", 60, host, guest)
                payload = os.urandom(256 * 1024)
                assert await echo_round_trip(run / "vm/echo.sock", payload) == payload
                assert guest.stop() == 0, guest.log()
                assert host.stop() == 0, host.log()
        finally:
            echo.close()
            await echo.wait_closed()


# -- subcommands load lazily -----------------------------------------------------------


def _imported(stderr: str) -> set[str]:
    """The modules ``python -X importtime`` reported importing."""
    return set(re.findall(r"^import time:.*\|\s*(\S+)$", stderr, re.MULTILINE))


def _ours(modules: set[str], *packages: str) -> set[str]:
    """The modules of *packages* (and the packages themselves) among *modules*."""
    return {m for m in modules for p in packages if m == p or m.startswith(p + ".")}


def test_main_help_lists_every_subcommand_and_imports_none() -> None:
    """`socketforward --help` lists each subcommand with its summary, without
    importing any of their modules."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "socketforward", "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name, command in cli.COMMANDS.items():
        assert re.search(rf"^\s+{name}\s+{re.escape(command.summary[:30])}", result.stdout, re.M)
    loaded = _ours(
        _imported(result.stderr),
        "socketforward.guest", "socketforward.host", "socketforward.demo",
        "socketforward.control", "socketforward.daemon",
    )  # fmt: skip
    assert not loaded


def test_guest_help_and_a_running_guest_never_import_the_host_or_the_demo() -> None:
    """`socketforward guest --help` shows the guest's options, and a running
    guest (started, dialing a host that is not there, asked for its statistics,
    stopped) never imports socketforward.host or socketforward.demo."""
    helped = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "socketforward", "guest", "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: socketforward guest")
    assert "--rpc-dial URI" in helped.stdout and "--log-level" in helped.stdout
    modules = _imported(helped.stderr)
    assert "socketforward.guest.cli" in modules
    assert not _ours(modules, "socketforward.host", "socketforward.demo")

    with short_tmp_dir() as run:
        log = run / "guest.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-X", "importtime", "-m", "socketforward", "guest",
                 "--rpc-dial", f"unix:{run}/rpc.sock", "--streams", f"unix:{run}/streams.sock"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        guest = Running(proc, log)
        try:
            wait_for_socket(run / "streams.sock", 60, guest)
            deadline = time.monotonic() + 60
            while "guest started" not in guest.log():  # its signal handlers are in place
                assert proc.poll() is None and time.monotonic() < deadline, guest.log()
                time.sleep(0.02)
            proc.send_signal(signal.SIGUSR1)  # the statistics line, a path of its own
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.5)  # a dial attempt or two meanwhile
            assert guest.stop() == 0, guest.log()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = guest.log()
    assert "stats pending=" in text, text
    modules = _imported(text)
    assert "socketforward.guest.agent" in modules
    assert not _ours(modules, "socketforward.host", "socketforward.demo")


def test_each_subcommand_help_is_its_own() -> None:
    """Each subcommand's --help shows its own options (registered on demand),
    with --version and the logging options; what `socketforward --help` lists
    for it is what its module says of itself."""
    own = {
        "demo": "--size-mib",
        "guest": "--rpc-dial",
        "host": "--forward",
        "status": "--json",
        "forward add": "FORWARD_ID=HOST_PATH:VM_PATH",
        "forward remove": "FORWARD_ID",
    }
    for command, option in own.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            cli.main([*command.split(), "--help"])
        assert exited.value.code == 0
        assert out.getvalue().startswith(f"usage: socketforward {command} ")
        for shown in (option, "--version", "--log-level"):
            assert shown in out.getvalue(), (command, shown)
    assert cli._parser().format_help() == cli._parser(eager=True).format_help()
