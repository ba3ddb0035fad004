"""What one forwarded connection costs each process: CPU microseconds (user and
system) of the guest, the host and the target service per connection, under
forward_bench's connection-rate load (32 workers: connect, 1-byte echo, close).

    uv run --locked --all-extras python -m bench.conn_cost [--seconds 4] [--py-spy DIR]

With --py-spy, py-spy (run through ``uv tool run``) records both forwarding
processes meanwhile and writes raw (collapsed-stack) profiles to DIR. The
figures are for finding where a connection's time goes, not for comparing
paths: bench.forward_bench does that.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import loadgen, markdown, processes
from bench.forward_bench import start_path
from bench.markdown import RIGHT
from bench.processes import ProcessGroup, user_system_seconds
from bench.target import start as start_target


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="load duration")
    parser.add_argument("--py-spy", type=Path, metavar="DIR", help="record py-spy profiles here")
    args = parser.parse_args()
    processes.raise_fd_limit()
    with processes.scratch_dir("conncost-") as tmp, ProcessGroup(tmp) as procs:
        target = str(tmp / "target.sock")
        service = start_target(procs, target)
        spies: list[subprocess.Popen[bytes]] = []
        try:
            path = start_path(procs, "OURS", target, None, None)
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
            before = {name: user_system_seconds(pid) for name, pid in named.items()}
            rate, failed = loadgen.connection_rate(path.entry, args.seconds, 32)
            after = {name: user_system_seconds(pid) for name, pid in named.items()}
            for spy in spies:
                spy.wait()
        finally:
            processes.stop_all(spies)
    count = rate * args.seconds
    print(f"{rate:,.0f} connections/s for {args.seconds:g} s ({failed} failed)")
    rows = []
    for name in named:
        user = (after[name][0] - before[name][0]) / count * 1e6
        system = (after[name][1] - before[name][1]) / count * 1e6
        rows.append([name, f"{user:.0f}", f"{system:.0f}", f"{user + system:.0f}"])
    header = ["process", "user us/conn", "system us/conn", "total"]
    print("\n".join(markdown.table(header, rows, align="l" + RIGHT * 3)))
    if args.py_spy is not None:
        print(f"py-spy profiles in {args.py_spy} (guest.txt, host.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
