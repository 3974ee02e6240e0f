"""Live streams of a run's events over SSE and WebSocket, as ASGI handlers the API app mounts.

Both transports share one pump with the resume contract of ``Last-Event-ID``: the stream subscribes to the
:class:`~aobd.api.fanout.FanoutHub` *before* reading the event log, so every event is either in the log read
or in the subscription (often in both: seqs already sent are skipped). A client that reconnects with the last
seq it saw therefore gets exactly the rest, with no gap and no duplicate. A stream ends after the run's
terminal event, when the client goes away, when the hub closes (server shutdown), or with a ``lagged`` notice
when the client reads too slowly for the hub's buffer; the run itself never waits for a client.

The caller (the API route) checks that the run exists and that the caller may read it: for a run that does
not exist, these handlers send heartbeats until the client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping, Sequence
from typing import Any, Protocol

import orjson

from aobd.api.fanout import FanoutHub, Lagged, Subscription
from aobd.api.sse import encode_comment, encode_message
from aobd.model.events import TERMINAL_EVENTS, Event, decode_event, encode_event, event_type
from aobd.store.protocols import EventLog, EventRecord

__all__ = ["serve_sse", "serve_websocket"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Events read from the log per query while replaying: bounds memory for runs with very long histories.
REPLAY_PAGE = 1000

_TERMINAL_TYPES = frozenset(cls.__struct_config__.tag for cls in TERMINAL_EVENTS)
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    # nginx buffers proxied responses by default, which would hold events back until its buffer fills.
    (b"x-accel-buffering", b"no"),
]
_HEARTBEAT_SSE = encode_comment("heartbeat")
_HEARTBEAT_WS = '{"type":"heartbeat"}'
_LAGGED_REASON = "slow subscriber"


class _Item:
    """One event ready to send: its seq, type name and JSON text (exactly as stored in the log)."""

    __slots__ = ("data", "seq", "type")

    def __init__(self, seq: int, type_: str, data: bytes) -> None:
        self.seq = seq
        self.type = type_
        self.data = data


class _Cursor:
    """How far a stream got: every seq up to ``seq`` was sent or filtered out; ``finished`` after a terminal."""

    __slots__ = ("finished", "node", "run_id", "seq")

    def __init__(self, run_id: str, after_seq: int, node: str | None) -> None:
        self.run_id = run_id
        self.seq = max(after_seq, 0)
        self.node = node
        self.finished = False

    def take_record(self, record: EventRecord, out: list[_Item]) -> None:
        if self.finished or record.seq <= self.seq:
            return
        self.seq = record.seq
        terminal = record.type in _TERMINAL_TYPES
        # Decoding only when filtering: an unfiltered stream forwards the stored JSON untouched.
        if terminal or self.node is None or _on_node(decode_event(record.data), self.node):
            out.append(_Item(record.seq, record.type, record.data))
        self.finished = terminal

    def take_event(self, event: Event, out: list[_Item]) -> None:
        if self.finished or event.seq <= self.seq:
            return
        self.seq = event.seq
        terminal = isinstance(event, TERMINAL_EVENTS)
        if terminal or self.node is None or _on_node(event, self.node):
            out.append(_Item(event.seq, event_type(event), encode_event(event)))
        self.finished = terminal


def _on_node(event: Event, node: str) -> bool:
    # Events without a node (run-level: RunCreated, PatchApplied...) pass every node filter.
    node_id = getattr(event, "node_id", None)
    return node_id is None or node_id == node


class _Sink(Protocol):
    async def events(self, items: list[_Item]) -> None: ...

    async def heartbeat(self) -> None: ...

    async def lagged(self, resume_from: int) -> None: ...


class _ClientGone(Exception):
    """The transport refused a send: the client has left, which ends a stream normally."""


async def _pump(
    sink: _Sink,
    *,
    log: EventLog,
    subscription: Subscription,
    cursor: _Cursor,
    first_page: Sequence[EventRecord],
    heartbeat_s: float,
    greet: bool = False,
) -> str:
    """Replay the log from the cursor, then forward live events. Returns why it stopped: end, lagged, closed.

    With ``greet``, a heartbeat goes first when there is nothing to replay: some servers hold the response
    headers back until the first body bytes, and the client should see at once that it is connected.
    """
    loop = asyncio.get_running_loop()
    records = first_page
    if greet and not records:
        await sink.heartbeat()
    replayed = 0
    while True:
        replayed += len(records)
        out: list[_Item] = []
        for record in records:
            cursor.take_record(record, out)
        if out:
            await sink.events(out)
        if cursor.finished:
            return "end"
        if len(records) < REPLAY_PAGE:
            break
        records = await log.read(cursor.run_id, cursor.seq, REPLAY_PAGE)
    if not replayed and cursor.seq and await _ended_by(log, cursor.run_id, cursor.seq):
        # Resumed after the terminal event: nothing will ever follow, so do not wait for it.
        return "end"

    last_write = loop.time()
    while True:
        if not await subscription.wait(max(0.0, last_write + heartbeat_s - loop.time())):
            # Idle: catch up from the log before the heartbeat. Live events from another process (the
            # multi-process daemon's fanout plane) are best effort; this bounds a lost one, even the terminal
            # event, to one heartbeat of delay instead of a stream that never ends. One point lookup per idle period.
            out = []
            if await log.last_seq(cursor.run_id) > cursor.seq:
                for record in await log.read(cursor.run_id, cursor.seq, REPLAY_PAGE):
                    cursor.take_record(record, out)
            if out:
                await sink.events(out)
            else:
                await sink.heartbeat()
            last_write = loop.time()
            if cursor.finished:
                return "end"
            continue
        batch = subscription.drain()
        if not batch:
            return "closed"
        out = []
        lagged = False
        for item in batch:
            if isinstance(item, Lagged):
                lagged = True
                break
            if item.seq > cursor.seq + 1 and not cursor.finished:
                # A seq went missing between the log and the hub (a publisher that skipped a batch, or one
                # in another process): fill it from the log so that ids stay gap-free.
                for record in await log.read(cursor.run_id, cursor.seq, item.seq - cursor.seq - 1):
                    cursor.take_record(record, out)
            cursor.take_event(item, out)
        if out:
            await sink.events(out)
            last_write = loop.time()
        if cursor.finished:
            return "end"
        if lagged:
            await sink.lagged(cursor.seq)
            return "lagged"


async def _ended_by(log: EventLog, run_id: str, seq: int) -> bool:
    """Whether the run's terminal event is stored at or before ``seq``."""
    last = await log.last_seq(run_id)
    if not 0 < last <= seq:
        return False
    tail = await log.read(run_id, last - 1, 1)
    return bool(tail) and tail[0].type in _TERMINAL_TYPES


async def _watch_disconnect(receive: Receive, disconnect_type: str) -> None:
    # Request bodies and client WebSocket messages carry nothing for a stream: drop them, wait for the end.
    while (await receive())["type"] != disconnect_type:
        pass


async def _until_disconnect(work: Coroutine[Any, Any, str], receive: Receive, disconnect_type: str) -> str | None:
    """Run ``work`` until it returns (its result) or the client disconnects (None); raise what ``work`` raises."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_watch_disconnect(receive, disconnect_type))
    try:
        await asyncio.wait((work_task, watch_task), return_when=asyncio.FIRST_COMPLETED)
        # A broken receive() means the connection is gone just as an http.disconnect does.
        disconnected = watch_task.done()
    finally:
        # Also reached when this handler is cancelled (server shutdown): no child may outlive it.
        for task in (work_task, watch_task):
            task.cancel()
        await asyncio.gather(work_task, watch_task, return_exceptions=True)
    if work_task.cancelled():
        return None
    error = work_task.exception()
    if error is None:
        return work_task.result()
    if disconnected or isinstance(error, _ClientGone):
        # A send that failed because the client left is the disconnect itself, not an error of ours.
        return None
    raise error


def _check_heartbeat(heartbeat_s: float) -> None:
    if not heartbeat_s > 0:
        raise ValueError(f"heartbeat_s must be a positive number of seconds, not {heartbeat_s!r}")


class _SseSink:
    def __init__(self, send: Send) -> None:
        self._send = send

    async def _body(self, body: bytes) -> None:
        try:
            await self._send({"type": "http.response.body", "body": body, "more_body": True})
        except OSError as exc:
            raise _ClientGone from exc

    async def events(self, items: list[_Item]) -> None:
        # One body chunk per burst. The stored JSON is one data line as is: JSON text never holds a raw CR or
        # LF (RFC 8259 escapes control characters), which saves decoding and re-encoding every event.
        await self._body(b"".join(b"id: %d\nevent: %s\ndata: %s\n\n" % (i.seq, i.type.encode(), i.data) for i in items))

    async def heartbeat(self) -> None:
        await self._body(_HEARTBEAT_SSE)

    async def lagged(self, resume_from: int) -> None:
        # No id: the client's Last-Event-ID must stay the seq of the last real event.
        data = orjson.dumps({"reason": _LAGGED_REASON, "resume_from": resume_from}).decode()
        await self._body(encode_message(data, event="lagged"))


async def serve_sse(
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    log: EventLog,
    hub: FanoutHub,
    run_id: str,
    after_seq: int = 0,
    node: str | None = None,
    heartbeat_s: float = 15.0,
) -> None:
    """Stream a run's events as ``text/event-stream`` (``GET /v1/runs/{id}/events`` with SSE).

    Each event is ``id: <seq>``, ``event: <type>``, ``data: <event JSON>``. The stream starts after
    ``after_seq`` (the ``Last-Event-ID`` a reconnecting client sends) with the stored events, continues with
    live ones, and ends after the run's terminal event. A client too slow for the hub's buffer gets a final
    ``event: lagged`` with data ``{"reason": "slow subscriber", "resume_from": <seq>}`` and reconnects with
    ``Last-Event-ID: <resume_from>``. The response ends when the hub closes, too.

    Args:
        scope: The ASGI HTTP scope (not inspected: the route parsed it).
        receive: ASGI receive, watched for ``http.disconnect``.
        send: ASGI send.
        log: The event log to replay from.
        hub: The hub the engine publishes committed events to.
        run_id: The run to stream.
        after_seq: Send only events with a greater seq.
        node: Send only the events of this node, plus those of the run itself (``RunCreated``, patches,
            ``RunCompleted``...). Ids stay the real seqs; ``resume_from`` may then be past the last id sent,
            as the events between were filtered out.
        heartbeat_s: Send a comment after this many idle seconds, so proxies and clients see a live connection.

    Raises:
        ValueError: ``heartbeat_s`` is not positive.
        Exception: Whatever the event log raises. Before the response starts (the first log read) it can still
            become an error response; later the connection is cut and the client resumes.
    """
    _check_heartbeat(heartbeat_s)
    cursor = _Cursor(run_id, after_seq, node)
    async with hub.subscribe(run_id) as subscription:
        first_page = await log.read(run_id, cursor.seq, REPLAY_PAGE)
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        pump = _pump(
            _SseSink(send),
            log=log,
            subscription=subscription,
            cursor=cursor,
            first_page=first_page,
            heartbeat_s=heartbeat_s,
            greet=True,
        )
        if await _until_disconnect(pump, receive, "http.disconnect") is not None:
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})


class _WebSocketSink:
    def __init__(self, send: Send) -> None:
        self._send = send

    async def _text(self, text: str) -> None:
        try:
            await self._send({"type": "websocket.send", "text": text})
        except OSError as exc:
            raise _ClientGone from exc

    async def events(self, items: list[_Item]) -> None:
        for item in items:
            await self._text(item.data.decode())

    async def heartbeat(self) -> None:
        await self._text(_HEARTBEAT_WS)

    async def lagged(self, resume_from: int) -> None:
        await self._text(
            orjson.dumps({"type": "lagged", "reason": _LAGGED_REASON, "resume_from": resume_from}).decode()
        )


#: WebSocket close codes by why the stream ended (RFC 6455 section 7.4.1): lagged is a normal end whose reason
#: the last message gave; a closed hub means the server is going away.
_CLOSE_CODES = {"end": 1000, "lagged": 1000, "closed": 1001}


async def serve_websocket(
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    log: EventLog,
    hub: FanoutHub,
    run_id: str,
    after_seq: int = 0,
    node: str | None = None,
    heartbeat_s: float = 15.0,
) -> None:
    """Stream a run's events over a WebSocket (``GET /v1/runs/{id}/ws``); the same content as :func:`serve_sse`.

    Accepts the connection, then sends each event as one text message holding the event's JSON (its ``type``
    is the event type), ``{"type": "heartbeat"}`` after ``heartbeat_s`` idle seconds, and a final
    ``{"type": "lagged", "reason": "slow subscriber", "resume_from": <seq>}`` when the client reads too slowly
    (reconnect with ``after_seq`` = ``resume_from``). Closes with 1000 after the terminal event or ``lagged``,
    1001 when the hub closes, 1011 on a server error (which is then re-raised for the server to log).

    Args:
        scope: The ASGI WebSocket scope (not inspected: the route parsed it).
        receive: ASGI receive; client messages are ignored, ``websocket.disconnect`` ends the stream.
        send: ASGI send.
        log: The event log to replay from.
        hub: The hub the engine publishes committed events to.
        run_id: The run to stream.
        after_seq: Send only events with a greater seq.
        node: Send only the events of this node, plus those of the run itself.
        heartbeat_s: Idle seconds between heartbeat messages.

    Raises:
        ValueError: ``heartbeat_s`` is not positive.
    """
    _check_heartbeat(heartbeat_s)
    if (await receive())["type"] != "websocket.connect":
        return  # The client left before the handshake completed.
    cursor = _Cursor(run_id, after_seq, node)
    async with hub.subscribe(run_id) as subscription:
        await send({"type": "websocket.accept"})
        try:
            first_page = await log.read(run_id, cursor.seq, REPLAY_PAGE)
            pump = _pump(
                _WebSocketSink(send),
                log=log,
                subscription=subscription,
                cursor=cursor,
                first_page=first_page,
                heartbeat_s=heartbeat_s,
            )
            why = await _until_disconnect(pump, receive, "websocket.disconnect")
        except Exception:
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1011})
            raise
        if why is not None:
            with contextlib.suppress(OSError):
                await send({"type": "websocket.close", "code": _CLOSE_CODES[why]})
