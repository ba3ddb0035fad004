"""The README's recipes (section "Recipes"), run as printed: each test takes
its recipe's code blocks from README.md, so the two cannot drift apart.

How a recipe runs on one machine (the README says it too):

* The blocks run in order, ``# on the host`` ones in one shell and ``# in the
  VM`` ones in another (bash, from the repository's root; exported variables
  carry over from one command to the next, as in a terminal).
* Every path under ``/run``, ``/var/run`` and ``/etc`` in a block is moved
  under a temporary directory (:func:`moved`); ``/run/socketfwd`` named by the
  program itself (the OCI recipe's) stays where it is.
* ``socketforward host ...`` runs in the background as the host; once it
  listens, a real ``socketforward guest --rpc-dial unix:... --streams unix:...``
  dials the two sockets libkrun would make of the VM's vsock ports (the
  recipes' ``/run/user/1000/vm1/rpc.sock`` and ``vsock_1026.sock``), and the
  next command runs when the host has the guest connected.
* ``systemctl`` lines are not run; the systemd test plays systemd's part with
  the units they name.

What else a test changes is in its docstring. A test skips only when an
external tool it needs is missing (and says which), or, for the OCI recipe,
without root (the guest binds under the real /run/socketfwd and gives the
socket to the spec's user).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.processes import Running, socketforward, wait_for_socket

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
OCI_SPEC = REPO / "contrib" / "oci" / "config.json"
UNITS = REPO / "contrib" / "systemd"
PROGRAM = Path(sys.executable).parent / "socketforward"  # the locked environment's
INSTALLED_PROGRAM = "/usr/local/bin/socketforward"  # where the units run it from

# The VM's directory on the host in the recipes (libkrun's vsock sockets).
VM_DIR = "/run/user/1000/vm1"

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed"),
]


def needs(*tools: str) -> pytest.MarkDecorator:
    """Skip unless every one of *tools* is on PATH, naming those missing."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")


# -- the README's recipes ---------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One fenced code block of a recipe."""

    lang: str
    text: str

    @property
    def role(self) -> str:
        """``host``, ``vm`` or ``""`` (a block that is shown, not run)."""
        first = self.text.splitlines()[0] if self.text else ""
        if first.startswith("# on the host"):
            return "host"
        if first.startswith("# in the VM"):
            return "vm"
        return ""


def recipe(title: str) -> list[Block]:
    """The code blocks under ``### {title}`` of the README's "Recipes"."""
    section = README.read_text().split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0]
    part = section.split(f"\n### {title}\n", 1)[1].split("\n### ", 1)[0]
    found = re.findall(r"^```(\w*)\n(.*?)^```$", part, re.MULTILINE | re.DOTALL)
    return [Block(lang, text) for lang, text in found]


_MOVED = re.compile(r"(?<![\w./-])(?=/(?:run|var/run|etc)/)")


def moved(text: str, root: Path) -> str:
    """*text* with every absolute path under /run, /var/run and /etc put under *root*."""
    return _MOVED.sub(str(root), text)


def commands(block: str) -> list[str]:
    """The shell commands of *block*: comment lines left out, a backslash
    continuation and a here-document kept with the line that starts them."""
    found: list[str] = []
    lines = iter(block.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        command = line
        while command.endswith("\\"):
            command += "\n" + next(lines)
        heredoc = re.search(r"<<-?\s*'?(\w+)'?", command)
        if heredoc is not None:
            for body in lines:
                command += "\n" + body
                if body == heredoc[1]:
                    break
        found.append(command)
    return found


def words(command: str) -> list[str]:
    """The words of *command* as the shell splits it (before expansion)."""
    return shlex.split(command.replace("\\\n", " "), comments=True)


def is_daemon(command: str) -> bool:
    """A command that runs until stopped. A guest is one too, only to be refused:
    never run here with its default (vsock) endpoints."""
    return words(command)[:2] in (["socketforward", "host"], ["socketforward", "guest"])


def test_the_substitutions_do_what_the_readme_says(tmp_path: Path) -> None:
    """The path moves leave relative paths, URLs and the program's own names
    alone, and every recipe has its blocks where the tests look for them."""
    assert moved("unix:/run/a --x=/var/run/b c:/etc/d contrib/x", tmp_path) == (
        f"unix:{tmp_path}/run/a --x={tmp_path}/var/run/b c:{tmp_path}/etc/d contrib/x"
    )
    assert moved("http://localhost/run/x unix:///run/y", tmp_path) == (
        "http://localhost/run/x unix:///run/y"
    )
    roles = {
        "The host's ssh-agent in the VM": ["host", "vm"],
        "The VM's docker.sock on the host": ["host", "host"],
        "gpg-agent in the VM": ["host", "vm"],
        "An OCI spec with a `uds` mount": ["host", ""],
        "A systemd set-up": ["host", "vm"],
    }
    for title, want in roles.items():
        blocks = recipe(title)
        assert [b.role for b in blocks] == want, title
        for block in blocks:
            lines = [line for line in block.text.splitlines() if not line.startswith("#")]
            assert 1 <= len(lines) <= 10, (title, "a recipe's block is at most 10 lines")


# -- running them -----------------------------------------------------------------


@dataclass
class Result:
    command: str
    status: int
    output: str  # stdout
    errors: str = ""  # stderr


@dataclass
class Shell:
    """A terminal of the recipe: commands run one at a time in bash from the
    repository's root; variables they set (``set -a``: all of them) carry over."""

    name: str
    root: Path
    env: dict[str, str]
    results: list[Result] = field(default_factory=list)

    def run(self, command: str, timeout: float = 30) -> Result:
        state = self.root / f"{self.name}.env"
        out_path, err_path = self.root / f"{self.name}.out", self.root / f"{self.name}.err"
        script = (
            f"set -a\n{command}\n__status=$?\nset +a\n"
            f"env -0 >{shlex.quote(str(state))}\nexit $__status\n"
        )
        # Files, not pipes: a daemon the command starts may keep them open.
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.run(
                ["bash", "-c", script],
                env=self.env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                timeout=timeout,
                check=False,
            )
        env: dict[str, str] = {}
        for entry in state.read_text().split("\0"):
            name, sep, value = entry.partition("=")
            if sep and name not in ("_", "__status", "SHLVL", "PWD", "OLDPWD"):
                env[name] = value
        self.env = env
        result = Result(
            command,
            proc.returncode,
            out_path.read_text(errors="replace"),
            err_path.read_text(errors="replace"),
        )
        self.results.append(result)
        return result

    @contextlib.contextmanager
    def spawn(self, command: str, log: Path) -> Iterator[Running]:
        """Run *command* in the background (bash expands it, then becomes it)."""
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                env=self.env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        running = Running(proc, log)
        try:
            yield running
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def wait_for_log(running: Running, text: str, timeout: float = 30, *others: Running) -> None:
    deadline = time.monotonic() + timeout
    while text not in running.log():
        for proc in (running, *others):
            if proc.proc.poll() is not None:
                raise AssertionError(f"process exited early; log:\n{proc.log()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} within {timeout}s; log:\n{running.log()}")
        time.sleep(0.02)


@dataclass
class Machine:
    """The host and "the VM" of one recipe, both on this machine under *root*."""

    root: Path
    stack: contextlib.ExitStack
    host: Shell
    vm: Shell
    daemons: list[Running] = field(default_factory=list)

    @property
    def rpc(self) -> Path:
        return Path(moved(f"{VM_DIR}/rpc.sock", self.root))

    @property
    def streams(self) -> Path:
        return Path(moved(f"{VM_DIR}/vsock_1026.sock", self.root))

    def path(self, recipe_path: str) -> Path:
        """Where a path of the recipe is on this machine."""
        return Path(moved(recipe_path, self.root))

    def play(self, block: Block, *, only: Callable[[str], bool] = lambda _: True) -> Result:
        """Run *block*'s commands (those *only* keeps) in its shell and return
        the last one's result. Each must succeed, but for the last command of a
        VM block: the test judges that one."""
        shell = self.host if block.role == "host" else self.vm
        todo = [c for c in commands(moved(block.text, self.root)) if only(c)]
        assert todo, block.text
        result = Result("", 0, "")
        for index, command in enumerate(todo):
            if is_daemon(command):
                self.start_host(shell, command)
                continue
            result = shell.run(command)
            if block.role == "host" or index < len(todo) - 1:
                assert result.status == 0, (result, self.logs())
        return result

    def start_host(self, shell: Shell, command: str) -> None:
        """The recipe's ``socketforward host``, then a guest dialing it; returns
        once the host has the guest connected (its Accept call is open)."""
        assert words(command)[:2] == ["socketforward", "host"], command
        n = len(self.daemons)
        host = self.stack.enter_context(shell.spawn(command, self.root / f"host{n}.log"))
        self.stack.callback(lambda: self._stopped(host))
        wait_for_socket(self.rpc, 30, host)
        guest_args = [
            "guest",
            "--rpc-dial",
            f"unix:{self.rpc}",
            "--streams",
            f"unix:{self.streams}",
        ]
        guest = self.stack.enter_context(socketforward(guest_args, self.root / f"guest{n}.log"))
        self.stack.callback(lambda: self._stopped(guest))
        self.daemons += [host, guest]
        wait_for_log(host, "accept stream opened", 30, guest)

    @staticmethod
    def _stopped(running: Running) -> None:
        assert running.stop() == 0, running.log()

    def logs(self) -> str:
        return "\n".join(d.log() for d in self.daemons)


@pytest.fixture
def machine(short_tmp: Path) -> Iterator[Machine]:
    """A fresh host and VM: the VM's directory (made by the VMM, 0700), HOMEs of
    their own, and the locked environment's ``socketforward`` first on PATH."""
    (short_tmp / VM_DIR.lstrip("/")).mkdir(parents=True, mode=0o700)
    for home in ("host-home", "vm-home"):
        (short_tmp / home).mkdir(mode=0o700)
    base = {"PATH": f"{PROGRAM.parent}:{os.environ['PATH']}", "LC_ALL": "C"}
    with contextlib.ExitStack() as stack:
        yield Machine(
            short_tmp,
            stack,
            Shell("host", short_tmp, {**base, "HOME": str(short_tmp / "host-home")}),
            Shell("vm", short_tmp, {**base, "HOME": str(short_tmp / "vm-home")}),
        )


# Small services of the test ------------------------------------------------------


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Threads joined at server_close()."""


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while data := sock.recv(1 << 16):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)


DOCKER_VERSION = b'{"Version":"27.3.1","ApiVersion":"1.47","Os":"linux"}'


class _DockerVersion(http.server.BaseHTTPRequestHandler):
    """An HTTP API on a UNIX socket, answering ``GET /version`` as Docker's does."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        found = self.path == "/version"
        body = DOCKER_VERSION if found else b'{"message":"page not found"}'
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def serving(path: Path, handler: type[socketserver.BaseRequestHandler]) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    server = _UnixServer(str(path), handler)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def round_trip(path: Path, payload: bytes) -> bytes:
    """Send *payload*, half-close, read to the end."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    return data


# -- 1. ssh-agent -----------------------------------------------------------------


@needs("ssh-agent", "ssh-add", "ssh-keygen")
def test_ssh_agent_recipe_lists_the_host_agents_keys_in_the_vm(machine: Machine) -> None:
    """`ssh-add -l` in the VM talks to the host's agent: "The agent has no
    identities." (exit status 1) while it holds none, then the key the host
    adds, with its fingerprint and comment (exit status 0)."""
    host_block, vm_block = recipe("The host's ssh-agent in the VM")

    def kill_agent() -> None:
        pid = machine.host.env.get("SSH_AGENT_PID")
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)

    machine.stack.callback(kill_agent)
    machine.play(host_block)
    assert machine.host.env["SSH_AUTH_SOCK"] == str(machine.path("/run/user/1000/ssh-agent.sock"))

    empty = machine.play(vm_block)
    assert (empty.status, empty.output.strip()) == (1, "The agent has no identities.")

    key = machine.root / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "recipe@host", "-f", str(key)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    assert machine.host.run(f"ssh-add -q {key}").status == 0
    fingerprint = subprocess.run(
        ["ssh-keygen", "-l", "-f", f"{key}.pub"], check=True, capture_output=True, text=True
    ).stdout.split()[1]
    listed = machine.play(vm_block)
    assert listed.status == 0, listed
    assert listed.output.split() == ["256", fingerprint, "recipe@host", "(ED25519)"]


# -- 2. the VM's docker.sock on the host ----------------------------------------------


@needs("curl")
@pytest.mark.parametrize("form", ["flags", "config"])
def test_docker_sock_recipe_answers_curl_on_the_host(machine: Machine, form: str) -> None:
    """`curl --unix-socket <host path> http://localhost/version` on the host
    gets the answer of the HTTP API listening in the VM, whether the expose
    comes from `--expose` or from the `[[expose]]` of a `--config` file; the
    host socket is mode 0600. (The VM's /var/run/docker.sock is the test's
    HTTP server; the config form's curl is the line of the first block.)"""
    flags_block, config_block = recipe("The VM's docker.sock on the host")
    with serving(machine.path("/var/run/docker.sock"), _DockerVersion):
        if form == "config":
            machine.play(config_block)
            answer = machine.play(flags_block, only=lambda c: words(c)[0] == "curl")
        else:
            answer = machine.play(flags_block)
        assert (answer.status, answer.output) == (0, DOCKER_VERSION.decode())
        exposed = machine.path(f"{VM_DIR}/docker.sock")
        assert stat.S_IMODE(exposed.stat().st_mode) == 0o600


# -- 3. gpg-agent -----------------------------------------------------------------


@needs("gpg", "gpg-agent", "gpgconf", "gpg-connect-agent")
def test_gpg_agent_recipe_reaches_the_host_agents_extra_socket(machine: Machine) -> None:
    """gpg-connect-agent in the VM gets the host agent's version and OK; the
    connection is in restricted mode, so it is the host's extra socket that
    answered, and no agent of the VM's own started. (Host and VM each have
    a GNUPGHOME of their own.)"""
    host_block, vm_block = recipe("gpg-agent in the VM")
    for side, shell in (("host", machine.host), ("vm", machine.vm)):
        home = machine.root / f"gnupg-{side}"
        home.mkdir(mode=0o700)
        shell.env["GNUPGHOME"] = str(home)
    machine.stack.callback(lambda: machine.host.run("gpgconf --kill gpg-agent"))
    machine.play(host_block)

    answer = machine.play(vm_block)
    version = subprocess.run(
        ["gpg-agent", "--version"], check=True, capture_output=True, text=True
    ).stdout.split()[2]
    assert answer.status == 0, (answer, machine.logs())
    assert answer.output.splitlines() == [f"D {version}", "OK"]
    restricted = machine.vm.run("gpg-connect-agent --no-autostart 'GETINFO restricted' /bye")
    assert restricted.output.splitlines()[-1] == "OK", restricted
    agent_socket = machine.vm.run("gpgconf --list-dirs agent-socket").output.strip()
    assert Path(agent_socket).is_symlink()


# -- 4. an OCI spec with a uds mount -------------------------------------------------


def _rewritten(mount: dict[str, Any], container_id: str) -> dict[str, Any]:
    """A uds mount as docs/protocol.md 8 says the host rewrites it (computed here)."""
    digest = hashlib.sha256(f"{container_id}:{mount['destination']}".encode()).hexdigest()
    return {
        "destination": mount["destination"],
        "type": "bind",
        "source": f"/run/socketfwd/{digest}.sock",
        "options": ["bind"],
    }


def test_the_sample_oci_spec_is_complete() -> None:
    """contrib/oci/config.json is a runtime spec a runtime can run: the fields
    the OCI runtime spec requires, a process.user with numeric ids, and one
    `uds` mount with a host source and a container destination."""
    spec = json.loads(OCI_SPEC.read_text())
    assert re.fullmatch(r"1\.\d+\.\d+", spec["ociVersion"])
    process = spec["process"]
    assert process["args"] and process["cwd"].startswith("/")
    assert all(isinstance(process["user"][k], int) for k in ("uid", "gid"))
    assert spec["root"]["path"]
    assert all(m["destination"].startswith("/") for m in spec["mounts"])
    uds = [m for m in spec["mounts"] if m["type"] == "uds"]
    assert [(m["source"][:1], m["destination"][:1], "options" in m) for m in uds] == [
        ("/", "/", False)
    ]


@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root: the guest binds under /run/socketfwd and gives the socket to the "
    "spec's user",
)
def test_oci_recipe_writes_the_bind_mount_and_reaches_the_host_socket(machine: Machine) -> None:
    """The written spec has the `uds` mount as a bind mount of
    /run/socketfwd/<sha256(container id:destination)>.sock, the other mounts
    as they were, and the README shows that mount for its container id; a
    connection to that VM socket (mode 0600, owned by the spec's
    process.user) reaches the service at the spec's host path. (The spec is a
    copy with its uds sources moved like the recipe's paths, an echo service
    there, and the container id made unique to this run.)"""
    host_block, shown = recipe("An OCI spec with a `uds` mount")
    spec = json.loads(OCI_SPEC.read_text())
    uds = next(m for m in spec["mounts"] if m["type"] == "uds")
    # What the README shows is the rule applied to the sample spec and its container id.
    readme_id = words(host_block.text)[words(host_block.text).index("--container-id") + 1]
    assert json.loads(shown.text) == _rewritten(uds, readme_id)

    copy = machine.root / "config.json"
    copy.write_text(
        json.dumps(
            {
                **spec,
                "mounts": [
                    {**m, "source": moved(m["source"], machine.root)} if m["type"] == "uds" else m
                    for m in spec["mounts"]
                ],
            }
        )
    )
    container_id = f"{readme_id}-{uuid.uuid4().hex[:12]}"
    text = host_block.text.replace("contrib/oci/config.json", str(copy))
    text = text.replace(f"--container-id {readme_id} ", f"--container-id {container_id} ")
    assert text.count(str(copy)) == 1 and text.count(container_id) == 1, text
    want = _rewritten(uds, container_id)
    vm_socket = Path(want["source"])
    socket_dir_existed = vm_socket.parent.exists()

    def clean() -> None:  # what a guest killed mid-test would leave
        vm_socket.unlink(missing_ok=True)
        if not socket_dir_existed:
            with contextlib.suppress(OSError):
                vm_socket.parent.rmdir()

    machine.stack.callback(clean)
    with serving(machine.path(uds["source"]), _Echo):
        machine.play(Block(host_block.lang, text))
        written = json.loads(machine.path(f"{VM_DIR}/ctr1.json").read_text())
        assert written["mounts"] == [want if m is uds else m for m in spec["mounts"]]
        assert {k: v for k, v in written.items() if k != "mounts"} == {
            k: v for k, v in spec.items() if k != "mounts"
        }
        st = vm_socket.stat()
        user = spec["process"]["user"]
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, user["uid"], user["gid"])
        assert round_trip(vm_socket, b"hello from the container") == b"hello from the container"


# -- 5. systemd -------------------------------------------------------------------


def _unit_for_this_machine(text: str) -> str:
    """A unit as installed here: the program where the locked environment has it."""
    assert INSTALLED_PROGRAM in text
    return text.replace(INSTALLED_PROGRAM, str(PROGRAM))


@needs("systemd-analyze")
@pytest.mark.parametrize("unit", ["socketforward-guest.service", "socketforward-host@.service"])
def test_systemd_units_pass_systemd_analyze_verify(unit: str, short_tmp: Path) -> None:
    """`systemd-analyze verify` accepts each unit of contrib/systemd (its
    ExecStart pointed at this environment's program): no unknown key, no bad
    value, a command that exists."""
    copy = short_tmp / unit
    copy.write_text(_unit_for_this_machine((UNITS / unit).read_text()))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    said = [line for line in (result.stdout + result.stderr).splitlines() if unit[:-8] in line]
    assert (result.returncode, said) == (0, []), result.stderr


@dataclass
class Unit:
    """What systemd would take from a unit file's [Service] section."""

    service: dict[str, list[str]]

    @classmethod
    def read(cls, text: str, instance: str = "") -> Unit:
        service: dict[str, list[str]] = {}
        section = ""
        for raw in text.replace("%i", instance).splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
            elif section == "[Service]":
                key, _, value = line.partition("=")
                service.setdefault(key, []).append(value)
        return cls(service)

    def one(self, key: str) -> str:
        (value,) = self.service[key]
        return value

    def environment(self) -> dict[str, str]:
        """Environment=, then EnvironmentFile= (whose values win, as in systemd)."""
        env: dict[str, str] = {}
        for value in self.service.get("Environment", []):
            for item in shlex.split(value):
                key, _, setting = item.partition("=")
                env[key] = setting
        for path in self.service.get("EnvironmentFile", []):
            for raw in Path(path.lstrip("-")).read_text().splitlines():
                line = raw.strip()
                if line and not line.startswith(("#", ";")):
                    key, _, value = line.partition("=")
                    env[key.strip()] = value.strip().strip("\"'")
        return env

    def command(self, key: str, env: dict[str, str]) -> list[str]:
        """An Exec*= line as systemd expands it: ``$NAME`` alone is split at
        whitespace into words (none when empty), ``${NAME}`` is one word."""
        argv: list[str] = []
        for word in shlex.split(self.one(key)):
            alone = re.fullmatch(r"\$(\w+)", word)
            if alone is not None:
                argv += env.get(alone[1], "").split()
            else:
                argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m[1], ""), word))
        return argv


@contextlib.contextmanager
def notify_socket(path: Path) -> Iterator[socket.socket]:
    """systemd's end of NOTIFY_SOCKET: a datagram socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(path))
        sock.settimeout(30)
        yield sock
    finally:
        sock.close()


@contextlib.contextmanager
def started(
    unit: Unit, root: Path, name: str, env: dict[str, str]
) -> Iterator[tuple[Running, socket.socket]]:
    """``systemctl start``: RuntimeDirectory= made, ExecStart= run with the
    unit's environment and a NOTIFY_SOCKET; returns once it sent READY=1."""
    for directory in unit.service.get("RuntimeDirectory", []):
        path = root / "run" / directory
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(int(unit.service.get("RuntimeDirectoryMode", ["0755"])[0], 8))
    unit_env = unit.environment()
    argv = unit.command("ExecStart", unit_env)
    assert argv[0] == str(PROGRAM), argv
    log = root / f"{name}.log"
    with notify_socket(root / f"{name}.notify") as notify:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                env={**env, **unit_env, "NOTIFY_SOCKET": str(root / f"{name}.notify")},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        running = Running(proc, log)
        try:
            try:
                assert notify.recv(64) == b"READY=1", running.log()
            except TimeoutError:
                raise AssertionError(f"{name}: no READY=1; log:\n{running.log()}") from None
            yield running, notify
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def stop(running: Running, notify: socket.socket) -> None:
    """``systemctl stop``: the unit's KillSignal (SIGTERM); STOPPING=1, then exit 0."""
    running.proc.send_signal(signal.SIGTERM)
    assert notify.recv(64) == b"STOPPING=1", running.log()
    assert running.proc.wait(timeout=15) == 0, running.log()


def test_systemd_recipe_units_start_ready_forward_reload_and_stop(machine: Machine) -> None:
    """With the files the recipe installs, each unit's ExecStart (as systemd
    expands it, the recipe's environment file for the host) starts the
    program, which reports READY=1 on NOTIFY_SOCKET; the recipe's forward
    works; ExecReload (systemctl reload) picks up a line added to the
    forwards file; SIGTERM gives STOPPING=1 and exit status 0. (systemctl is
    played by the test; in the guest unit the vsock endpoints are replaced by
    the unix: sockets of the host's environment file, as libkrun joins them.)"""
    host_block, vm_block = recipe("A systemd set-up")
    machine.path("/etc/systemd/system").mkdir(parents=True)
    machine.path("/run/vms/vm1").mkdir(parents=True)  # the VMM's, for its vsock sockets

    def systemctl_lines(block: Block) -> list[list[str]]:
        return [words(c)[1:] for c in commands(block.text) if words(c)[0] == "systemctl"]

    def not_systemctl(command: str) -> bool:
        return words(command)[0] != "systemctl"

    machine.play(host_block, only=not_systemctl)
    machine.play(vm_block, only=not_systemctl)
    assert systemctl_lines(host_block) == [
        ["daemon-reload"],
        ["enable", "--now", "socketforward-host@vm1.service"],
    ]
    assert systemctl_lines(vm_block) == [
        ["daemon-reload"],
        ["enable", "--now", "socketforward-guest.service"],
    ]

    installed = machine.path("/etc/systemd/system")
    host_unit = Unit.read(
        moved(_unit_for_this_machine((installed / "socketforward-host@.service").read_text()),
              machine.root),
        instance="vm1",
    )  # fmt: skip
    endpoints = host_unit.environment()
    rpc = endpoints["SOCKETFORWARD_RPC"].removeprefix("--rpc-listen=")
    guest_text = _unit_for_this_machine((installed / "socketforward-guest.service").read_text())
    for vsock, unix in (
        ("vsock://2:1025", rpc),
        ("vsock://:1026", endpoints["SOCKETFORWARD_STREAMS"]),
    ):
        assert guest_text.count(vsock) == 1, vsock
        guest_text = guest_text.replace(vsock, unix)
    guest_unit = Unit.read(guest_text)

    base = machine.host.env
    target = machine.path("/var/run/docker.sock")
    vm_socket = machine.path("/run/socketfwd/docker.sock")
    with (
        serving(target, _Echo),
        started(host_unit, machine.root, "host-unit", base) as (host, host_notify),
        started(guest_unit, machine.root, "guest-unit", base) as (guest, guest_notify),
    ):
        wait_for_socket(vm_socket, 30, host, guest)
        assert round_trip(vm_socket, b"docker ps") == b"docker ps"

        forwards = Path(host_unit.one("ExecStart").split("--forwards-file ")[1].split()[0])
        added = machine.path("/run/socketfwd/added.sock")
        with forwards.open("a") as f:
            f.write(f"added={target}:{added}\n")
        reload = host_unit.command("ExecReload", {"MAINPID": str(host.proc.pid)})
        subprocess.run(reload, check=True, timeout=30)
        wait_for_socket(added, 30, host, guest)
        assert round_trip(added, b"reloaded") == b"reloaded"

        stop(guest, guest_notify)
        stop(host, host_notify)
