"""A real guest in QEMU whose only way out is a vhost-user vsock device.

The pieces come from ``scripts/vm_setup.sh`` (QEMU, busybox-static, socat,
Debian's kernel unpacked, vhost-device-vsock), listed in its ``vm.env``. The
guest boots a small initramfs (``init.sh`` + busybox + the virtio, vsock and 9p
modules), mounts the host's ``/`` read-only over virtio-9p and a writable share
(the run's ``share`` directory, at the same path) and runs ``share/guest.sh``
chrooted there, so the host's Python and this package run in the guest. No
network device: vsock, served by vhost-device-vsock as hybrid vsock (UNIX
sockets on the host), is its only way out. The host never opens AF_VSOCK.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("SOCKETFORWARD_VM_CACHE", REPO / "build" / "vm"))
SETUP_SCRIPT = REPO / "scripts" / "vm_setup.sh"
GUEST_CID = 3
# Loaded in dependency order (from each module's .modinfo "depends=").
WANTED_MODULES = ("virtio_pci", "vmw_vsock_virtio_transport", "9pnet_virtio", "9p")
MEMORY_MIB = 1024


class SetupMissingError(RuntimeError):
    """What vm_setup.sh should have provided is not there."""


@dataclass(frozen=True)
class VmTools:
    qemu: str
    busybox: str
    socat: str
    kernel: str
    modules: str
    vhost_device_vsock: str

    @classmethod
    def load(cls) -> VmTools:
        env_file = CACHE / "vm.env"
        if not env_file.is_file():
            raise SetupMissingError(f"{env_file} missing: run `make vm-setup` ({SETUP_SCRIPT})")
        values = dict(
            line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line
        )
        try:
            tools = cls(
                qemu=values["QEMU"],
                busybox=values["BUSYBOX"],
                socat=values["SOCAT"],
                kernel=values["KERNEL"],
                modules=values["MODULES"],
                vhost_device_vsock=values["VHOST_DEVICE_VSOCK"],
            )
        except KeyError as exc:
            raise SetupMissingError(f"{env_file} lacks {exc}: run `make vm-setup`") from None
        for name in ("busybox", "kernel", "vhost_device_vsock", "socat"):
            if not os.path.exists(getattr(tools, name)):
                raise SetupMissingError(
                    f"{name} {getattr(tools, name)} missing: run `make vm-setup`"
                )
        return tools


def find_qemu() -> str | None:
    """The QEMU binary: from vm.env if set up, else from PATH."""
    with contextlib.suppress(OSError, ValueError):
        for line in (CACHE / "vm.env").read_text().splitlines():
            if line.startswith("QEMU=") and os.access(line[5:], os.X_OK):
                return line[5:]
    return shutil.which("qemu-system-x86_64")


def accelerator() -> tuple[str, str]:
    """("kvm"|"tcg", why): KVM only when a real kvm_intel/kvm_amd module is loaded."""
    for mod in ("kvm_intel", "kvm_amd"):
        if os.path.isdir(f"/sys/module/{mod}") and os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "kvm", f"/sys/module/{mod} exists"
    return "tcg", "no /sys/module/kvm_intel or kvm_amd (a paravirtual /dev/kvm cannot run it)"


def qemu_start_problem() -> str | None:
    """Why QEMU cannot start at all on this machine, or None when it can."""
    qemu = find_qemu()
    if qemu is None:
        return "qemu-system-x86_64 not found (make vm-setup installs it with apt-get)"
    accel, _ = accelerator()
    try:
        probe = subprocess.run(
            [qemu, "-machine", f"q35,accel={accel}", "-cpu", "max", "-nodefaults",
             "-display", "none", "-no-user-config", "-S", "-qmp", "stdio"],
            input=b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
            capture_output=True,
            timeout=30,
            check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{qemu} cannot start: {exc}"
    if probe.returncode != 0:
        err = probe.stderr.decode(errors="replace").strip()
        return f"{qemu} cannot start (exit {probe.returncode}): {err}"
    return None


# ---------------------------------------------------------------- initramfs


def _module_paths(modules_dir: Path) -> dict[str, Path]:
    paths = {}
    for rel in (modules_dir / "modules.order").read_text().split():
        path = modules_dir / rel
        for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
            if path.name.endswith(suffix):
                paths[path.name[: -len(suffix)].replace("-", "_")] = path
    return paths


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        import lzma  # noqa: PLC0415

        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        import gzip  # noqa: PLC0415

        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise SetupMissingError(f"{path}: zstd-compressed modules are not supported")
    return data


def module_load_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """(name, .ko bytes) for ``wanted`` and what they depend on, dependencies first."""
    paths = _module_paths(modules_dir)
    builtin = {
        Path(line).name.split(".ko")[0].replace("-", "_")
        for line in (modules_dir / "modules.builtin").read_text().split()
    }
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in paths:
            raise SetupMissingError(f"module {name} not found under {modules_dir}")
        data = _module_bytes(paths[name])
        match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
        for dep in match.group(1).decode().split(",") if match else []:
            if dep:
                visit(dep.replace("-", "_"))
        order.append((name, data))

    for name in wanted:
        visit(name)
    return order


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    encoded = name.encode() + b"\0"
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + encoded
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def build_initramfs(tools: VmTools) -> Path:
    """The guest's initramfs (newc cpio), cached by content under the setup cache."""
    modules = module_load_order(Path(tools.modules), WANTED_MODULES)
    busybox = Path(tools.busybox).read_bytes()
    init = (HERE / "init.sh").read_text().replace("@MODULES@", " ".join(n for n, _ in modules))
    digest = hashlib.sha256(init.encode() + busybox)
    for name, data in modules:
        digest.update(name.encode() + data)
    out = CACHE / f"initramfs-{digest.hexdigest()[:16]}.cpio"
    if out.is_file():
        return out
    reg, dirmode = stat.S_IFREG, stat.S_IFDIR | 0o755
    parts = [_cpio_entry(d, dirmode) for d in ("bin", "dev", "proc", "sys", "newroot", "modules")]
    parts.append(_cpio_entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    parts.append(_cpio_entry("bin/busybox", reg | 0o755, busybox))
    parts.append(_cpio_entry("init", reg | 0o755, init.encode()))
    parts += [_cpio_entry(f"modules/{n}.ko", reg | 0o644, d) for n, d in modules]
    parts.append(_cpio_entry("TRAILER!!!", 0))
    for old in CACHE.glob("initramfs-*.cpio"):
        old.unlink()
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(b"".join(parts))
    tmp.rename(out)
    return out


# ---------------------------------------------------------------- the VM


def guest_env_lines() -> str:
    """Shell lines that give a guest script the host's Python environment."""
    venv_bin = Path(sys.executable).parent
    return (
        f"export PATH={venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        "export HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 LANG=C.UTF-8\n"
        f"PY={sys.executable}\nREPO={REPO}\n"
    )


def _stop(proc: subprocess.Popen[bytes], timeout: float = 5) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Vm:
    """A booted guest: its console log, and its processes (reaped by ``boot``)."""

    def __init__(self, workdir: Path, started: float) -> None:
        self.workdir = workdir
        self.share = workdir / "share"
        self.uds = workdir / "v.sock"  # hybrid vsock: host->guest CONNECT; <uds>_P guest->host
        self.console_path = workdir / "console.log"
        self.vhost_log = workdir / "vhost-device-vsock.log"
        self.started = started
        self.qemu: subprocess.Popen[bytes] | None = None
        self.vhost: subprocess.Popen[bytes] | None = None

    def console(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.console_path.read_text(errors="replace")
        return ""

    def diagnostics(self) -> str:
        out = [f"--- console\n{self.console()}"]
        for path in [self.workdir / "qemu.log", self.vhost_log, *sorted(self.share.glob("*.log"))]:
            with contextlib.suppress(OSError):
                out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(out)

    def wait_console(self, marker: str, timeout: float) -> float:
        """Seconds since QEMU started when ``marker`` showed on the console."""
        deadline = time.monotonic() + timeout
        while marker not in self.console():
            assert self.qemu is not None
            if self.qemu.poll() is not None:
                raise AssertionError(
                    f"QEMU exited ({self.qemu.returncode}) before {marker!r}\n" + self.diagnostics()
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {marker!r} within {timeout}s\n{self.diagnostics()}")
            time.sleep(0.02)
        return time.monotonic() - self.started

    def wait_exit(self, timeout: float) -> int:
        """Wait for the guest to power off (QEMU exits)."""
        assert self.qemu is not None
        try:
            return self.qemu.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"guest still running after {timeout}s\n{self.diagnostics()}"
            ) from None

    def status(self) -> dict[str, str]:
        """``share/status`` (KEY=VALUE lines written by the guest script)."""
        with contextlib.suppress(FileNotFoundError):
            text = (self.share / "status").read_text()
            return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        return {}


def _wait_path(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"{path} did not appear (exit {proc.poll()}):\n{log.read_text(errors='replace')}"
            )
        time.sleep(0.01)


@contextlib.contextmanager
def boot(tools: VmTools, workdir: Path, guest_script: str) -> Iterator[Vm]:
    """Boot the guest; it runs ``guest_script`` (saved as ``workdir/share/guest.sh``).

    vhost-device-vsock and QEMU are killed and reaped when the block ends.
    """
    vm = Vm(workdir, time.monotonic())
    vm.share.mkdir(mode=0o700, exist_ok=True)
    (vm.share / "guest.sh").write_text(guest_script)
    initramfs = build_initramfs(tools)
    try:
        _start(vm, tools, initramfs)
        yield vm
    finally:
        for proc in (vm.qemu, vm.vhost):
            if proc is not None:
                _stop(proc)


def _start(vm: Vm, tools: VmTools, initramfs: Path) -> None:
    vhost_sock = vm.workdir / "vhost-user.sock"
    with vm.vhost_log.open("wb") as log:
        vm.vhost = subprocess.Popen(
            [tools.vhost_device_vsock, "--vm",
             f"guest-cid={GUEST_CID},socket={vhost_sock},uds-path={vm.uds}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )  # fmt: skip
    _wait_path(vhost_sock, vm.vhost, vm.vhost_log, 10)
    accel, _ = accelerator()
    cpu = "host" if accel == "kvm" else "max"
    cmd = [
        tools.qemu, "-machine", f"q35,accel={accel}", "-cpu", cpu, "-smp", "1",
        "-m", f"{MEMORY_MIB}M",
        "-object", f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
        "-numa", "node,memdev=mem",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-nic", "none",
        "-serial", f"file:{vm.console_path}", "-monitor", "none",
        "-kernel", tools.kernel, "-initrd", str(initramfs),
        "-append", f"console=ttyS0 panic=-1 rdinit=/init quiet sfshare={vm.share} sfrepo={REPO}",
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=work,path={vm.share},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=work,mount_tag=work",
        # The checkout (with .venv) at its own path: under /tmp or /run the
        # guest's tmpfs would hide it (CI may clone there).
        "-fsdev", f"local,id=repo,path={REPO},security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=repo,mount_tag=repo",
        "-chardev", f"socket,id=vsock0,path={vhost_sock}",
        "-device", "vhost-user-vsock-pci,chardev=vsock0",
    ]  # fmt: skip
    vm.started = time.monotonic()
    with (vm.workdir / "qemu.log").open("wb") as log:
        vm.qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
