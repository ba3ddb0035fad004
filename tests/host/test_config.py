"""The host's configuration file, read and checked (``socketforward host
--config``, :mod:`socketforward.host.config`): pure, no sockets.

What a user notices: the README's example is a file the host takes; every
mistake is refused with ``FILE:LINE:`` and the key it is about."""

from __future__ import annotations

import grp
import pwd
import re
import textwrap
from pathlib import Path

import pytest

from socketforward import transport
from socketforward.host.config import (
    CONFIG,
    SETTINGS,
    Config,
    ConfigError,
    plan_source,
    read_config,
)
from socketforward.host.forwards import Expose, Forward

README = Path(__file__).resolve().parents[2] / "README.md"

GOOD = """\
rpc_listen = "unix:/run/sf/vm1/rpc.sock"
streams = "vsock://3:1026"

[[forward]]
id = "a"
host = "/h/a.sock"
vm = "/v/a.sock"

[[forward]]
id = "b"
host = "/h/b.sock"
vm = "/v/b.sock"

[[expose]]
id = "e"
vm = "/v/e.sock"
host = "/h/e.sock"
"""


def write(tmp: Path, text: str, name: str = "vm1.toml") -> str:
    path = tmp / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def readme_example() -> str:
    """The ```toml block of README.md's "Running it with a VM"."""
    section = README.read_text().split("## Running it with a VM", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "one TOML example in the section"
    return str(blocks[0])


def test_the_readme_example_is_a_valid_config(tmp_path: Path) -> None:
    """The README's example reads as it says: both endpoints, the control
    endpoint, a budget and a timeout, a forward with its VM socket's mode and
    owner, an expose whose host socket is 0660."""
    config = read_config(write(tmp_path, readme_example()))
    assert config.rpc_listen == transport.UnixEndpoint("/run/socketforward/vm1/rpc.sock")
    assert config.rpc_dial is None
    assert config.streams == transport.UnixEndpoint("/run/vms/vm1/vsock_1026.sock")
    assert config.control == transport.UnixEndpoint("/run/socketforward/vm1/control.sock")
    assert (config.max_relays, config.dial_timeout) == (4096, 2.5)
    assert config.forwards == (
        Forward("docker", "/var/run/docker.sock", "/run/socketfwd/docker.sock", 0o660, 0, 991),
    )
    assert config.exposes == (
        Expose(
            "containerd",
            "/run/containerd/containerd.sock",
            "/run/socketforward/vm1-containerd.sock",
            mode=0o660,
            gid=1000,
        ),
    )


def test_every_setting_is_read_and_unset_ones_are_none(tmp_path: Path) -> None:
    """Every setting a flag has is a key of the same name; an expose's host
    socket is 0600 unless configured, a forward's mode is the guest's default
    (None); a file with only settings has no forwards."""
    config = read_config(
        write(
            tmp_path,
            """
            rpc_dial = "vsock://3:1025"
            streams = "hvsock:/run/vm/v.sock:1026"
            streams_uid = 1234
            control = "unix:/run/sf/ctl.sock"
            dial_timeout = 1
            stream_timeout = 2.5
            stream_retry_for = 60
            drain = 0
            max_relays = 100
            max_pending = 10
            stream_pool = 0
            """,
        )
    )
    assert config.rpc_dial == transport.VsockEndpoint(3, 1025)
    assert config.streams == transport.HvsockEndpoint("/run/vm/v.sock", 1026)
    assert [config.setting(k) for k in SETTINGS[3:]] == [
        1234, transport.UnixEndpoint("/run/sf/ctl.sock"), 1.0, 2.5, 60.0, 0.0, 100, 10, 0,
    ]  # fmt: skip
    assert (config.forwards, config.exposes) == ((), ())
    good = read_config(write(tmp_path, GOOD))
    assert good.forwards[0] == Forward("a", "/h/a.sock", "/v/a.sock")
    assert good.exposes == (Expose("e", "/v/e.sock", "/h/e.sock", mode=0o600),)
    assert good.at("forward b") == f"{good.path}:9"
    assert read_config(write(tmp_path, "")) == Config(str(tmp_path / "vm1.toml"))


def test_owner_and_group_names_are_looked_up_on_this_host(tmp_path: Path) -> None:
    """`owner` and `group` take a number, digits in a string, or a name of this
    host's users and groups (turned into its number, which the VM gets)."""
    root_user, root_group = pwd.getpwuid(0).pw_name, grp.getgrgid(0).gr_name
    config = read_config(
        write(
            tmp_path,
            f"""
            streams_uid = "{root_user}"
            [[forward]]
            id = "a"
            host = "/h/a.sock"
            vm = "/v/a.sock"
            owner = "{root_user}"
            group = "{root_group}"
            [[expose]]
            id = "e"
            vm = "/v/e.sock"
            host = "/h/e.sock"
            mode = "660"
            owner = "1234"
            group = 5678
            """,
        )
    )
    assert (config.forwards[0].uid, config.forwards[0].gid, config.streams_uid) == (0, 0, 0)
    assert (config.exposes[0].mode, config.exposes[0].uid, config.exposes[0].gid) == (
        0o660,
        1234,
        5678,
    )


# Each case: the file, then what the error says after "FILE:" (the line, the key).
ERRORS: dict[str, tuple[str, str]] = {
    "syntax": ('streams = "unix:/s.sock\n', "1:24: not TOML"),
    "an unquoted mode": (
        GOOD.replace('vm = "/v/b.sock"', 'vm = "/v/b.sock"\nmode = 0660'),
        "13:9: not TOML: Expected newline or end of document after a statement; a mode is "
        'an octal string in quotes, such as mode = "0660"',
    ),
    "a mode as a number": (
        GOOD.replace('vm = "/v/b.sock"', 'vm = "/v/b.sock"\nmode = 660'),
        "13: [[forward]] #2 (id b): mode must be an octal string in quotes, such as "
        'mode = "0660", not the number 660',
    ),
    "a mode that is not octal": (
        GOOD.replace('host = "/h/e.sock"', 'host = "/h/e.sock"\nmode = "0890"'),
        '18: [[expose]] #1 (id e): mode "0890" is not an octal file mode',
    ),
    "unknown top-level key": (GOOD + "max_relay = 3\n", ""),  # placed below
    "unknown key in a table": (
        GOOD.replace('id = "b"', 'id = "b"\nhots = "/h/x.sock"'),
        '11: [[forward]] #2 (id b): unknown key "hots" (known: id, host, vm, mode, owner, group)',
    ),
    "a missing key": (
        GOOD.replace('vm = "/v/b.sock"\n', ""),
        '9: [[forward]] #2 (id b): missing key "vm"',
    ),
    "a relative host path": (
        GOOD.replace('host = "/h/b.sock"', 'host = "b.sock"'),
        '11: [[forward]] #2 (id b): host "b.sock" is relative; it must be absolute',
    ),
    "a relative VM path": (
        GOOD.replace('vm = "/v/e.sock"', 'vm = "run/e.sock"'),
        '16: [[expose]] #1 (id e): vm "run/e.sock" is relative',
    ),
    "a path that is not a string": (
        GOOD.replace('vm = "/v/a.sock"', "vm = 3"),
        "7: [[forward]] #1 (id a): vm must be a string, not the number 3",
    ),
    "a forward id twice": (
        GOOD.replace('id = "b"', 'id = "a"'),
        "10: [[forward]] #2 (id a): forward ID a is given twice (first at line 5)",
    ),
    "an expose id twice": (
        GOOD + '[[expose]]\nid = "e"\nvm = "/v/f.sock"\nhost = "/h/f.sock"\n',
        "19: [[expose]] #2 (id e): expose ID e is given twice (first at line 15)",
    ),
    "a bad id": (
        GOOD.replace('id = "b"', 'id = "b,c"'),
        "10: [[forward]] #2 (id b,c): id: forward ID 'b,c' may hold printable ASCII only",
    ),
    "a count as a string": (
        'max_relays = "100"\n' + GOOD,
        '1: max_relays must be a whole number (1 or more), not the string "100"',
    ),
    "a count as a boolean": ("max_pending = true\n", "1: max_pending must be a whole number"),
    "a pool too big": (
        "stream_pool = 65\n",
        "1: stream_pool must be a whole number from 0 to 64, not 65",
    ),
    "zero seconds": ("dial_timeout = 0\n", "1: dial_timeout must be a number of seconds"),
    "negative drain": ("drain = -1.5\n", "1: drain must be a number of seconds (0 or more)"),
    "both rpc keys": (
        'rpc_listen = "unix:/a/rpc.sock"\nrpc_dial = "vsock://3:1025"\n',
        "2: give rpc_listen or rpc_dial, not both",
    ),
    "a bad endpoint": ('streams = "tcp://x:1"\n', '1: streams "tcp://x:1": '),
    "listening on hvsock": ('rpc_listen = "hvsock:/v.sock:1025"\n', "1: rpc_listen cannot listen"),
    "control on vsock": ('control = "vsock://3:99"\n', '1: control "vsock://3:99": the control'),
    "an endpoint as a number": ("streams = 1026\n", "1: streams must be an endpoint URI string"),
    "no such user": (
        GOOD.replace('id = "a"', 'id = "a"\nowner = "no-such-user-here"'),
        '6: [[forward]] #1 (id a): owner "no-such-user-here": no such user on this host',
    ),
    "no such group": (
        GOOD.replace('id = "e"', 'id = "e"\ngroup = "no-such-group-here"'),
        '16: [[expose]] #1 (id e): group "no-such-group-here": no such group on this host',
    ),
    "an owner out of range": (
        GOOD.replace('id = "a"', 'id = "a"\nowner = 4294967295'),
        "6: [[forward]] #1 (id a): owner 4294967295 is out of range",
    ),
    "a group as a boolean": (
        GOOD.replace('id = "a"', 'id = "a"\ngroup = false'),
        "6: [[forward]] #1 (id a): group must be a number or a group name, not the boolean",
    ),
    "a single [forward] table": (
        '[forward]\nid = "a"\n',
        "1: forward must be written as [[forward]] tables, not a table",
    ),
    "forward as a string": ('forward = "a"\n', "1: forward must be written as [[forward]]"),
}
ERRORS["unknown top-level key"] = (
    'streams = "vsock://3:1026"\nmax_relay = 3\n',
    '2: unknown key "max_relay" (known: rpc_listen, rpc_dial, streams,',
)


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_a_mistake_is_refused_naming_the_file_the_line_and_the_key(
    tmp_path: Path, case: str
) -> None:
    """Each mistake in the file is a ConfigError reading `FILE:LINE: ...` (the
    line of the key at fault, of its table when the key is missing) that says
    which key and what is wrong."""
    text, expected = ERRORS[case]
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        read_config(path)
    assert str(err.value).startswith(f"{path}:{expected}"), str(err.value)
    assert "\n" not in str(err.value)


def test_a_missing_or_unreadable_file_names_it(tmp_path: Path) -> None:
    """A file that is not there, or not UTF-8, is refused naming it (and the line)."""
    with pytest.raises(ConfigError, match=f"^{tmp_path}/none.toml: No such file"):
        read_config(str(tmp_path / "none.toml"))
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'streams = "vsock://3:1026"\n# caf\xe9\n')
    with pytest.raises(ConfigError, match=f"^{bad}:2: not UTF-8"):
        read_config(str(bad))


def test_lines_are_right_after_a_multi_line_string_and_inline_tables(tmp_path: Path) -> None:
    """A multi-line string holding text like a table header does not throw the
    line count off; a table written inline is placed at its key's line."""
    text = GOOD.replace('vm = "/v/a.sock"', 'vm = """/v/a\n[[forward]]\nx = 1.sock"""')
    text = text.replace('id = "b"', 'id = "b"\nmode = 1')
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"vm1.toml:13: \[\[forward\]\] #2 \(id b\): mode must"):
        read_config(path)
    inline = 'streams = "vsock://3:1026"\n\nforward = [{id = "a", host = "/h", vm = "v"}]\n'
    with pytest.raises(ConfigError, match=r"vm1.toml:3: \[\[forward\]\] #1 \(id a\): vm \"v\""):
        read_config(write(tmp_path, inline))


A = Forward("a", "/h/a.sock", "/v/a.sock")
A_0640 = Forward("a", "/h/a.sock", "/v/a.sock", mode=0o640)
B = Forward("b", "/h/b.sock", "/v/b.sock")
C = Forward("c", "/h/c.sock", "/v/c.sock")


def test_plan_adds_removes_and_changes_by_the_difference() -> None:
    """Re-reading a source adds what is new, removes what it dropped, and a
    changed entry (same id, other mode) is removed, then added; what other
    sources gave is left alone."""
    table = {"a": A, "b": B, "x": Forward("x", "/h/x.sock", "/v/x.sock")}
    owners = {"a": CONFIG, "b": CONFIG, "x": "--forward"}
    plan = plan_source(CONFIG, table, owners, [A_0640, C])
    assert (plan.remove, plan.add, plan.clashes) == (["a", "b"], [A_0640, C], {})


def test_plan_an_identical_entry_of_another_source_is_fine_another_one_clashes() -> None:
    """The very same entry given by the command line stays the command line's;
    with other paths it is a clash naming that source (also when the source is
    strict about identical ones); an identical one added at run time is taken
    over."""
    table, owners = {"a": A, "b": B}, {"a": "--forward", "b": "control"}
    plan = plan_source(CONFIG, table, owners, [A, B], adoptable={"control"})
    assert (plan.add, plan.remove, plan.adopt, plan.clashes) == ([], [], ["b"], {})
    assert plan_source(CONFIG, table, owners, [A_0640]).clashes == {"a": "--forward"}
    strict = plan_source(CONFIG, table, owners, [A], strict={"--forward"})
    assert strict.clashes == {"a": "--forward"}


def test_plan_an_entry_both_files_list_passes_to_the_other_when_one_drops_it() -> None:
    """An entry the configuration file holds and the forwards file lists too is
    handed over, not removed, when the configuration file drops it; listing it
    otherwise than the other file does is a clash."""
    table, owners = {"a": A}, {"a": CONFIG}
    elsewhere = {"--forwards-file": {"a": A}}
    plan = plan_source(CONFIG, table, owners, [], wanted_elsewhere=elsewhere)
    assert (plan.remove, plan.hand_over) == ([], {"a": "--forwards-file"})
    changed = plan_source(CONFIG, table, owners, [A_0640], wanted_elsewhere=elsewhere)
    assert changed.clashes == {"a": "--forwards-file"}
