"""protoc-gen-python_ttrpc on the Echo service: in-process on its descriptor, and via protoc."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.compiler import plugin_pb2

from echo import echo_pb2
from ttrpc_asyncio import plugin

PROTO_ROOT = Path(echo_pb2.__file__).parent  # echo.proto beside its generated code
GENERATED = PROTO_ROOT / "echo_ttrpc.py"
DEFAULT_IMPORT = "import ttrpc_asyncio as ttrpc"


def _run(parameter: str) -> plugin_pb2.CodeGeneratorResponse:
    request = plugin_pb2.CodeGeneratorRequest(file_to_generate=["echo.proto"], parameter=parameter)
    echo_pb2.DESCRIPTOR.CopyToProto(request.proto_file.add())
    return plugin.generate(request)


def _import_lines(content: str) -> list[str]:
    return [line for line in content.splitlines() if line.startswith(("import ", "from "))]


def test_default_runtime_is_ttrpc_asyncio() -> None:
    """Without ``runtime=`` the stubs import ``import ttrpc_asyncio as ttrpc``,
    exactly the committed file."""
    response = _run("module=echo")
    assert not response.error
    [out] = response.file
    assert out.name == "echo_ttrpc.py"
    assert DEFAULT_IMPORT in _import_lines(out.content)
    assert out.content == GENERATED.read_text()


@pytest.mark.parametrize(
    ("runtime", "line"),
    [
        ("myapp.vendor.ttrpc", "from myapp.vendor import ttrpc"),
        ("ttrpc", "import ttrpc"),
        ("aiottrpc", "import aiottrpc as ttrpc"),
        ("myapp._rpc", "from myapp import _rpc as ttrpc"),
        ("ttrpc_asyncio", "import ttrpc_asyncio as ttrpc"),
    ],
)
def test_runtime_parameter_names_the_import(runtime: str, line: str) -> None:
    """``runtime=<module>`` makes the stubs import that module as ``ttrpc``; the
    rest of the file is unchanged and still valid Python."""
    response = _run(f"module=echo,runtime={runtime}")
    assert not response.error
    [out] = response.file
    imports = _import_lines(out.content)
    assert imports[-1] == line
    assert DEFAULT_IMPORT not in imports[:-1]
    expected = GENERATED.read_text().replace(DEFAULT_IMPORT, line)
    assert out.content == expected
    compile(out.content, out.name, "exec")


@pytest.mark.parametrize(
    ("parameter", "message"),
    [
        ("module=x,runtim=a.b", "unknown parameter runtim"),
        ("runtime=a b", "is not a Python module name"),
        ("runtime=a..ttrpc", "is not a Python module name"),
    ],
)
def test_bad_parameters_fail_the_run(parameter: str, message: str) -> None:
    """A misspelt or malformed parameter makes protoc fail with the reason,
    instead of silently generating stubs for the default runtime."""
    response = _run(parameter)
    assert message in response.error
    assert not response.file


def _protoc(
    tmp_path: Path, *options: str, root: Path = PROTO_ROOT, proto: str = "echo.proto"
) -> subprocess.CompletedProcess[str]:
    plugin_exe = Path(sys.executable).parent / "protoc-gen-python_ttrpc"
    return subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{root}",
         f"--plugin=protoc-gen-python_ttrpc={plugin_exe}",
         f"--python_ttrpc_out={tmp_path}", *options, proto],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_runtime_option_through_protoc(tmp_path: Path) -> None:
    """``--python_ttrpc_opt=runtime=...`` on protoc's command line reaches the
    plugin (as installed) and sets the stubs' import."""
    result = _protoc(
        tmp_path, "--python_ttrpc_opt=module=gen", "--python_ttrpc_opt=runtime=vendor.ttrpc"
    )
    assert result.returncode == 0, result.stderr
    imports = _import_lines((tmp_path / "echo_ttrpc.py").read_text())
    assert imports[-2:] == ["import gen.echo_pb2", "from vendor import ttrpc"]


def test_bad_option_fails_protoc(tmp_path: Path) -> None:
    """protoc exits non-zero and shows the plugin's reason for a misspelt option."""
    result = _protoc(tmp_path, "--python_ttrpc_opt=runtme=vendor.ttrpc")
    assert result.returncode != 0
    assert "unknown parameter runtme" in result.stderr
    assert not (tmp_path / "echo_ttrpc.py").exists()


PING_PROTO = """\
syntax = "proto3";
package ping.v1;
import "google/protobuf/empty.proto";
service Ping {
  rpc Ping(google.protobuf.Empty) returns (google.protobuf.Empty);
}
"""


def test_stubs_land_beside_protocs_modules_under_a_dotted_dashed_path(tmp_path: Path) -> None:
    """A proto under a path like containerd's (``github.com/containerd/...``; here
    ``example.com/my-api/``) gets its stubs where protoc's python generator puts
    its ``_pb2`` module (``example/com/my_api/``), importing it by that name: the
    generated package imports as it is."""
    protos, out = tmp_path / "protos", tmp_path / "out"
    (protos / "example.com" / "my-api").mkdir(parents=True)
    (protos / "example.com" / "my-api" / "ping.proto").write_text(PING_PROTO)
    out.mkdir()
    result = _protoc(out, f"--python_out={out}", root=protos, proto="example.com/my-api/ping.proto")
    assert result.returncode == 0, result.stderr
    generated = sorted(str(path.relative_to(out)) for path in out.rglob("*.py"))
    assert generated == ["example/com/my_api/ping_pb2.py", "example/com/my_api/ping_ttrpc.py"]
    check = "from example.com.my_api import ping_ttrpc; print(ping_ttrpc.PingStub.SERVICE_NAME)"
    ran = subprocess.run(
        [sys.executable, "-c", check], cwd=out, capture_output=True, text=True, check=False
    )
    assert ran.stdout == "ping.v1.Ping\n", ran.stderr
