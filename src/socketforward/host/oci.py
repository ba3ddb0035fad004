"""OCI ``uds`` mounts: forwards from a runtime spec, rewritten to bind mounts
(docs/protocol.md 8).

A mount ``{"type": "uds", "source": HOST_PATH, "destination": CTR_PATH}`` becomes
a forward with ``forward_id = hex(sha256(container_id + ":" + destination))``;
the VM listens at ``/run/socketfwd/{forward_id}.sock``, mode 0600, owned by
the container's ``process.user``, and the mount is rewritten in place to a
bind mount of that path. The host path stays on the host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from socketforward.host.forwards import MAX_ID, Forward

__all__ = [
    "VM_SOCKET_DIR",
    "VM_SOCKET_MODE",
    "OciSpecError",
    "UdsMount",
    "container_owner",
    "forward_id_for",
    "forwards_from_oci_spec",
    "load_spec",
    "parse_uds_mount",
    "rewrite_uds_mounts",
    "vm_path_for",
    "write_spec",
]

VM_SOCKET_DIR: Final = "/run/socketfwd"
VM_SOCKET_MODE: Final = 0o600
"""The mode of a uds mount's socket in the VM: its owner (the container's user) only."""


class OciSpecError(ValueError):
    """The runtime spec cannot be used; the message names the mount and the problem."""


@dataclass(frozen=True)
class UdsMount:
    """One ``uds`` mount turned into a forward."""

    forward_id: str
    host_path: str
    vm_path: str
    container_path: str


def forward_id_for(container_id: str, destination: str) -> str:
    """``hex(sha256(container_id + ":" + destination))``, as nerdbox's shim."""
    return hashlib.sha256(f"{container_id}:{destination}".encode()).hexdigest()


def vm_path_for(forward_id: str) -> str:
    return f"{VM_SOCKET_DIR}/{forward_id}.sock"


def _problem(mount: dict[str, Any]) -> str | None:
    source = mount.get("source", "")
    destination = mount.get("destination", "")
    options = mount.get("options") or []
    if not isinstance(source, str):
        return "source (host path) must be a string"
    if not isinstance(destination, str):
        return "destination (container path) must be a string"
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        return "options must be a list of strings"
    if not source:
        return "source (host path) is required"
    if not destination:
        return "destination (container path) is required"
    if options:
        return f'unknown option "{", ".join(options)}"'
    return None


def parse_uds_mount(container_id: str, mount: dict[str, Any]) -> UdsMount:
    """The forward one ``uds`` mount describes; :class:`OciSpecError` when it is malformed."""
    problem = _problem(mount)
    if problem is not None:
        destination = mount.get("destination", "")
        raise OciSpecError(f"parsing uds mount for {json.dumps(destination)}: {problem}")
    fid = forward_id_for(container_id, mount["destination"])
    return UdsMount(
        forward_id=fid,
        host_path=mount["source"],
        vm_path=vm_path_for(fid),
        container_path=mount["destination"],
    )


def rewrite_uds_mounts(spec: dict[str, Any], container_id: str) -> list[UdsMount]:
    """Turn every ``uds`` mount of *spec* into a bind mount, in place; other mounts
    are left untouched. All mounts are checked first, so on error *spec* is unchanged."""
    if not container_id:
        raise OciSpecError("container id is required")
    mounts = spec.get("mounts")
    if mounts is None:
        return []
    if not isinstance(mounts, list):
        raise OciSpecError("mounts must be a list")
    found: list[tuple[int, UdsMount]] = []
    seen: dict[str, str] = {}
    for index, mount in enumerate(mounts):
        if not isinstance(mount, dict):
            raise OciSpecError(f"mount {index} is not an object")
        if mount.get("type") != "uds":
            continue
        uds = parse_uds_mount(container_id, mount)
        if uds.forward_id in seen:
            raise OciSpecError(
                f"parsing uds mount for {json.dumps(uds.container_path)}: "
                "destination appears more than once"
            )
        seen[uds.forward_id] = uds.host_path
        found.append((index, uds))
    for index, uds in found:
        mounts[index] = {
            "destination": uds.container_path,
            "type": "bind",
            "source": uds.vm_path,
            "options": ["bind"],
        }
    return [uds for _, uds in found]


def container_owner(spec: dict[str, Any]) -> tuple[int, int]:
    """The uid and gid of the container's ``process.user``; each one missing is
    0 (root), as the OCI runtime spec says. :class:`OciSpecError` names a field
    of the wrong type."""
    process = spec.get("process")
    if process is None:
        return 0, 0
    if not isinstance(process, dict):
        raise OciSpecError("process must be an object")
    user = process.get("user")
    if user is None:
        return 0, 0
    if not isinstance(user, dict):
        raise OciSpecError("process.user must be an object")
    ids = []
    for name in ("uid", "gid"):
        value = user.get(name, 0)
        # bool is an int to Python, never to the spec; 2**32 - 1 is chown's "unchanged".
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ID:
            raise OciSpecError(
                f"process.user.{name} must be an integer from 0 to {MAX_ID}, "
                f"not {json.dumps(value)}"
            )
        ids.append(value)
    return ids[0], ids[1]


def load_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an OCI runtime spec (config.json)."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except json.JSONDecodeError as exc:
        raise OciSpecError(f"{os.fspath(path)}: not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise OciSpecError(f"{os.fspath(path)}: the spec is not a JSON object")
    return spec


def write_spec(path: str | os.PathLike[str], spec: dict[str, Any]) -> None:
    """Write *spec* to *path* atomically: a temp file in the same directory, fsync,
    rename. Readers see the old file or the new one, never a partial one. An
    existing file's mode is kept (0644 otherwise)."""
    target = Path(path)
    data = json.dumps(spec, indent=2).encode() + b"\n"
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename is durable once the directory entry is.
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def forwards_from_oci_spec(
    spec: dict[str, Any], container_id: str
) -> tuple[list[Forward], list[UdsMount]]:
    """Rewrite *spec*'s uds mounts in place; the forwards they make. Each VM
    socket is mode 0600 and owned by the container's user (:func:`container_owner`),
    so a container running as any user can connect and no other user can."""
    uid, gid = container_owner(spec)  # before the rewrite: on error *spec* is unchanged
    mounts = rewrite_uds_mounts(spec, container_id)
    forwards = []
    for m in mounts:
        try:
            forwards.append(Forward(m.forward_id, m.host_path, m.vm_path, VM_SOCKET_MODE, uid, gid))
        except ValueError as exc:
            raise OciSpecError(f"uds mount for {m.container_path!r}: {exc}") from None
    return forwards, mounts
