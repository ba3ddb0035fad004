"""The forward table, without sockets: what a forward is, the forwards file,
merging the command line's sources, and what re-reading the file changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from socketforward.host.forwards import (
    Forward,
    ForwardsClash,
    Reload,
    Source,
    merge_sources,
    parse_forward,
    plan_reload,
    read_forwards_file,
)


def F(fid: str, name: str | None = None) -> Forward:
    name = name or fid
    return Forward(fid, f"/host/{name}.sock", f"/run/{name}.sock")


# -- Forward and parse_forward ----------------------------------------------------------


def test_parse_forward_splits_at_the_last_colon_slash() -> None:
    """`ID=HOST:VM` gives the three parts; a host path holding ':' still parses
    because the paths split where the VM path begins."""
    assert parse_forward("db=/run/pg.sock:/run/db.sock") == Forward(
        "db", "/run/pg.sock", "/run/db.sock"
    )
    assert parse_forward("x=/a:b/h.sock:/v.sock") == Forward("x", "/a:b/h.sock", "/v.sock")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("noequals", "is not FORWARD_ID=HOST_PATH:VM_PATH"),
        ("a=/h.sock", "is not FORWARD_ID=HOST_PATH:VM_PATH"),
        ("=/h.sock:/v.sock", "forward ID must not be empty"),
        ("a,b=/h.sock:/v.sock", "without ',', '=' or spaces"),
        ("a b=/h.sock:/v.sock", "without ',', '=' or spaces"),
        ("a=rel.sock:/v.sock", "host path 'rel.sock' is relative; it must be absolute"),
        ("a=/h.sock:/v\0.sock", "VM path"),
        (f"a=/{'x' * 200}.sock:/v.sock", "bytes sun_path can hold"),
        (f"{'i' * 257}=/h.sock:/v.sock", "longer than 256 characters"),
    ],
)
def test_bad_forwards_are_refused_saying_what_and_where(text: str, message: str) -> None:
    """Each malformed forward is a ValueError quoting the text and naming the
    part that is wrong."""
    with pytest.raises(ValueError) as info:
        parse_forward(text)
    assert message in str(info.value)
    assert str(info.value).startswith(repr(text))


# -- the forwards file ---------------------------------------------------------------------


def test_forwards_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    """One forward per line, in file order; `#` comments, blank lines and
    surrounding spaces are ignored."""
    path = tmp_path / "forwards"
    path.write_text("# table\n\n  a=/h/a.sock:/v/a.sock  \n# more\nb=/h/b.sock:/v/b.sock\n")
    assert read_forwards_file(str(path)) == [
        Forward("a", "/h/a.sock", "/v/a.sock"),
        Forward("b", "/h/b.sock", "/v/b.sock"),
    ]


@pytest.mark.parametrize(
    ("content", "where"),
    [
        (b"a=/h.sock:/v.sock\nbroken\n", ":2: 'broken'"),
        (b"a=/h.sock:/v.sock\na=/h.sock:/v.sock\n", ":2: forward ID a is given twice"),
        (b"\xff\xfe\n", ": "),
    ],
)
def test_forwards_file_errors_name_the_file_and_line(
    tmp_path: Path, content: bytes, where: str
) -> None:
    """A line that does not parse, an id given twice or bytes that are not
    UTF-8 make a ValueError that starts with the file (and line)."""
    path = tmp_path / "forwards"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        read_forwards_file(str(path))
    assert str(info.value).startswith(f"{path}{where}")


def test_missing_forwards_file_is_a_value_error(tmp_path: Path) -> None:
    """A file that cannot be read is a ValueError naming it, like a bad line."""
    with pytest.raises(ValueError, match="No such file"):
        read_forwards_file(str(tmp_path / "absent"))


# -- merging the command line ----------------------------------------------------------------


def _sources(forward: list[Forward], file: list[Forward], spec: list[Forward]) -> list[Source]:
    return [
        Source("--forward", forward),
        Source("--forwards-file", file, "/etc/fw"),
        Source("--oci-spec", spec, "/c.json"),
    ]


def test_merge_keeps_every_source_in_order() -> None:
    """Distinct forwards from every option make one table, in option order."""
    merged = merge_sources(_sources([F("a")], [F("b"), F("c")], [F("d")]))
    assert [f.forward_id for f in merged] == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        (_sources([F("a"), F("a")], [], []), "--forward: forward ID a is given twice"),
        (
            _sources([F("a")], [F("a", "other")], []),
            "--forwards-file /etc/fw: forward ID a is also given with --forward",
        ),
        (
            _sources([], [F("a")], [F("a")]),
            "--oci-spec /c.json: forward ID a is also given with --forward or --forwards-file",
        ),
    ],
)
def test_merge_refuses_an_id_given_twice_naming_the_options(
    sources: list[Source], message: str
) -> None:
    """A forward_id given twice, by one option or by two, is refused naming the
    option that repeats it (and its file) and the options it clashes with."""
    with pytest.raises(ValueError) as info:
        merge_sources(sources)
    assert str(info.value) == message


# -- reloading the forwards file ---------------------------------------------------------------


def test_reload_removes_what_left_the_file_and_adds_what_is_new() -> None:
    """Entries gone from the file are removed, new ones added, unchanged ones
    left alone; the command line's own entries are never touched."""
    table = {"a": F("a"), "b": F("b"), "cli": F("cli")}
    plan = plan_reload(table, {"a", "b"}, {"cli"}, [F("b"), F("c")])
    assert plan == Reload(remove=["a"], add=[F("c")])


def test_reload_replaces_an_entry_whose_paths_changed() -> None:
    """A forward_id kept in the file with other paths is removed and added
    again with the new paths."""
    table = {"a": F("a")}
    moved = F("a", "elsewhere")
    assert plan_reload(table, {"a"}, set(), [moved]) == Reload(remove=["a"], add=[moved])


def test_reload_of_an_unchanged_file_changes_nothing() -> None:
    """Re-reading the same file plans no removal and no addition."""
    table = {"a": F("a"), "b": F("b")}
    assert plan_reload(table, {"a", "b"}, set(), [F("b"), F("a")]) == Reload([], [])


def test_reload_of_an_empty_file_removes_only_the_file_entries() -> None:
    """An emptied file takes out every forward it put in, in id order, and
    nothing the command line gave."""
    table = {"z": F("z"), "a": F("a"), "cli": F("cli")}
    assert plan_reload(table, {"z", "a"}, {"cli"}, []) == Reload(remove=["a", "z"], add=[])


def test_reload_clashing_with_the_command_line_is_refused() -> None:
    """A file that now names a forward_id the command line gave is refused as a
    whole, naming the ids (the table must stay unchanged)."""
    table = {"a": F("a"), "cli": F("cli"), "oci": F("oci")}
    with pytest.raises(ForwardsClash) as info:
        plan_reload(table, {"a"}, {"cli", "oci"}, [F("oci", "x"), F("cli"), F("n")])
    assert str(info.value) == "forward IDs also given on the command line: cli,oci"
