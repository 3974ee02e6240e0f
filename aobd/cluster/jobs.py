"""Node attempts over Kafka (``[cluster] execution = "bus"``): the owner of a run publishes each function and http
attempt to ``node.jobs.<priority>``; the runners of every daemon share those topics in one consumer group; each
outcome goes to the results topic keyed by run_id, where the run's owner (which consumes that topic already)
hands it to the attempt waiting for it.

Delivery is at least once and recording exactly once. A runner commits a job's offset only after the broker
acknowledged its outcome, so a runner that dies mid-job leaves the job uncommitted: its group rebalances and
another daemon's runner executes the job again. The owner records whichever outcome comes first for the attempt
it waits for and drops the rest (same job_id: already answered; an attempt it no longer waits for: timed out or
moved to another owner). When no outcome comes at all, the driver's attempt timeout retries the node under its
retry policy.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from aobd.bus.kafka import BusError, KafkaConfig, KafkaProducer, Message, Partition, PriorityJobConsumer
from aobd.runner import wire
from aobd.runner.remote import RemoteExecutor
from aobd.runner.wire import REMOTE_TYPES, NodeJob, NodeOutcome
from aobd.runner.worker import Runner

from .messages import encode_outcome

if TYPE_CHECKING:
    from aobd.config import Config
    from aobd.engine.driver import Engine

    from .coordinator import ClusterCoordinator

log = structlog.get_logger("aobd.cluster.jobs")


class KafkaJobTransport:
    """Hands a job to Kafka: the job topic of its priority, keyed by run_id (a run's jobs stay in order)."""

    def __init__(self, config: KafkaConfig, producer: Callable[[], KafkaProducer]) -> None:
        self._producer = producer  # the coordinator's, created when it starts
        self._topics = dict(zip(("high", "medium", "low"), config.job_topics))

    async def submit(self, job: NodeJob) -> None:
        await self._producer().send(self._topics[job.priority], job.run_id, wire.encode(job))


# --- offsets: commit a partition's jobs in order, whatever order they finish in ---------------------------


@dataclass(slots=True, eq=False)
class _Slot:
    message: Message
    done: bool = False


class OffsetTracker:
    """Which job offsets may be committed: per partition, the longest prefix of taken jobs that are all done.

    Jobs run concurrently and finish in any order, but a commit covers every earlier offset of its partition, so
    an offset is committable only once every job taken before it in its partition is done. Slots are objects,
    not offsets: after a revoke (:meth:`drop`) the same offsets may be taken again, and an old job finishing late
    must not mark the new one done.
    """

    def __init__(self) -> None:
        self._held: dict[Partition, deque[_Slot]] = {}

    def take(self, message: Message) -> _Slot:
        slot = _Slot(message)
        self._held.setdefault(Partition(message.topic, message.partition), deque()).append(slot)
        return slot

    def committable(self, partitions: Iterable[Partition] | None = None) -> list[Message]:
        """Per partition (of ``partitions``, default all), the last message of its done prefix, now forgotten."""
        out: list[Message] = []
        for partition in list(self._held) if partitions is None else partitions:
            held = self._held.get(partition)
            last = None
            while held and held[0].done:
                last = held.popleft().message
            if last is not None:
                out.append(last)
        return out

    def drop(self, partitions: Iterable[Partition]) -> None:
        for partition in partitions:
            self._held.pop(partition, None)

    def __len__(self) -> int:
        return sum(len(held) for held in self._held.values())


class RecentJobs:
    """Job ids answered lately (bounded): a redelivered job whose outcome was acknowledged is not run again."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, job_id: str) -> None:
        self._ids[job_id] = None
        self._ids.move_to_end(job_id)
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._ids


# --- the runner side -----------------------------------------------------------------------------------------


class ClusterRunner:
    """Executes node jobs from ``node.jobs.*`` (high before medium before low, low never starved) with at most
    ``concurrency`` at once, and answers each on the results topic before committing it."""

    def __init__(self, config: KafkaConfig, runner: Runner, *, concurrency: int, group_id: str | None = None) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.config = config
        self.runner = runner
        self.concurrency = concurrency
        self.group_id = group_id or f"{config.group_id}.runners"
        self._producer: KafkaProducer | None = None
        self._consumer: PriorityJobConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._jobs: dict[str, asyncio.Task[None]] = {}  # job_id -> the task running it
        self._offsets = OffsetTracker()
        self._recent = RecentJobs()
        self._freed = asyncio.Event()
        self._stopping = False
        self.answered = 0
        self.duplicates = 0
        self.malformed = 0

    async def start(self, producer: KafkaProducer) -> None:
        self._producer = producer
        # The orchestrators' group assigns by range and member order is arbitrary: range here too would give a
        # daemon's runner exactly the partitions it owns as an orchestrator about half the time, and every job
        # would make a round trip to its own sender. Round robin deals each topic's partitions apart from that.
        consumer = {"partition.assignment.strategy": "roundrobin", **self.config.consumer}
        config = msgspec.structs.replace(self.config, consumer=consumer)
        self._consumer = PriorityJobConsumer(config, self.group_id, on_revoke=self._revoked)
        self._task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        assert self._consumer is not None
        while not self._stopping:
            try:
                free = self.concurrency - len(self._jobs)
                if free > 0:
                    for message in await self._consumer.poll_batch(free, 0.5):
                        self._take(message)
                else:
                    # Every slot is busy: wait for one, but keep polling now and then, or the group would evict
                    # this member (max.poll.interval.ms). Full levels are paused, so little is fetched meanwhile.
                    self._freed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._freed.wait(), 1.0)
                    await self._consumer.fetch(0.0)
                await self._commit()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("consuming node jobs failed; retrying")
                await asyncio.sleep(0.5)

    def _take(self, message: Message) -> None:
        slot = self._offsets.take(message)
        try:
            job = wire.decode_job(message.value)
        except Exception:  # msgspec.DecodeError, or a job of a newer wire format
            self.malformed += 1
            log.warning("skipping a malformed node job", topic=message.topic, offset=message.offset)
            slot.done = True  # a poison message must not hold its partition's commits back forever
            return
        running = self._jobs.get(job.job_id)
        if job.job_id in self._recent or running is not None:
            # Redelivered (a rebalance, or a commit that failed): its outcome was acknowledged, or will be by the
            # task that runs it; its offset is committable once that task is done.
            self.duplicates += 1
            if running is None:
                slot.done = True
            else:
                running.add_done_callback(lambda _: setattr(slot, "done", True))
            return
        task = asyncio.create_task(self._run(job, slot))
        self._jobs[job.job_id] = task

    async def _run(self, job: NodeJob, slot: _Slot) -> None:
        try:
            outcome = await self.runner.run(job)
            await self._answer(job, outcome)
            self._recent.add(job.job_id)
        finally:
            slot.done = True
            self._jobs.pop(job.job_id, None)
            self._freed.set()

    async def _answer(self, job: NodeJob, outcome: NodeOutcome) -> None:
        """Produce the outcome, retrying while its attempt may still be waiting for it."""
        assert self._producer is not None
        value, headers = encode_outcome(outcome)
        delay = 0.1
        while True:
            try:
                await self._producer.send(self.config.results_topic, job.run_id, value, headers)
                self.answered += 1
                return
            except BusError as exc:
                if self.runner.clock() > job.deadline:
                    # Nobody waits any more: the owner's attempt timed out and the node retries under its policy.
                    log.warning("dropping an outcome the broker did not take", job_id=job.job_id, error=exc.message)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _commit(self, partitions: Iterable[Partition] | None = None) -> None:
        assert self._consumer is not None
        done = self._offsets.committable(partitions)
        if not done:
            return
        try:
            await self._consumer.commit(done)
        except BusError as exc:
            # A partition moved meanwhile: its new owner receives these jobs again and they run again
            # (at least once); their outcomes are dropped by the run's owner as already answered.
            log.warning("committing node jobs failed", error=exc.message)

    async def _revoked(self, partitions: frozenset[Partition]) -> None:
        # The partitions are still ours while this runs: commit what is answered, so their new owner starts past it.
        await self._commit(partitions)
        self._offsets.drop(partitions)

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop taking jobs, let running ones answer (up to ``grace_s``), commit them and leave the group."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        running = list(self._jobs.values())
        if running:
            _, late = await asyncio.wait(running, timeout=grace_s)
            for task in late:  # uncommitted: redelivered to another daemon's runner
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._commit()
            await self._consumer.close()
        await self.runner.close()

    def status(self) -> dict[str, Any]:
        return {
            "runner_id": self.runner.runner_id,
            "jobs_executed": self.runner.executed,
            "jobs_expired": self.runner.expired,
            "jobs_running": len(self._jobs),
            "jobs_duplicate": self.duplicates,
            "outcomes_sent": self.answered,
        }


def install_bus_execution(engine: Engine, coordinator: ClusterCoordinator, config: Config) -> ClusterRunner | None:
    """Route the engine's function and http attempts over ``node.jobs.*`` and give this daemon a runner.

    Installs a :class:`RemoteExecutor` for :data:`REMOTE_TYPES` and attaches it (and the runner) to the
    coordinator, which starts and stops them with itself and delivers the outcomes it consumes. Returns the
    runner (None when ``cluster.runner_concurrency`` is 0: this daemon only orchestrates).
    """
    kafka = config.kafka
    transport = KafkaJobTransport(kafka, lambda: coordinator.producer)
    remote = RemoteExecutor(transport, origin=coordinator.daemon_id, clock=engine.clock)
    for node_type in REMOTE_TYPES:
        engine.executors[node_type] = remote
    runner = None
    if config.cluster.runner_concurrency > 0:
        worker = Runner(
            coordinator.daemon_id,
            handler_modules=config.security.handler_modules,
            http_allow=config.security.http_allow,
        )
        runner = ClusterRunner(kafka, worker, concurrency=config.cluster.runner_concurrency)
    coordinator.attach_execution(remote, runner)
    return runner
