"""The fanout plane: committed events from the orchestrators to the accept workers' live streams.

Orchestrators publish through an :class:`EventPublisher` (an engine record listener) to the plane's XSUB
(:func:`aobd.planes.paths.fanout_in`); the plane forwards to its XPUB (:func:`aobd.planes.paths.fanout_out`), where
each accept worker's :class:`FanoutSubscriber` feeds the local :class:`~aobd.api.fanout.FanoutHub` that SSE and
WebSocket streams subscribe to. A message is one frame, the msgpack array ``[[run_id, [event JSON, ...]], ...]``:
everything an orchestrator committed in one turn of its loop for the runs some stream follows, each run's events
in seq order, exactly as stored in the log. Orchestrators publish only runs that an accept worker's stream
follows, by the shared table of :mod:`aobd.planes.watched`, and one message per turn rather than per run: the
proxy and every accept worker pay per message.

Delivery is best effort, which the streams already tolerate: they replay history from the event log before
following live events, fill a gap in seqs from the log, and a client resumes with ``Last-Event-ID``. Publishing
never waits (zmq PUB drops at its high-water mark rather than block the engine).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import structlog
import zmq

from aobd.api.fanout import FanoutHub
from aobd.config import Config
from aobd.model.events import Event, decode_event
from aobd.planes import paths
from aobd.planes.zloop import LoopSocket
from aobd.store.protocols import EventRecord

__all__ = ["EventPublisher", "FanoutSubscriber", "main", "serve"]

log = structlog.get_logger("aobd.planes.fanout")

#: Messages queued per socket before zmq drops: ~minutes of a busy orchestrator's events; streams refill gaps.
HIGH_WATER_MARK = 100_000

_encoder = msgspec.msgpack.Encoder()
_batch = msgspec.msgpack.Decoder(list[tuple[str, list[bytes]]])


def bind(config: Config, context: zmq.Context[Any]) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    """The plane's XSUB (orchestrators connect) and XPUB (accept workers connect), bound."""
    paths.ensure_socket_dir(config)
    inbound = context.socket(zmq.XSUB)
    outbound = context.socket(zmq.XPUB)
    for socket in (inbound, outbound):
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        socket.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    inbound.bind(paths.fanout_in(config))
    outbound.bind(paths.fanout_out(config))
    return inbound, outbound


def forward(inbound: zmq.Socket[Any], outbound: zmq.Socket[Any]) -> None:
    """Forward until the sockets' context is terminated; then close them (which lets the termination finish)."""
    try:
        # XSUB/XPUB forward the subscriptions upstream too, so publishers filter at the source.
        zmq.proxy(inbound, outbound)
    except zmq.ContextTerminated:
        pass
    finally:
        inbound.close()
        outbound.close()


def main(config: Config) -> int:
    """Entry point of the fanout plane process: forward until SIGTERM/SIGINT; returns the exit status."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(config))


async def serve(config: Config, *, stop: asyncio.Event | None = None) -> int:
    """Run the proxy on a thread (zmq.proxy is a blocking C loop) while the event loop heartbeats to the
    supervisor (:class:`aobd.planes.health.ChildLink`), until ``stop`` is set or a SIGTERM/SIGINT arrives."""
    from aobd.planes.health import ChildLink

    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    # Its own context: terminating it ends the proxy without touching the heartbeat socket.
    context: zmq.Context[Any] = zmq.Context()
    inbound, outbound = bind(config, context)  # here, so that a bind error fails the process at once
    thread = threading.Thread(target=forward, args=(inbound, outbound), name="aobd-fanout-proxy", daemon=True)
    thread.start()
    link = ChildLink(config, "fanout", 0)
    link.start()
    link.ready = True
    await link.beat_now()
    log.info("fanout plane ready", inbound=paths.fanout_in(config), outbound=paths.fanout_out(config))
    try:
        await stop.wait()
    finally:
        await asyncio.to_thread(context.term)  # returns once forward() closed its sockets
        thread.join(5)
        await link.close()
    return 0


class EventPublisher:
    """Engine record listener of an orchestrator: publishes committed events to the fanout plane.

    The engine calls it once per committed step (one run) with the step's records, the events already encoded
    for the log, so they travel as they are (encoding a W6 run's 20 events again cost about 10 us). Records are
    gathered until the event loop turns and then sent as one message, so a burst of commits costs one send.
    With ``watched`` (an orchestrator's :class:`~aobd.planes.watched.WatchedAnywhere`), only the steps of runs
    some accept worker's stream follows are published: the rest would cost every process on the way a wakeup
    for nothing.

    Usage: ``publisher = EventPublisher(config, watched=...); engine.record_listeners.append(publisher)``;
    ``publisher.close()``.
    """

    def __init__(
        self,
        config: Config,
        *,
        endpoint: str | None = None,
        context: zmq.Context[Any] | None = None,
        watched: Callable[[str], bool] | None = None,
    ) -> None:
        self._own_context = context is None
        self._context = context or zmq.Context()
        # A plain (blocking-API) socket: PUB never blocks, so the sync listener can send from the loop thread.
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        self._socket.connect(endpoint or paths.fanout_in(config))
        self._watched = watched
        self._pending: dict[str, list[bytes]] = {}
        self._scheduled = False
        #: Messages sent, and dropped at the high-water mark.
        self.sent = 0
        self.dropped = 0

    def __call__(self, run_id: str, records: list[EventRecord]) -> None:
        if self._watched is not None and not self._watched(run_id):
            return
        self._pending.setdefault(run_id, []).extend(record.data for record in records)
        if self._scheduled:
            return
        try:
            asyncio.get_running_loop().call_soon(self.flush)
            self._scheduled = True
        except RuntimeError:  # no loop (a synchronous caller): nothing to coalesce with
            self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        try:
            self._socket.send(_encoder.encode(list(pending.items())), flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            self.dropped += 1  # streams refill the gap from the log
        except zmq.ZMQError:
            return  # closed: the orchestrator is stopping

    def close(self) -> None:
        self.flush()
        self._socket.close()
        if self._own_context:
            self._context.term()


class FanoutSubscriber:
    """Feeds an accept worker's hub from the fanout plane.

    It subscribes to every run rather than to the runs being watched: a per-run zmq subscription reaches the
    publisher only some time later, and an event committed in between (the terminal one, say) would be lost
    to a stream that already read the log; the stream would then wait forever. Events of runs nobody here
    watches are dropped before decoding (:meth:`FanoutHub.watching`), which keeps the cost to a dict lookup
    per run in a message; messages are received by a :class:`~aobd.planes.zloop.LoopSocket` (no future each).
    """

    def __init__(
        self,
        config: Config,
        hub: FanoutHub,
        *,
        endpoint: str | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.hub = hub
        self.endpoint = endpoint or paths.fanout_out(config)
        self._own_context = context is None
        self._context: zmq.Context[Any] = context or zmq.Context()
        self._socket: LoopSocket | None = None

    async def start(self) -> None:
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.connect(self.endpoint)
        self._socket = LoopSocket(socket, self._receive)

    def _receive(self, frames: list[bytes]) -> None:
        if len(frames) != 1:
            return
        try:
            batch = _batch.decode(frames[0])
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("undecodable fanout message", size=len(frames[0]))
            return
        watching = self.hub.watching
        for run_id, encoded in batch:
            if not watching(run_id):
                continue
            try:
                events: Sequence[Event] = [decode_event(data) for data in encoded]
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
                log.warning("undecodable fanout events", run_id=run_id[:64])
                continue
            self.hub.publish(events)

    async def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._own_context:
            self._context.term()
