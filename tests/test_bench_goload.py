"""The forward benchmark's Go load generator and target (bench/go/cmd/sfload via
bench/goload.py): each workload against the Go target with tiny sizes, result
shapes and byte counts, and that the Go and Python targets and loads mix.
Figures only, never a time as pass/fail."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench import goload, loadgen
from bench.processes import ProcessGroup
from bench.target import start as start_python_target
from tests.interop.peers import require_go
from tests.processes import short_tmp_dir

SIZE = 3 * loadgen.MiB + 5  # more than one block, not a multiple of one


@pytest.fixture(scope="module")
def sfload() -> Path:
    require_go()
    return goload.build()


@pytest.fixture(scope="module")
def targets(sfload: Path) -> Iterator[dict[str, str]]:
    """The Go and the Python target service, each on its own socket."""
    with short_tmp_dir("sfload-") as tmp, ProcessGroup(tmp) as group:
        go, py = str(tmp / "go.sock"), str(tmp / "py.sock")
        goload.start_target(group, sfload, go)
        start_python_target(group, py)
        yield {"go": go, "python": py}


def test_build_is_cached(sfload: Path) -> None:
    """The same sources give the same binary, named by their hash."""
    assert goload.build() == sfload
    assert sfload.name.startswith("sfload-") and sfload.parent == goload.BUILD_DIR


def test_transfers_count_bytes(sfload: Path, targets: dict[str, str]) -> None:
    for workload in ("upload", "download"):
        r = goload.run(sfload, workload, targets["go"], 60, size=SIZE)
        assert r == {"workload": workload, "bytes": SIZE, "seconds": r["seconds"]}
        assert r["seconds"] > 0
    r = goload.run(sfload, "upload", targets["go"], 60, size=0)
    assert r["bytes"] == 0


@pytest.mark.parametrize("workload", ["rtt", "ttfb"])
def test_latencies(sfload: Path, targets: dict[str, str], workload: str) -> None:
    r = goload.run(sfload, workload, targets["go"], 60, count=50, warmup=5)
    samples = r["samples_us"]
    assert r["count"] == len(samples) == 50
    assert samples == sorted(samples) and samples[0] > 0
    assert r["p50_us"] == samples[25] and r["p99_us"] == samples[49]


def test_connection_rate(sfload: Path, targets: dict[str, str]) -> None:
    r = goload.run(sfload, "conns", targets["go"], 60, seconds=0.2, workers=4)
    assert r["failed"] == 0 and r["done"] > 0
    assert r["rate"] == pytest.approx(r["done"] / r["seconds"])


def test_burst_all_served_direct(sfload: Path, targets: dict[str, str]) -> None:
    r = goload.GoLoad(sfload).burst(targets["go"], 200, 10)
    assert (r.served, r.refused, r.reset, r.hung) == (200, 0, 0, 0)
    assert r.seconds > 0


def test_go_load_api_as_python_load(sfload: Path, targets: dict[str, str]) -> None:
    """GoLoad returns what bench.loadgen's functions return."""
    load: loadgen.Load = goload.GoLoad(sfload)
    path = targets["go"]
    assert load.upload(path, SIZE) > 0 and load.download(path, SIZE) > 0
    assert len(load.round_trips(path, 20)) == 20
    assert len(load.first_bytes(path, 10)) == 10
    rate, failed = load.connection_rate(path, 0.1, 2)
    assert rate > 0 and failed == 0


@contextlib.contextmanager
def one_connection(path: str, handle: Callable[[socket.socket], None]) -> Iterator[None]:
    """A service on ``path`` that runs ``handle`` on one connection (a thread)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen(1)
        srv.settimeout(30)

        def serve() -> None:
            conn, _ = srv.accept()
            # The load closes with the answer unread once it saw it was wrong.
            with conn, contextlib.suppress(ConnectionError):
                handle(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield
        thread.join(30)


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(1 << 16):
        conn.sendall(data)


def _short_download(conn: socket.socket) -> None:
    conn.recv(9)
    conn.sendall(b"z" * 10)


def _wrong_echo(conn: socket.socket) -> None:
    conn.recv(1)
    conn.sendall(b"y")


@pytest.mark.parametrize(
    ("workload", "handle", "options", "message"),
    [
        ("upload", _echo, {"size": 100}, "service counted .* bytes, sent 100"),
        ("download", _short_download, {"size": 100}, "received 10 bytes, expected 100"),
        ("rtt", _wrong_echo, {"count": 1, "warmup": 0}, "echo answered"),
        ("ttfb", _wrong_echo, {"count": 1, "warmup": 0}, "echo answered"),
    ],
)
def test_wrong_answers_fail(
    sfload: Path,
    workload: str,
    handle: Callable[[socket.socket], None],
    options: dict[str, float],
    message: str,
) -> None:
    """A byte count off or a wrong echo is an error, not a figure."""
    with short_tmp_dir("sfload-") as tmp:
        path = str(tmp / "bad.sock")
        with one_connection(path, handle), pytest.raises(RuntimeError, match=message):
            goload.run(sfload, workload, path, 60, **options)


def test_no_service_fails(sfload: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no such file"):
        goload.run(sfload, "rtt", str(tmp_path / "none.sock"), 60, count=1)


def test_go_load_against_python_target(sfload: Path, targets: dict[str, str]) -> None:
    load = goload.GoLoad(sfload)
    path = targets["python"]
    assert load.upload(path, SIZE) > 0
    assert load.download(path, SIZE) > 0
    assert len(load.first_bytes(path, 10)) == 10


def test_python_load_against_go_target(targets: dict[str, str]) -> None:
    path = targets["go"]
    assert loadgen.upload(path, SIZE, bytes(loadgen.MiB)) > 0
    assert loadgen.download(path, SIZE) > 0
    samples = loadgen.round_trips(path, 20, warmup=2)
    assert len(samples) == 20 and samples[0] > 0
    r = loadgen.burst(path, 50, 10)
    assert (r.served, r.refused, r.reset, r.hung) == (50, 0, 0, 0)
