"""OCI ``uds`` mounts (docs/protocol.md 8): forward ids, the
rewrite to bind mounts, errors, and the atomic write of the rewritten spec."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from socketforward.host import Forward, forwards_from_oci_spec, oci

BAR_ID = "954a6df32e91bb55e6fcd9df9f90728e56b4f87aa92b22fe3b63df33f18a3188"
DEF_ID = "79a1c3c374d3573c0e7f1e7ca567d3531b3aefd3c202b8811df64e77fdaeab0c"


def _spec() -> dict[str, Any]:
    return {
        "ociVersion": "1.1.0",
        "process": {"args": ["sh"]},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"type": "uds", "source": "/var/run/foo.sock", "destination": "/var/run/bar.sock"},
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec"],
            },
            {"type": "uds", "source": "/var/run/abc.sock", "destination": "/var/run/def.sock"},
        ],
    }


def test_spec_vectors_rewrite_uds_mounts_in_place() -> None:
    """The reference's forward-id test vectors: each uds mount becomes a bind mount of
    /run/socketfwd/<forward_id>.sock at the same place; other mounts are untouched."""
    spec = _spec()
    untouched = [copy.deepcopy(spec["mounts"][0]), copy.deepcopy(spec["mounts"][2])]
    mounts = oci.rewrite_uds_mounts(spec, "container-abc")
    assert mounts == [
        oci.UdsMount(
            BAR_ID, "/var/run/foo.sock", f"/run/socketfwd/{BAR_ID}.sock", "/var/run/bar.sock"
        ),
        oci.UdsMount(
            DEF_ID, "/var/run/abc.sock", f"/run/socketfwd/{DEF_ID}.sock", "/var/run/def.sock"
        ),
    ]
    assert spec["mounts"] == [
        untouched[0],
        {
            "destination": "/var/run/bar.sock",
            "type": "bind",
            "source": f"/run/socketfwd/{BAR_ID}.sock",
            "options": ["bind"],
        },
        untouched[1],
        {
            "destination": "/var/run/def.sock",
            "type": "bind",
            "source": f"/run/socketfwd/{DEF_ID}.sock",
            "options": ["bind"],
        },
    ]
    assert oci.forward_id_for("container-abc", "/var/run/bar.sock") == BAR_ID


def test_same_mount_in_two_containers_gets_two_forward_ids() -> None:
    """The container id is part of the forward_id, so one VM can hold the same
    socket mount for two containers without them colliding."""
    first, second = _spec(), _spec()
    ids_a = [m.forward_id for m in oci.rewrite_uds_mounts(first, "c1")]
    ids_b = [m.forward_id for m in oci.rewrite_uds_mounts(second, "c2")]
    assert not set(ids_a) & set(ids_b)


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        ({"type": "uds", "source": "", "destination": "/run/docker.sock"},
         "source (host path) is required"),
        ({"type": "uds", "destination": "/run/docker.sock"}, "source (host path) is required"),
        ({"type": "uds", "source": "/var/run/docker.sock", "destination": ""},
         "destination (container path) is required"),
        ({"type": "uds", "source": "/var/run/docker.sock", "destination": "/run/docker.sock",
          "options": ["first", "second"]}, 'unknown option "first, second"'),
        ({"type": "uds", "source": "/a.sock", "destination": "/b.sock", "options": "rw"},
         "options must be a list"),
    ],
)  # fmt: skip
def test_malformed_uds_mount_is_refused_and_spec_left_unchanged(
    mount: dict[str, Any], message: str
) -> None:
    """A malformed uds mount is refused with the reference's text, and no mount
    of the spec is rewritten (not even the good ones before it)."""
    spec = _spec()
    spec["mounts"].append(mount)
    before = copy.deepcopy(spec)
    with pytest.raises(oci.OciSpecError) as info:
        oci.rewrite_uds_mounts(spec, "c1")
    assert message in str(info.value)
    assert spec == before


def test_duplicate_destination_and_missing_mounts() -> None:
    """Two uds mounts at one destination are refused; a spec without mounts has no forwards."""
    spec = {"mounts": [{"type": "uds", "source": "/a.sock", "destination": "/x.sock"}] * 2}
    with pytest.raises(oci.OciSpecError, match="more than once"):
        oci.rewrite_uds_mounts(spec, "c1")
    assert oci.rewrite_uds_mounts({"ociVersion": "1.1.0"}, "c1") == []


def test_forwards_from_spec_keep_the_host_path_on_the_host() -> None:
    """The host side turns each uds mount into a forward: host path from the spec,
    VM path under /run/socketfwd; a spec without process.user runs the container
    as root, so root owns the VM socket, mode 0600."""
    forwards, _ = forwards_from_oci_spec(_spec(), "container-abc")
    assert forwards[0] == Forward(
        BAR_ID, "/var/run/foo.sock", f"/run/socketfwd/{BAR_ID}.sock", mode=0o600, uid=0, gid=0
    )
    with pytest.raises(oci.OciSpecError, match="absolute"):
        forwards_from_oci_spec(
            {"mounts": [{"type": "uds", "source": "rel.sock", "destination": "/x.sock"}]}, "c"
        )


def test_write_spec_is_atomic_and_keeps_the_mode(tmp_path: Path) -> None:
    """The rewritten spec replaces config.json in one rename (a reader sees the
    old file or the new one, never half), keeps its mode and leaves no temp file."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_spec()))
    os.chmod(path, 0o640)
    before = os.stat(path)
    spec = oci.load_spec(path)
    oci.rewrite_uds_mounts(spec, "container-abc")
    oci.write_spec(path, spec)
    after = os.stat(path)
    assert after.st_ino != before.st_ino  # a new file renamed over, not rewritten in place
    assert after.st_mode & 0o777 == 0o640
    assert oci.load_spec(path) == spec
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    """When the rename cannot happen the target is unchanged and no temp file is left."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        oci.write_spec(target, _spec())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "keep").read_text() == "x"


def test_load_spec_reports_bad_json(tmp_path: Path) -> None:
    """A config.json that is not a JSON object is refused with the file named."""
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(oci.OciSpecError, match=r"config\.json: not valid JSON"):
        oci.load_spec(path)
    path.write_text("[]")
    with pytest.raises(oci.OciSpecError, match="not a JSON object"):
        oci.load_spec(path)


def test_vm_sockets_belong_to_the_containers_user_mode_0600() -> None:
    """Every uds mount's VM socket is owned by the container's process.user and
    mode 0600: a container running as a non-root user can connect to it and no
    other user of the VM can."""
    spec = _spec()
    spec["process"]["user"] = {"uid": 1234, "gid": 5678, "additionalGids": [10]}
    forwards, _ = forwards_from_oci_spec(spec, "container-abc")
    assert [(f.mode, f.uid, f.gid) for f in forwards] == [(0o600, 1234, 5678)] * 2
    assert oci.container_owner(spec) == (1234, 5678)


@pytest.mark.parametrize(
    ("process", "owner"),
    [
        (None, (0, 0)),
        ({"args": ["sh"]}, (0, 0)),
        ({"user": {}}, (0, 0)),
        ({"user": {"uid": 1000}}, (1000, 0)),
        ({"user": {"gid": 100}}, (0, 100)),
        ({"user": {"uid": 4294967294, "gid": 0}}, (4294967294, 0)),
    ],
)
def test_missing_user_or_ids_mean_root_as_the_oci_spec_says(
    process: dict[str, Any] | None, owner: tuple[int, int]
) -> None:
    """Without process.user, or without its uid or gid, the container runs with
    uid or gid 0, so that is the VM socket's owner."""
    spec = _spec()
    del spec["process"]
    if process is not None:
        spec["process"] = process
    forwards, _ = forwards_from_oci_spec(spec, "c1")
    assert {(f.uid, f.gid) for f in forwards} == {owner}


_NOT_AN_ID = "must be an integer from 0 to 4294967294, not"


@pytest.mark.parametrize(
    ("process", "message"),
    [
        ({"user": {"uid": "1234", "gid": 0}}, f'process.user.uid {_NOT_AN_ID} "1234"'),
        ({"user": {"uid": 1234, "gid": 5.5}}, f"process.user.gid {_NOT_AN_ID} 5.5"),
        ({"user": {"uid": True}}, f"process.user.uid {_NOT_AN_ID} true"),
        ({"user": {"uid": None}}, f"process.user.uid {_NOT_AN_ID} null"),
        ({"user": {"uid": -1}}, f"process.user.uid {_NOT_AN_ID} -1"),
        ({"user": {"gid": 4294967295}}, f"process.user.gid {_NOT_AN_ID} 4294967295"),
        ({"user": "root"}, "process.user must be an object"),
        (["sh"], "process must be an object"),
    ],
)
def test_user_of_the_wrong_type_is_refused_naming_the_field(process: Any, message: str) -> None:
    """A process.user whose uid or gid is not a 32-bit user id (a string, a
    float, a boolean, null, out of range) is refused with an OciSpecError
    naming the field, and no mount of the spec is rewritten."""
    spec = _spec()
    spec["process"] = process
    before = copy.deepcopy(spec)
    with pytest.raises(oci.OciSpecError) as info:
        forwards_from_oci_spec(spec, "c1")
    assert str(info.value) == message
    assert spec == before
