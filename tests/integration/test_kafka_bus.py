"""The Kafka bus against a real Kafka-protocol broker (Tansu started here, or AOBD_TEST_KAFKA).

Each test uses topics and groups of its own, so the tests share one broker and stay independent.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import Iterator, Sequence

import pytest

from aobd.bus.kafka import (
    Deduper,
    Delivery,
    KafkaConfig,
    KafkaConsumer,
    KafkaProducer,
    Message,
    Partition,
    PriorityJobConsumer,
    RebalanceHook,
    Seen,
    ensure_topics,
    partition_of,
)
from aobd.errors import ConfigError
from tests.conftest import run_async
from tests.kafka_broker import KafkaBroker, start_broker
from tests.services import service_missing

pytestmark = pytest.mark.integration

PARTITIONS = 6
_names = itertools.count()


@pytest.fixture(scope="module")
def broker() -> Iterator[KafkaBroker]:
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        service_missing("Kafka client", "confluent-kafka is not installed: pip install -e '.[cluster]'")
    started = start_broker()
    try:
        yield started
    finally:
        started.close()


def config_for(broker: KafkaBroker, name: str, partitions: int = PARTITIONS) -> KafkaConfig:
    """A config whose topics and group belong to this test alone."""
    prefix = f"t{next(_names)}-{name}"
    return KafkaConfig(
        bootstrap=broker.bootstrap,
        events_topic=f"{prefix}.events",
        jobs_high_topic=f"{prefix}.jobs.high",
        jobs_medium_topic=f"{prefix}.jobs.medium",
        jobs_low_topic=f"{prefix}.jobs.low",
        results_topic=f"{prefix}.results",
        agent_jobs_topic=f"{prefix}.agent.jobs",
        agent_results_topic=f"{prefix}.agent.results",
        partitions=partitions,
        replication_factor=1,
        group_id=f"{prefix}.group",
        consumer=broker.consumer_settings,
    )


async def send_runs(producer: KafkaProducer, topic: str, runs: int, per_run: int, first_seq: int = 1) -> list[Delivery]:
    """Send ``per_run`` messages for each of ``runs`` runs, interleaved, pipelined; returns the deliveries."""
    tasks = [
        asyncio.create_task(producer.send(topic, f"run-{r}", f"{r}:{seq}".encode(), seq=seq))
        for seq in range(first_seq, first_seq + per_run)
        for r in range(runs)
    ]
    return list(await asyncio.gather(*tasks))


async def drain(consumer: KafkaConsumer, want: int, timeout_s: float = 30.0) -> list[Message]:
    """Poll until ``want`` messages came (or the time is up), then once more to catch any extra one."""
    got: list[Message] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(got) < want and asyncio.get_running_loop().time() < deadline:
        got += await consumer.poll_batch(500, 0.5)
    got += await consumer.poll_batch(500, 0.3)
    return got


async def read_after_join(consumer: KafkaConsumer, timeout_s: float = 30.0) -> list[Message]:
    """What a new member reads once it joined its group and fetched from its committed offsets."""
    got: list[Message] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not consumer.assigned_partitions() and asyncio.get_running_loop().time() < deadline:
        got += await consumer.poll_batch(500, 0.2)
    assert consumer.assigned_partitions(), "the consumer never got partitions"
    return got + await consumer.poll_batch(500, 1.0)


def assert_runs_in_order(messages: Sequence[Message], runs: int, per_run: int, first_seq: int = 1) -> None:
    by_run: dict[str, list[int]] = defaultdict(list)
    for message in messages:
        assert message.run_id is not None and message.seq is not None
        by_run[message.run_id].append(message.seq)
        assert message.value == f"{message.run_id.removeprefix('run-')}:{message.seq}".encode()
    assert sorted(by_run) == sorted(f"run-{r}" for r in range(runs))
    for run_id, seqs in by_run.items():
        assert seqs == list(range(first_seq, first_seq + per_run)), run_id


def test_topics_are_created_idempotently(broker: KafkaBroker) -> None:
    config = config_for(broker, "topics")

    async def scenario() -> None:
        first = await ensure_topics(config)
        assert first == dict.fromkeys(config.topics, PARTITIONS)
        assert await ensure_topics(config) == first
        with pytest.raises(ConfigError, match=r"kafka\.partitions = 3 but topic .* has 6 partitions"):
            await ensure_topics(KafkaConfig(**{**_fields(config), "partitions": 3}))

    run_async(scenario())


def _fields(config: KafkaConfig) -> dict:
    return {name: getattr(config, name) for name in config.__struct_fields__}


def test_keyed_messages_keep_run_order_and_arrive_once(broker: KafkaBroker) -> None:
    config = config_for(broker, "order")
    runs, per_run = 50, 20

    async def scenario() -> None:
        await ensure_topics(config)
        producer = KafkaProducer(config)
        try:
            deliveries = await send_runs(producer, config.events_topic, runs, per_run)
            await producer.flush()
        finally:
            producer.close()
        # the producer put every run where partition_of says, so an orchestrator can tell which runs it owns
        keys = [f"run-{r}" for _seq in range(per_run) for r in range(runs)]
        assert [d.partition for d in deliveries] == [partition_of(k, PARTITIONS) for k in keys]
        assert len({d.partition for d in deliveries}) == PARTITIONS

        async with KafkaConsumer(config, [config.events_topic]) as consumer:
            got = await drain(consumer, runs * per_run)
            await consumer.commit(got)
        assert len(got) == runs * per_run
        assert_runs_in_order(got, runs, per_run)
        dedupe = Deduper()
        assert {dedupe.check(m.run_id or "", m.seq or 0).verdict for m in got} == {Seen.NEW}
        assert all(m.partition == partition_of(m.run_id or "", PARTITIONS) for m in got)

    run_async(scenario())


def test_uncommitted_messages_are_read_again_and_deduped(broker: KafkaBroker) -> None:
    config = config_for(broker, "redeliver")
    runs, per_run = 10, 10

    async def scenario() -> None:
        await ensure_topics(config)
        producer = KafkaProducer(config)
        try:
            await send_runs(producer, config.events_topic, runs, per_run)
        finally:
            producer.close()
        dedupe = Deduper()  # the orchestrator's view of what is applied (durable: seeded from the event log)

        async with KafkaConsumer(config, [config.events_topic]) as first:
            seen = await drain(first, runs * per_run)
            assert len(seen) == runs * per_run
            assert all(dedupe.check(m.run_id or "", m.seq or 0).verdict is Seen.NEW for m in seen)
            # the effect of every message is durable, but this member dies having committed only the first 40
            await first.commit(seen[:40])
        uncommitted = {(m.partition, m.offset) for m in seen[40:]}

        async with KafkaConsumer(config, [config.events_topic]) as second:
            again = await drain(second, len(uncommitted))
            await second.commit(again)
        # at-least-once: exactly the uncommitted messages come again, nothing committed does
        assert {(m.partition, m.offset) for m in again} == uncommitted
        assert len(again) == len(uncommitted)
        assert {dedupe.check(m.run_id or "", m.seq or 0).verdict for m in again} == {Seen.DUPLICATE}

        async with KafkaConsumer(config, [config.events_topic]) as third:
            assert await read_after_join(third) == []  # everything committed now

    run_async(scenario())


def test_revoke_hook_can_commit_before_the_partitions_move(broker: KafkaBroker) -> None:
    config = config_for(broker, "revoke")

    async def scenario() -> None:
        await ensure_topics(config)
        producer = KafkaProducer(config)
        try:
            await send_runs(producer, config.events_topic, 6, 5)
        finally:
            producer.close()
        applied: list[Message] = []
        revoked: list[frozenset[Partition]] = []

        async def commit_applied(parts: frozenset[Partition]) -> None:
            revoked.append(parts)
            await consumer.commit(m for m in applied if (m.topic, m.partition) in parts)

        consumer = KafkaConsumer(config, [config.events_topic], on_revoke=commit_applied)
        async with consumer:
            applied += await drain(consumer, 30)
        # leaving the group revoked every partition, and the hook committed what was applied
        assert len(applied) == 30 and revoked[-1] == {Partition(config.events_topic, p) for p in range(PARTITIONS)}
        async with KafkaConsumer(config, [config.events_topic]) as successor:
            assert await read_after_join(successor) == []

    run_async(scenario())


def test_group_members_split_partitions_and_own_their_runs(broker: KafkaBroker) -> None:
    config = config_for(broker, "split")
    runs, per_run = 40, 5

    async def scenario() -> None:
        await ensure_topics(config)
        hooks: dict[str, list[tuple[str, frozenset[Partition]]]] = {"a": [], "b": []}

        def hook(member: str, kind: str) -> RebalanceHook:
            async def record(parts: frozenset[Partition]) -> None:
                hooks[member].append((kind, parts))

            return record

        a = KafkaConsumer(config, [config.events_topic], on_assign=hook("a", "assign"), on_revoke=hook("a", "revoke"))
        b = KafkaConsumer(config, [config.events_topic], on_assign=hook("b", "assign"), on_revoke=hook("b", "revoke"))
        got: dict[str, list[Message]] = {"a": [], "b": []}
        try:
            everything = {Partition(config.events_topic, p) for p in range(PARTITIONS)}
            deadline = asyncio.get_running_loop().time() + 30
            while asyncio.get_running_loop().time() < deadline:
                polled = await asyncio.gather(a.poll_batch(100, 0.2), b.poll_batch(100, 0.2))
                got["a"] += polled[0]
                got["b"] += polled[1]
                mine, theirs = a.assigned_partitions(), b.assigned_partitions()
                if mine and theirs and mine | theirs == everything:
                    break
            assert mine and theirs and not mine & theirs and mine | theirs == everything
            assert got == {"a": [], "b": []}

            producer = KafkaProducer(config)
            try:
                await send_runs(producer, config.events_topic, runs, per_run)
            finally:
                producer.close()
            deadline = asyncio.get_running_loop().time() + 30
            while len(got["a"]) + len(got["b"]) < runs * per_run and asyncio.get_running_loop().time() < deadline:
                polled = await asyncio.gather(a.poll_batch(500, 0.3), b.poll_batch(500, 0.3))
                got["a"] += polled[0]
                got["b"] += polled[1]
            assert a.assigned_partitions() == mine and b.assigned_partitions() == theirs  # no rebalance meanwhile
            # each member received exactly the runs it owns by partition_of
            for member, other, received in ((a, b, got["a"]), (b, a, got["b"])):
                assert received
                for message in received:
                    assert member.owns(message.run_id or "") and not other.owns(message.run_id or "")
        finally:
            await asyncio.gather(a.close(), b.close())

        assert_runs_in_order(got["a"] + got["b"], runs, per_run)
        assert not a.owns("run-0") and not b.owns("run-0")  # closed members own nothing
        # the hooks saw each member's assignment, and closing revoked it
        for member, held in (("a", mine), ("b", theirs)):
            calls = hooks[member]
            assert ("assign", held) in calls
            assert ("revoke", held) in calls[calls.index(("assign", held)) :]

    run_async(scenario())


def test_broker_restart_loses_no_acknowledged_message(broker: KafkaBroker) -> None:
    if not broker.can_restart:
        pytest.skip("AOBD_TEST_KAFKA names an external broker, which the tests cannot restart")
    config = config_for(broker, "restart")
    runs, per_run = 10, 10

    async def scenario() -> None:
        await ensure_topics(config)
        producer = KafkaProducer(config)
        consumer = KafkaConsumer(config, [config.events_topic])
        try:
            await send_runs(producer, config.events_topic, runs, per_run)
            before = await drain(consumer, runs * per_run)
            assert len(before) == runs * per_run
            await consumer.commit(before)

            broker.stop(kill=True)  # a crash: acknowledged means stored
            # sends while the broker is down wait in librdkafka and complete once it is back
            pending = asyncio.create_task(send_runs(producer, config.events_topic, runs, per_run, first_seq=11))
            await asyncio.sleep(0.5)
            assert not pending.done()
            await asyncio.to_thread(broker.start)
            await asyncio.wait_for(pending, 60)

            after = await drain(consumer, runs * per_run, timeout_s=45)
            await consumer.commit(after)
            assert_runs_in_order(after, runs, per_run, first_seq=11)
        finally:
            producer.close()
            await consumer.close()

        # the commits survived the crash too: a new member of the group has nothing left to read
        async with KafkaConsumer(config, [config.events_topic]) as member:
            assert await read_after_join(member) == []
        # a new group reads everything from the start: all 200 acknowledged messages survived, once each
        fresh = KafkaConfig(**{**_fields(config), "group_id": config.group_id + ".fresh"})
        async with KafkaConsumer(fresh, [config.events_topic]) as reader:
            everything = await drain(reader, 2 * runs * per_run)
        assert_runs_in_order(everything, runs, 2 * per_run)

    run_async(scenario())


def test_priority_consumer_serves_high_before_medium_before_low(broker: KafkaBroker) -> None:
    config = config_for(broker, "priority", partitions=2)
    per_level = 20

    async def scenario() -> None:
        await ensure_topics(config)
        producer = KafkaProducer(config)
        try:
            # low first, so a consumer reading in arrival order would serve low first
            for topic in reversed(config.job_topics):
                await asyncio.gather(*(producer.send(topic, f"run-{i}", topic.encode()) for i in range(per_level)))
        finally:
            producer.close()
        async with PriorityJobConsumer(config) as jobs:
            deadline = asyncio.get_running_loop().time() + 30
            while await jobs.fetch(0.5) < 3 * per_level and asyncio.get_running_loop().time() < deadline:
                pass
            assert jobs.buffer.sizes() == [per_level] * 3
            served = [m for _ in range(3 * per_level) for m in await jobs.poll_batch(1, 0.1)]
            await jobs.commit(served)
        high, medium, low = config.job_topics
        round_ = [high] * 8 + [medium] * 4 + [low]
        tail = [high] * 4 + [medium] * 4 + [low] + ([medium] * 4 + [low]) * 2 + [low] * 15
        assert [m.topic for m in served] == round_ * 2 + tail

    run_async(scenario())


def test_priority_consumer_pauses_a_full_level(broker: KafkaBroker) -> None:
    config = config_for(broker, "backpressure", partitions=1)

    async def scenario() -> None:
        await ensure_topics(config)
        high, _medium, low = config.job_topics
        producer = KafkaProducer(config)
        try:
            await asyncio.gather(*(producer.send(low, "run-low", b"low") for _ in range(50)))
            async with PriorityJobConsumer(config, buffer_per_priority=10) as jobs:
                deadline = asyncio.get_running_loop().time() + 30
                while jobs.buffer.sizes()[2] < 10 and asyncio.get_running_loop().time() < deadline:
                    await jobs.fetch(0.5)
                # the low level is full and paused: its backlog stays on the broker ...
                assert jobs.consumer.assigned_partitions() >= {Partition(low, 0)}
                for _ in range(3):
                    await jobs.fetch(0.2)
                assert jobs.buffer.sizes()[2] <= 20  # capacity, and at most one fetch beyond it
                # ... so a new high job is fetched and served first
                await producer.send(high, "run-high", b"high")
                deadline = asyncio.get_running_loop().time() + 30
                while jobs.buffer.sizes()[0] == 0 and asyncio.get_running_loop().time() < deadline:
                    await jobs.fetch(0.2)
                first = await jobs.poll_batch(1)
                assert [m.value for m in first] == [b"high"]
                # draining low resumes it, and every low job arrives once, in order
                lows: list[Message] = []
                deadline = asyncio.get_running_loop().time() + 30
                while len(lows) < 50 and asyncio.get_running_loop().time() < deadline:
                    lows += await jobs.poll_batch(5, 0.3)
                assert [m.offset for m in lows] == list(range(50))
        finally:
            producer.close()

    run_async(scenario())
