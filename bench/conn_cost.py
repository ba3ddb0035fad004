"""What one forwarded connection costs each process: CPU microseconds (user and
system) of the guest, the host and the target service per connection, under
forward_bench's connection-rate load (32 workers: connect, 1-byte echo, close).

    uv run --locked --all-extras python bench/conn_cost.py [--seconds 4] [--py-spy DIR]

With --py-spy, py-spy (run through ``uv tool run``) records both forwarding
processes meanwhile and writes raw (collapsed-stack) profiles to DIR. The
figures are for finding where a connection's time goes, not for comparing
paths: forward_bench.py does that.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import forward_bench as fb
import loadgen


def _user_sys(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="load duration")
    parser.add_argument("--py-spy", type=Path, metavar="DIR", help="record py-spy profiles here")
    args = parser.parse_args()
    loadgen.raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="conncost-", dir="/tmp") as tmp_name:
        tmp = Path(tmp_name)
        target = str(tmp / "target.sock")
        service = subprocess.Popen(
            [sys.executable, fb.__file__, "_serve", target],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        procs = fb.Procs(tmp)
        spies: list[subprocess.Popen[bytes]] = []
        try:
            loadgen.wait_ready_line(service, "target service")
            path = fb.start_path(procs, "OURS", target, None, None)
            guest, host = path.pids
            named = {"guest": guest, "host": host, "target": service.pid}
            if args.py_spy is not None:
                args.py_spy.mkdir(parents=True, exist_ok=True)
                for name in ("guest", "host"):
                    # `uv run` tells its children where uv is.
                    cmd = [os.environ.get("UV", "uv"), "tool", "run", "py-spy", "record"]
                    cmd += ["-p", str(named[name]), "-d", str(int(args.seconds) + 1)]
                    cmd += ["-r", "400", "-f", "raw", "--nonblocking"]
                    cmd += ["-o", str(args.py_spy / f"{name}.txt")]
                    spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
                time.sleep(1.0)  # py-spy attaches
            before = {name: _user_sys(pid) for name, pid in named.items()}
            rate, failed = loadgen.connection_rate(path.entry, args.seconds, 32)
            after = {name: _user_sys(pid) for name, pid in named.items()}
            for spy in spies:
                spy.wait()
        finally:
            procs.stop()
            loadgen.stop_all([service])
    count = rate * args.seconds
    print(f"{rate:,.0f} connections/s for {args.seconds:g} s ({failed} failed)")
    print("| process | user us/conn | system us/conn | total |")
    print("|---|--:|--:|--:|")
    for name in named:
        user = (after[name][0] - before[name][0]) / count * 1e6
        system = (after[name][1] - before[name][1]) / count * 1e6
        print(f"| {name} | {user:.0f} | {system:.0f} | {user + system:.0f} |")
    if args.py_spy is not None:
        print(f"py-spy profiles in {args.py_spy} (guest.txt, host.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
