"""Stream objects handed to client callers and server handlers."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Generic, Self, TypeVar

from google.protobuf.message import DecodeError, Message

from .errors import MessageDecodeError, StreamClosedError, TtrpcError

if TYPE_CHECKING:
    from .context import CallContext

RECEIVE_QUEUE_SIZE = 64
"""Messages buffered per stream before the connection stops reading (containerd/ttrpc: 64)."""

SendT = TypeVar("SendT", bound=Message)
RecvT = TypeVar("RecvT", bound=Message)


class MessageQueue:
    """Received payloads of one stream, bounded; the end of the stream is a marker.

    ``offer`` never blocks: when it returns False the connection stops reading;
    ``on_space`` is called as the consumer takes messages from a queue at least
    half full."""

    __slots__ = (
        "_consumer", "_end", "_end_waiter", "_items", "_low_water", "_maxsize", "_on_space",
        "_waiter",
    )  # fmt: skip

    def __init__(self, maxsize: int, on_space: Callable[[MessageQueue], None]) -> None:
        self._items: collections.deque[bytes] = collections.deque()
        self._maxsize = maxsize
        self._low_water = maxsize // 2
        self._on_space = on_space
        self._end: BaseException | bool = False
        self._waiter: asyncio.Future[None] | None = None
        self._consumer: Callable[[bytes], None] | None = None
        self._end_waiter: asyncio.Future[None] | None = None

    @property
    def below_low_water(self) -> bool:
        return len(self._items) <= self._low_water

    @property
    def finished(self) -> bool:
        return self._end is not False

    def consume(self, consumer: Callable[[bytes], None] | None) -> None:
        """Hand each item to *consumer* as it is offered instead of queueing it
        (items already queued go first); None queues them again. An exception
        from *consumer* ends the queue with that error."""
        self._consumer = consumer
        drained = consumer is not None and bool(self._items)
        while consumer is not None and self._consumer is consumer and self._items:
            if not self._hand_over(consumer, self._items.popleft()):
                break
        if drained:
            self._on_space(self)  # the connection may be waiting for room

    def _hand_over(self, consumer: Callable[[bytes], None], item: bytes) -> bool:
        try:
            consumer(item)
        except Exception as exc:
            self.fail(exc)
            return False
        return True

    def offer(self, item: bytes, *, force: bool = False) -> bool:
        if self._end is not False:
            return True  # the reader is gone; drop silently
        consumer = self._consumer
        if consumer is not None and not self._items:
            self._hand_over(consumer, item)
            return True
        if not force and len(self._items) >= self._maxsize:
            return False
        self._items.append(item)
        self._wake()
        return True

    def finish(self, error: BaseException | None = None) -> None:
        """No more items; readers get ``error`` (if any) once the queue is drained."""
        if self._end is False:
            self._end = error if error is not None else True
            self._wake()
            self._wake_end()

    def fail(self, error: BaseException) -> None:
        """End at once, dropping queued items."""
        self._items.clear()
        self._end = error
        self._wake()
        self._wake_end()

    def _wake_end(self) -> None:
        waiter = self._end_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def ended(self) -> None:
        """Wait until no more items will come, leaving queued ones where they
        are; raises the stream's error, if it ended with one."""
        while self._end is False:
            if self._end_waiter is None or self._end_waiter.done():
                self._end_waiter = asyncio.get_running_loop().create_future()
            await self._end_waiter
        if isinstance(self._end, BaseException):
            raise self._end

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> bytes | None:
        """The next payload, None at a clean end, or the stream's error."""
        while not self._items:
            end = self._end
            if end is True:
                return None
            if isinstance(end, BaseException):
                raise end
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if len(self._items) >= self._low_water:
            self._on_space(self)  # the connection may be waiting for room
        return item


def decode(message_type: type[RecvT], data: bytes) -> RecvT:
    """*data* as a *message_type*; MessageDecodeError (that message only) when it is not one."""
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise MessageDecodeError(message_type.__name__, data, str(exc)) from exc


class _Receiving(Generic[RecvT]):
    """What both kinds of stream do with the peer's messages besides ``recv``:
    iterate over them, deliver them to a callback, wait for their end."""

    _queue: MessageQueue
    _recv_type: type[RecvT]

    async def recv(self) -> RecvT | None:
        raise NotImplementedError

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> RecvT:
        message = await self.recv()
        if message is None:
            raise StopAsyncIteration
        return message

    def deliver(
        self,
        on_message: Callable[[RecvT], None],
        on_undecodable: Callable[[MessageDecodeError], None],
    ) -> None:
        """Hand each of the peer's messages to *on_message* as the connection
        reads it, with no task woken per message: for a consumer whose work per
        message never waits. A message that does not decode goes to
        *on_undecodable*. ``recv`` then returns only at the end of the peer's
        side (None, or its error); an exception from either callback ends the
        stream with that error. :meth:`stop_delivery` queues messages again."""
        message_type = self._recv_type

        def consume(data: bytes) -> None:
            try:
                message = decode(message_type, data)
            except MessageDecodeError as exc:
                on_undecodable(exc)
                return
            on_message(message)

        self._queue.consume(consume)

    def stop_delivery(self) -> None:
        """Queue messages for ``recv`` again (undoes :meth:`deliver`)."""
        self._queue.consume(None)

    async def ended(self) -> None:
        """Wait until the peer has ended its side, without taking any message
        (those still queued stay for ``recv``); raises the stream's error."""
        await self._queue.ended()


class ClientStream(_Receiving[RecvT], Generic[SendT, RecvT]):
    """A streaming call, client side: ``send``/``close_send`` and ``recv``/``async for``.

    Server-streaming calls cannot send; client-streaming calls receive exactly
    one message (the response) after ``close_send``. Use ``async with`` (or
    ``aclose``) so an abandoned call is forgotten by the connection."""

    def __init__(
        self,
        stream_id: int,
        queue: MessageQueue,
        response_type: type[RecvT],
        *,
        client_streaming: bool,
        server_streaming: bool,
        send_data: Callable[[int, bytes], Awaitable[None]],
        send_data_nowait: Callable[[int, bytes], None],
        send_close: Callable[[int], Awaitable[None]],
        abandon: Callable[[int], None],
    ) -> None:
        self.stream_id = stream_id
        self._queue = queue
        self._recv_type = response_type
        self.client_streaming = client_streaming
        self.server_streaming = server_streaming
        self._send_data = send_data
        self._send_data_nowait = send_data_nowait
        self._send_close = send_close
        self._abandon = abandon
        self._local_closed = not client_streaming
        self._done = False

    def _check_sendable(self) -> None:
        if self._local_closed:
            raise StreamClosedError(f"stream {self.stream_id}: sending side is closed")
        if self._queue.finished:
            # The server has finished the call; what it said is in the queue.
            raise StreamClosedError(f"stream {self.stream_id}: the server ended the call")

    async def send(self, message: SendT) -> None:
        self._check_sendable()
        await self._send_data(self.stream_id, message.SerializeToString())

    def send_nowait(self, message: SendT) -> None:
        """Send without waiting while the peer is slow to read: the transport
        buffers what it cannot write yet. For callers that bound by other means
        how much they send (a window of unanswered requests, say, or a check of
        ``Client.write_buffer_size`` and an ``await Client.drain()``)."""
        self._check_sendable()
        self._send_data_nowait(self.stream_id, message.SerializeToString())

    async def close_send(self) -> None:
        """End our side; the server sees end of stream. A no-op when already closed."""
        if self._local_closed:
            return
        self._local_closed = True
        if not self._queue.finished:
            await self._send_close(self.stream_id)

    async def recv(self) -> RecvT | None:
        """The next message, or None once the server ended the stream successfully.

        A message that does not decode raises :class:`MessageDecodeError` and is
        dropped; the stream goes on (call ``recv`` again, or start a new
        ``async for``). Any other error ends the stream."""
        if self._done:
            return None
        try:
            data = await self._queue.get()
        except BaseException:
            self._done = True
            raise
        if data is None:
            self._done = True
            return None
        return decode(self._recv_type, data)

    async def aclose(self) -> None:
        """Forget the call; frames still arriving for it are dropped. If our side
        is still open the server is told (a close frame), so its handler sees the
        end of the stream instead of waiting on a call nobody reads."""
        self._done = True
        if not self._local_closed and not self._queue.finished:
            self._local_closed = True
            with contextlib.suppress(TtrpcError, StreamClosedError):
                await self._send_close(self.stream_id)
        self._queue.fail(StreamClosedError(f"stream {self.stream_id}: closed locally"))
        self._abandon(self.stream_id)

    async def __aenter__(self) -> ClientStream[SendT, RecvT]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class ServerStream(_Receiving[RecvT], Generic[RecvT, SendT]):
    """A streaming call, server side: ``recv``/``async for`` the client's messages,
    ``send`` ours. Returning from the handler ends the stream."""

    def __init__(
        self,
        context: CallContext,
        queue: MessageQueue,
        request_type: type[RecvT],
        send_data: Callable[[bytes], Awaitable[None]],
        send_data_nowait: Callable[[bytes], None],
    ) -> None:
        self.context = context
        self._queue = queue
        self._recv_type = request_type
        self._send_data = send_data
        self._send_data_nowait = send_data_nowait

    async def recv(self) -> RecvT | None:
        """The client's next message, or None when it closed its side. An
        undecodable message raises :class:`MessageDecodeError`; the stream goes on."""
        data = await self._queue.get()
        return None if data is None else decode(self._recv_type, data)

    async def send(self, message: SendT) -> None:
        await self._send_data(message.SerializeToString())

    def send_nowait(self, message: SendT) -> None:
        """Send without waiting while the client is slow to read (the transport
        buffers the rest): for handlers that bound what they send by other means."""
        self._send_data_nowait(message.SerializeToString())
