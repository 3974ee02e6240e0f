"""Each daemon's outbox relay, without Postgres or a broker: it claims the rows of the partitions it holds, stops
claiming a partition as soon as it is revoked (the claim in flight is still published and marked), counts what it
relayed by partition, and publishes what is left of its partitions when it leaves. The claim's own rules (order
across relays, leases, rows without a partition) are tested on Postgres in tests/integration/test_store_postgres.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from aobd.bus.kafka import KafkaConfig, Partition
from aobd.cluster.coordinator import RELAY_POLL_S, ClusterCoordinator, Outbox
from aobd.engine.driver import Engine
from aobd.store.memory import MemoryCas, MemoryEventLog
from aobd.store.postgres import NO_PARTITION, OutboxEntry
from aobd.store.protocols import EventRecord
from perf.w6 import w6_document
from tests.conftest import run_async

CONFIG = KafkaConfig(partitions=3)


class MemoryOutbox(MemoryEventLog):
    """Outbox rows in memory; a claim hands out the unclaimed rows of its partitions (0's include NO_PARTITION)."""

    outbox = True

    def __init__(self) -> None:
        super().__init__()
        self.outbox_partition_of: Callable[[str], int] | None = None
        self.rows: list[OutboxEntry] = []
        self.claimed: set[int] = set()
        self.published: set[int] = set()
        self.claims: list[frozenset[int]] = []
        self._changed = asyncio.Event()

    async def until(self, condition: Callable[[], object]) -> None:
        """Wait (up to 5 s) until ``condition`` holds after a claim or a mark."""
        async with asyncio.timeout(5.0):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def add(self, run_id: str, seq: int, partition: int) -> int:
        entry = OutboxEntry(len(self.rows) + 1, EventRecord(run_id, seq, "step", 0.0, b"{}"), partition)
        self.rows.append(entry)
        return entry.id

    def _of(self, entry: OutboxEntry, partitions: Collection[int]) -> bool:
        return entry.partition in partitions or (entry.partition == NO_PARTITION and 0 in partitions)

    async def claim_outbox(
        self, limit: int = 500, *, lease: float = 30.0, partitions: Collection[int]
    ) -> list[OutboxEntry]:
        self.claims.append(frozenset(partitions))
        taken = [e for e in self.rows if e.id not in self.claimed and self._of(e, partitions)][:limit]
        self.claimed.update(e.id for e in taken)
        self._changed.set()
        return taken

    async def mark_published(self, ids: Iterable[int]) -> int:
        new = set(ids) - self.published
        self.published |= new
        self._changed.set()
        return len(new)

    async def outbox_backlog(self, partitions: Collection[int]) -> int:
        return sum(1 for e in self.rows if e.id not in self.published and self._of(e, partitions))


class GatedProducer:
    """Acknowledges a message once its gate is open."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.sent: list[tuple[str, int | None]] = []

    async def send(
        self, topic: str, key: str, value: bytes, headers: Mapping[str, bytes | str] | None = None, *, seq: int | None
    ) -> None:
        await self.gate.wait()
        self.sent.append((key, seq))

    def close(self) -> None:
        pass


def test_the_memory_outbox_is_an_outbox() -> None:
    assert isinstance(MemoryOutbox(), Outbox)
    assert not isinstance(MemoryEventLog(), Outbox)


def test_a_daemon_relays_its_partitions_and_stops_claiming_a_revoked_one_at_once() -> None:
    async def main() -> None:
        log = MemoryOutbox()
        coordinator = ClusterCoordinator(Engine(log, MemoryCas()), CONFIG, "d1")
        producer = GatedProducer()
        coordinator._producer = producer  # type: ignore[assignment]
        coordinator._owned = {0, 1}
        a1, b1 = log.add("a", 1, 0), log.add("b", 1, 1)
        log.add("c", 1, 2)  # another daemon's
        legacy = log.add("old", 1, NO_PARTITION)  # written before the partition count was known: 0's
        coordinator.start_relay()
        await log.until(lambda: log.claims)
        assert log.claims == [{0, 1}] and log.claimed == {a1, b1, legacy}

        # Partition 1 moves while its rows are being published.
        await coordinator._revoked(frozenset({Partition(CONFIG.results_topic, 1)}))
        b2, a2 = log.add("b", 2, 1), log.add("a", 2, 0)
        producer.gate.set()
        await log.until(lambda: a2 in log.published)
        assert {a1, b1, legacy} <= log.published  # the claim in flight finished
        assert b2 not in log.claimed  # partition 1's new owner relays it
        assert set(log.claims[1:]) == {frozenset({0})}
        assert producer.sent == [("a", 1), ("b", 1), ("old", 1), ("a", 2)]
        status = coordinator.status()
        assert status["outbox_relayed"] == 4
        assert status["outbox_relayed_by_partition"] == {"0": 3, "1": 1}

        # Leaving: what is left of the partitions still held goes out first.
        a3 = log.add("a", 3, 0)
        await coordinator.close(flush_s=5.0)
        assert a3 in log.published and b2 not in log.published
        assert coordinator._relay_task.done()

    run_async(main())


def test_a_daemon_without_partitions_claims_nothing_and_leaves_at_once() -> None:
    async def main() -> None:
        log = MemoryOutbox()
        log.add("a", 1, 0)
        coordinator = ClusterCoordinator(Engine(log, MemoryCas()), CONFIG, "d1")
        coordinator._producer = GatedProducer()  # type: ignore[assignment]
        coordinator.start_relay()
        await asyncio.sleep(0.05)
        await coordinator.close(flush_s=5.0)
        assert log.claims == [] and log.published == set()

    run_async(main())


class AppendingOutbox(MemoryOutbox):
    """Every append also writes its outbox rows, as the Postgres log does in the same transaction."""

    async def append(self, run_id: str, records: Sequence[EventRecord], **kwargs: Any) -> None:
        await super().append(run_id, records, **kwargs)
        for record in records:
            self.add(run_id, record.seq, 0)


def test_a_commit_wakes_an_idle_relay_before_its_poll() -> None:
    async def main() -> None:
        log = AppendingOutbox()
        engine = Engine(log, MemoryCas())
        coordinator = ClusterCoordinator(engine, CONFIG, "d1")
        producer = GatedProducer()
        producer.gate.set()
        coordinator._producer = producer  # type: ignore[assignment]
        coordinator._owned = {0}
        coordinator.start_relay()
        await log.until(lambda: log.claims)  # claimed nothing: now idle until a commit or the poll

        started = time.monotonic()
        await engine.run(w6_document(), {"x": 1})
        await log.until(lambda: log.rows and {e.id for e in log.rows} == log.published)
        assert time.monotonic() - started < RELAY_POLL_S / 2
        assert [seq for _, seq in producer.sent] == [e.record.seq for e in log.rows]
        await coordinator.close(flush_s=5.0)
        await engine.close()

    run_async(main())
