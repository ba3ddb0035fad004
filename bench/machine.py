"""What a benchmark ran on, for its report: the CPU, the memory, tools'
versions, and how busy the machine was meanwhile."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path


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


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine used so far (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    # user nice system idle iowait irq softirq steal: all but idle and iowait
    busy = sum(int(f) for i, f in enumerate(fields[:8]) if i not in (3, 4))
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """This process's CPU and that of its reaped children (all of ours by the end)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
