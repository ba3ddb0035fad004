"""Regenerate every generated Python file from the .proto sources (``make proto``).

``--check`` compares instead of writing and exits 1 listing stale files; the
test suite runs it so nobody can forget to regenerate.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
TTRPC = ROOT / "ttrpc-asyncio"  # the ttrpc library, a workspace member


@dataclass(frozen=True)
class Target:
    proto_root: Path
    proto: str  # path relative to proto_root, as imported
    out_dir: Path  # the generated files land here, flat
    module: str  # Python package of out_dir
    services: bool  # also emit ttrpc stubs


TARGETS = [
    # google.rpc.Status, vendored: ttrpc's Response carries it, and generating
    # it here spares a dependency (googleapis-common-protos) for one message.
    Target(TTRPC / "proto", "google/rpc/status.proto", TTRPC / "src/ttrpc_asyncio/proto",
           "ttrpc_asyncio.proto", services=False),
    Target(TTRPC / "proto", "ttrpc/ttrpc.proto", TTRPC / "src/ttrpc_asyncio/proto",
           "ttrpc_asyncio.proto", services=False),
    Target(ROOT / "proto", "nerdbox/services/socketforward/v1/socketforward.proto",
           ROOT / "src/socketforward/api", "socketforward.api", services=True),
    Target(ROOT / "proto", "socketforward/control/v1/control.proto",
           ROOT / "src/socketforward/api", "socketforward.api", services=True),
    # The Echo test service of the ttrpc tests, the interop suites and the benchmark.
    Target(TTRPC / "tests/echo", "echo.proto", TTRPC / "tests/echo", "echo", services=True),
]  # fmt: skip


def include_dirs() -> list[str]:
    """google/protobuf/*.proto (protobuf's own well-known types). Not
    site-packages: a google/rpc/status.proto installed there must not stand in
    for the vendored one."""
    return [str(Path(grpc_tools.__file__).parent / "_proto")]


def python_module(proto: str) -> str:
    """The module protoc names for *proto*: ``google/rpc/status.proto`` ->
    ``google.rpc.status_pb2``."""
    return proto.removesuffix(".proto").replace("/", ".") + "_pb2"


def localize_imports(text: str, out_dir: Path) -> str:
    """Imports of modules generated into the same package become relative
    (``from google.rpc import status_pb2`` -> ``from . import status_pb2``):
    protoc names them by their .proto path, but here they live beside the
    importer, and the ttrpc package refers to itself by relative imports only."""
    for other in TARGETS:
        package, _, module = python_module(other.proto).rpartition(".")
        if other.out_dir == out_dir and package:
            text = text.replace(f"from {package} import {module} ", f"from . import {module} ")
    return text


def generate(target: Target, out: Path) -> list[Path]:
    """Run protoc for one target into ``out`` (flat); returns the files written."""
    with tempfile.TemporaryDirectory() as tmp:
        bin_dir = Path(sys.executable).parent
        args = [
            sys.executable, "-m", "grpc_tools.protoc",
            f"-I{target.proto_root}", *(f"-I{d}" for d in include_dirs()),
            f"--python_out={tmp}",
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--mypy_out={tmp}",
        ]  # fmt: skip
        if target.services:
            args += [
                f"--plugin=protoc-gen-python_ttrpc={bin_dir / 'protoc-gen-python_ttrpc'}",
                f"--python_ttrpc_out=module={target.module}:{tmp}",
            ]
        subprocess.run([*args, target.proto], check=True, cwd=ROOT)
        written = []
        out.mkdir(parents=True, exist_ok=True)
        for produced in sorted(Path(tmp).rglob("*.py*")):
            dest = out / produced.name
            text = localize_imports(produced.read_text(encoding="utf-8"), target.out_dir)
            dest.write_text(text, encoding="utf-8")
            written.append(dest)
        return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    check = parser.parse_args().check
    stale: list[str] = []
    for target in TARGETS:
        if not check:
            for path in generate(target, target.out_dir):
                print(f"wrote {path.relative_to(ROOT)}")
            (target.out_dir / "__init__.py").touch()
            continue
        with tempfile.TemporaryDirectory() as tmp:
            for fresh in generate(target, Path(tmp)):
                current = target.out_dir / fresh.name
                if not current.exists() or not filecmp.cmp(fresh, current, shallow=False):
                    stale.append(str(current.relative_to(ROOT)))
    if stale:
        print("stale generated files (run `make proto`):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
