"""The committed Go stubs match what generate.sh produces now."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.interop.peers import GO_DIR, require_go

PACKAGES = ("echopb", "sfpb")


def _stubs(root: Path) -> dict[str, bytes]:
    return {
        f"{pkg}/{p.name}": p.read_bytes()
        for pkg in PACKAGES
        for p in sorted((root / pkg).glob("*.go"))
    }


def test_generated_go_stubs_are_fresh(tmp_path: Path) -> None:
    require_go()
    proc = subprocess.run(
        ["bash", str(GO_DIR / "generate.sh"), str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"generate.sh failed:\n{proc.stdout}{proc.stderr}"
    fresh, committed = _stubs(tmp_path), _stubs(GO_DIR)
    assert fresh, "generate.sh produced no Go files"
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated Go stubs (run tests/interop/go/generate.sh): {stale}"
