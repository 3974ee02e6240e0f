"""Run ownership across daemons: the partition of a run in Kafka decides which daemon drives it.

Every daemon's coordinator joins one consumer group on the results topic. Kafka's group protocol assigns the
partitions; a daemon drives exactly the runs whose partition it holds (``partition_of(run_id)``, murmur2 like
the Java clients). No clustering code of our own decides anything:

- **Starting a run anywhere.** The daemon that received the request records the run's first step in the
  shared event log. If it does not own the run, it publishes a ``resume`` message keyed by run_id; the owner
  consumes it and carries the run on from the log.
- **Assignment.** When partitions are assigned, the new owner lists the unfinished runs of those partitions in
  the event log and resumes each (rebuild from events, re-dispatch running attempts, re-arm wakes).
- **Revocation.** When partitions are revoked the daemon stops driving their runs. If it is slow to notice, its
  next append conflicts with the new owner's (expected seq), and it stops then: the log has one writer.
- Offsets are committed after the messages' effects are durable (at-least-once); a duplicate ``resume`` is a
  no-op.
- **Events leave through the outbox.** Every daemon relays the outbox rows of the runs of its partitions to the
  events topic (:meth:`ClusterCoordinator._relay`), so the event stream grows with the daemons; the claim
  (:meth:`~aobd.store.postgres.PostgresEventLog.claim_outbox`) keeps each run's events in order when a
  partition moves.
- **Node outcomes.** With ``[cluster] execution = "bus"`` node attempts travel over ``node.jobs.*``
  (:mod:`aobd.cluster.jobs`) and their outcomes come back on this same topic, keyed by run_id, so they reach
  the run's owner; :mod:`aobd.cluster.messages` tells them from nudges.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

import structlog

from aobd.bus.kafka import (
    BusError,
    KafkaConfig,
    KafkaConsumer,
    KafkaProducer,
    Message,
    Partition,
    ensure_topics,
    partition_of,
)
from aobd.engine.driver import Engine
from aobd.errors import NotFound
from aobd.runner.remote import RemoteExecutor
from aobd.runner.wire import NodeOutcome

from .messages import Nudge, decode, encode_nudge

if TYPE_CHECKING:
    from aobd.store.postgres import OutboxEntry

    from .jobs import ClusterRunner

log = structlog.get_logger("aobd.cluster")

#: Most outbox rows a relay claims and publishes at once.
RELAY_BATCH: Final = 500
#: Seconds a relay's claim lasts. Short, so that the rows of a publish that failed (broker down) or of a daemon
#: that died are claimed again soon; a lease that lapses mid-publish costs duplicates, never order.
RELAY_LEASE_S: Final = 5.0
#: Seconds between sweeps for unfinished runs of this daemon's partitions that it does not drive. A run started on
#: another daemon comes here by a nudge on the cluster topic; the sweep carries on the runs whose nudge never came
#: (the broker was down when the run started, so the start failed after the run was recorded) or comes late.
SWEEP_S: Final = 30.0
#: Longest wait between claims while the outbox of this daemon's partitions looks empty. A commit of this daemon
#: wakes the relay at once (:meth:`ClusterCoordinator._wake_relay`); the poll is for rows no commit here announces:
#: those another daemon wrote for a partition now ours, and claims whose lease lapsed.
RELAY_POLL_S: Final = 1.0
#: Least time from one claim's start to the next one's after an empty claim, so that the commits of a busy moment
#: share a claim: a claim, a publish and a mark are three round trips and some CPU. It bounds the claims a
#: woken relay makes at 20 a second (claiming 5 ms after each wake allowed 200; docs/performance.md has the pairs).
RELAY_MIN_GAP_S: Final = 0.05


@runtime_checkable
class Outbox(Protocol):
    """What the relay needs of an event log with a transactional outbox
    (:class:`~aobd.store.postgres.PostgresEventLog`)."""

    #: Whether appends write outbox rows at all.
    outbox: bool
    #: The partition of a run, stored with its outbox rows; set by :meth:`ClusterCoordinator.start`.
    outbox_partition_of: Callable[[str], int] | None

    async def claim_outbox(
        self, limit: int = 500, *, lease: float = 30.0, partitions: Collection[int]
    ) -> list[OutboxEntry]: ...

    async def mark_published(self, ids: Iterable[int]) -> int: ...

    async def outbox_backlog(self, partitions: Collection[int]) -> int: ...


class ClusterCoordinator:
    """One daemon's part in the cluster: it drives the runs of the partitions Kafka assigns it, hands their node
    outcomes to the attempts waiting for them, and relays their outbox rows to the events topic.

    Args:
        engine: this daemon's engine, on the shared event log.
        config: the Kafka settings; ``results_topic`` is the topic whose partitions decide ownership.
        daemon_id: this daemon's name in logs, nudges and the cluster directory.
    """

    def __init__(self, engine: Engine, config: KafkaConfig, daemon_id: str) -> None:
        self.engine = engine
        self.config = config
        self.daemon_id = daemon_id
        self.topic = config.results_topic
        #: Partitions of the results topic: config until :meth:`start` reads the topic's own count.
        self.partitions = config.partitions
        self._producer: KafkaProducer | None = None
        self._consumer: KafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._relay_task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        #: Runs the sweep carried on because no nudge had brought them (see SWEEP_S).
        self.swept = 0
        #: Outbox rows this daemon relayed, in all and by partition (rows written without one count as 0's).
        self.relayed = 0
        self.relayed_by_partition: Counter[int] = Counter()
        self._closing = False
        #: Set by every commit of this daemon's engine: the relay has rows to claim.
        self._relay_wake = asyncio.Event()
        self._claimed_at = 0.0  # when the relay's last claim began (time.monotonic())
        self._owned: set[int] = set()
        #: Set by aobd.cluster.jobs.install_bus_execution: where outcomes go, and this daemon's runner.
        self.remote: RemoteExecutor | None = None
        self.runner: ClusterRunner | None = None
        self.outcomes = 0
        self.ready = asyncio.Event()
        #: Set by the daemon (aobd.cluster.directory.Directory): told when this daemon's partitions change.
        self.directory: Any = None
        #: Set by the daemon: called with each run this daemon took over (to index what the run waits for).
        self.on_resumed: Callable[[str], Awaitable[None]] | None = None

    def owned_partitions(self) -> set[int]:
        return set(self._owned)

    def attach_execution(self, remote: RemoteExecutor, runner: ClusterRunner | None) -> None:
        """Deliver consumed outcomes to ``remote``; start and stop ``runner`` with this coordinator."""
        self.remote = remote
        self.runner = runner

    @property
    def producer(self) -> KafkaProducer:
        if self._producer is None:
            raise BusError("the cluster coordinator is not started: it has no Kafka producer yet")
        return self._producer

    async def start(self) -> None:
        # ensure_topics refuses a kafka.partitions other than the topic's count, so owns() and the outbox rows
        # agree with where the producer puts a run's messages.
        self.partitions = (await ensure_topics(self.config))[self.topic]
        if isinstance(self.engine.log, Outbox):
            # Before any append of this daemon: the relay of a partition claims the rows stored under it.
            self.engine.log.outbox_partition_of = functools.partial(partition_of, partitions=self.partitions)
        self._producer = KafkaProducer(self.config)
        self._consumer = KafkaConsumer(
            self.config, [self.topic], self.config.group_id, on_assign=self._assigned, on_revoke=self._revoked
        )
        self._task = asyncio.create_task(self._consume())
        self.start_relay()
        self._sweep_task = asyncio.create_task(self._sweep())
        if self.runner is not None:
            await self.runner.start(self._producer)

    def owns(self, run_id: str) -> bool:
        return partition_of(run_id, self.partitions) in self._owned

    async def announce(self, run_id: str) -> None:
        """Tell the run's owner, whoever it is, to carry the run on from the log."""
        value, headers = encode_nudge(Nudge("resume", run_id, self.daemon_id))
        await self.producer.send(self.topic, run_id, value, headers)

    async def _assigned(self, partitions: frozenset[Partition]) -> None:
        numbers = {p.partition for p in partitions if p.topic == self.topic}
        self._owned |= numbers
        if self.directory is not None:
            self.directory.ownership_changed()
        resumed = 0
        for run_id in await self.engine.log.unfinished_runs(partitions=numbers):
            if partition_of(run_id, self.partitions) in numbers:
                resumed += await self._resume(run_id)
        self.ready.set()
        log.info("partitions assigned", partitions=sorted(numbers), resumed_runs=resumed, daemon=self.daemon_id)

    async def _revoked(self, partitions: frozenset[Partition]) -> None:
        numbers = {p.partition for p in partitions if p.topic == self.topic}
        self._owned -= numbers
        if self.directory is not None:
            self.directory.ownership_changed()
        released = [
            run_id
            for run_id in self.engine.active_runs()
            if partition_of(run_id, self.partitions) in numbers and self.engine.release(run_id)
        ]
        log.info("partitions revoked", partitions=sorted(numbers), released_runs=len(released), daemon=self.daemon_id)

    async def _resume(self, run_id: str) -> int:
        try:
            await self.engine.resume(run_id)
        except NotFound:
            return 0  # its first step is not in the log yet; the creator's nudge will bring us back
        if not self.engine.drives(run_id):
            return 0  # it finished meanwhile
        if self.on_resumed is not None:
            try:
                await self.on_resumed(run_id)
            except Exception:
                log.exception("indexing a run taken over failed", run_id=run_id)
        return 1

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            try:
                await self.resume_unannounced()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweeping for unfinished runs failed; trying again later")

    async def resume_unannounced(self) -> int:
        """Carry on the unfinished runs of this daemon's partitions that it does not drive; how many it took.

        Every such run's nudge is lost or late: the partitions' runs were resumed when they were assigned, and
        runs started here since are driven here. A run that finished meanwhile is left alone (``Engine.resume``).
        """
        owned = frozenset(self._owned)
        if not owned:
            return 0
        strays = [
            run_id
            # The log narrows the listing to these partitions as far as it recorded them; the check stays.
            for run_id in await self.engine.log.unfinished_runs(partitions=owned)
            if partition_of(run_id, self.partitions) in owned and not self.engine.drives(run_id)
        ]
        taken = sum(await asyncio.gather(*(self._resume(run_id) for run_id in strays)))
        if taken:
            self.swept += taken
            log.warning("carried on runs whose nudge never came", runs=taken, daemon=self.daemon_id)
        return taken

    async def _consume(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                messages = await self._consumer.poll_batch(500, 0.5)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("polling the cluster topic failed; retrying")
                await asyncio.sleep(0.5)
                continue
            runs = self._route(messages)
            # Each resume reads the run from the shared log: do a batch's concurrently (measured: serially, a
            # three-daemon cluster spent most of its time here).
            await asyncio.gather(*(self._resume(run_id) for run_id in runs))
            if messages:
                await self._consumer.commit(messages)

    def _route(self, messages: list[Message]) -> set[str]:
        """Hand outcomes to the attempts waiting for them; return the owned runs that nudges ask to resume.

        An outcome is committed once delivered, before its completion is recorded: if this daemon dies in
        between, the run's next owner re-dispatches the attempt, so the offset need not wait for the record.
        """
        runs = set()
        for message in messages:
            payload = decode(message)
            if isinstance(payload, NodeOutcome):
                # Nobody waits for it (remote is None: execution = "local" here): dropped, and the attempt it
                # answers, if any, times out and retries.
                if self.remote is not None and self.remote.deliver(payload):
                    self.outcomes += 1
            elif payload is None:
                log.warning("ignoring a malformed cluster message", offset=message.offset, headers=message.headers)
            elif payload.kind == "resume" and self.owns(payload.run_id):
                runs.add(payload.run_id)
        return runs

    async def _relay(self) -> None:
        """The outbox relay: committed events to the events topic, so an event is on Kafka iff it was committed.

        Every daemon relays the rows of the runs whose partition it holds, read again at every claim: a revoked
        partition is not claimed after the revocation (a claim in flight is published and marked; its leases keep
        the partition's new owner off those runs meanwhile, and cover this daemon's death). The claim keeps each
        run's events in order across relays; delivery is at least once, and consumers dedupe by
        ``(run_id, seq)``.
        """
        outbox = self.engine.log
        if not isinstance(outbox, Outbox) or not outbox.outbox:
            return  # a log without an outbox (not Postgres)
        while True:
            try:
                owned = frozenset(self._owned)
                self._relay_wake.clear()  # before the claim: a commit during it wakes the wait below at once
                self._claimed_at = time.monotonic()
                entries = await outbox.claim_outbox(RELAY_BATCH, lease=RELAY_LEASE_S, partitions=owned) if owned else []
                if not entries:
                    # Closing: done once no row of ours is left, but an empty claim may only mean that the rows
                    # wait behind another relay's lease (close() bounds the wait).
                    if self._closing and (not owned or not await outbox.outbox_backlog(owned)):
                        return
                    await self._relay_idle()
                    continue
                assert self._producer is not None
                # Produced in claim order (ids follow seqs within a run); the producer keeps that order.
                await asyncio.gather(
                    *(
                        self._producer.send(self.config.events_topic, e.record.run_id, e.record.data, seq=e.record.seq)
                        for e in entries
                    )
                )
                await outbox.mark_published([e.id for e in entries])
                self.relayed += len(entries)
                self.relayed_by_partition.update(max(e.partition, 0) for e in entries)  # NO_PARTITION is 0's
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay failed; retrying")
                await asyncio.sleep(0.5)

    def start_relay(self) -> None:
        """Start the outbox relay, woken by every commit of this daemon's engine (``start`` calls it)."""
        self.engine.record_listeners.append(self._wake_relay)
        self._relay_task = asyncio.create_task(self._relay())

    def _wake_relay(self, run_id: str, records: list[Any]) -> None:
        """A record listener of the engine: this daemon committed events, so its outbox has rows."""
        self._relay_wake.set()

    async def _relay_idle(self) -> None:
        """Wait for a commit of this daemon (and until RELAY_MIN_GAP_S after the last claim began) or the next poll."""
        if self._closing:
            await asyncio.sleep(RELAY_MIN_GAP_S * 2)  # flushing: the rows left wait behind another relay's lease
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._relay_wake.wait(), RELAY_POLL_S)
            await asyncio.sleep(max(0.0, self._claimed_at + RELAY_MIN_GAP_S - time.monotonic()))

    async def close(self, flush_s: float = 10.0) -> None:
        """Leave the cluster. The relay first publishes what is left in the outbox of this daemon's partitions (up
        to ``flush_s``), while it still holds them, so a clean stop leaves no committed event waiting for their
        next owners."""
        self._closing = True
        with contextlib.suppress(ValueError):
            self.engine.record_listeners.remove(self._wake_relay)
        self._relay_wake.set()  # an idle relay flushes now rather than at its next poll
        if self.runner is not None:
            # Runs on the producer, which closes last; the outcome consumer stays up meanwhile, as the engine
            # was drained before (its remote attempts got their outcomes through it).
            await self.runner.close()
        if self._relay_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._relay_task), flush_s)
        for task in (self._task, self._relay_task, self._sweep_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._consumer is not None:
            await self._consumer.close()
        if self._producer is not None:
            self._producer.close()

    def status(self) -> dict[str, Any]:
        return {
            "daemon_id": self.daemon_id,
            "owned_partitions": sorted(self._owned),
            "partitions": self.partitions,
            "runs_carried_on_by_sweep": self.swept,
            "outbox_relayed": self.relayed,
            "outbox_relayed_by_partition": {str(p): n for p, n in sorted(self.relayed_by_partition.items())},
            "execution": "bus" if self.remote is not None else "local",
            **(
                {
                    "jobs_submitted": self.remote.submitted,
                    "outcomes_delivered": self.outcomes,
                    "outcomes_dropped": self.remote.dropped,
                }
                if self.remote is not None
                else {}
            ),
            **({"runner": self.runner.status()} if self.runner is not None else {}),
        }
