"""The command line as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from socketforward import __version__


def test_demo_forwards_and_checks_bytes() -> None:
    """`socketforward demo` runs host service, host and guest as processes, forwards
    HTTP byte-exact, stops both sides cleanly and leaves no socket file."""
    result = subprocess.run(
        [sys.executable, "-m", "socketforward", "demo", "--size-mib", "8", "--burst", "20"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "sha256 matches" in result.stdout
    assert "20 served" in result.stdout
    assert "guest exited with status 0" in result.stdout
    assert "host exited with status 0" in result.stdout
    assert "all checks passed; socket files left behind: 0" in result.stdout


def test_bad_arguments_exit_nonzero_with_message() -> None:
    """A bad option value is refused with a message naming it."""
    result = subprocess.run(
        [sys.executable, "-m", "socketforward", "demo", "--burst", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--burst" in result.stderr


def test_duration_options_refuse_non_positive_or_infinite_values() -> None:
    """Timeouts on either side take a positive, finite number of seconds, and say so."""
    for value in ("0", "-1", "inf", "nan", "soon"):
        result = subprocess.run(
            [sys.executable, "-m", "socketforward", "guest", "--rpc-dial", "unix:/nonexistent",
             "--streams", "unix:/nonexistent-streams", "--pending-timeout", value],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 2, (value, result.stderr)
        assert "not a positive number of seconds" in result.stderr


def test_version_prints_the_package_version() -> None:
    """`socketforward --version` names the installed version and exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "socketforward", "--version"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"socketforward {__version__}"


def test_logging_options_are_checked_after_the_subcommand_too() -> None:
    """An unknown level is refused with exit status 2, wherever it is given."""
    for args in (["--log-level", "loud", "guest"], ["guest", "--log-format", "xml"]):
        result = subprocess.run(
            [sys.executable, "-m", "socketforward", *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 2, (args, result.stderr)
        assert "invalid choice" in result.stderr
