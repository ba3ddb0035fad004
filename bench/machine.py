"""What a benchmark ran on, for its report: the CPU, the memory, tools'
versions, and how busy the machine was meanwhile (other processes' CPU time
and the hypervisor's steal, from /proc)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from bench import processes


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_gib() -> float:
    """Installed memory (MemTotal), 0 when /proc/meminfo cannot tell."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    return 0.0


def tool_version(argv: list[str], missing: str = "not installed") -> str:
    """The version line ``argv`` prints (socat's ``-V``: its second line)."""
    with contextlib.suppress(OSError):
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
        text = (proc.stdout or proc.stderr).strip().splitlines()
        return text[1] if argv[-1] == "-V" and len(text) > 1 else (text[0] if text else "?")
    return missing


class CpuTimes(NamedTuple):
    """The machine's CPU seconds so far, summed over its CPUs (/proc/stat)."""

    busy: float
    """user + nice + system: processes, kernel threads included (guest time is
    counted in user already); interrupts are left out, as the benchmark's own
    traffic raises most of them."""
    steal: float
    """Time a virtual CPU wanted to run and the hypervisor ran something else."""


def cpu_times() -> CpuTimes:
    fields = [int(f) for f in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    fields += [0] * (8 - len(fields))  # steal is the 8th; old kernels stop earlier
    tick = os.sysconf("SC_CLK_TCK")
    return CpuTimes(busy=sum(fields[:3]) / tick, steal=fields[7] / tick)


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine used so far (/proc/stat)."""
    return cpu_times().busy


def own_cpu_seconds() -> float:
    """This process's CPU and that of its reaped children (all of ours by the end)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and all its descendants, living or reaped.

    A reaped child's time is in ``os.times``'s children fields; a living one's
    (and that of the children it reaped) is read from its /proc/PID/stat."""
    total = own_cpu_seconds()
    for pid in processes.descendants(os.getpid())[1:]:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += processes.cpu_seconds([pid])
    return total


def process_cpu() -> dict[tuple[int, int], tuple[str, float]]:
    """Every process's own CPU seconds, keyed by (pid, start time) so a reused
    pid is a new process; with its command name."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[tuple[int, int], tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            text = Path(f"/proc/{entry}/stat").read_text()
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text.rsplit(")", 1)[1].split()
            # fields[0] is field 3 (state): utime 14, stime 15, starttime 22
            cpu = (int(fields[11]) + int(fields[12])) / tick
            out[(int(entry), int(fields[19]))] = (name, cpu)
    return out


@dataclass
class Noise:
    """What else used the machine's CPUs while the benchmark ran a stretch."""

    seconds: float
    """Wall-clock length of the stretch."""
    capacity: float
    """CPU seconds there were: ``seconds`` times the number of CPUs."""
    other: float
    """CPU seconds used by processes not the benchmark's (machine busy time
    from /proc/stat minus the CPU time of the benchmark's process tree)."""
    steal: float
    """CPU seconds the hypervisor took from the virtual CPUs (/proc/stat)."""
    top: list[tuple[str, float]] = field(default_factory=list)
    """The biggest other users by command name, from /proc/PID/stat; what
    started and ended inside the stretch shows only as the rest."""

    @property
    def other_percent(self) -> float:
        return 100 * self.other / self.capacity if self.capacity else 0.0

    @property
    def steal_percent(self) -> float:
        return 100 * self.steal / self.capacity if self.capacity else 0.0

    @property
    def percent(self) -> float:
        """Other work and steal together, in percent of the CPU there was."""
        return self.other_percent + self.steal_percent

    def describe_top(self, minimum: float = 0.05) -> str:
        """``name 1.2 s, ...`` for the biggest other users, and the short-lived rest."""
        named = [(n, s) for n, s in self.top if s >= minimum]
        parts = [f"{n} {s:.1f} s" for n, s in named]
        rest = self.other - sum(s for _, s in named)
        if rest >= minimum:
            parts.append(f"others and short-lived processes {rest:.1f} s")
        return ", ".join(parts) or "none"


class NoiseMeter:
    """Measure :class:`Noise` from ``start()`` to ``stop()``.

    The benchmark's own processes are its process tree (this process, its
    children and theirs): their CPU time is subtracted from the machine's busy
    time, and left out of the named list."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self._cpu0 = CpuTimes(0.0, 0.0)
        self._own0 = 0.0
        self._procs0: dict[tuple[int, int], tuple[str, float]] = {}

    def start(self) -> None:
        self._procs0 = process_cpu()
        self._own0 = tree_cpu_seconds()
        self._cpu0 = cpu_times()
        self._t0 = time.monotonic()

    def stop(self, top: int = 3) -> Noise:
        seconds = time.monotonic() - self._t0
        cpu = cpu_times()
        own = tree_cpu_seconds() - self._own0
        ours = set(processes.descendants(os.getpid()))
        by_name: dict[str, float] = {}
        for key, (name, used) in process_cpu().items():
            if key[0] in ours:
                continue
            before = self._procs0.get(key)
            delta = used - (before[1] if before else 0.0)
            if delta > 0:
                by_name[name] = by_name.get(name, 0.0) + delta
        other = max(0.0, cpu.busy - self._cpu0.busy - own)
        return Noise(
            seconds=seconds,
            capacity=seconds * (os.cpu_count() or 1),
            other=other,
            steal=max(0.0, cpu.steal - self._cpu0.steal),
            top=sorted(by_name.items(), key=lambda kv: -kv[1])[:top],
        )
