"""The Kafka bus's pure policies, without a broker: run partitioning, (run_id, seq) dedupe, priority scheduling."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import msgspec
import pytest

from aobd.bus.kafka import (
    PINNED_PRODUCER,
    Deduper,
    KafkaConfig,
    Message,
    Partition,
    PriorityBuffer,
    PriorityScheduler,
    Seen,
    _client_conf,
    murmur2,
    partition_of,
)
from aobd.errors import ConfigError

# org.apache.kafka.common.utils.UtilsTest#testMurmur2: the Java client's hash, as signed 32-bit ints.
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("key", "expected"), JAVA_MURMUR2.items())
def test_murmur2_matches_the_java_client(key: bytes, expected: int) -> None:
    assert murmur2(key) == expected & 0xFFFFFFFF


def test_partition_of_is_the_java_default_partitioner() -> None:
    for key, hashed in JAVA_MURMUR2.items():
        for partitions in (1, 3, 12, 100):
            assert partition_of(key.decode(), partitions) == (hashed & 0x7FFFFFFF) % partitions


def test_partition_of_is_deterministic_and_spreads_runs() -> None:
    runs = [f"run-{i:05d}" for i in range(6000)]
    first = [partition_of(run, 12) for run in runs]
    assert first == [partition_of(run, 12) for run in runs]
    counts = Counter(first)
    assert set(counts) == set(range(12))
    assert min(counts.values()) > 350  # 500 expected per partition
    assert partition_of("ünïcode-run", 7) == (murmur2("ünïcode-run".encode()) & 0x7FFFFFFF) % 7
    with pytest.raises(ValueError, match="at least 1"):
        partition_of("run", 0)


def test_deduper_drops_duplicates_and_reports_gaps() -> None:
    dedupe = Deduper()
    assert dedupe.check("r1", 1).verdict is Seen.NEW
    assert dedupe.check("r1", 2).verdict is Seen.NEW
    again = dedupe.check("r1", 2)
    assert (again.verdict, again.last) == (Seen.DUPLICATE, 2)
    assert dedupe.check("r1", 1).verdict is Seen.DUPLICATE
    gap = dedupe.check("r1", 6)
    assert (gap.verdict, gap.last, list(gap.missing)) == (Seen.GAP, 2, [3, 4, 5])
    assert dedupe.last("r1") == 6  # the caller repairs 3..5 from the event log, then applies 6
    assert dedupe.check("r1", 4).verdict is Seen.DUPLICATE
    assert dedupe.check("r1", 7).verdict is Seen.NEW
    assert list(dedupe.check("r1", 8).missing) == []
    # runs are independent
    assert dedupe.check("r2", 1).verdict is Seen.NEW


def test_deduper_seed_and_forget() -> None:
    dedupe = Deduper()
    # a run first seen mid-stream starts at that seq ...
    assert dedupe.check("fresh", 40).verdict is Seen.NEW
    # ... unless the event log said how far it was applied
    dedupe.seed("known", 10)
    assert dedupe.check("known", 9).verdict is Seen.DUPLICATE
    assert dedupe.check("known", 11).verdict is Seen.NEW
    dedupe.forget("known")
    assert dedupe.last("known") is None
    assert dedupe.check("known", 3).verdict is Seen.NEW


def test_deduper_is_bounded_and_evicts_the_least_recent_run() -> None:
    dedupe = Deduper(max_runs=3)
    for run in ("a", "b", "c"):
        dedupe.check(run, 1)
    dedupe.check("a", 2)  # a is now the most recent
    dedupe.check("d", 1)
    assert len(dedupe) == 3
    assert dedupe.last("b") is None
    assert dedupe.last("a") == 2
    with pytest.raises(ValueError):
        Deduper(max_runs=0)


def serve_one_at_a_time(scheduler: PriorityScheduler, available: list[int], n: int) -> list[int]:
    levels: list[int] = []
    left = list(available)
    for _ in range(n):
        step = scheduler.plan(left, 1)
        if not any(step):
            break
        level = step.index(1)
        left[level] -= 1
        levels.append(level)
    return levels


def test_priority_rounds_serve_8_high_4_medium_1_low() -> None:
    assert PriorityScheduler().plan([100, 100, 100], 13) == [8, 4, 1]
    one_by_one = serve_one_at_a_time(PriorityScheduler(), [100, 100, 100], 26)
    assert one_by_one == ([0] * 8 + [1] * 4 + [2]) * 2


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 7, 13, 50])
def test_priority_shares_hold_for_any_batch_size(batch: int) -> None:
    scheduler = PriorityScheduler()
    served = [0, 0, 0]
    for _ in range(13 * 20 // batch):
        for level, n in enumerate(scheduler.plan([10_000, 10_000, 10_000], batch)):
            served[level] += n
    total = sum(served)
    # 8:4:1 within one round's rounding
    assert abs(served[0] - total * 8 / 13) <= 8
    assert abs(served[1] - total * 4 / 13) <= 4
    assert served[2] >= total // 13


def test_low_is_never_starved_by_a_stream_of_high() -> None:
    scheduler = PriorityScheduler()
    low_served_at = []
    for step in range(200):
        # high always has work (new jobs keep arriving), low has one waiting job at a time
        if scheduler.plan([1_000, 0, 1], 1)[2]:
            low_served_at.append(step)
    gaps = [b - a for a, b in pairwise(low_served_at)]
    assert low_served_at and max(gaps) <= 9  # 8 high, then the low one


def test_priority_is_work_conserving() -> None:
    scheduler = PriorityScheduler()
    assert scheduler.plan([0, 0, 30], 20) == [0, 0, 20]
    assert scheduler.plan([0, 7, 30], 20) == [0, 7, 13]
    assert scheduler.plan([3, 0, 0], 20) == [3, 0, 0]
    assert scheduler.plan([0, 0, 0], 20) == [0, 0, 0]
    assert scheduler.plan([5, 5, 5], 0) == [0, 0, 0]


def test_priority_rejects_bad_weights() -> None:
    with pytest.raises(ValueError):
        PriorityScheduler([8, 0, 1])
    with pytest.raises(ValueError):
        PriorityScheduler([]).plan([], 1)
    with pytest.raises(ValueError):
        PriorityScheduler().plan([1, 1], 1)


def job(topic: str, partition: int, offset: int) -> Message:
    return Message(topic, partition, offset, f"run-{partition}", b"{}", {}, 0)


def test_priority_buffer_keeps_partition_order_and_drops_revoked_partitions() -> None:
    topics = ("jobs.high", "jobs.medium", "jobs.low")
    buffer = PriorityBuffer(topics, capacity=4)
    buffer.add([job("jobs.low", 0, o) for o in range(3)])
    buffer.add([job("jobs.high", p, o) for o in range(5) for p in (0, 1)])
    buffer.add([job("jobs.medium", 1, o) for o in range(2)])
    assert buffer.sizes() == [10, 2, 3]
    assert buffer.full_topics() == {"jobs.high"}
    first = buffer.take(11)
    assert [m.topic for m in first] == ["jobs.high"] * 8 + ["jobs.medium"] * 2 + ["jobs.low"]
    for partition in (0, 1):
        offsets = [m.offset for m in first if m.topic == "jobs.high" and m.partition == partition]
        assert offsets == sorted(offsets)
    assert buffer.drop([Partition("jobs.high", 1), Partition("jobs.low", 0)]) == 1 + 2
    rest = buffer.take(100)
    assert [(m.topic, m.partition, m.offset) for m in rest] == [("jobs.high", 0, 4)]
    assert len(buffer) == 0
    with pytest.raises(ValueError, match="none of the priority topics"):
        buffer.add([job("elsewhere", 0, 0)])


def test_message_seq_and_run_id() -> None:
    message = Message("t", 0, 5, "run-1", b"x", {"seq": b"17"}, 0)
    assert (message.run_id, message.seq) == ("run-1", 17)
    assert Message("t", 0, 5, None, b"x", {}, 0).seq is None


def test_kafka_config_defaults_and_toml_shape() -> None:
    config = KafkaConfig()
    assert config.topics == (
        "workflow.events",
        "node.jobs.high",
        "node.jobs.medium",
        "node.jobs.low",
        "node.results",
        "agent.jobs",
        "agent.results",
    )
    assert config.job_topics == ("node.jobs.high", "node.jobs.medium", "node.jobs.low")
    loaded = msgspec.convert(
        {"bootstrap": "k1:9092,k2:9092", "partitions": 24, "consumer": {"session.timeout.ms": 10000}}, KafkaConfig
    )
    assert (loaded.partitions, loaded.consumer) == (24, {"session.timeout.ms": 10000})
    with pytest.raises(msgspec.ValidationError, match="partitons"):
        msgspec.convert({"partitons": 3}, KafkaConfig)


def test_settings_the_bus_depends_on_cannot_be_overridden() -> None:
    config = KafkaConfig(producer={"linger.ms": 20, "acks": -1}, consumer={"fetch.min.bytes": 1})
    conf = _client_conf(config, "producer", {"linger.ms": 5}, PINNED_PRODUCER)
    assert (conf["partitioner"], conf["acks"], conf["linger.ms"]) == ("murmur2_random", "all", 20)
    assert "fetch.min.bytes" not in conf
    config = KafkaConfig(producer={"partitioner": "consistent_random"})
    with pytest.raises(ConfigError, match=r"kafka\.producer\.partitioner"):
        _client_conf(config, "producer", pinned=PINNED_PRODUCER)
    config = KafkaConfig(client={"enable.idempotence": False})
    with pytest.raises(ConfigError, match=r"kafka\.client\.enable\.idempotence"):
        _client_conf(config, "producer", pinned=PINNED_PRODUCER)
