"""Figures (not a test): boot time, throughput and round trips through real vsock.

    python3 -m uv run --locked --all-extras python -m tests.vm.measure [--mib N]

One VM boot (the same set-up as tests/vm/test_real_vm.py); inside it the same
client process measures three paths to the host service, one after the other:

* ours   guest UNIX socket -> socketforward guest -> vsock -> vhost-device-vsock
         -> hvsock:<uds>:1026 -> socketforward host -> service
* socat  guest UNIX socket -> socat UNIX-LISTEN,fork VSOCK-CONNECT:2:1027 -> vsock
         -> vhost-device-vsock -> <uds>_1027 -> socat UNIX-LISTEN,fork UNIX-CONNECT
         -> service
* vsock  the client on AF_VSOCK 2:1027 itself (no guest-side relay) -> ... as socat

Throughput is without hashing (pure transfer); the single vCPU under TCG runs
the client, the guest-side relay and the guest kernel, so these are figures for
this machine, not limits of the code.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from tests.processes import short_tmp_dir
from tests.vm import harness, vm

TARGETS = {
    "ours": f"unix:{harness.VM_SOCKET}",
    "socat": "unix:/run/socat.sock",
    "vsock": f"vsock:2:{harness.SOCAT_PORT}",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="MiB each way (default 64)")
    ap.add_argument("--rtt", type=int, default=500, help="64-byte round trips (default 500)")
    ap.add_argument("--connects", type=int, default=50, help="new connections (default 50)")
    ap.add_argument(
        "--host-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for socketforward host (repeatable; e.g. --host-arg=--stream-pool "
        "--host-arg=0 to measure without pooled data streams)",
    )
    args = ap.parse_args()
    problem = vm.qemu_start_problem()
    if problem:
        print(f"QEMU cannot start: {problem}", file=sys.stderr)
        return 1
    tools = vm.VmTools.load()
    flags = f"--mib {args.mib} --no-hash --rtt {args.rtt} --connects {args.connects}"
    clients = "".join(
        harness.client_line(target, f"{name}.json", flags) for name, target in TARGETS.items()
    )
    with short_tmp_dir("sfvm-") as workdir:
        out = harness.run(
            tools,
            workdir,
            clients,
            result_names=tuple(f"{n}.json" for n in TARGETS),
            timeout=600,
            socat=True,
            host_args=args.host_arg,
        )
    accel, why = vm.accelerator()
    print(f"command: {shlex.join(['python', '-m', 'tests.vm.measure', *sys.argv[1:]])}")
    print(f"machine: QEMU {accel} ({why}), -smp 1, {vm.MEMORY_MIB} MiB, vhost-device-vsock")
    print(
        f"boot: QEMU start -> guest script running {out.boot_s:.1f} s; "
        f"whole run {out.total_s:.1f} s"
    )
    print(
        f"{'path':6} {'upload MB/s':>12} {'download MB/s':>14} "
        f"{'64 B RTT ms':>12} {'connect ms':>11}"
    )
    failed = False
    for name in TARGETS:
        res: dict[str, Any] = out.results.get(f"{name}.json", {"errors": {"all": "no results"}})
        if res["errors"]:
            failed = True
            print(f"{name:6} errors: {res['errors']}")
            continue
        print(
            f"{name:6} {res['upload']['mb_s']:12.1f} {res['download']['mb_s']:14.1f} "
            f"{res['rtt']['median_ms']:12.2f} {res['connect']['median_ms']:11.1f}"
        )
    print(f"({args.mib} MiB each way, no hashing; RTT median of {args.rtt} on one connection;")
    print(f" connect = median of {args.connects} x connect + 1-byte echo + close)")
    if failed:
        print(out.diagnostics[-8000:], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
