"""The vendored google.rpc.Status: ttrpc's error responses on the wire."""

from __future__ import annotations

from google.protobuf import descriptor

from ttrpc_asyncio.proto import status_pb2, ttrpc_pb2


def test_status_generated_from_the_vendored_proto_keeps_googleapis_wire() -> None:
    """google.rpc.Status, generated into ttrpc_asyncio.proto instead of coming
    from googleapis-common-protos, keeps googleapis' file name, full name and
    field numbers, so an error response encodes to the bytes ttrpc peers read."""
    status = ttrpc_pb2.Response.DESCRIPTOR.fields_by_name["status"].message_type
    assert status is status_pb2.Status.DESCRIPTOR
    assert (status.full_name, status.file.name) == ("google.rpc.Status", "google/rpc/status.proto")
    assert {f.name: (f.number, f.type) for f in status.fields} == {
        "code": (1, descriptor.FieldDescriptor.TYPE_INT32),
        "message": (2, descriptor.FieldDescriptor.TYPE_STRING),
        "details": (3, descriptor.FieldDescriptor.TYPE_MESSAGE),
    }
    details = status.fields_by_name["details"].message_type
    assert details is not None and details.full_name == "google.protobuf.Any"
    response = ttrpc_pb2.Response(status=status_pb2.Status(code=5, message="nope"))
    assert response.SerializeToString() == b"\n\x08\x08\x05\x12\x04nope"
