"""``socketforward host`` as a user runs it: a real subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from socketforward import datastream, transport
from socketforward.host import oci
from tests.host.fake_guest import exchange, reverse_after_eof, unix_service
from tests.host.host_env import guest_accepting, host_command, host_process, wait_until

pytestmark = pytest.mark.timeout(60)


def test_bad_arguments_exit_nonzero_naming_the_argument(short_tmp: Path) -> None:
    """Every malformed argument makes `socketforward host` exit non-zero with a
    message that names the argument and the problem, before anything starts;
    so does a --streams path in a directory other users can write."""
    private = short_tmp / "p"
    private.mkdir(mode=0o700)
    rpc = f"unix:{private}/rpc.sock"
    base = ["--rpc-listen", rpc, "--streams", f"unix:{private}/streams.sock"]
    good = "--forward=a=/h.sock:/v.sock"
    bad_spec = short_tmp / "bad.json"
    bad_spec.write_text(
        json.dumps({"mounts": [{"type": "uds", "source": "", "destination": "/x.sock"}]})
    )
    bad_table, clash_table = short_tmp / "bad.txt", short_tmp / "clash.txt"
    bad_table.write_text("# ok\nb=relative.sock:/v.sock\n")
    clash_table.write_text("a=/other.sock:/v.sock\n")
    open_dir = short_tmp / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o755)
    world, sticky = short_tmp / "world", short_tmp / "sticky"
    world.mkdir()
    os.chmod(world, 0o777)
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # like /tmp: a missing path can still be taken
    cases: dict[str, tuple[list[str], str]] = {
        "no rpc flag": (["--streams", "unix:/s.sock", good], "--rpc-listen"),
        "both rpc flags": ([*base, "--rpc-dial", "unix:/x.sock", good], "not allowed with"),
        "relative rpc": (["--rpc-listen", "unix:rel.sock", "--streams", "unix:/s", good],
                         "argument --rpc-listen"),
        "hvsock listen": (["--rpc-listen", "hvsock:/v.sock:1025", "--streams", "unix:/s", good],
                          "cannot listen"),
        "bad streams": (["--rpc-listen", rpc, "--streams", "tcp://x", good], "argument --streams"),
        "no streams": (["--rpc-listen", rpc, good], "--streams"),
        "forward syntax": ([*base, "--forward", "noequals"], "argument --forward"),
        "forward relative": ([*base, "--forward", "a=rel.sock:/v.sock"], "host path"),
        "forward comma": ([*base, "--forward", "a,b=/h.sock:/v.sock"], "forward ID"),
        "forward twice": ([*base, good, good], "given twice"),
        "missing table": ([*base, "--forwards-file", "/nonexistent"], "--forwards-file /nonexist"),
        "bad table": ([*base, "--forwards-file", str(bad_table)], f"{bad_table}:2:"),
        "table clash": ([*base, good, "--forwards-file", str(clash_table)],
                        "also given with --forward"),
        "nothing": (base, "nothing to forward"),
        "spec w/o id": ([*base, "--oci-spec", str(bad_spec)], "--oci-spec needs --container-id"),
        "write w/o spec": ([*base, good, "--write-spec", "/tmp/x.json"], "--write-spec needs"),
        "bad mount": ([*base, "--oci-spec", str(bad_spec), "--container-id", "c1"],
                      "source (host path) is required"),
        "missing spec": ([*base, "--oci-spec", "/nonexistent.json", "--container-id", "c1"],
                         "--oci-spec /nonexistent.json"),
        "timeout": ([*base, good, "--dial-timeout", "-1"], "argument --dial-timeout"),
        "open dir": (["--rpc-listen", f"unix:{open_dir}/rpc.sock", "--streams", "unix:/s", good],
                     "open to other users"),
        "streams in world-writable dir": (["--rpc-listen", rpc, "--streams",
                                           f"unix:{world}/s.sock", good],
                                          f"--streams unix:{world}/s.sock: directory {world} "
                                          "can be written by other users"),
        "streams in sticky dir": (["--rpc-listen", rpc, "--streams", f"unix:{sticky}/s.sock",
                                   good], "--streams unix:"),
        "hvsock streams in open dir": (["--rpc-listen", rpc, "--streams",
                                        f"hvsock:{world}/v.sock:1026", good],
                                       f"--streams hvsock:{world}/v.sock:1026: directory"),
        "streams uid": ([*base, good, "--streams-uid", "-1"], "argument --streams-uid"),
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(
            host_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for name, (args, _) in cases.items()
    }
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode != 0, name
        assert cases[name][1] in stderr, (name, stderr)
    assert not (open_dir / "rpc.sock").exists()
    assert not (private / "rpc.sock").exists()
    assert not (world / "s.sock").exists()


async def test_host_process_forwards_and_stops_cleanly_on_sigterm(short_tmp: Path) -> None:
    """The host process takes forwards from an OCI spec (and writes the rewritten
    spec), serves a guest that dials in, and on SIGTERM ends its relays, removes
    its RPC socket file and exits 0."""
    host_dir, vm_dir = short_tmp / "host", short_tmp / "vm"
    target_path = host_dir / "target.sock"
    spec_path, out_path = short_tmp / "config.json", short_tmp / "out.json"
    spec_path.write_text(
        json.dumps(
            {"mounts": [{"type": "uds", "source": str(target_path), "destination": "/x.sock"}]}
        )
    )
    forward_id = oci.forward_id_for("ctr-1", "/x.sock")
    rpc_path = host_dir / "rpc" / "rpc.sock"
    streams_ep = transport.UnixEndpoint(str(vm_dir / "streams.sock"))
    log_path = short_tmp / "host.log"
    async with (
        unix_service(target_path, reverse_after_eof),
        datastream.StreamRegistry(await transport.listen(streams_ep)) as registry,
        host_process(
            "--rpc-listen", f"unix:{rpc_path}", "--streams", str(streams_ep),
            "--oci-spec", str(spec_path), "--container-id", "ctr-1", "--write-spec", str(out_path),
            log_path=log_path, rpc_path=rpc_path,
        ) as proc,
    ):  # fmt: skip
        assert os.stat(rpc_path).st_mode & 0o777 == 0o600
        assert os.stat(rpc_path.parent).st_mode & 0o777 == 0o700
        assert json.loads(out_path.read_text())["mounts"] == [
            {
                "destination": "/x.sock",
                "type": "bind",
                "source": f"/run/socketfwd/{forward_id}.sock",
                "options": ["bind"],
            }
        ]
        rpc = transport.UnixEndpoint(str(rpc_path))
        async with guest_accepting(rpc, registry) as (guest, call):
            assert guest.binds == [[(forward_id, f"/run/socketfwd/{forward_id}.sock")]]
            assert call.announced == [forward_id]
            assert (await call.connect("s-1", forward_id)).error == ""
            assert (await call.connect("s-2", forward_id)).error == ""
            first, held = guest.claimed.pop("s-1"), guest.claimed.pop("s-2")
            assert first is not None and held is not None
            with first, held:
                assert await exchange(first, b"hello") == b"olleh"
                proc.send_signal(signal.SIGTERM)
                async with asyncio.timeout(30):
                    assert await proc.wait() == 0
                    # The relay still open when the host stopped is ended.
                    assert await asyncio.get_running_loop().sock_recv(held, 10) == b""
    assert not rpc_path.exists()
    log = log_path.read_text()
    assert "host stopping" in log
    assert f"stats forward_id={forward_id} requests=2 connected=2" in log


async def test_sighup_rereads_the_forwards_file(short_tmp: Path) -> None:
    """With --forwards-file, SIGHUP applies the file's changes while running:
    a forward taken out is Unbound and refused, a new one is Bound and served,
    --forward entries stay; a file that no longer parses changes nothing and
    the log names its line."""
    host_dir, vm_dir = short_tmp / "host", short_tmp / "vm"
    a_path, b_path, c_path = (host_dir / f"{n}.sock" for n in "abc")
    table = short_tmp / "forwards"
    table.write_text(f"# test table\n\na={a_path}:/run/a.sock\n")
    rpc_path = host_dir / "rpc" / "rpc.sock"
    streams_ep = transport.UnixEndpoint(str(vm_dir / "streams.sock"))
    log_path = short_tmp / "host.log"
    async with (
        unix_service(a_path, reverse_after_eof),
        unix_service(b_path, reverse_after_eof),
        unix_service(c_path, reverse_after_eof),
        datastream.StreamRegistry(await transport.listen(streams_ep)) as registry,
        host_process(
            "--rpc-listen", f"unix:{rpc_path}", "--streams", str(streams_ep),
            "--forwards-file", str(table), "--forward", f"c={c_path}:/run/c.sock",
            log_path=log_path, rpc_path=rpc_path,
        ) as proc,
    ):  # fmt: skip
        rpc = transport.UnixEndpoint(str(rpc_path))
        async with guest_accepting(rpc, registry) as (guest, call):
            assert sorted(guest.binds[0]) == [("a", "/run/a.sock"), ("c", "/run/c.sock")]
            assert (await call.connect("s-1", "a")).error == ""

            table.write_text(f"b={b_path}:/run/b.sock\n")
            proc.send_signal(signal.SIGHUP)
            # Each change of the table reopens Accept (after the removal,
            # then after the addition): wait for the one announcing both.
            while (call := await guest.next_accept()).announced != ["b,c"]:
                pass
            assert guest.unbinds == [["a"]]
            assert guest.binds[-1] == [("b", "/run/b.sock")]
            assert (await call.connect("s-2", "a")).error.startswith("unknown forward ID")
            assert (await call.connect("s-3", "b")).error == ""
            assert (await call.connect("s-4", "c")).error == ""
            sock = guest.claimed.pop("s-3")
            assert sock is not None
            with sock:
                assert await exchange(sock, b"bee") == b"eeb"

            table.write_text(f"b={b_path}:/run/b.sock\nthis is not a forward\n")
            proc.send_signal(signal.SIGHUP)
            await wait_until(lambda: b"not reloaded" in log_path.read_bytes())
            assert f"{table}:2".encode() in log_path.read_bytes()
            assert (await call.connect("s-5", "b")).error == ""
            guest.close_claimed()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0


async def test_sighup_without_forwards_file_is_logged_and_the_host_keeps_forwarding(
    short_tmp: Path,
) -> None:
    """Without --forwards-file a SIGHUP (a habit of init systems) is logged and
    changes nothing: the host stays up and keeps forwarding; SIGUSR1 logs the
    statistics; SIGTERM then exits 0 and leaves no socket file behind."""
    host_dir, vm_dir = short_tmp / "host", short_tmp / "vm"
    a_path = host_dir / "a.sock"
    rpc_path = host_dir / "rpc" / "rpc.sock"
    streams_ep = transport.UnixEndpoint(str(vm_dir / "streams.sock"))
    log_path = short_tmp / "host.log"
    async with (
        unix_service(a_path, reverse_after_eof),
        datastream.StreamRegistry(await transport.listen(streams_ep)) as registry,
        host_process(
            "--rpc-listen", f"unix:{rpc_path}", "--streams", str(streams_ep),
            "--forward", f"a={a_path}:/run/a.sock",
            log_path=log_path, rpc_path=rpc_path,
        ) as proc,
    ):  # fmt: skip
        rpc = transport.UnixEndpoint(str(rpc_path))
        async with guest_accepting(rpc, registry) as (guest, call):
            proc.send_signal(signal.SIGHUP)
            await wait_until(lambda: b"SIGHUP ignored" in log_path.read_bytes())
            assert proc.returncode is None
            assert (await call.connect("s-1", "a")).error == ""
            sock = guest.claimed.pop("s-1")
            assert sock is not None
            with sock:
                assert await exchange(sock, b"still here") == b"ereh llits"
            proc.send_signal(signal.SIGUSR1)
            await wait_until(
                lambda: b"stats forward_id=a requests=1 connected=1" in log_path.read_bytes()
            )
            assert guest.unbinds == []
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    assert not rpc_path.exists()
    assert "stats unknown_forward_requests=0" in log_path.read_text()


async def test_streams_uid_option_is_the_user_the_stream_endpoint_must_be(
    short_tmp: Path,
) -> None:
    """`--streams-uid UID` names the user whose process must serve the data-stream
    endpoint: with another user's uid than the endpoint's, each connection fails
    with `failed to open data stream` and the host log names both uids."""
    host_dir, vm_dir = short_tmp / "host", short_tmp / "vm"
    a_path = host_dir / "a.sock"
    rpc_path = host_dir / "rpc" / "rpc.sock"
    streams_ep = transport.UnixEndpoint(str(vm_dir / "streams.sock"))
    log_path = short_tmp / "host.log"
    other = os.geteuid() + 1
    async with (
        unix_service(a_path, reverse_after_eof),
        datastream.StreamRegistry(await transport.listen(streams_ep)) as registry,
        host_process(
            "--rpc-listen", f"unix:{rpc_path}", "--streams", str(streams_ep),
            "--forward", f"a={a_path}:/run/a.sock", "--streams-uid", str(other),
            log_path=log_path, rpc_path=rpc_path,
        ) as proc,
    ):  # fmt: skip
        rpc = transport.UnixEndpoint(str(rpc_path))
        async with guest_accepting(rpc, registry) as (_, call):
            assert (await call.connect("s-1", "a")).error == "failed to open data stream"
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    log = log_path.read_text()
    assert f"peer_uid={os.geteuid()}" in log and f"expected_uid={other}" in log
    assert "failed=stream_peer:1" in log
