"""The command line as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_pool_sizes_are_bounded_and_say_so() -> None:
    """The host's --stream-pool takes 0 to 64 and the guest's
    --max-pooled-streams 0 or more; anything else is exit status 2 naming the
    value (docs/protocol.md 5.6)."""
    cases = [
        (["host", "--rpc-listen", "unix:/nonexistent/rpc.sock", "--streams",
          "unix:/nonexistent-streams", "--stream-pool", "65"], "must be from 0 to 64"),
        (["host", "--rpc-listen", "unix:/nonexistent/rpc.sock", "--streams",
          "unix:/nonexistent-streams", "--stream-pool", "-1"], "must be >= 0"),
        (["guest", "--rpc-dial", "unix:/nonexistent", "--streams", "unix:/nonexistent-streams",
          "--max-pooled-streams", "-1"], "must be >= 0"),
        (["guest", "--rpc-dial", "unix:/nonexistent", "--streams", "unix:/nonexistent-streams",
          "--max-pooled-streams", "many"], "is not an integer"),
    ]  # fmt: skip
    for args, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "socketforward", *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)


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


def _socketforward(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "socketforward", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_status_with_nothing_listening_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """`socketforward status` where no program listens: one error line, exit 1."""
    result = _socketforward("status", "--control", f"unix:{tmp_path}/control.sock")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"socketforward status: error: nothing listens at unix:{tmp_path}/control.sock: "
        "no such file (is the program running with --control?)\n"
    )


def test_control_commands_check_their_arguments_before_connecting(tmp_path: Path) -> None:
    """--control takes unix:PATH only; `forward add` reads entries as `host
    --forward` does and names a bad one; both are exit status 2."""
    result = _socketforward("status", "--control", "vsock://2:1024")
    assert result.returncode == 2 and "must be unix:PATH" in result.stderr
    ctl = f"unix:{tmp_path}/control.sock"
    result = _socketforward("forward", "add", "--control", ctl, "a=/h/a.sock:/run/a", "b=nope")
    assert result.returncode == 2
    assert "'b=nope' is not FORWARD_ID=HOST_PATH:VM_PATH" in result.stderr


def test_programs_refuse_a_control_socket_in_an_open_directory(tmp_path: Path) -> None:
    """Both programs refuse --control in a directory other users can enter
    (exit status 2), as the host does for --rpc-listen."""
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    ctl = f"unix:{open_dir}/control.sock"
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    for args in (
        ["guest", "--rpc-dial", f"unix:{private}/rpc.sock", "--streams",
         f"unix:{private}/streams.sock", "--control", ctl],
        ["host", "--rpc-listen", f"unix:{private}/rpc.sock", "--streams",
         f"unix:{private}/streams.sock", "--forward", "a=/h/a.sock:/run/a.sock", "--control", ctl],
    ):  # fmt: skip
        result = _socketforward(*args)
        assert result.returncode == 2, (args[0], result.stderr)
        assert f"--control {ctl}: directory {open_dir} is open to other users" in result.stderr
        assert not (open_dir / "control.sock").exists()
