"""Node attempts over the bus, without a broker: what rides the results topic is told apart by its header,
outcomes reach the attempt waiting for them (and only it), and a runner commits a partition's jobs in order,
runs a redelivered job once and answers before it commits."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import msgspec

from aobd.bus.kafka import KafkaConfig, Message, Partition, partition_of
from aobd.cluster.coordinator import ClusterCoordinator
from aobd.cluster.jobs import ClusterRunner, KafkaJobTransport, OffsetTracker
from aobd.cluster.messages import KIND_HEADER, Kind, Nudge, decode, encode_nudge, encode_outcome, kind_of
from aobd.engine.driver import Engine
from aobd.model import events as ev
from aobd.model.workflow import Node
from aobd.nodes.base import NodeContext
from aobd.runner import wire
from aobd.runner.remote import RemoteExecutor
from aobd.runner.wire import NodeJob, NodeOutcome
from aobd.runner.worker import Runner
from aobd.store.memory import MemoryCas, MemoryEventLog
from tests.conftest import edge, fn, run_async, workflow

CONFIG = KafkaConfig(partitions=3)


def message(topic: str, key: str, value: bytes, headers: dict[str, str] | None = None, offset: int = 0) -> Message:
    raw = {name: v.encode() for name, v in (headers or {}).items()}
    partition = partition_of(key, CONFIG.partitions)
    return Message(topic, partition, offset, key, value, raw, 0)


def outcome(job_id: str = "j1", run_id: str = "r1") -> NodeOutcome:
    return NodeOutcome(job_id, run_id, "n1", 1, True, {"x": 1}, runner="d2", origin="d1")


def test_results_topic_messages_are_told_apart_by_their_header() -> None:
    nudge = Nudge("resume", "r1", "d1")
    as_nudge = message(CONFIG.results_topic, "r1", *encode_nudge(nudge))
    as_outcome = message(CONFIG.results_topic, "r1", *encode_outcome(outcome()))
    legacy = message(CONFIG.results_topic, "r1", msgspec.json.encode(nudge))  # a daemon from before the header
    newer = message(CONFIG.results_topic, "r1", b"\x00", {KIND_HEADER: "something-new"})
    assert [kind_of(m) for m in (as_nudge, as_outcome, legacy, newer)] == [
        Kind.NUDGE,
        Kind.OUTCOME,
        Kind.NUDGE,
        Kind.UNKNOWN,
    ]
    assert decode(as_nudge) == decode(legacy) == nudge
    assert decode(as_outcome) == outcome()
    assert decode(newer) is None


def test_a_payload_under_the_wrong_header_is_refused_not_guessed() -> None:
    value, _ = encode_outcome(outcome())
    assert decode(message(CONFIG.results_topic, "r1", value, {KIND_HEADER: "nudge"})) is None
    value, _ = encode_nudge(Nudge("resume", "r1", "d1"))
    assert decode(message(CONFIG.results_topic, "r1", value, {KIND_HEADER: "outcome"})) is None


class Recorder:
    def __init__(self) -> None:
        self.jobs: list[NodeJob] = []

    async def submit(self, job: NodeJob) -> None:
        self.jobs.append(job)


def test_outcomes_reach_the_waiting_attempt_and_others_are_dropped() -> None:
    async def main() -> None:
        coordinator = ClusterCoordinator(Engine(MemoryEventLog(), MemoryCas()), CONFIG, "d1")
        transport = Recorder()
        remote = RemoteExecutor(transport, origin="d1")
        coordinator.attach_execution(remote, None)
        coordinator._owned = {partition_of("owned-run", CONFIG.partitions)}
        node = msgspec.convert({"id": "n1", "type": "function", "config": {"handler": "builtin:echo"}}, Node)
        ctx = NodeContext(run_id="r1", node_id="n1", attempt=1, idempotency_key="r1:n1", timeout_s=5.0)
        call = asyncio.create_task(remote(node, {"x": 1}, ctx))
        await asyncio.sleep(0)  # the call submits its job and waits for the outcome
        (job,) = transport.jobs
        answer = NodeOutcome(job.job_id, "r1", "n1", 1, True, {"x": 2}, runner="d2", origin="d1")
        stray = NodeOutcome("nobody-waits", "r1", "n1", 1, True, {"x": 3})
        other_owned = next(r for r in (f"run{i}" for i in range(100)) if not coordinator.owns(r))
        batch = [
            message(CONFIG.results_topic, "r1", *encode_outcome(stray)),
            message(CONFIG.results_topic, "r1", *encode_outcome(answer)),
            message(CONFIG.results_topic, "r1", *encode_outcome(answer)),  # redelivered: answered already
            message(CONFIG.results_topic, "owned-run", *encode_nudge(Nudge("resume", "owned-run", "d2"))),
            message(CONFIG.results_topic, other_owned, *encode_nudge(Nudge("resume", other_owned, "d2"))),
            message(CONFIG.results_topic, "r1", b"\xc1", {KIND_HEADER: "outcome"}),  # malformed: skipped
        ]
        assert coordinator._route(batch) == {"owned-run"}
        assert await call == {"x": 2}
        assert (coordinator.outcomes, remote.dropped) == (1, 2)
        status = coordinator.status()
        assert status["execution"] == "bus" and status["outcomes_delivered"] == 1

    run_async(main())


def test_commits_cover_only_a_prefix_of_done_jobs_per_partition() -> None:
    tracker = OffsetTracker()
    a = [tracker.take(Message("jobs", 0, offset, "r", b"", {}, 0)) for offset in range(3)]
    b = tracker.take(Message("jobs", 1, 7, "s", b"", {}, 0))
    a[1].done = a[2].done = True
    assert tracker.committable() == []  # offset 0 still runs: committing 2 would lose it on a crash
    a[0].done = b.done = True
    assert sorted((m.partition, m.offset) for m in tracker.committable()) == [(0, 2), (1, 7)]
    assert len(tracker) == 0
    late = tracker.take(Message("jobs", 0, 3, "r", b"", {}, 0))
    tracker.drop([Partition("jobs", 0)])  # revoked: the new owner runs it again
    late.done = True
    assert tracker.committable() == []


class LoopbackProducer:
    """Acknowledges every send at once and keeps it as a consumed message would look."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    async def send(self, topic: str, key: str, value: bytes, headers: dict[str, Any] | None = None) -> None:
        self.sent.append(message(topic, key, value, headers, offset=len(self.sent)))


def test_a_w6_run_over_the_job_and_results_topics_is_recorded_exactly_once_despite_redelivery() -> None:
    """The whole loop on message values: engine -> job topic -> runner (each job delivered twice) -> results
    topic -> coordinator -> engine."""

    async def main() -> None:
        engine = Engine(MemoryEventLog(), MemoryCas())
        coordinator = ClusterCoordinator(engine, CONFIG, "d1")
        producer = LoopbackProducer()
        coordinator._producer = producer  # type: ignore[assignment]
        remote = RemoteExecutor(KafkaJobTransport(CONFIG, lambda: coordinator.producer), origin="d1")
        engine.executors["function"] = remote
        runner = ClusterRunner(CONFIG, Runner("d2", handler_modules=None), concurrency=8)
        runner._producer = producer  # type: ignore[assignment]
        coordinator.attach_execution(remote, runner)
        document = workflow([fn("a"), fn("b"), fn("c")], [edge("a", "b"), edge("b", "c")])
        done = asyncio.create_task(engine.run(document, {"x": 1}, priority="high"))
        seen = 0
        while not done.done():
            await asyncio.sleep(0.001)
            fresh, seen = producer.sent[seen:], len(producer.sent)
            for m in fresh:
                if m.topic == CONFIG.results_topic:
                    coordinator._route([m])
                else:
                    assert m.topic == CONFIG.jobs_high_topic  # the run's priority picks the topic
                    runner._take(m)
                    runner._take(m)  # redelivered while it runs: not run twice
        result = await done
        assert result["status"] == "completed"
        assert runner.runner.executed == 3 and runner.duplicates == 3
        assert len(runner._offsets.committable()) == 1 and len(runner._offsets) == 0
        events = [ev.decode_event(r.data) for r in await engine.log.read(result["run_id"])]
        completed = Counter(e.node_id for e in events if isinstance(e, ev.NodeCompleted))
        assert completed == {"a": 1, "b": 1, "c": 1}

    run_async(main())


def test_jobs_and_outcomes_keep_their_wire_form() -> None:
    node = msgspec.convert({"id": "n1", "type": "http", "config": {"url": "http://x"}}, Node)
    job = NodeJob("j", "r", "n1", 2, node, {"a": [1]}, 3.0, 9.0, priority="low", origin="d1")
    assert wire.decode_job(wire.encode(job)) == job


def test_a_runner_sees_the_attempts_idempotency_key() -> None:
    """A map item's key (``<run>:<node>:<index>``) is the same on a runner as in the owner."""
    node = msgspec.convert({"id": "m_item", "type": "function", "config": {"handler": "tests.handlers:with_ctx"}}, Node)
    job = NodeJob("j", "r", "m[2]", 1, node, {}, 5.0, 1e12, idempotency_key="r:m:2")
    outcome = run_async(Runner("d2", handler_modules=None).run(job))
    assert outcome.ok and outcome.output["key"] == "r:m:2", outcome
