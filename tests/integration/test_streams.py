"""SSE and WebSocket run streams end to end: granian's embedded server, a real engine, aiohttp as the client.

A tiny ASGI app mounts ``serve_sse`` and ``serve_websocket`` the way the API does (``Last-Event-ID`` or
``?after=`` to resume, ``?node=`` to filter). Every stream is checked against the event log: the ids are the
stored seqs with no gap and no duplicate, and each event's data is the stored event. A ``?slow=`` query makes
the app's ``send`` sleep, which stands in for a client reading slower than the run produces events.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest
from granian.constants import Interfaces
from granian.server.embed import Server

from aobd.api import streams
from aobd.api.fanout import FanoutHub
from aobd.api.sse import SseMessage, SseParser, is_event_stream
from aobd.api.streams import serve_sse, serve_websocket
from aobd.engine.driver import Engine
from aobd.model.events import TERMINAL_EVENTS, Event, decode_event
from aobd.store.memory import MemoryCas, MemoryEventLog
from tests.conftest import edge, run_async, workflow

pytestmark = pytest.mark.integration

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]

TERMINAL = {"RunCompleted", "RunFailed", "RunCancelled"}


def sleep_node(node_id: str, ms: int) -> dict[str, Any]:
    return {"id": node_id, "type": "function", "config": {"handler": "builtin:sleep", "ms": ms}}


def chain(*nodes: tuple[str, int]) -> dict[str, Any]:
    """Sleep nodes one after the other."""
    ids = [node_id for node_id, _ in nodes]
    return workflow([sleep_node(n, ms) for n, ms in nodes], [edge(a, b) for a, b in itertools.pairwise(ids)])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class StreamApp:
    """The streaming routes of the API, reduced to what these tests need."""

    def __init__(self, log: MemoryEventLog, hub: FanoutHub, heartbeat_s: float) -> None:
        self.log = log
        self.hub = hub
        self.heartbeat_s = heartbeat_s
        #: What the handlers raised: the server would only log it, so the harness fails the test instead.
        self.errors: list[BaseException] = []

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        parts = scope["path"].strip("/").split("/")  # runs/<id>/events | runs/<id>/ws
        if "slow" in query:
            send = slowed(send, float(query["slow"]))
        common: dict[str, Any] = {
            "log": self.log,
            "hub": self.hub,
            "run_id": parts[1],
            "after_seq": int(headers.get("last-event-id") or query.get("after") or 0),
            "node": query.get("node"),
            "heartbeat_s": self.heartbeat_s,
        }
        try:
            if scope["type"] == "websocket":
                await serve_websocket(scope, receive, send, **common)
            else:
                await serve_sse(scope, receive, send, **common)
        except BaseException as exc:
            self.errors.append(exc)
            raise


def slowed(send: Send, delay: float) -> Send:
    async def slow_send(message: Message) -> None:
        if message["type"] in ("http.response.body", "websocket.send"):
            await asyncio.sleep(delay)
        await send(message)

    return slow_send


class Harness:
    """Engine, hub and server on the running loop; closes all of them (and the client session) on exit."""

    def __init__(self, *, buffer_size: int = 1024, heartbeat_s: float = 15.0) -> None:
        self.log = MemoryEventLog()
        self.cas = MemoryCas()
        self.engine = Engine(self.log, self.cas)
        self.hub = FanoutHub(buffer_size)
        self.engine.listeners.append(self.hub.publish)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.app = StreamApp(self.log, self.hub, heartbeat_s)
        self.server = Server(
            self.app,
            address="127.0.0.1",
            port=self.port,
            interface=Interfaces.ASGI,
            log_enabled=False,
        )
        self._serving: asyncio.Task[None] | None = None
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Harness:
        self._serving = asyncio.ensure_future(self.server.serve())
        self.session = aiohttp.ClientSession()
        for _ in range(500):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.01)
                continue
            writer.close()
            await writer.wait_closed()
            return self
        raise RuntimeError(f"granian did not listen on port {self.port}")

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.session is not None:
            await self.session.close()
        # Ends the streams still open on the server side, so that stopping the server does not wait for them.
        self.hub.close()
        self.server.stop()
        if self._serving is not None:
            await asyncio.wait_for(self._serving, 10)
        await self.engine.close()
        await self.log.close()
        await self.cas.close()
        assert not self.app.errors, f"stream handlers raised: {self.app.errors!r}"

    @property
    def client(self) -> aiohttp.ClientSession:
        assert self.session is not None
        return self.session

    async def stored(self, run_id: str) -> list[SseMessage]:
        """The run's events as the stream should carry them."""
        return [SseMessage(r.data.decode(), r.type, str(r.seq)) for r in await self.log.read(run_id)]

    async def wait_for_subscribers(self, count: int) -> None:
        for _ in range(500):
            if self.hub.subscriber_count() == count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{self.hub.subscriber_count()} subscribers, expected {count}")


async def read_sse(
    response: aiohttp.ClientResponse, *, stop_after: int | None = None, raw: list[bytes] | None = None
) -> list[SseMessage]:
    """Messages of an SSE response until it ends (or ``stop_after`` messages), as a client parses them."""
    assert response.status == 200
    assert is_event_stream(response.headers["content-type"])
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    parser = SseParser()
    messages: list[SseMessage] = []
    async for chunk in response.content.iter_any():
        if raw is not None:
            raw.append(chunk)
        messages += parser.feed_bytes(chunk)
        if stop_after is not None and len(messages) >= stop_after:
            return messages
    parser.end_of_stream()
    return messages


async def sse(harness: Harness, run_id: str, query: str = "", **headers: str) -> list[SseMessage]:
    url = f"{harness.base}/runs/{run_id}/events{query}"
    async with harness.client.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as response:
        return await read_sse(response)


def assert_gap_free(messages: list[SseMessage], first: int = 1) -> None:
    assert [int(m.id) for m in messages] == list(range(first, first + len(messages)))


def test_sse_streams_a_whole_run_live_and_ends_after_run_completed() -> None:
    async def main() -> None:
        async with Harness() as h:
            url = f"{h.base}/runs/r1/events"
            async with h.client.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
                # Connected before the run exists: every event arrives live, none from the replay.
                await h.wait_for_subscribers(1)
                await h.engine.start_run(chain(("a", 50), ("b", 50)), {}, run_id="r1")
                messages = await read_sse(response)
            assert messages == await h.stored("r1")
            assert_gap_free(messages)
            assert messages[0].event == "RunCreated"
            assert messages[-1].event == "RunCompleted"
            assert json.loads(messages[-1].data)["type"] == "RunCompleted"
            assert {json.loads(m.data).get("node_id") for m in messages} >= {"a", "b"}
            await h.wait_for_subscribers(0)

    run_async(main())


def test_sse_replays_a_finished_run_and_resumes_after_its_end_with_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pages of 3 make the replay of this run take several log reads.
    monkeypatch.setattr(streams, "REPLAY_PAGE", 3)

    async def main() -> None:
        async with Harness() as h:
            summary = await h.engine.run(chain(("a", 1), ("b", 1)), {}, run_id="done")
            assert summary["status"] == "completed"
            stored = await h.stored("done")
            assert await sse(h, "done") == stored
            assert await sse(h, "done", **{"Last-Event-ID": "3"}) == stored[3:]
            # Resuming after the terminal event: the response ends at once instead of waiting forever.
            assert await sse(h, "done", **{"Last-Event-ID": stored[-1].id}) == []
            await h.wait_for_subscribers(0)

    run_async(main())


def test_sse_reconnect_with_last_event_id_gets_exactly_the_rest() -> None:
    async def main() -> None:
        async with Harness() as h:
            doc = chain(("a", 80), ("b", 80), ("c", 80), ("d", 80))
            await h.engine.start_run(doc, {}, run_id="r2")
            url = f"{h.base}/runs/r2/events"
            async with h.client.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
                first = await read_sse(response, stop_after=4)
            # The client went away mid-run: the server notices and drops its subscription.
            await h.wait_for_subscribers(0)
            assert first[-1].event not in TERMINAL
            rest = await sse(h, "r2", **{"Last-Event-ID": first[-1].id})
            assert rest[-1].event == "RunCompleted"
            assert first + rest == await h.stored("r2")
            assert_gap_free(first + rest)

    run_async(main())


def test_sse_fills_events_missing_from_the_hub_from_the_log() -> None:
    async def main() -> None:
        async with Harness() as h:
            dropped: list[int] = []
            batches = 0

            def lossy_publish(events: list[Event]) -> None:
                # Loses every second batch, as a publisher in another process might, but not the terminal one:
                # a gap is filled when the next event shows it, and nothing follows the terminal event.
                nonlocal batches
                batches += 1
                if batches % 2 == 0 and not any(isinstance(e, TERMINAL_EVENTS) for e in events):
                    dropped.extend(e.seq for e in events)
                    return
                h.hub.publish(events)

            h.engine.listeners[:] = [lossy_publish]
            url = f"{h.base}/runs/r8/events"
            async with h.client.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
                await h.wait_for_subscribers(1)
                await h.engine.start_run(chain(("a", 20), ("b", 20), ("c", 20)), {}, run_id="r8")
                messages = await read_sse(response)
            assert dropped
            assert messages == await h.stored("r8")
            assert_gap_free(messages)

    run_async(main())


def test_sse_node_filter_keeps_the_nodes_and_the_runs_events_with_real_ids() -> None:
    async def main() -> None:
        async with Harness() as h:
            await h.engine.start_run(chain(("a", 30), ("b", 30), ("c", 30)), {}, run_id="r3")
            messages = await sse(h, "r3", "?node=b")
            stored = await h.stored("r3")

            def wanted(m: SseMessage) -> bool:
                node_id = getattr(decode_event(m.data.encode()), "node_id", None)
                return node_id in (None, "b") or m.event in TERMINAL

            assert messages == [m for m in stored if wanted(m)]
            assert {json.loads(m.data).get("node_id") for m in messages} == {None, "b"}
            assert messages[0].event == "RunCreated"
            assert messages[-1].event == "RunCompleted"
            assert len(messages) < len(stored)

    run_async(main())


def test_sse_heartbeats_arrive_while_the_run_is_idle() -> None:
    async def main() -> None:
        async with Harness(heartbeat_s=0.05) as h:
            await h.engine.start_run(chain(("slow", 600)), {}, run_id="r4")
            raw: list[bytes] = []
            url = f"{h.base}/runs/r4/events"
            async with h.client.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
                messages = await read_sse(response, raw=raw)
            assert messages == await h.stored("r4")
            # 600 ms of sleeping node at one heartbeat per idle 50 ms; a loaded machine may deliver fewer.
            assert b"".join(raw).count(b": heartbeat\n") >= 3

    run_async(main())


def test_sse_catches_up_from_the_log_when_live_events_are_lost() -> None:
    """A publisher in another process may drop events (the terminal one too): idle streams read the log."""

    async def main() -> None:
        async with Harness(heartbeat_s=0.05) as h:
            h.engine.listeners.remove(h.hub.publish)  # nothing reaches the hub: the log is the only source
            await h.engine.start_run(chain(("a", 100), ("b", 100)), {}, run_id="r-lost")
            url = f"{h.base}/runs/r-lost/events"
            async with h.client.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
                messages = await read_sse(response)
            assert messages == await h.stored("r-lost")

    run_async(main())


def test_sse_slow_subscriber_gets_lagged_while_the_run_completes() -> None:
    async def main() -> None:
        async with Harness(buffer_size=2) as h:
            # Many quick nodes in parallel commit events faster than a client taking 200 ms per chunk reads them.
            doc = workflow([sleep_node(f"n{i}", 1) for i in range(8)])
            url = f"{h.base}/runs/r5/events?slow=0.2"
            async with h.client.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
                await h.wait_for_subscribers(1)
                await h.engine.start_run(doc, {}, run_id="r5")
                reading = asyncio.ensure_future(read_sse(response))
                # The run never waits for its subscribers: it is over while the client is still reading.
                summary = await asyncio.wait_for(h.engine.wait("r5"), 10)
                assert not reading.done()
                messages = await reading
            assert summary["status"] == "completed"
            *events, lagged = messages
            assert lagged.event == "lagged"
            notice = json.loads(lagged.data)
            assert notice == {"reason": "slow subscriber", "resume_from": int(events[-1].id)}
            # The notice carries no id, so the client's Last-Event-ID is still the last real event.
            assert lagged.id == events[-1].id
            rest = await sse(h, "r5", **{"Last-Event-ID": str(notice["resume_from"])})
            assert events + rest == await h.stored("r5")
            assert rest[-1].event == "RunCompleted"

    run_async(main())


async def read_ws(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    messages = []
    async for message in ws:
        assert message.type == aiohttp.WSMsgType.TEXT
        messages.append(json.loads(message.data))
    return messages


def as_ws(stored: list[SseMessage]) -> list[dict[str, Any]]:
    return [json.loads(m.data) for m in stored]


def test_websocket_delivers_the_same_events_with_heartbeats_and_closes_normally() -> None:
    async def main() -> None:
        async with Harness(heartbeat_s=0.05) as h:
            async with h.client.ws_connect(f"{h.base}/runs/r6/ws", timeout=aiohttp.ClientWSTimeout(ws_close=10)) as ws:
                await h.wait_for_subscribers(1)
                await h.engine.start_run(chain(("a", 50), ("b", 300)), {}, run_id="r6")
                messages = await read_ws(ws)
                assert ws.close_code == 1000
            heartbeats = [m for m in messages if m["type"] == "heartbeat"]
            assert heartbeats
            assert all(m == {"type": "heartbeat"} for m in heartbeats)
            events = [m for m in messages if m["type"] != "heartbeat"]
            stored = await h.stored("r6")
            assert events == as_ws(stored)
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            # Resuming (and the node filter) work as over SSE.
            async with h.client.ws_connect(f"{h.base}/runs/r6/ws?after=2&node=a") as ws:
                resumed = await read_ws(ws)
                assert ws.close_code == 1000
            assert resumed == [e for e in events[2:] if e.get("node_id") in (None, "a") or e["type"] in TERMINAL]
            await h.wait_for_subscribers(0)

    run_async(main())


def test_websocket_slow_subscriber_gets_lagged() -> None:
    async def main() -> None:
        async with Harness(buffer_size=2) as h:
            doc = workflow([sleep_node(f"n{i}", 1) for i in range(8)])
            async with h.client.ws_connect(f"{h.base}/runs/r7/ws?slow=0.05") as ws:
                await h.wait_for_subscribers(1)
                await h.engine.start_run(doc, {}, run_id="r7")
                messages = await read_ws(ws)
                assert ws.close_code == 1000
            *events, lagged = messages
            assert lagged == {"type": "lagged", "reason": "slow subscriber", "resume_from": events[-1]["seq"]}
            assert events == as_ws(await h.stored("r7"))[: len(events)]

    run_async(main())


def test_client_disconnect_on_an_idle_stream_ends_the_handlers() -> None:
    async def main() -> None:
        async with Harness() as h:
            # No such run yet: both streams sit idle until their clients leave.
            async with h.client.get(f"{h.base}/runs/idle/events") as response:
                assert response.status == 200
                async with h.client.ws_connect(f"{h.base}/runs/idle/ws"):
                    await h.wait_for_subscribers(2)
            await h.wait_for_subscribers(0)

    run_async(main())
