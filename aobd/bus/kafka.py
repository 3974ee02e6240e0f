"""The Kafka bus: topics, an idempotent keyed producer, manually committed consumer groups, and the policies
(run partitioning, ``(run_id, seq)`` dedupe, priority scheduling) that make at-least-once delivery safe.

Every message is keyed by its ``run_id``, so a run's messages stay in order in one partition and the orchestrator
that owns that partition owns the run (:meth:`KafkaConsumer.owns`). The producer pins the ``murmur2_random``
partitioner: keyed messages then land where the Java clients would put them, and :func:`partition_of` computes the
same partition without asking the broker. Consumers commit offsets only after the caller made the effect durable,
so a crash re-delivers; :class:`Deduper` drops what was already seen and reports gaps for repair from the event log.

The policies at the top of this module are pure (no client, no I/O) and unit-tested without a broker. The client
classes below them bridge ``confluent_kafka`` (librdkafka) to asyncio: blocking calls run on a worker thread,
delivery reports come back through ``loop.call_soon_threadsafe``. ``confluent_kafka`` is imported only when a
client is built (install with ``pip install 'aobd[cluster]'``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

import msgspec
import structlog

# Re-exported: the bus's users import KafkaConfig and BusError from here. Their homes are the one config tree
# and the one error tree, which must not import this module (nor confluent_kafka).
from aobd.config import KafkaConfig
from aobd.errors import BusError, ConfigError

if TYPE_CHECKING:
    import confluent_kafka

log = structlog.get_logger("aobd.bus.kafka")

#: Client settings the bus depends on for correctness; an override of one of them is a configuration error.
PINNED_PRODUCER: Final[Mapping[str, Any]] = {
    # exactly-once per partition and in order, even across retries and broker restarts
    "enable.idempotence": True,
    "acks": "all",
    # keyed messages land where the Java clients put them and where partition_of() says
    "partitioner": "murmur2_random",
}
PINNED_CONSUMER: Final[Mapping[str, Any]] = {
    # offsets move only through commit(), after the effect is durable
    "enable.auto.commit": False,
}


# --- pure policies: partitioning, dedupe, priority scheduling -------------------------------------------------


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (``org.apache.kafka.common.utils.Utils.murmur2``) as an unsigned 32-bit int."""
    m = 0x5BD1E995
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    whole = length & ~3
    for i in range(0, whole, 4):
        k = (int.from_bytes(data[i : i + 4], "little") * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = length - whole
    if tail == 3:
        h ^= data[whole + 2] << 16
    if tail >= 2:
        h ^= data[whole + 1] << 8
    if tail >= 1:
        h ^= data[whole]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def partition_of(run_id: str, partitions: int) -> int:
    """The partition a message keyed by ``run_id`` lands in, among ``partitions``.

    Matches the Java clients' default partitioner and librdkafka's ``murmur2``/``murmur2_random`` for keyed
    messages (which :class:`KafkaProducer` pins): ``(murmur2(key) & 0x7fffffff) % partitions``.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions}")
    return (murmur2(run_id.encode()) & 0x7FFFFFFF) % partitions


class Seen(enum.Enum):
    #: The next seq of the run (or the first seen of it): apply it.
    NEW = "new"
    #: seq at or below the run's high-water mark: already seen, drop it.
    DUPLICATE = "duplicate"
    #: seq beyond the next expected one: the caller reads the missing seqs from the event log first.
    GAP = "gap"


@dataclass(frozen=True, slots=True)
class DedupResult:
    verdict: Seen
    run_id: str
    seq: int
    #: The run's high-water mark before this message (0 when the run was unknown).
    last: int

    @property
    def missing(self) -> range:
        """Seqs skipped before this one (empty unless the verdict is GAP)."""
        return range(self.last + 1, self.seq) if self.verdict is Seen.GAP else range(0)


class Deduper:
    """Drops re-delivered messages by ``(run_id, seq)`` with a bounded high-water mark per run.

    At-least-once delivery means a message may come again (a consumer died before committing, a producer
    retried). Per run, messages arrive in seq order (one partition), so remembering the highest seq seen is
    enough: a seq at or below it is a duplicate, the next one is new, a larger one reveals a gap. A GAP still
    advances the mark to its seq: the caller repairs ``result.missing`` from the event log before using it.

    A run first seen (or forgotten, or evicted) starts at the seq it arrives with; :meth:`seed` sets the mark
    from the event log instead (for example, when a partition is assigned) so that the first re-delivered
    message of a run already applied is recognised. ``max_runs`` bounds memory: the least recently seen runs
    are evicted first.
    """

    def __init__(self, max_runs: int = 100_000) -> None:
        if max_runs < 1:
            raise ValueError("max_runs must be at least 1")
        self.max_runs = max_runs
        self._last: OrderedDict[str, int] = OrderedDict()

    def check(self, run_id: str, seq: int) -> DedupResult:
        """Classify ``seq`` of ``run_id`` and advance the run's mark when it is not a duplicate."""
        last = self._last.get(run_id)
        if last is None:
            self._remember(run_id, seq)
            return DedupResult(Seen.NEW, run_id, seq, 0)
        self._last.move_to_end(run_id)
        if seq <= last:
            return DedupResult(Seen.DUPLICATE, run_id, seq, last)
        self._last[run_id] = seq
        return DedupResult(Seen.NEW if seq == last + 1 else Seen.GAP, run_id, seq, last)

    def seed(self, run_id: str, last_seq: int) -> None:
        """Set the run's mark to ``last_seq`` (the last seq already applied, from the event log)."""
        self._remember(run_id, last_seq)

    def forget(self, run_id: str) -> None:
        """Drop the run's mark (it finished, or its partition moved to another consumer)."""
        self._last.pop(run_id, None)

    def last(self, run_id: str) -> int | None:
        return self._last.get(run_id)

    def __len__(self) -> int:
        return len(self._last)

    def _remember(self, run_id: str, seq: int) -> None:
        self._last[run_id] = seq
        self._last.move_to_end(run_id)
        while len(self._last) > self.max_runs:
            self._last.popitem(last=False)


class PriorityScheduler:
    """Weighted round robin over priority levels: which level the next messages come from.

    A round serves up to ``weights[0]`` messages of level 0 (highest), then up to ``weights[1]`` of level 1, and
    so on, skipping a level with nothing available. Under a backlog at every level the shares are the weights
    (8:4:1 by default), so a lower level is slowed but never starved: it gets at least its weight in every round.
    The position in the round carries over between calls, so serving one message at a time keeps the same shares.
    The scheduler is work-conserving: an empty level's share goes to the others.
    """

    def __init__(self, weights: Sequence[int] = (8, 4, 1)) -> None:
        if not weights or any(w < 1 for w in weights):
            raise ValueError(f"weights must be positive, not {list(weights)}")
        self.weights = tuple(weights)
        self._level = 0
        self._left = self.weights[0]

    def plan(self, available: Sequence[int], max_items: int) -> list[int]:
        """How many messages to take from each level (at most ``max_items`` in all, none beyond ``available``)."""
        if len(available) != len(self.weights):
            raise ValueError(f"{len(available)} levels available, {len(self.weights)} weights")
        left = list(available)
        take = [0] * len(left)
        budget = max_items
        idle = 0  # consecutive levels visited that had nothing: a whole cycle of them ends the plan
        while budget > 0 and idle < len(left):
            level = self._level
            n = min(self._left, left[level], budget)
            if n:
                take[level] += n
                left[level] -= n
                budget -= n
                self._left -= n
                idle = 0
            else:
                idle += 1
            if self._left == 0 or left[level] == 0:
                self._level = (level + 1) % len(self.weights)
                self._left = self.weights[self._level]
        return take


class Partition(NamedTuple):
    topic: str
    partition: int


class Message(msgspec.Struct, frozen=True):
    """A consumed message, detached from the client (safe to keep after the consumer is closed)."""

    topic: str
    partition: int
    offset: int
    #: The message key: the run_id for every aobd message.
    key: str | None
    value: bytes
    headers: dict[str, bytes]
    timestamp_ms: int

    @property
    def run_id(self) -> str | None:
        return self.key

    @property
    def seq(self) -> int | None:
        """The ``seq`` header as an int, when the message carries one."""
        raw = self.headers.get("seq")
        return int(raw) if raw is not None else None


class PriorityBuffer:
    """Fetched job messages held per priority level and served by a :class:`PriorityScheduler`.

    Messages of one partition stay in fetch order (so a run's jobs keep their order). A level holding
    ``capacity`` messages or more is reported by :meth:`full_topics` so that its partitions can be paused:
    otherwise a backlog of low-priority jobs would fill the fetch queue ahead of new high-priority ones.
    """

    def __init__(self, topics: Sequence[str], weights: Sequence[int] = (8, 4, 1), capacity: int = 256) -> None:
        if len(topics) != len(weights):
            raise ValueError(f"{len(topics)} topics but {len(weights)} weights")
        self.topics = tuple(topics)
        self.capacity = capacity
        self.scheduler = PriorityScheduler(weights)
        self._level = {topic: i for i, topic in enumerate(self.topics)}
        self._queues: list[deque[Message]] = [deque() for _ in self.topics]

    def add(self, messages: Iterable[Message]) -> None:
        for message in messages:
            level = self._level.get(message.topic)
            if level is None:
                raise ValueError(f"message of topic {message.topic!r} is none of the priority topics {self.topics}")
            self._queues[level].append(message)

    def take(self, max_messages: int) -> list[Message]:
        plan = self.scheduler.plan([len(q) for q in self._queues], max_messages)
        return [self._queues[level].popleft() for level, n in enumerate(plan) for _ in range(n)]

    def drop(self, partitions: Iterable[Partition]) -> int:
        """Forget the messages of ``partitions`` (revoked: their new owner fetches them again); returns how many."""
        gone = set(partitions)
        dropped = 0
        for i, held in enumerate(self._queues):
            kept = deque(m for m in held if (m.topic, m.partition) not in gone)
            dropped += len(held) - len(kept)
            self._queues[i] = kept
        return dropped

    def full_topics(self) -> set[str]:
        return {topic for topic, held in zip(self.topics, self._queues) if len(held) >= self.capacity}

    def sizes(self) -> list[int]:
        return [len(q) for q in self._queues]

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues)


# --- clients ------------------------------------------------------------------------------------------------


def _confluent() -> ModuleType:
    try:
        import confluent_kafka
    except ImportError as exc:
        raise ConfigError(
            "the Kafka bus needs confluent-kafka, which is not installed: pip install 'aobd[cluster]'"
        ) from exc
    return confluent_kafka


def _client_conf(
    config: KafkaConfig,
    kind: Literal["admin", "producer", "consumer"],
    defaults: Mapping[str, Any] | None = None,
    pinned: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """librdkafka settings of one client: ours, then ``kafka.client``, then ``kafka.<kind>``, then the pinned ones.

    Raises:
        ConfigError: an override contradicts a pinned setting.
    """
    overrides: Mapping[str, Any] = {"admin": {}, "producer": config.producer, "consumer": config.consumer}[kind]
    pinned = pinned or {}
    for key, value in pinned.items():
        for table, given in (("client", config.client), (kind, overrides)):
            if key in given and _setting(given[key]) != _setting(value):
                raise ConfigError(
                    f"kafka.{table}.{key} = {given[key]!r} is not allowed: the bus needs {key} = {value!r}"
                )
    return {
        "bootstrap.servers": config.bootstrap,
        # librdkafka's own log lines go through Python logging (and so through aobd's log setup) instead of
        # straight to stderr; they are delivered by the poll/consume calls.
        "logger": _librdkafka_logger(),
        "error_cb": _log_client_error,
        **(defaults or {}),
        **config.client,
        **overrides,
        **pinned,
    }


def _setting(value: object) -> str:
    text = str(value).strip().lower()
    return "all" if text == "-1" else text  # acks=-1 is acks=all


def _librdkafka_logger() -> Any:
    import logging

    return logging.getLogger("aobd.bus.librdkafka")


def _log_client_error(err: confluent_kafka.KafkaError) -> None:
    # Most client errors are transient (a broker restarting, a connection refused): librdkafka retries them and
    # its own log line already says so. Fatal ones are raised again where they matter (sends, polls).
    if err.fatal():
        log.error("kafka client failed", error=err.str(), code=err.name())
    elif err.code() in _NOTABLE_ERRORS:
        log.warning("kafka client error", error=err.str(), code=err.name())
    else:
        log.debug("kafka client error", error=err.str(), code=err.name())


#: librdkafka error codes worth a warning: no broker reachable, or credentials refused.
_NOTABLE_ERRORS: Final = frozenset({-187, -169, 58})  # _ALL_BROKERS_DOWN, _AUTHENTICATION, SASL_AUTHENTICATION_FAILED


def _topic_partitions(metadata: Any, topic: str) -> int | None:
    found = metadata.topics.get(topic)
    if found is None or found.error is not None:
        return None
    return len(found.partitions)


async def ensure_topics(config: KafkaConfig, *, timeout_s: float = 30.0) -> dict[str, int]:
    """Create every topic of ``config`` that does not exist yet; return each topic's partition count.

    Idempotent: an existing topic is kept. An existing topic with another partition count than
    ``kafka.partitions`` is an error, because the partition of a run would then differ from what
    :func:`partition_of` computes.

    Raises:
        ConfigError: a topic exists with a different partition count.
        BusError: the brokers did not answer or refused to create a topic.
    """
    ck = _confluent()
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(_client_conf(config, "admin"))
    try:
        metadata = await asyncio.to_thread(admin.list_topics, timeout=timeout_s)
        missing = [topic for topic in config.topics if _topic_partitions(metadata, topic) is None]
        if missing:
            futures = admin.create_topics(
                [NewTopic(topic, config.partitions, config.replication_factor) for topic in missing],
                request_timeout=timeout_s,
            )
            for topic, future in futures.items():
                try:
                    await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
                except ck.KafkaException as exc:
                    # another process may have created it between our metadata read and our request
                    if exc.args[0].code() != ck.KafkaError.TOPIC_ALREADY_EXISTS:
                        raise BusError(f"creating Kafka topic {topic!r} failed: {exc.args[0].str()}") from exc
            metadata = await asyncio.to_thread(admin.list_topics, timeout=timeout_s)
    except ck.KafkaException as exc:
        raise BusError(f"Kafka at {config.bootstrap} did not answer: {exc.args[0].str()}") from exc
    except TimeoutError as exc:
        raise BusError(f"Kafka at {config.bootstrap} did not create the topics within {timeout_s}s") from exc
    counts: dict[str, int] = {}
    for topic in config.topics:
        count = _topic_partitions(metadata, topic)
        if count is None:
            raise BusError(f"Kafka topic {topic!r} still does not exist after it was created")
        if count != config.partitions:
            raise ConfigError(
                f"kafka.partitions = {config.partitions} but topic {topic!r} has {count} partitions; set"
                f" kafka.partitions = {count} (a run's partition must not change while it is in flight)"
            )
        counts[topic] = count
    return counts


class Delivery(NamedTuple):
    """Where the broker stored an acknowledged message."""

    topic: str
    partition: int
    offset: int


class KafkaProducer:
    """An idempotent producer; :meth:`send` resolves when the broker acknowledged the message (``acks=all``).

    librdkafka batches and retries on its own thread; a poll thread here serves its delivery reports and hands
    each to the event loop of its sender. Safe to share between tasks of one loop. Messages of a run are stored
    in the order of the ``send`` calls, also when several are in flight (tasks started in that order) and across
    retries: pipelining sends by creating tasks keeps a run's order.
    """

    def __init__(self, config: KafkaConfig) -> None:
        ck = _confluent()
        self.config = config
        conf = _client_conf(config, "producer", {"linger.ms": 5}, PINNED_PRODUCER)
        conf["error_cb"] = self._on_error
        self._producer = ck.Producer(conf)
        self._fatal: str | None = None
        self._pending: set[asyncio.Future[Delivery]] = set()
        self._turn = asyncio.Lock()
        self._queued_senders = 0
        self._closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_reports, name="aobd-kafka-producer", daemon=True)
        self._thread.start()

    def _on_error(self, err: confluent_kafka.KafkaError) -> None:
        if err.fatal():
            # an idempotent producer that lost its guarantees stops for good; sends fail from now on
            self._fatal = err.str()
        _log_client_error(err)

    def _serve_reports(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.1)

    async def send(
        self,
        topic: str,
        key: str,
        value: bytes,
        headers: Mapping[str, bytes | str] | None = None,
        *,
        seq: int | None = None,
    ) -> Delivery:
        """Send ``value`` keyed by ``key`` (a run_id) and wait until the broker acknowledged it.

        Args:
            headers: extra headers; values are bytes or UTF-8 strings.
            seq: the message's position in its run, sent as the ``seq`` header (``Message.seq``).

        Raises:
            BusError: the message was not delivered (``message.timeout.ms`` passed, or the producer failed fatally).
        """
        if self._closed:
            raise BusError("send on a closed Kafka producer")
        if self._fatal is not None:
            raise BusError(f"the Kafka producer failed and cannot send: {self._fatal}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Delivery] = loop.create_future()

        def on_delivery(err: confluent_kafka.KafkaError | None, msg: confluent_kafka.Message) -> None:
            # runs on the poll thread; msg is only valid during this call, so copy what the sender needs
            if err is not None:
                result: Delivery | BusError = BusError(f"Kafka did not acknowledge a message to {topic!r}: {err.str()}")
            else:
                result = Delivery(topic, msg.partition() or 0, msg.offset() or 0)
            with contextlib.suppress(RuntimeError):  # the sender's loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, future, result)

        wire_headers = [
            (name, value.encode() if isinstance(value, str) else value) for name, value in (headers or {}).items()
        ]
        if seq is not None:
            wire_headers.append(("seq", str(seq).encode()))

        def produce() -> None:
            self._producer.produce(
                topic, value=value, key=key.encode(), headers=wire_headers or None, on_delivery=on_delivery
            )

        if self._queued_senders:
            await self._produce_in_turn(produce)
        else:
            try:
                produce()
            except BufferError:
                await self._produce_in_turn(produce)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return await future

    async def _produce_in_turn(self, produce: Callable[[], None]) -> None:
        # librdkafka's local queue is full (queue.buffering.max.messages). Senders wait for deliveries to drain it
        # in FIFO order (asyncio.Lock is fair), and later sends queue behind them: a run's messages keep the order
        # in which send() was called.
        self._queued_senders += 1
        try:
            async with self._turn:
                while True:
                    try:
                        produce()
                        return
                    except BufferError:
                        await asyncio.sleep(0.005)
        finally:
            self._queued_senders -= 1

    async def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every message sent so far is acknowledged or failed.

        Raises:
            BusError: messages were still unacknowledged after ``timeout_s``.
        """
        left = await asyncio.to_thread(self._producer.flush, timeout_s)
        if left:
            raise BusError(f"{left} Kafka messages were not acknowledged within {timeout_s}s")
        if self._pending:  # reports already taken from librdkafka but not yet handed to their futures
            await asyncio.wait(list(self._pending), timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued (up to ``timeout_s``, blocking) and release the client. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join()
        left = self._producer.flush(timeout_s)
        if left:
            log.warning("kafka producer closed with unacknowledged messages", messages=left)
        self._producer.close()


def _settle(future: asyncio.Future[Delivery], result: Delivery | BusError) -> None:
    if future.done():  # the sender was cancelled
        return
    if isinstance(result, BusError):
        future.set_exception(result)
    else:
        future.set_result(result)


#: A rebalance hook: awaited on the consumer's event loop with the partitions assigned or revoked.
RebalanceHook = Callable[[frozenset[Partition]], Awaitable[None]]


def _message(raw: confluent_kafka.Message) -> Message:
    key = raw.key()
    raw_headers = raw.headers() or []  # consumed messages carry a list of (name, bytes | None)
    pairs = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
    headers = {name: value.encode() if isinstance(value, str) else value or b"" for name, value in pairs}
    return Message(
        topic=raw.topic() or "",
        partition=raw.partition() or 0,
        offset=raw.offset() or 0,
        key=key.decode() if key is not None else None,
        value=raw.value() or b"",
        headers=headers,
        timestamp_ms=raw.timestamp()[1],
    )


class KafkaConsumer:
    """A member of a consumer group with manual commits, bridged to asyncio.

    ``poll_batch`` runs the blocking fetch on this consumer's own thread. Nothing is committed automatically:
    call :meth:`commit` once the effect of the messages is durable, so a crash before that re-delivers them
    (at-least-once) to whichever member owns the partition next.

    The rebalance hooks run on the event loop while the group waits for them: in ``on_revoke`` the partitions are
    still owned, so work of their runs can be finished or committed before another member takes them over. A hook
    may ``commit``, ``pause`` or ``resume``, but not ``poll_batch`` (the poll it runs inside is waiting for it).

    Use as ``async with KafkaConsumer(...) as consumer:`` or call :meth:`close`.
    """

    def __init__(
        self,
        config: KafkaConfig,
        topics: Sequence[str],
        group_id: str | None = None,
        *,
        on_assign: RebalanceHook | None = None,
        on_revoke: RebalanceHook | None = None,
        hook_timeout_s: float = 30.0,
    ) -> None:
        ck = _confluent()
        self._ck = ck
        self.config = config
        self.topics = tuple(topics)
        self.group_id = group_id or config.group_id
        self.on_assign = on_assign
        self.on_revoke = on_revoke
        self.hook_timeout_s = hook_timeout_s
        defaults = {
            "auto.offset.reset": "earliest",  # a new group starts at the oldest message: no job is skipped
            # range gives a member the same partition numbers of every topic it reads, so a run's events, jobs
            # and results (same key, same partition count) reach the same orchestrator
            "partition.assignment.strategy": "range",
        }
        conf = _client_conf(config, "consumer", defaults, PINNED_CONSUMER)
        conf["group.id"] = self.group_id
        self._consumer = ck.Consumer(conf)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="aobd-kafka-consumer")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._assigned: set[Partition] = set()
        self._partition_counts: dict[str, int] = {}
        self._late: list[confluent_kafka.Message] = []
        self._relay: queue.SimpleQueue[_Relayed | None] | None = None
        self._closed = False
        self._consumer.subscribe(
            list(self.topics), on_assign=self._assigned_cb, on_revoke=self._revoked_cb, on_lost=self._revoked_cb
        )

    async def __aenter__(self) -> KafkaConsumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # rebalance callbacks: librdkafka calls them on the consumer's thread, inside consume() or close()

    def _assigned_cb(self, consumer: Any, partitions: list[confluent_kafka.TopicPartition]) -> None:
        parts = frozenset(Partition(tp.topic, tp.partition) for tp in partitions)
        with self._lock:
            self._assigned |= parts
        self._run_hook(self.on_assign, parts)

    def _revoked_cb(self, consumer: Any, partitions: list[confluent_kafka.TopicPartition]) -> None:
        parts = frozenset(Partition(tp.topic, tp.partition) for tp in partitions)
        # the hook runs while the partitions are still ours; they are gone when it returns
        self._run_hook(self.on_revoke, parts)
        with self._lock:
            self._assigned -= parts

    def _run_hook(self, hook: RebalanceHook | None, parts: frozenset[Partition]) -> None:
        loop = self._loop
        if hook is None or loop is None or loop.is_closed():
            return
        # While a rebalance callback runs, librdkafka holds a commit from any other thread until the callback
        # returns, so a hook's commit would wait for the hook. The hook's commits are relayed to this thread instead
        # and run here, inside the callback, where librdkafka allows them.
        relay: queue.SimpleQueue[_Relayed | None] = queue.SimpleQueue()
        with self._lock:
            self._relay = relay
        try:
            asyncio.run_coroutine_threadsafe(_call_hook(hook, parts, relay, self.group_id), loop)
            deadline = time.monotonic() + self.hook_timeout_s
            while True:
                try:
                    item = relay.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    log.error("kafka rebalance hook timed out", group=self.group_id, seconds=self.hook_timeout_s)
                    break
                if item is None:  # the hook returned
                    break
                item.run()
        finally:
            with self._lock:
                self._relay = None
            # commits relayed just before the relay closed
            while True:
                try:
                    item = relay.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item.run()

    def assigned_partitions(self) -> frozenset[Partition]:
        """The partitions this member owns now."""
        with self._lock:
            return frozenset(self._assigned)

    def owns(self, run_id: str, topic: str | None = None) -> bool:
        """Whether this member owns the partition of ``run_id`` in ``topic`` (default: its first topic)."""
        topic = topic or self.topics[0]
        count = self._partition_counts.get(topic)
        if count is None:  # nothing of that topic was ever assigned here
            return False
        return Partition(topic, partition_of(run_id, count)) in self.assigned_partitions()

    async def poll_batch(self, max_messages: int = 500, timeout_s: float = 1.0) -> list[Message]:
        """Up to ``max_messages`` messages, waiting up to ``timeout_s`` for the first one.

        Also where the group's rebalances happen (and so where the hooks are called): poll regularly, at the
        latest every ``max.poll.interval.ms``, or the group evicts this member.

        Raises:
            BusError: the consumer failed fatally.
        """
        if self._closed:
            raise BusError("poll on a closed Kafka consumer")
        loop = self._loop = asyncio.get_running_loop()
        if self._late:
            raw, self._late = self._late, []
        else:
            fetch = loop.run_in_executor(self._executor, self._fetch, max_messages, timeout_s)
            try:
                raw = await asyncio.shield(fetch)
            except asyncio.CancelledError:
                # the consumer's position already moved past what this fetch returns: keep it for the next poll
                fetch.add_done_callback(self._keep_late)
                raise
        out: list[Message] = []
        for message in raw:
            err = message.error()
            if err is None:
                out.append(_message(message))
            elif err.fatal():
                raise BusError(f"the Kafka consumer of group {self.group_id!r} failed: {err.str()}")
            else:
                log.warning("kafka consumer error", group=self.group_id, error=err.str())
        return out

    def _fetch(self, max_messages: int, timeout_s: float) -> list[confluent_kafka.Message]:
        # consume(n, timeout) would wait for all n messages; an orchestrator wants what is there as soon as there
        # is something: wait for one message, then take what is already queued behind it.
        if not self._partition_counts:
            self._load_partition_counts()
        first = self._consumer.poll(timeout_s)
        if first is None:
            return []
        return [first, *self._consumer.consume(max_messages - 1, 0)] if max_messages > 1 else [first]

    def _load_partition_counts(self) -> None:
        # Not from a rebalance callback: a client call nested in a callback breaks confluent-kafka's per-thread
        # call state, and the next callback of the same poll aborts the process (CallState_get assertion).
        counts = dict.fromkeys(self.topics, self.config.partitions)
        try:
            metadata = self._consumer.list_topics(timeout=10)
        except self._ck.KafkaException as exc:
            log.warning("kafka metadata unavailable", group=self.group_id, error=exc.args[0].str())
        else:
            for topic in self.topics:
                counts[topic] = _topic_partitions(metadata, topic) or counts[topic]
        self._partition_counts = counts

    def _keep_late(self, fetch: asyncio.Future[list[confluent_kafka.Message]]) -> None:
        if not fetch.cancelled() and fetch.exception() is None:
            self._late.extend(fetch.result())

    async def commit(self, messages: Iterable[Message]) -> None:
        """Commit the offsets past ``messages``: call it only after their effect is durable.

        Commits, per partition, the offset after the highest one among ``messages``, so every earlier message
        of that partition counts as done too: commit in partition order.

        Raises:
            BusError: the commit failed (for example, the partition was revoked meanwhile: its new owner will
                receive the messages again, and dedupe drops what was already applied).
        """
        next_offsets: dict[Partition, int] = {}
        for message in messages:
            key = Partition(message.topic, message.partition)
            next_offsets[key] = max(next_offsets.get(key, 0), message.offset + 1)
        if not next_offsets:
            return
        offsets = [self._ck.TopicPartition(p.topic, p.partition, o) for p, o in next_offsets.items()]

        def commit() -> None:
            self._consumer.commit(offsets=offsets, asynchronous=False)

        with self._lock:
            relay = self._relay
            if relay is not None:  # inside a rebalance: the callback's thread commits (see _run_hook)
                relayed = _Relayed(commit)
                relay.put(relayed)
        try:
            if relay is not None:
                await asyncio.wrap_future(relayed.future)
            else:
                # not on the consumer's own thread, which may be blocked in a poll
                await asyncio.to_thread(commit)
        except self._ck.KafkaException as exc:
            raise BusError(f"committing Kafka offsets of group {self.group_id!r} failed: {exc.args[0].str()}") from exc

    def pause(self, partitions: Iterable[Partition]) -> None:
        """Stop fetching ``partitions`` (what librdkafka prefetched of them is discarded and fetched again later)."""
        self._pause_resume(self._consumer.pause, partitions)

    def resume(self, partitions: Iterable[Partition]) -> None:
        self._pause_resume(self._consumer.resume, partitions)

    def _pause_resume(self, call: Callable[[list[Any]], None], partitions: Iterable[Partition]) -> None:
        tps = [self._ck.TopicPartition(p.topic, p.partition) for p in partitions]
        if tps:
            try:
                call(tps)
            except self._ck.KafkaException as exc:  # a partition revoked meanwhile
                log.warning("kafka pause/resume failed", group=self.group_id, error=exc.args[0].str())

    async def close(self) -> None:
        """Leave the group (running the revoke hook) and release the client. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._loop = asyncio.get_running_loop()
        try:
            await self._loop.run_in_executor(self._executor, self._consumer.close)
        finally:
            self._executor.shutdown(wait=True)


class _Relayed:
    """A call handed to the thread that runs a rebalance callback."""

    def __init__(self, call: Callable[[], None]) -> None:
        self.call = call
        self.future: concurrent.futures.Future[None] = concurrent.futures.Future()

    def run(self) -> None:
        try:
            self.call()
        except BaseException as exc:  # handed to the awaiting task, which raises it
            self.future.set_exception(exc)
        else:
            self.future.set_result(None)


async def _call_hook(
    hook: RebalanceHook, parts: frozenset[Partition], relay: queue.SimpleQueue[_Relayed | None], group: str
) -> None:
    try:
        await hook(parts)
    except Exception:
        # raising would surface inside librdkafka's rebalance; the group must go on
        log.exception("kafka rebalance hook failed", group=group)
    finally:
        relay.put(None)


class PriorityJobConsumer:
    """Node jobs from the high, medium and low topics, served by weight (8:4:1 by default) so that low is never
    starved; see :class:`PriorityScheduler`.

    One consumer reads the three topics; fetched messages wait in a :class:`PriorityBuffer`, and the partitions of
    a level whose buffer is full are paused so that its backlog cannot delay the other levels. Messages of
    revoked partitions are dropped from the buffer (their new owner fetches them again).
    """

    def __init__(
        self,
        config: KafkaConfig,
        group_id: str | None = None,
        *,
        weights: Sequence[int] = (8, 4, 1),
        buffer_per_priority: int = 256,
        on_assign: RebalanceHook | None = None,
        on_revoke: RebalanceHook | None = None,
    ) -> None:
        self.topics = config.job_topics
        self.buffer = PriorityBuffer(self.topics, weights, buffer_per_priority)
        self._user_assign = on_assign
        self._user_revoke = on_revoke
        self._paused: set[Partition] = set()
        self.consumer = KafkaConsumer(config, self.topics, group_id, on_assign=self._assigned, on_revoke=self._revoked)

    async def __aenter__(self) -> PriorityJobConsumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _assigned(self, parts: frozenset[Partition]) -> None:
        self._paused -= parts  # a newly assigned partition starts unpaused
        if self._user_assign is not None:
            await self._user_assign(parts)

    async def _revoked(self, parts: frozenset[Partition]) -> None:
        self._paused -= parts
        self.buffer.drop(parts)
        if self._user_revoke is not None:
            await self._user_revoke(parts)

    async def fetch(self, timeout_s: float = 0.0) -> int:
        """Move fetched messages into the buffer (waiting up to ``timeout_s`` for some); returns the buffer size."""
        # Always fetch, even with a full buffer: full levels are paused, so what comes is from the others (a new
        # high job behind a low backlog). A level thus holds at most capacity plus one fetch.
        self.buffer.add(await self.consumer.poll_batch(self.buffer.capacity, timeout_s))
        self._apply_backpressure()
        return len(self.buffer)

    def _apply_backpressure(self) -> None:
        full = self.buffer.full_topics()
        wanted = {p for p in self.consumer.assigned_partitions() if p.topic in full}
        self.consumer.pause(wanted - self._paused)
        self.consumer.resume(self._paused - wanted)
        self._paused = wanted

    async def poll_batch(self, max_messages: int = 100, timeout_s: float = 1.0) -> list[Message]:
        """The next jobs by priority: up to ``max_messages``, waiting up to ``timeout_s`` when none is buffered."""
        await self.fetch(0.0 if len(self.buffer) else timeout_s)
        return self.buffer.take(max_messages)

    async def commit(self, messages: Iterable[Message]) -> None:
        """Commit jobs whose effect is durable; see :meth:`KafkaConsumer.commit`."""
        await self.consumer.commit(messages)

    async def close(self) -> None:
        await self.consumer.close()
