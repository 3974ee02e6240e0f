"""The orchestrator <-> runner transport of the runner plane: node attempts over zmq ipc, with credit.

Each orchestrator binds a ROUTER at :func:`aobd.planes.paths.orchestrator_jobs`; every runner connects a DEALER
to every orchestrator. Frames (after the ROUTER's identity frame) are ``[kind, payload]``:

- runner -> orchestrator ``hello`` / ``beat``: msgpack :class:`RunnerBeat` (once at start, then every
  :data:`HEARTBEAT_S`). A beat from an unknown runner registers it, so runners survive an orchestrator restart.
- orchestrator -> runner ``jobs``: a batch of :class:`~aobd.runner.wire.NodeJob` (one frame per runner per
  loop turn: batching is what keeps the per-attempt cost of the hop low).
- runner -> orchestrator ``done``: a batch of :class:`~aobd.runner.wire.NodeOutcome`.

Delivery is at least once. :class:`JobBook` (pure, no sockets, injected clock) decides which runner gets which
job and which jobs go out again: a runner that missed :data:`DEAD_AFTER_S` of heartbeats, or was replaced by a
new process of the same runner index (the supervisor restarted it), loses its jobs to the queue. A job whose
outcome never comes back is still bounded by the driver's attempt timeout, and an outcome that arrives twice is
dropped by :meth:`RemoteExecutor.deliver`, so completion stays exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
import zmq

from aobd.config import Config, orchestrator_count
from aobd.runner import wire
from aobd.runner.wire import NodeJob, NodeOutcome
from aobd.runner.worker import Runner

from . import paths, shm_ir
from .zloop import LoopSocket

log = structlog.get_logger("aobd.planes.jobs")

HEARTBEAT_S = 1.0
#: Three missed beats: long enough to ride out a GC pause or a busy loop, short against attempt timeouts (30 s).
DEAD_AFTER_S = 3.5
#: Jobs a runner executes at once per orchestrator when [planes] runner_credit is not set.
DEFAULT_CREDIT = 256

HELLO, BEAT, JOBS, DONE = b"hello", b"beat", b"jobs", b"done"


class RunnerBeat(msgspec.Struct, frozen=True):
    #: The runner's index in the runner plane (stable across restarts) and its pid (new on each restart).
    index: int
    pid: int
    #: Jobs it takes at once from this orchestrator, and how many it is executing now (for a re-registration).
    credit: int
    busy: int = 0


_beat_decoder = msgspec.msgpack.Decoder(RunnerBeat)
_encoder = msgspec.msgpack.Encoder()


@dataclass(slots=True)
class RunnerSlot:
    identity: bytes
    index: int
    pid: int
    credit: int
    last_seen: float
    holding: dict[str, NodeJob] = field(default_factory=dict)
    #: Jobs it runs for an earlier incarnation of this orchestrator: they take credit until their outcomes arrive.
    foreign: int = 0

    @property
    def free(self) -> int:
        return self.credit - len(self.holding) - self.foreign


class JobBook:
    """Which runner holds which job; the policy of the transport, free of I/O (see the module docstring)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, dead_after_s: float = DEAD_AFTER_S) -> None:
        self.clock = clock
        self.dead_after_s = dead_after_s
        self.queue: deque[NodeJob] = deque()
        self.runners: dict[bytes, RunnerSlot] = {}
        self.resent = 0
        self.expired = 0

    def beat(self, identity: bytes, beat: RunnerBeat) -> list[bytes]:
        """Record a hello or heartbeat; returns identities declared dead because this one replaced them."""
        now = self.clock()
        slot = self.runners.get(identity)
        if slot is not None:
            slot.last_seen = now
            slot.credit = beat.credit
            return []
        self.runners[identity] = RunnerSlot(identity, beat.index, beat.pid, beat.credit, now, foreign=beat.busy)
        # The same runner index with another pid is a restarted process: the old one's jobs will never come back.
        replaced = [i for i, s in self.runners.items() if s.index == beat.index and s.pid != beat.pid]
        for old in replaced:
            self.drop(old)
        return replaced

    def submit(self, job: NodeJob) -> None:
        self.queue.append(job)

    def assign(self, now_unix: float) -> dict[bytes, list[NodeJob]]:
        """Hand queued jobs to runners with free credit, least loaded first; drops jobs past their deadline."""
        batches: dict[bytes, list[NodeJob]] = {}
        if not self.queue:
            return batches
        # Fill runners in order of free credit; credits are in the hundreds, so one sort per flush is cheap.
        for slot in sorted(self.runners.values(), key=lambda s: s.free, reverse=True):
            free = slot.free
            while free > 0 and self.queue:
                job = self.queue.popleft()
                if job.deadline < now_unix:
                    self.expired += 1  # the driver has timed this attempt out already
                    continue
                slot.holding[job.job_id] = job
                batches.setdefault(slot.identity, []).append(job)
                free -= 1
            if not self.queue:
                break
        return batches

    def complete(self, identity: bytes, outcomes: list[NodeOutcome]) -> None:
        slot = self.runners.get(identity)
        if slot is None:
            return
        slot.last_seen = self.clock()
        for outcome in outcomes:
            if slot.holding.pop(outcome.job_id, None) is None and slot.foreign > 0:
                slot.foreign -= 1

    def reap(self) -> list[bytes]:
        """Declare runners silent for longer than ``dead_after_s`` dead; their jobs go back to the queue."""
        deadline = self.clock() - self.dead_after_s
        dead = [i for i, s in self.runners.items() if s.last_seen < deadline]
        for identity in dead:
            self.drop(identity)
        return dead

    def drop(self, identity: bytes) -> int:
        """Forget a runner; its unfinished jobs go to the front of the queue (they are the oldest). Returns how many."""
        slot = self.runners.pop(identity, None)
        if slot is None or not slot.holding:
            return 0
        self.queue.extendleft(reversed(list(slot.holding.values())))
        self.resent += len(slot.holding)
        return len(slot.holding)

    def holding(self) -> int:
        return sum(len(s.holding) for s in self.runners.values())


class ZmqJobTransport:
    """The orchestrator's side: a :class:`~aobd.runner.remote.JobTransport` over the jobs ROUTER.

    ``deliver`` receives every outcome (set it to ``RemoteExecutor.deliver``).
    """

    def __init__(self, config: Config, index: int, *, deliver: Callable[[NodeOutcome], object] | None = None) -> None:
        self.config = config
        self.address = paths.orchestrator_jobs(config, index)
        self.deliver = deliver
        self.book = JobBook()
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._sock: LoopSocket | None = None
        self._flush_scheduled = False
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        paths.ensure_socket_dir(self.config)
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # Unbounded queues towards runners: credit bounds what is in flight, a high-water mark would drop silently.
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.bind(self.address)
        self._sock = LoopSocket(sock, self._receive)
        self._tasks = [asyncio.create_task(self._reap())]
        log.info("jobs transport bound", address=self.address)

    async def submit(self, job: NodeJob) -> None:
        self.submit_nowait(job)

    def submit_nowait(self, job: NodeJob) -> None:
        if self._sock is None:
            raise RuntimeError("the job transport is not started")
        self.book.submit(job)
        self._wake()

    def _wake(self) -> None:
        """Hand out queued jobs at the end of this loop turn: however many were submitted in it, one batch each."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._send)

    def runner_gone(self, index: int, pid: int) -> None:
        """The supervisor saw runner ``index`` (process ``pid``) exit: re-send its jobs now, not after the timeout."""
        for identity, slot in list(self.book.runners.items()):
            if slot.index == index and slot.pid == pid and self.book.drop(identity):
                self._wake()

    def status(self) -> dict[str, object]:
        return {
            "runners": len(self.book.runners),
            "queued": len(self.book.queue),
            "holding": self.book.holding(),
            "resent": self.book.resent,
            "expired": self.book.expired,
        }

    def _send(self) -> None:
        self._flush_scheduled = False
        if self._sock is None:
            return
        for identity, jobs in self.book.assign(time.time()).items():
            self._sock.send([identity, JOBS, wire.encode(jobs)])

    def _receive(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            return
        ident, kind, payload = frames
        try:
            if kind == DONE:
                outcomes = wire.decode_outcomes(payload)
                self.book.complete(ident, outcomes)
                if self.deliver is not None:
                    for outcome in outcomes:
                        self.deliver(outcome)
            elif kind in (HELLO, BEAT):
                beat = _beat_decoder.decode(payload)
                if ident not in self.book.runners:
                    log.info("runner joined", runner=beat.index, pid=beat.pid, credit=beat.credit)
                for old in self.book.beat(ident, beat):
                    log.warning("runner replaced; re-sending its jobs", runner=beat.index, old=old.decode())
            else:
                return
        except msgspec.DecodeError as exc:
            log.error("undecodable frame from a runner", kind=kind[:16], error=str(exc))
            return
        self._wake()  # credit came back or a runner joined: queued jobs may go out now

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S / 2)
            for identity in self.book.reap():
                log.warning("runner silent; re-sending its jobs", runner=identity.decode(errors="replace"))
                self._wake()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


class RunnerLoop:
    """The runner's side: receive job batches from every orchestrator, run them concurrently, answer in batches."""

    def __init__(self, config: Config, index: int, *, runner: Runner | None = None) -> None:
        self.config = config
        self.index = index
        self.pid = os.getpid()
        self.credit = config.planes.runner_credit or DEFAULT_CREDIT
        self.runner = runner or Runner(
            f"runner-{index}:{self.pid}",
            handler_modules=list(config.security.handler_modules),
            http_allow=list(config.security.http_allow),
            documents=shm_ir.SharedDocuments(shm_ir.namespace_of(config.data_dir)),
        )
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._socks: list[LoopSocket] = []
        self._outbox: dict[int, list[NodeOutcome]] = {}
        self._busy: dict[int, int] = {}
        self._flush_scheduled = False
        self._running: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for i in range(orchestrator_count(self.config)):
            sock = self._ctx.socket(zmq.DEALER)
            # A fresh identity per process: the orchestrator tells a restarted runner from the old one by it.
            sock.setsockopt(zmq.IDENTITY, f"r{self.index}.{self.pid}".encode())
            sock.setsockopt(zmq.LINGER, 2000)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.connect(paths.orchestrator_jobs(self.config, i))
            self._busy[i] = 0
            self._outbox[i] = []
            loop_socket = LoopSocket(sock, functools.partial(self._receive, i))
            self._socks.append(loop_socket)
            loop_socket.send([HELLO, self._beat(i)])
        self._tasks.append(asyncio.create_task(self._heartbeat()))

    def _beat(self, i: int) -> bytes:
        return _encoder.encode(RunnerBeat(self.index, self.pid, self.credit, self._busy[i]))

    def busy(self) -> int:
        return sum(self._busy.values())

    def _receive(self, i: int, frames: list[bytes]) -> None:
        if len(frames) != 2 or frames[0] != JOBS:
            return
        try:
            jobs = wire.decode_jobs(frames[1])
        except msgspec.DecodeError as exc:
            log.error("undecodable job batch", orchestrator=i, error=str(exc))
            return
        loop = asyncio.get_running_loop()
        for job in jobs:
            # A handler that cannot await runs here and now (no task); the others get a task each.
            outcome = self.runner.run_now(job)
            if isinstance(outcome, NodeOutcome):
                self._done(i, outcome)
                continue
            self._busy[i] += 1
            task = loop.create_task(self._run(i, outcome))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, i: int, attempt: Coroutine[Any, Any, NodeOutcome]) -> None:
        try:
            outcome = await attempt
        finally:
            self._busy[i] -= 1
        self._done(i, outcome)

    def _done(self, i: int, outcome: NodeOutcome) -> None:
        self._outbox[i].append(outcome)
        if not self._flush_scheduled:  # one batch per orchestrator per loop turn
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for i, sock in enumerate(self._socks):
            batch, self._outbox[i] = self._outbox[i], []
            if batch and not sock.closed:
                sock.send([DONE, wire.encode(batch)])

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            for i, sock in enumerate(self._socks):
                sock.send([BEAT, self._beat(i)])

    async def drain(self, grace_s: float) -> None:
        """Finish the attempts in hand (their orchestrators are gone or draining too), flush their outcomes."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=grace_s)
        self._flush()

    async def close(self) -> None:
        for task in [*self._tasks, *self._running]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._running, return_exceptions=True)
        for sock in self._socks:
            with contextlib.suppress(zmq.ZMQError):
                sock.close(linger=2000)
        await self.runner.close()
