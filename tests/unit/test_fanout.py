"""FanoutHub semantics: per-run routing in seq order, bounded queues that cut off slow subscribers, closing."""

from __future__ import annotations

import asyncio

import pytest

from aobd.api.fanout import FanoutHub, Lagged, Subscription
from aobd.model.events import Event, RunCompleted, TimerFired
from tests.conftest import run_async


def events(run_id: str, first: int, last: int) -> list[Event]:
    return [TimerFired(run_id=run_id, seq=seq, ts=float(seq), node_id=f"n{seq}") for seq in range(first, last + 1)]


async def collect(subscription: Subscription) -> list[Event | Lagged]:
    return [item async for item in subscription]


def seqs(items: list[Event | Lagged]) -> list[int]:
    return [item.seq for item in items if isinstance(item, Event)]


def test_events_arrive_in_seq_order_across_batches() -> None:
    async def main() -> None:
        hub = FanoutHub()
        subscription = hub.subscribe("r1")
        hub.publish(events("r1", 1, 3))
        hub.publish(events("r1", 4, 4))
        hub.publish([*events("r1", 5, 6), RunCompleted(run_id="r1", seq=7, ts=7.0)])
        hub.close()
        items = await collect(subscription)
        assert seqs(items) == [1, 2, 3, 4, 5, 6, 7]
        assert isinstance(items[-1], RunCompleted)

    run_async(main())


def test_repeated_or_stale_events_are_not_yielded_twice() -> None:
    async def main() -> None:
        hub = FanoutHub()
        subscription = hub.subscribe("r1")
        hub.publish(events("r1", 1, 3))
        hub.publish(events("r1", 2, 4))
        hub.publish(events("r1", 1, 1))
        hub.close()
        assert seqs(await collect(subscription)) == [1, 2, 3, 4]

    run_async(main())


def test_only_events_published_after_subscribing_are_seen() -> None:
    async def main() -> None:
        hub = FanoutHub()
        hub.publish(events("r1", 1, 2))
        subscription = hub.subscribe("r1")
        hub.publish(events("r1", 3, 4))
        hub.close()
        assert seqs(await collect(subscription)) == [3, 4]

    run_async(main())


def test_many_subscribers_of_many_runs_get_their_own_runs_events() -> None:
    async def main() -> None:
        hub = FanoutHub()
        a = [hub.subscribe("ra") for _ in range(50)]
        b = [hub.subscribe("rb") for _ in range(50)]
        assert hub.subscriber_count() == 100
        # One batch may carry several runs (the engine's listeners see whatever was committed together).
        for seq in range(1, 21):
            hub.publish([*events("ra", seq, seq), *events("rb", seq, seq), *events("rc", seq, seq)])
        hub.close()
        for subscription in a:
            items = await collect(subscription)
            assert seqs(items) == list(range(1, 21))
            assert {item.run_id for item in items if isinstance(item, Event)} == {"ra"}
        for subscription in b:
            items = await collect(subscription)
            assert {item.run_id for item in items if isinstance(item, Event)} == {"rb"}
        assert hub.subscriber_count() == 0

    run_async(main())


def test_a_waiting_consumer_is_woken_by_publish() -> None:
    async def main() -> None:
        hub = FanoutHub()
        subscription = hub.subscribe("r1")
        consumer = asyncio.ensure_future(collect(subscription))
        for seq in range(1, 6):
            await asyncio.sleep(0)
            hub.publish(events("r1", seq, seq))
        await asyncio.sleep(0)
        assert not consumer.done()
        hub.close()
        assert seqs(await asyncio.wait_for(consumer, 5)) == [1, 2, 3, 4, 5]

    run_async(main())


def test_overflow_marks_the_subscriber_lagged_without_blocking_publish() -> None:
    async def main() -> None:
        hub = FanoutHub(buffer_size=3)
        slow = hub.subscribe("r1")
        fast = hub.subscribe("r1")
        fast_items: list[Event | Lagged] = []
        for seq in range(1, 11):
            # publish is synchronous: returning at all proves it never waited for the slow subscriber.
            hub.publish(events("r1", seq, seq))
            fast_items += fast.drain()
        assert slow.lagged
        assert not fast.lagged
        # The lagged subscriber left the hub at once, so later publishes no longer touch it.
        assert hub.subscriber_count() == 1
        items = await collect(slow)
        assert seqs(items) == [1, 2, 3]
        assert items[-1] == Lagged("r1", 3)
        assert seqs(fast_items) == list(range(1, 11))
        fast.close()
        assert hub.subscriber_count() == 0

    run_async(main())


def test_a_batch_larger_than_the_buffer_lags_at_the_first_event_that_does_not_fit() -> None:
    async def main() -> None:
        hub = FanoutHub(buffer_size=4)
        subscription = hub.subscribe("r1")
        hub.publish(events("r1", 1, 100))
        items = await collect(subscription)
        assert seqs(items) == [1, 2, 3, 4]
        assert items[-1] == Lagged("r1", 4)

    run_async(main())


def test_lagged_before_any_event_reports_seq_zero() -> None:
    async def main() -> None:
        hub = FanoutHub(buffer_size=1)
        subscription = hub.subscribe("r1")
        hub.publish(events("r1", 1, 1))
        assert subscription.drain() == events("r1", 1, 1)
        hub.publish(events("r1", 2, 3))
        assert await collect(subscription) == [*events("r1", 2, 2), Lagged("r1", 2)]

    run_async(main())


def test_subscriber_count_follows_close_and_context_manager() -> None:
    async def main() -> None:
        hub = FanoutHub()
        assert hub.subscriber_count() == 0
        first = hub.subscribe("r1")
        async with hub.subscribe("r1") as second:
            assert hub.subscriber_count() == 2
            assert not second.closed
        assert second.closed
        assert hub.subscriber_count() == 1
        first.close()
        first.close()
        assert hub.subscriber_count() == 0
        hub.publish(events("r1", 1, 1))
        assert first.drain() == []

    run_async(main())


def test_subscription_close_ends_a_waiting_iteration_and_drops_its_queue() -> None:
    async def main() -> None:
        hub = FanoutHub()
        subscription = hub.subscribe("r1")
        consumer = asyncio.ensure_future(collect(subscription))
        await asyncio.sleep(0)
        subscription.close()
        assert await asyncio.wait_for(consumer, 5) == []
        queued = hub.subscribe("r1")
        hub.publish(events("r1", 1, 2))
        queued.close()
        assert await collect(queued) == []

    run_async(main())


def test_hub_close_ends_every_subscription_after_its_queued_events() -> None:
    async def main() -> None:
        hub = FanoutHub()
        idle = hub.subscribe("r1")
        busy = hub.subscribe("r2")
        waiting = asyncio.ensure_future(collect(idle))
        await asyncio.sleep(0)
        hub.publish(events("r2", 1, 2))
        hub.close()
        assert await asyncio.wait_for(waiting, 5) == []
        assert seqs(await collect(busy)) == [1, 2]
        assert not busy.lagged
        assert hub.subscriber_count() == 0
        late = hub.subscribe("r1")
        assert late.closed
        assert hub.subscriber_count() == 0
        assert await collect(late) == []

    run_async(main())


def test_wait_times_out_and_a_cancelled_wait_loses_nothing() -> None:
    async def main() -> None:
        hub = FanoutHub()
        subscription = hub.subscribe("r1")
        assert await subscription.wait(0.01) is False
        waiter = asyncio.ensure_future(subscription.wait())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        hub.publish(events("r1", 1, 1))
        assert await subscription.wait(0.01) is True
        assert seqs(subscription.drain()) == [1]
        subscription.close()

    run_async(main())


def test_publish_without_subscribers_is_a_no_op() -> None:
    hub = FanoutHub()
    hub.publish(events("r1", 1, 1000))
    assert hub.subscriber_count() == 0


def test_buffer_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="buffer_size"):
        FanoutHub(buffer_size=0)
