"""One VM run: host service, ``socketforward host`` over hybrid vsock, the guest agent.

Used by ``test_real_vm.py`` (assertions) and ``measure.py`` (figures).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.processes import Running, socketforward
from tests.vm import vm

HERE = Path(__file__).resolve().parent
VM_SOCKET = "/run/socketfwd/svc.sock"
VM_SERVICE = "/run/vmsvc.sock"
"""A service inside the VM (tests/vm/service.py), exposed on the host."""
EXPOSED = "exposed.sock"
"""Its socket on the host, in the run's directory."""
RPC_PORT, STREAM_PORT, SOCAT_PORT = 1025, 1026, 1027


@dataclass
class Outcome:
    """What one run produced, read after the guest powered off."""

    boot_s: float  # QEMU start -> guest script running (chrooted into the host's /)
    total_s: float  # QEMU start -> guest powered off
    status: dict[str, str]
    results: dict[str, dict[str, Any]]
    service_log: list[dict[str, Any]]
    host_exit: int | None
    host_log: str
    diagnostics: str
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def host_service(workdir: Path) -> Iterator[tuple[Path, Path]]:
    """tests/vm/service.py on ``workdir/svc.sock``; yields (socket, its JSON-lines log)."""
    sock, log = workdir / "svc.sock", workdir / "service.jsonl"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "service.py"), str(sock), str(log)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            raise AssertionError(f"host service did not start: {line!r}, exit {proc.poll()}")
        yield sock, log
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client_line(target: str, out: str, args: str) -> str:
    return (
        f'"$PY" "$REPO/tests/vm/guest_client.py" --target {target} '
        f'--out "$SHARE/{out}" --agent-pid "$AGENT" {args} >"$SHARE/{out}.log" 2>&1\n'
        f'echo "{out}_exit=$?" >>"$SHARE/status"\n'
    )


def expose_clients(wait: float) -> str:
    """Guest lines for an expose run: serve tests/vm/service.py at VM_SERVICE,
    say SF-EXPOSE-READY once the host is connected, then wait (at most *wait*
    s) until the host's clients are done (``share/host-done``)."""
    return (
        f'"$PY" "$REPO/tests/vm/service.py" {VM_SERVICE} "$SHARE/vm-service.jsonl" '
        '>"$SHARE/vm-service.log" 2>&1 &\nVMSVC=$!\n'
        f"while [ ! -S {VM_SERVICE} ]; do sleep 0.05; done\n"
        # The forward's socket appears once the host has Bound: the RPC is up.
        f"while [ ! -S {VM_SOCKET} ]; do sleep 0.05; done\n"
        "echo SF-EXPOSE-READY\n"
        f'i=0; while [ ! -e "$SHARE/host-done" ] && [ $i -lt {int(wait * 10)} ]; do '
        "sleep 0.1; i=$((i+1)); done\n"
        "kill -TERM $VMSVC; wait $VMSVC\n"
    )


def guest_script(share: Path, clients: str, socat: bool = False) -> str:
    """guest.sh: start the agent with its defaults, run the clients, SIGTERM the agent."""
    lines = [
        "#!/bin/sh\n",
        "echo SF-GUEST-START\n",
        f"SHARE={share}\n",
        vm.guest_env_lines(),
    ]
    lines += [
        # The defaults: dial vsock CID 2 port 1025, listen on vsock port 1026.
        '"$PY" -m socketforward -v guest >"$SHARE/agent.log" 2>&1 &\n',
        "AGENT=$!\n",
        "unset PYTHONPATH\n",
    ]
    if socat:  # the comparison: socat from a guest UNIX socket to vsock CID 2
        lines.append(
            f"socat UNIX-LISTEN:/run/socat.sock,fork VSOCK-CONNECT:2:{SOCAT_PORT} "
            '>"$SHARE/socat-guest.log" 2>&1 &\nSOCAT=$!\n'
        )
    lines += [
        clients,
        "echo SF-CLIENTS-DONE\n",
        "kill -TERM $AGENT\n",
        "( sleep 20; kill -KILL $AGENT ) 2>/dev/null &\n",
        "wait $AGENT\n",
        'echo "agent_exit=$?" >>"$SHARE/status"\n',
        f'echo "vm_socket_left=$([ -e {VM_SOCKET} ] && echo yes || echo no)" >>"$SHARE/status"\n',
        # Bind made /run/socketfwd; shutdown removes it with the socket in it.
        'echo "run_socketfwd=$(ls -A /run/socketfwd 2>/dev/null || echo gone)" >>"$SHARE/status"\n',
    ]
    if socat:
        lines.append("kill $SOCAT\n")
    lines.append("echo SF-GUEST-DONE\n")
    return "".join(lines)


def run(
    tools: vm.VmTools,
    workdir: Path,
    clients: str,
    *,
    result_names: tuple[str, ...],
    timeout: float,
    boot_timeout: float = 90,
    socat: bool = False,
    host_clients: Callable[[Path], None] | None = None,
    host_args: Sequence[str] = (),
) -> Outcome:
    """Boot the VM with the host side running; everything is stopped before returning.

    With *host_clients* the host also exposes VM_SERVICE at ``workdir/EXPOSED``
    and, once the guest (running :func:`expose_clients`) says it is ready,
    calls it with that path; then it tells the guest it is done. *host_args*
    go to ``socketforward host`` after the others."""
    deadline = time.monotonic() + timeout
    share = workdir / "share"
    with contextlib.ExitStack() as stack:
        svc, svc_log = stack.enter_context(host_service(workdir))
        uds = workdir / "v.sock"
        host: Running = stack.enter_context(
            socketforward(
                ["host", "--rpc-listen", f"unix:{uds}_{RPC_PORT}",
                 "--streams", f"hvsock:{uds}:{STREAM_PORT}",
                 "--forward", f"svc={svc}:{VM_SOCKET}",
                 *(["--expose", f"vmsvc={VM_SERVICE}:{workdir / EXPOSED}"]
                   if host_clients is not None else []),
                 *host_args],
                workdir / "host.log",
            )
        )  # fmt: skip
        if socat:
            socat_log = stack.enter_context((workdir / "socat-host.log").open("wb"))
            proc = subprocess.Popen(
                [tools.socat, f"UNIX-LISTEN:{uds}_{SOCAT_PORT},fork", f"UNIX-CONNECT:{svc}"],
                stdin=subprocess.DEVNULL, stdout=socat_log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            stack.callback(_reap, proc)
        machine = stack.enter_context(vm.boot(tools, workdir, guest_script(share, clients, socat)))
        try:
            boot_s = machine.wait_console("SF-GUEST-START", boot_timeout)
            if host_clients is not None:
                machine.wait_console("SF-EXPOSE-READY", max(1.0, deadline - time.monotonic()))
                try:
                    host_clients(workdir / EXPOSED)
                finally:
                    (share / "host-done").touch()
            machine.wait_exit(max(1.0, deadline - time.monotonic()))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- host.log\n{host.log()[-6000:]}") from None
        total_s = time.monotonic() - machine.started
        host_exit = host.stop()
        diagnostics = machine.diagnostics() + f"\n--- host.log\n{host.log()[-6000:]}"
        results = {}
        for name in result_names:
            path = share / name
            if path.is_file():
                results[name] = json.loads(path.read_text())
        service_log = [json.loads(line) for line in svc_log.read_text().splitlines() if line]
        vm_log = share / "vm-service.jsonl"
        vm_service_log = (
            [json.loads(line) for line in vm_log.read_text().splitlines() if line]
            if vm_log.is_file()
            else []
        )
        return Outcome(
            boot_s=boot_s,
            total_s=total_s,
            status=machine.status(),
            results=results,
            service_log=service_log,
            host_exit=host_exit,
            host_log=host.log(),
            diagnostics=diagnostics,
            extra={"vm_service_log": vm_service_log},
        )
    raise AssertionError("unreachable")


def _reap(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
