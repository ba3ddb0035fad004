"""What the programs log and how: the level options before and after the
subcommand, and ``--log-format json``."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from socketforward.daemon import JsonFormatter, message_fields
from socketforward.datastream import open_stream_now
from socketforward.logs import escape
from socketforward.transport import UnixEndpoint


def _record(msg: str, *args: object, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("socketforward.guest", level, __file__, 1, msg, args, None)


def test_json_line_has_the_event_and_its_key_value_fields() -> None:
    """One JSON object per event: time, level, logger, message, and each
    key=value pair of the message as a string field."""
    line = JsonFormatter().format(
        _record("fd limit soft=%d hard=%s max_connections=%d", 1024, "unknown", 7)
    )
    assert "\n" not in line
    event = json.loads(line)
    assert event["level"] == "INFO"
    assert event["logger"] == "socketforward.guest"
    assert event["message"] == "fd limit soft=1024 hard=unknown max_connections=7"
    assert event["soft"] == "1024" and event["hard"] == "unknown"
    assert event["max_connections"] == "7"
    assert event["time"].endswith("+00:00")


@pytest.mark.parametrize(
    "forged",
    ["a\nINFO forged level=ERROR", 'say "hi"', "it's", "x=1 y=2", "\\", "'", '"', "\x00\x1b[31m"],
)
def test_a_peer_value_stays_one_valid_line_and_one_field(forged: str) -> None:
    """Whatever a peer put in a value (line breaks, quotes, '=', backslashes),
    the line is one valid JSON object, the value reads back as sent, and no
    field of the peer's making appears."""
    line = JsonFormatter().format(
        _record("bad bind forward=%s path=%s n=%d", escape(forged), escape(forged), 3)
    )
    assert "\n" not in line
    event = json.loads(line)
    assert event["forward"] == forged and event["path"] == forged
    assert event["n"] == "3" and event["level"] == "INFO"
    assert "y" not in event


def test_a_raw_newline_or_quote_in_a_message_still_makes_valid_json() -> None:
    """Quoting never depends on the content: even unescaped text stays one line."""
    line = JsonFormatter().format(_record('odd key=a"b\nc other="x'))
    assert "\n" not in line
    assert json.loads(line)["message"] == 'odd key=a"b\nc other="x'


def test_repr_values_and_exceptions_stay_strings() -> None:
    """A value quoted with repr reads back as its text; an exception's repr
    with spaces in it is one value; the fields are all strings."""
    fields = message_fields(
        "host stopped unexpectedly error=OSError(104, 'reset by peer') id='a b' n=5"
    )
    assert fields == {"error": "OSError(104, 'reset by peer')", "id": "a b", "n": "5"}
    assert message_fields("no fields here, it's plain") == {}


def test_reserved_keys_do_not_replace_the_event_fields() -> None:
    """A message key named like an event field leaves the event field alone."""
    event = json.loads(JsonFormatter().format(_record("odd level=DEBUG logger=x ok=1")))
    assert event["level"] == "INFO" and event["logger"] == "socketforward.guest"
    assert event["ok"] == "1"


def test_exception_is_one_field() -> None:
    """A logged traceback goes into the ``exception`` field, still one line."""
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exception"]


def _guest_log(tmp: Path, *options: str, before: tuple[str, ...] = ()) -> str:
    """Start a guest on UNIX endpoints in *tmp* with *options* after the
    subcommand, wait for it to be up, stop it with SIGTERM; its log."""
    log_path = tmp / "guest.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "socketforward", *before, "guest",
             "--rpc-listen", f"unix:{tmp}/rpc.sock", "--streams", f"unix:{tmp}/streams.sock",
             *options],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (tmp / "rpc.sock").is_socket():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        # A data stream opened and left: its "stream registered" line is DEBUG.
        stream = open_stream_now(UnixEndpoint(f"{tmp}/streams.sock"), "sf-test-1")
        assert stream is not None
        with stream:
            stream.settimeout(10)
            stream.recv(64)  # the ack
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log_path.read_text()


def test_default_level_logs_lifecycle_not_debug(short_tmp: Path) -> None:
    """Without options the guest logs its start at INFO and no DEBUG line."""
    text = _guest_log(short_tmp)
    assert " INFO socketforward.guest: guest started" in text
    assert " DEBUG " not in text


@pytest.mark.parametrize("option", [["-v"], ["--verbose"], ["--log-level", "debug"]])
def test_verbose_after_the_subcommand_adds_debug_lines(short_tmp: Path, option: list[str]) -> None:
    """``guest -v`` (or --log-level debug) writes DEBUG lines as ``-v guest`` does."""
    text = _guest_log(short_tmp, *option)
    assert " DEBUG " in text
    assert "guest started" in text


@pytest.mark.parametrize(
    "options", [(("-q",), ()), (("--log-level", "warning"), ()), ((), ("--quiet",))]
)
def test_quiet_drops_info_lines(
    short_tmp: Path, options: tuple[tuple[str, ...], tuple[str, ...]]
) -> None:
    """``-q`` or --log-level warning, after or before the subcommand, leaves
    out the INFO lifecycle lines."""
    after, before = options
    text = _guest_log(short_tmp, *after, before=before)
    assert "guest started" not in text
    assert " INFO " not in text


def test_the_last_level_option_wins(short_tmp: Path) -> None:
    """``-v guest -q``: the option given last decides."""
    text = _guest_log(short_tmp, "-q", before=("-v",))
    assert "guest started" not in text


def test_json_format_from_a_running_guest(short_tmp: Path) -> None:
    """``guest --log-format json``: every line parses, the start line carries
    its key=value fields."""
    text = _guest_log(short_tmp, "--log-format", "json")
    events = [json.loads(line) for line in text.splitlines()]
    started = next(e for e in events if e["message"].startswith("guest started"))
    assert started["level"] == "INFO" and started["logger"] == "socketforward.guest"
    assert started["streams"] == f"unix:{short_tmp}/streams.sock"
    limits = next(e for e in events if e["message"].startswith("fd limit"))
    assert limits["fds_per_connection"].isdigit()
