"""Generated Python code matches its .proto sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_python_is_fresh() -> None:
    """`make proto` output equals what is committed (edit the .proto, not the output)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/generate_protos.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
