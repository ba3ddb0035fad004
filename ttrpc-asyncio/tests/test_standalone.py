"""ttrpc_asyncio stands alone: typed for its users, and importing nothing
but itself, the standard library and protobuf (nothing of socketforward, the
project it came from), so its distribution needs protobuf alone."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import echo
import ttrpc_asyncio as ttrpc

PACKAGE_DIR = Path(ttrpc.__file__).resolve().parent
PACKAGE = "ttrpc_asyncio"

# A user's program, with its own generated stubs (a copy of the echo package)
# beside it.
TYPED_USER = """\
from __future__ import annotations

import asyncio
import socket

import ttrpc_asyncio as ttrpc
from echo import echo_pb2, echo_ttrpc


class Echo(echo_ttrpc.EchoBase):
    async def Unary(
        self, request: echo_pb2.EchoRequest, context: ttrpc.CallContext
    ) -> echo_pb2.EchoResponse:
        peer: ttrpc.PeerCredentials | None = context.peer
        if peer is None:
            raise ttrpc.TtrpcError(ttrpc.Code.PERMISSION_DENIED, "who are you")
        return echo_pb2.EchoResponse(payload=request.payload, seq=1)

    async def Bidi(
        self, stream: ttrpc.ServerStream[echo_pb2.EchoRequest, echo_pb2.EchoResponse]
    ) -> None:
        async for request in stream:
            await stream.send(echo_pb2.EchoResponse(payload=request.payload))


async def echo_twice(payload: bytes) -> list[bytes] | int:
    server = ttrpc.Server(require_same_user=True)
    server.register(Echo())
    ours, theirs = socket.socketpair()
    serving = asyncio.ensure_future(server.serve_connection(ours))
    got: list[bytes] = []
    async with await ttrpc.Client.connect(theirs) as client:
        stub = echo_ttrpc.EchoStub(client)
        try:
            response = await stub.Unary(echo_pb2.EchoRequest(payload=payload), timeout=1.0)
            got.append(response.payload)
            async with await stub.Bidi(metadata={"k": "v"}) as stream:
                await stream.send(echo_pb2.EchoRequest(payload=payload))
                reply: echo_pb2.EchoResponse | None = await stream.recv()
                got += [] if reply is None else [reply.payload]
        except ttrpc.Error as exc:
            code: ttrpc.Code | int = exc.code if isinstance(exc, ttrpc.TtrpcError) else 0
            return int(code)
    await serving
    return got
"""


def _mypy(program: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "user.py").write_text(program)
    stubs = Path(echo.__file__).parent
    (tmp_path / "echo").mkdir()
    for name in ("__init__.py", "echo_pb2.py", "echo_pb2.pyi", "echo_ttrpc.py"):
        shutil.copy(stubs / name, tmp_path / "echo" / name)
    # No project config and no MYPYPATH: the package must come from the installed
    # environment, as it would for someone who pip-installed it.
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", "",
         "--cache-dir", str(tmp_path / "cache"), "user.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip


@pytest.mark.timeout(300)
def test_users_get_type_checked_against_the_installed_package(tmp_path: Path) -> None:
    """A program using ttrpc_asyncio and its generated stubs passes `mypy --strict`
    outside this repository (py.typed is shipped, so the types are not silently Any)."""
    result = _mypy(TYPED_USER, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "import-untyped" not in result.stdout
    ran = subprocess.run(
        [sys.executable, "-c", "import asyncio, user; print(asyncio.run(user.echo_twice(b'hi')))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ran.stdout == "[b'hi', b'hi']\n", ran.stderr  # and it runs as written


@pytest.mark.timeout(300)
def test_type_errors_in_user_code_are_reported(tmp_path: Path) -> None:
    """The same check catches a wrong type passed to a generated stub (the types
    really are read, not ignored)."""
    wrong = TYPED_USER.replace(
        "stub.Unary(echo_pb2.EchoRequest(payload=payload)",
        "stub.Unary(echo_pb2.EchoResponse(payload=payload)",
    )
    assert wrong != TYPED_USER
    result = _mypy(wrong, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "EchoResponse" in result.stdout


def _module_name(path: Path) -> tuple[str, bool]:
    """The dotted name of a module file of the package, and whether it is a package."""
    parts = [*PACKAGE.split("."), *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _is_protobuf(target: str) -> bool:
    return target == "google.protobuf" or target.startswith("google.protobuf.")


def _foreign_imports(source: str, module: str, is_package: bool) -> list[str]:
    """What ``module`` imports besides the standard library, protobuf and its own
    package by relative import (an absolute import of itself counts too), as
    ``name:line`` strings."""
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif not isinstance(node, ast.ImportFrom):
            continue
        elif not node.level:
            targets = [node.module or ""]
        elif node.level - 1 >= len(package_parts):
            found.append(f"{'.' * node.level}{node.module or ''}:{node.lineno}")
            continue
        else:
            continue  # relative, and it stays inside the package
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                found.append(f"absolute {target}:{node.lineno}")
            elif target.split(".")[0] not in sys.stdlib_module_names and not _is_protobuf(target):
                found.append(f"{target}:{node.lineno}")
    return found


def test_package_imports_only_itself_the_standard_library_and_protobuf() -> None:
    """Every module of ttrpc_asyncio imports only itself (by relative imports that
    stay inside it), the standard library and protobuf: nothing of socketforward,
    so the distribution installs and works with protobuf alone."""
    modules = sorted(PACKAGE_DIR.rglob("*.py"))
    assert PACKAGE_DIR / "server.py" in modules
    assert PACKAGE_DIR / "proto" / "ttrpc_pb2.py" in modules
    offenders = {
        str(path.relative_to(PACKAGE_DIR)): found
        for path in modules
        if (found := _foreign_imports(path.read_text(), *_module_name(path)))
    }
    assert offenders == {}


def test_import_check_sees_what_it_must_refuse() -> None:
    """The import check above is not vacuous: it flags socketforward and any other
    third-party import, a relative import climbing out of the package, and an
    absolute import of the package itself, while it lets a relative import within
    the package, the standard library and protobuf pass."""
    source = textwrap.dedent("""\
        from socketforward import transport
        from ... import protocol
        from .. import errors
        from ttrpc_asyncio import errors as again
        import socketforward.relay
        from .... import beyond
        import ttrpc_asyncio.client
        from .._frame import Flags
        import yaml
        from google.protobuf import message
        import asyncio, os.path
        from __future__ import annotations
        """)
    found = _foreign_imports(source, f"{PACKAGE}.proto.probe", is_package=False)
    assert found == [
        "socketforward:1",
        "...:2",
        "absolute ttrpc_asyncio:4",
        "socketforward.relay:5",
        "....:6",
        "absolute ttrpc_asyncio.client:7",
        "yaml:9",
    ]


def test_logs_under_module_names() -> None:
    """Each module logs under its own name below ``ttrpc_asyncio``, so one logger
    configures the whole library and a record says where it came from."""
    from ttrpc_asyncio import _channel, _fd_transport, client, server  # noqa: PLC0415

    for module in (_channel, _fd_transport, client, server):
        assert module.log.name == module.__name__
        assert module.log.name.startswith(PACKAGE + ".")
