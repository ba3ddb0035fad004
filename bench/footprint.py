"""What an installed socketforward costs: disk, memory and start-up time.

    uv run --locked --all-extras python -m bench.footprint [--runs 15]

It builds the wheels (``uv build``: socketforward and the ttrpc-asyncio it
requires), installs them with plain pip into two fresh venvs under /tmp
(``socketforward``, and ``socketforward[fast]`` with uvloop),
and measures each with its installed ``socketforward`` script, away from the
repository: the installed size of socketforward and each runtime dependency,
the resident memory of an idle ``socketforward guest`` (over ``unix:``
endpoints, no host: started, dialing, nothing to relay), and the start-up time
of ``socketforward guest --version`` (the guest's imports and parser) and of
``socketforward guest`` until its data-stream socket exists. It prints a
Markdown table and writes nothing into the repository. pip fetches the
dependencies from the package registry (its cache helps).

The helpers (:func:`build_wheels`, :func:`make_venv`, :func:`installed_sizes`,
:func:`installed_env`) are also what tests/test_packaging.py installs with.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from bench import markdown, processes
from bench.machine import cpu_model
from bench.markdown import RIGHT

ROOT = Path(__file__).resolve().parent.parent

START_TIMEOUT = 30.0
"""How long a guest may take to make its data-stream socket."""

SETTLE = 2.0
"""Seconds an idle guest runs before its memory is read: start-up done, a few
dial attempts (backoff) made."""

# Every variable that would make an installed program see something other
# than its own venv: the repository's sources, uv's environment, a Python of
# someone's choosing.
_FOREIGN_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONUSERBASE")


class InstallError(RuntimeError):
    """A wheel could not be built or installed; the message says what pip said."""


@dataclass(frozen=True)
class Wheels:
    """The repository's two wheels, made by :func:`build_wheels`: socketforward,
    and ttrpc-asyncio, which it requires."""

    socketforward: Path
    ttrpc_asyncio: Path

    def ttrpc_asyncio_requirement(self) -> str:
        """pip's requirement for ttrpc-asyncio from its wheel."""
        return f"ttrpc-asyncio @ {self.ttrpc_asyncio.as_uri()}"

    def socketforward_requirements(self, extras: Sequence[str] = ()) -> list[str]:
        """pip's requirements for ``socketforward[extras]`` from its wheel, with
        the ttrpc-asyncio it requires named by its wheel too: pip takes ours
        instead of looking the name up in the registry."""
        name = f"socketforward[{','.join(extras)}]" if extras else "socketforward"
        return [f"{name} @ {self.socketforward.as_uri()}", self.ttrpc_asyncio_requirement()]


@dataclass(frozen=True)
class Venv:
    """A virtual environment made by :func:`make_venv`."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def script(self, name: str = "socketforward") -> Path:
        """An installed console script (``socketforward``)."""
        return self.root / "bin" / name


def installed_env() -> dict[str, str]:
    """The environment for the installed programs: this one without what would
    point them back at the repository or at uv's environment."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def uv_command() -> list[str]:
    """How to run uv: ``uv run`` names itself in ``UV``; else uv on PATH, else
    the project's way (``python3 -m uv``, Makefile)."""
    found = os.environ.get("UV") or shutil.which("uv")
    return [found] if found else ["python3", "-m", "uv"]


def build_wheels(out_dir: Path) -> Wheels:
    """The workspace's wheels, built by ``uv build --all-packages`` (hatchling,
    each pyproject's build backend) into *out_dir*."""
    result = subprocess.run(
        [*uv_command(), "build", "--all-packages", "--wheel", "--quiet",
         "--out-dir", str(out_dir), str(ROOT)],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    names = [field.name for field in fields(Wheels)]
    found = {name: sorted(out_dir.glob(f"{name}-*.whl")) for name in names}
    if result.returncode != 0 or any(len(wheels) != 1 for wheels in found.values()):
        raise InstallError(f"uv build --wheel failed ({result.returncode}):\n{result.stderr}")
    return Wheels(**{name: wheels[0] for name, wheels in found.items()})


def make_venv(where: Path, requirements: Sequence[str]) -> Venv:
    """A fresh venv (the standard library's ``venv``, with pip) at *where*, with
    *requirements* (see :class:`Wheels`) installed by plain pip."""
    venv.create(where, with_pip=True, symlinks=True, clear=True)
    env = Venv(where)
    result = subprocess.run(
        # --retries/--timeout: offline, say so in seconds rather than minutes.
        [str(env.python), "-m", "pip", "install", "--quiet", "--retries", "2", "--timeout", "30",
         *requirements],
        capture_output=True, text=True, env=installed_env(), cwd=where, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        requirement = " ".join(requirements)
        raise InstallError(
            f"pip install {requirement} failed ({result.returncode}); it fetches the "
            "runtime dependencies from the package registry (PyPI), so it needs to reach "
            f"it (CI does). pip said:\n{result.stdout}{result.stderr}"
        )
    return env


# Run by the venv's own Python: socketforward and what it requires,
# transitively, each with the bytes of the files pip recorded for it (.pyc
# included). socketforward's extras count when installed (they were asked
# for); a dependency's extras were not (uvloop's "dev" extra names pip).
_SIZES = """
import importlib.metadata as md, json, re
def key(name): return re.sub(r"[-_.]+", "-", name).lower()
dists = {key(d.metadata["Name"]): d for d in md.distributions()}
sizes, todo = {}, ["socketforward"]
while todo:
    name = todo.pop()
    if name in sizes or name not in dists:
        continue
    dist = dists[name]
    sizes[name] = sum(f.locate().stat().st_size for f in dist.files or [] if f.locate().exists())
    todo += [key(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in dist.requires or []
             if name == "socketforward" or "extra" not in r.partition(";")[2]]
print(json.dumps(sizes))
"""


def installed_sizes(env: Venv) -> dict[str, int]:
    """Bytes on disk of socketforward and each runtime dependency in *env*
    (normalized distribution names: ``socketforward``, ``protobuf``, ...)."""
    out = subprocess.run(
        [str(env.python), "-c", _SIZES],
        capture_output=True,
        text=True,
        env=installed_env(),
        check=True,
    ).stdout
    sizes: dict[str, int] = json.loads(out)
    return sizes


@contextlib.contextmanager
def idle_guest(env: Venv, run: Path) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    """An installed ``socketforward guest`` over ``unix:`` endpoints in *run*
    with no host (it dials, backs off, dials again) and the seconds it took to
    make its data-stream socket; stopped and reaped on exit."""
    streams = run / "streams.sock"
    with contextlib.suppress(FileNotFoundError):
        streams.unlink()
    argv = [str(env.script()), "guest", "-q", "--rpc-dial", f"unix:{run}/rpc.sock",
            "--streams", f"unix:{streams}"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=installed_env(), cwd=run,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not streams.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{argv!r} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{streams} did not appear within {START_TIMEOUT}s")
            time.sleep(0.001)
        yield proc, time.perf_counter() - start
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of *pid* (/proc/PID/status), in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0])
    return fields


def command_seconds(argv: Sequence[str]) -> float:
    """Wall-clock seconds of one run of *argv*, which must succeed."""
    start = time.perf_counter()
    subprocess.run(argv, capture_output=True, env=installed_env(), check=True, cwd="/")
    return time.perf_counter() - start


@dataclass
class Figures:
    """One venv's measurements."""

    sizes: dict[str, int]
    memory: dict[str, int]
    times: dict[str, list[float]]


TIMED: dict[str, Callable[[Venv], list[str]]] = {
    "python -c pass (the interpreter alone)": lambda env: [str(env.python), "-c", "pass"],
    "socketforward --version": lambda env: [str(env.script()), "--version"],
    "socketforward guest --version": lambda env: [str(env.script()), "guest", "--version"],
}
GUEST_START = "socketforward guest, until its stream socket exists"


def measure(envs: dict[str, Venv], runs: int, run_dir: Path) -> dict[str, Figures]:
    """Every figure of every venv; the timed runs interleave the venvs, so a
    busy moment of the machine does not fall on one of them alone."""
    figures = {
        name: Figures(installed_sizes(env), {}, {k: [] for k in [*TIMED, GUEST_START]})
        for name, env in envs.items()
    }
    for name, env in envs.items():  # one unmeasured start each: caches warm
        command_seconds(TIMED["socketforward guest --version"](env))
        with idle_guest(env, run_dir) as (proc, _):
            time.sleep(SETTLE)
            figures[name].memory = memory_kib(proc.pid)
    for _ in range(runs):
        for name, env in envs.items():
            for what, argv in TIMED.items():
                figures[name].times[what].append(command_seconds(argv(env)))
            with idle_guest(env, run_dir) as (_, seconds):
                figures[name].times[GUEST_START].append(seconds)
    return figures


def _mb(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.1f}"


def _ms(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    return f"{ms[0]:.0f} / {statistics.median(ms):.0f} / {ms[-1]:.0f}"


def report(figures: dict[str, Figures], runs: int) -> list[str]:
    names = list(figures)
    dists = sorted(
        {d for f in figures.values() for d in f.sizes}, key=lambda d: (d != "socketforward", d)
    )
    rows = [
        [f"installed size, {d}, MB", *(_mb(figures[n].sizes.get(d)) for n in names)] for d in dists
    ]
    rows.append(
        ["installed size, total, MB", *(_mb(sum(figures[n].sizes.values())) for n in names)]
    )
    rss = {n: figures[n].memory for n in names}
    rows.append(["idle guest VmRSS, MiB", *(f"{rss[n]['VmRSS'] / 1024:.1f}" for n in names)])
    rows.append(
        [
            "idle guest RssAnon / RssFile, MiB",
            *(f"{rss[n]['RssAnon'] / 1024:.1f} / {rss[n]['RssFile'] / 1024:.1f}" for n in names),
        ]
    )
    rows += [
        [f"start-up, {what}, ms min / median / max", *(_ms(figures[n].times[what]) for n in names)]
        for what in [*TIMED, GUEST_START]
    ]
    header = ["", *(f"pip install {n}" for n in names)]
    return [
        f"Footprint of the installed wheels, {time.strftime('%Y-%m-%d')}: Python "
        f"{platform.python_version()}, {cpu_model()}, {runs} runs of each start-up.",
        "",
        *markdown.table(header, rows, align="l" + RIGHT * len(names)),
        "",
        f"Command: `{markdown.command_line('bench.footprint')}`",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each start-up (default 15)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    with processes.scratch_dir("footprint-") as tmp:
        try:
            wheels = build_wheels(tmp / "dist")
            envs = {
                "socketforward": make_venv(tmp / "plain", wheels.socketforward_requirements()),
                "socketforward[fast]": make_venv(
                    tmp / "fast", wheels.socketforward_requirements(["fast"])
                ),
            }
        except InstallError as exc:
            print(f"bench.footprint: {exc}", file=sys.stderr)
            return 1
        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=tmp))
        figures = measure(envs, args.runs, run_dir)
    print("\n".join(report(figures, args.runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
