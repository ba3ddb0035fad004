"""The protocol's words: stream ids, the host's error texts (the exact bytes
nerdbox's guest and ours read), the Accept metadata."""

from __future__ import annotations

import re

import pytest

from socketforward.protocol import (
    DEFAULT_RPC_DIAL,
    DEFAULT_STREAMS,
    MAX_FORWARD_ID_LEN,
    HostError,
    announced_forward_ids,
    classify,
    generate_stream_id,
    valid_stream_id,
)


def test_stream_id_format() -> None:
    """Stream ids read `{prefix}-{unix-ns}-{6 url-safe chars}` and differ each time."""
    ids = {generate_stream_id("fwd") for _ in range(100)}
    assert len(ids) == 100
    for stream_id in ids:
        assert re.fullmatch(r"fwd-\d{19}-[A-Za-z0-9_-]{6}", stream_id), stream_id
    assert generate_stream_id().startswith("socketfwd-")


def test_stream_ids_the_channel_cannot_carry_are_invalid() -> None:
    """Empty ids and ids over 256 UTF-8 bytes are refused; 256 bytes is fine."""
    assert valid_stream_id("x" * 256)
    assert not valid_stream_id("")
    assert not valid_stream_id("x" * 257)
    assert not valid_stream_id("é" * 129)  # 258 bytes


def test_host_error_texts_are_nerdboxs_bytes() -> None:
    """The texts on the wire are exactly the reference host's; none names a path."""
    assert HostError.UNKNOWN_FORWARD.text("fwd-a") == "unknown forward ID: fwd-a"
    assert HostError.DIAL.text() == "failed to dial host socket"
    assert HostError.STREAM.text() == "failed to open data stream"
    assert HostError.STREAM_ID.text() == "invalid stream ID"
    assert HostError.OVERLOAD.text() == "too many pending connections"


def test_unknown_forward_text_echoes_a_bounded_id() -> None:
    """A VM-supplied forward_id is echoed back cut at the forward-id bound."""
    text = HostError.UNKNOWN_FORWARD.text("x" * (MAX_FORWARD_ID_LEN + 50))
    assert text == "unknown forward ID: " + "x" * MAX_FORWARD_ID_LEN + "..."


@pytest.mark.parametrize("error", list(HostError))
def test_classify_reads_back_every_text(error: HostError) -> None:
    """Each text the host sends is recognised as what it is."""
    assert classify(error.text("some-id")) is error


@pytest.mark.parametrize("text", ["", "boom", "failed to dial host socket!", "unknown forward"])
def test_classify_leaves_other_texts_alone(text: str) -> None:
    """Success and another host's words are no HostError."""
    assert classify(text) is None


def test_announced_forward_ids() -> None:
    """Metadata values are comma-separated ids, spaces trimmed; none means None."""
    assert announced_forward_ids(["a, b", "c,,"]) == frozenset({"a", "b", "c"})
    assert announced_forward_ids([]) is None
    assert announced_forward_ids([" , "]) is None


def test_defaults_are_nerdboxs_ports() -> None:
    """The guest dials the host at CID 2 port 1025 and listens on 1026."""
    assert (DEFAULT_RPC_DIAL, DEFAULT_STREAMS) == ("vsock://2:1025", "vsock://:1026")
