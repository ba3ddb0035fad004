"""The Echo test service in Python: the same semantics as the Go peer's server
(tests/interop/go/cmd/peer), so one scenario list checks both."""

from __future__ import annotations

import asyncio

import ttrpc_asyncio as ttrpc
from echo import echo_pb2, echo_ttrpc


def _metadata(context: ttrpc.CallContext) -> list[echo_pb2.Pair]:
    return [
        echo_pb2.Pair(key=key, value=value)
        for key in sorted(context.metadata)
        for value in sorted(context.metadata[key])
    ]


def _fail(request: echo_pb2.EchoRequest) -> None:
    if request.fail_code:
        raise ttrpc.TtrpcError(request.fail_code, request.fail_message)


class EchoService(echo_ttrpc.EchoBase):
    async def Unary(
        self, request: echo_pb2.EchoRequest, context: ttrpc.CallContext
    ) -> echo_pb2.EchoResponse:
        if request.sleep_ms:
            await asyncio.sleep(request.sleep_ms / 1000)
        _fail(request)
        payload = b"x" * request.response_size if request.response_size else request.payload
        return echo_pb2.EchoResponse(payload=payload, seq=1, metadata=_metadata(context))

    async def ClientStream(
        self, stream: ttrpc.ServerStream[echo_pb2.EchoRequest, echo_pb2.EchoResponse]
    ) -> echo_pb2.EchoResponse:
        payloads: list[bytes] = []
        first: echo_pb2.EchoRequest | None = None
        async for request in stream:
            first = first or request
            payloads.append(request.payload)
        if first is not None:
            _fail(first)
        return echo_pb2.EchoResponse(
            payload=b"".join(payloads), seq=len(payloads), metadata=_metadata(stream.context)
        )

    async def ServerStream(
        self,
        request: echo_pb2.EchoRequest,
        stream: ttrpc.ServerStream[echo_pb2.EchoRequest, echo_pb2.EchoResponse],
    ) -> None:
        md = _metadata(stream.context)
        for seq in range(1, request.count + 1):
            await stream.send(echo_pb2.EchoResponse(payload=request.payload, seq=seq, metadata=md))
        _fail(request)

    async def Bidi(
        self, stream: ttrpc.ServerStream[echo_pb2.EchoRequest, echo_pb2.EchoResponse]
    ) -> None:
        md = _metadata(stream.context)
        seq = 0
        async for request in stream:
            _fail(request)
            seq += 1
            await stream.send(echo_pb2.EchoResponse(payload=request.payload, seq=seq, metadata=md))
