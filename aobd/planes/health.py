"""Children <-> supervisor: heartbeats in, the health table out, over the supervisor's ROUTER.

Every child connects a DEALER to :func:`aobd.planes.paths.supervisor` and sends a ``beat`` (:class:`ChildBeat`)
every :data:`HEARTBEAT_S`. A beat with ``want_health`` set is answered with the supervisor's health table
(msgpack of :meth:`Supervisor.snapshot`), so an orchestrator's ``/v1/admin/status`` and ``/metrics`` read a copy at
most one beat old without a request on their own path. Beats carry the child's metrics exposition when it has
one, and the answer carries every child's (a second frame), from which orchestrator 0 merges the daemon's
``/metrics`` (:func:`aobd.metrics.merge_expositions`). When a runner exits, the supervisor tells every
orchestrator at once (``gone``), so its jobs go out again before the heartbeat timeout would notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
import zmq
import zmq.asyncio

from aobd.config import Config

from . import paths

log = structlog.get_logger("aobd.planes.health")

HEARTBEAT_S = 1.0
BEAT, HEALTH, GONE = b"beat", b"health", b"gone"


class ChildBeat(msgspec.Struct, frozen=True):
    role: str
    index: int
    pid: int
    #: False while the child starts (an orchestrator resuming runs, opening its listeners).
    ready: bool = False
    want_health: bool = False
    #: The child's metrics (Prometheus text), for the daemon-wide ``/metrics`` (empty: it has none).
    metrics: bytes = b""


class ChildGone(msgspec.Struct, frozen=True):
    role: str
    index: int
    pid: int


encoder = msgspec.msgpack.Encoder()
beat_decoder = msgspec.msgpack.Decoder(ChildBeat)
gone_decoder = msgspec.msgpack.Decoder(ChildGone)
_metrics_decoder = msgspec.msgpack.Decoder(dict[str, bytes])


def planes_ready(health: dict[str, Any], *, orchestrators: bool = True) -> bool:
    """Whether the daemon can take runs, by the supervisor's table: every orchestrator ready (unless
    ``orchestrators`` is False: an orchestrator asking about the others) and at least one runner ready when the
    layout has runners. False until the first table arrives."""
    children = health.get("children") or []
    if not children:
        return False
    if orchestrators and not all(c["ready"] for c in children if c["role"] == "orchestrator"):
        return False
    runners = [c for c in children if c["role"] == "runner"]
    return not runners or any(c["ready"] for c in runners)


class ChildLink:
    """A child's side: heartbeats (with readiness), the latest health table, and ``gone`` notices."""

    def __init__(
        self,
        config: Config,
        role: str,
        index: int,
        *,
        want_health: bool = False,
        on_gone: Callable[[ChildGone], None] | None = None,
    ) -> None:
        self.role = role
        self.index = index
        self.want_health = want_health
        self.on_gone = on_gone
        self.ready = False
        #: Renders this child's metrics for its beats (None: it sends none).
        self.metrics_source: Callable[[], bytes] | None = None
        #: The supervisor's last health table (empty until the first answer).
        self.health: dict[str, Any] = {}
        #: Every child's metrics as of its last beat, by ``"<role>-<index>"`` (sent with the health table).
        self.children_metrics: dict[str, bytes] = {}
        self._address = paths.supervisor(config)
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self._address)
        self._sock = sock
        self._tasks = [asyncio.create_task(self._beat()), asyncio.create_task(self._receive())]

    async def beat_now(self) -> None:
        if self._sock is not None:
            metrics = b""
            if self.metrics_source is not None:
                try:
                    metrics = self.metrics_source()
                except Exception:  # a broken collector must not stop the heartbeat
                    log.exception("could not render this child's metrics")
            beat = ChildBeat(self.role, self.index, os.getpid(), self.ready, self.want_health, metrics)
            await self._sock.send_multipart([BEAT, encoder.encode(beat)])

    async def _beat(self) -> None:
        while True:
            await self.beat_now()
            await asyncio.sleep(HEARTBEAT_S)

    async def _receive(self) -> None:
        assert self._sock is not None
        while True:
            kind, payload, *more = await self._sock.recv_multipart()
            try:
                if kind == HEALTH:
                    self.health = msgspec.msgpack.decode(payload)
                    if more:
                        self.children_metrics = _metrics_decoder.decode(more[0])
                elif kind == GONE and self.on_gone is not None:
                    self.on_gone(gone_decoder.decode(payload))
            except msgspec.DecodeError as exc:
                log.error("undecodable frame from the supervisor", error=str(exc))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.close(linger=0)
            self._sock = None
