"""What a user gets from the package: the wheel installed by plain pip into a
fresh venv works from its own ``socketforward`` script, and each subcommand
loads only its own modules (``socketforward guest`` in a small VM starts
without the host's or the demo's).

The wheel is built and installed once per test session (``uv build``; pip
fetches protobuf and uvloop from the package registry, through its cache).
Without the registry the install fails, and says so: CI has it.
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
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor

from bench.footprint import InstallError, Venv, build_wheel, installed_env, make_venv
from socketforward import cli
from socketforward.ttrpc.proto import status_pb2, ttrpc_pb2
from tests.processes import (
    Running,
    echo_round_trip,
    echo_server,
    short_tmp_dir,
    wait_for_socket,
)

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

# Building the wheel and a venv and pip-installing into it take a few seconds
# with warm caches, a minute or so with cold ones.
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh venv with ``pip install socketforward[fast]`` of this tree's wheel."""
    tmp = tmp_path_factory.mktemp("packaging")
    try:
        return make_venv(tmp / "venv", build_wheel(tmp / "dist"), ["fast"])
    except InstallError as exc:
        problem = str(exc)
    pytest.fail(problem, pytrace=False)  # outside `except`: pip's words once, no traceback


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
    the runtime dependencies (protobuf, and uvloop for the fast extra)."""
    result = subprocess.run(
        [str(installed.script()), "--version"],
        capture_output=True, text=True, env=installed_env(), cwd="/", timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"socketforward {VERSION}"
    where = subprocess.run(
        [str(installed.python), "-c", "import socketforward; print(socketforward.__file__)"],
        capture_output=True, text=True, env=installed_env(), cwd="/", timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(installed.root), where
    listed = subprocess.run(
        [str(installed.python), "-m", "pip", "list", "--format", "freeze"],
        capture_output=True, text=True, env=installed_env(), timeout=60, check=True,
    ).stdout  # fmt: skip
    names = {line.split("==")[0].lower() for line in listed.split()} - {"pip", "setuptools"}
    assert names == {"socketforward", "protobuf", "uvloop"}


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


def test_status_generated_from_the_vendored_proto_keeps_googleapis_wire() -> None:
    """google.rpc.Status, generated into the ttrpc package instead of coming
    from googleapis-common-protos, keeps googleapis' file name, full name and
    field numbers, so an error response encodes to the bytes ttrpc peers read."""
    status = ttrpc_pb2.Response.DESCRIPTOR.fields_by_name["status"].message_type
    assert status is status_pb2.Status.DESCRIPTOR
    assert (status.full_name, status.file.name) == ("google.rpc.Status", "google/rpc/status.proto")
    assert {f.name: (f.number, f.type) for f in status.fields} == {
        "code": (1, descriptor.FieldDescriptor.TYPE_INT32),
        "message": (2, descriptor.FieldDescriptor.TYPE_STRING),
        "details": (3, descriptor.FieldDescriptor.TYPE_MESSAGE),
    }
    details = status.fields_by_name["details"].message_type
    assert details is not None and details.full_name == "google.protobuf.Any"
    response = ttrpc_pb2.Response(status=status_pb2.Status(code=5, message="nope"))
    assert response.SerializeToString() == b"\n\x08\x08\x05\x12\x04nope"


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
