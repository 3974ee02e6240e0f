"""In-process fanout of committed run events to live subscribers (SSE and WebSocket streams).

The engine calls :meth:`FanoutHub.publish` with every committed batch, on its own path to the next step, so
publishing must never wait: each subscriber has a bounded queue, and one that falls ``buffer_size`` events
behind is cut off with a :class:`Lagged` marker instead of slowing the run or growing without bound. A lagged
client resumes from the event log (``Last-Event-ID``), which holds everything it missed.

The hub is loop-bound: call every method from the thread running the event loop the subscribers iterate on.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from aobd.model.events import Event

__all__ = ["FanoutHub", "Lagged", "RunTracker", "Subscription"]


class RunTracker(Protocol):
    """Follows which runs a hub has subscriptions to (see ``FanoutHub(tracker=...)``)."""

    def watch(self, run_id: str) -> None: ...

    def unwatch(self, run_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Lagged:
    """Last item of a subscription that fell behind: later events of the run were not queued for it.

    Attributes:
        run_id: The run subscribed to.
        last_seq: Seq of the last event the subscription yielded before this marker (0 if none): resume
            reading the log after it.
    """

    run_id: str
    last_seq: int


class Subscription:
    """Live events of one run, in seq order, from the moment of subscribing; made by :meth:`FanoutHub.subscribe`.

    Iterate it (``async for``) to get :class:`~aobd.model.events.Event` objects; iteration ends when the hub
    closes, when :meth:`close` is called, or after a final :class:`Lagged` when the subscriber fell behind.
    It has one consumer: only one task may wait on it at a time.
    """

    def __init__(self, hub: FanoutHub, run_id: str, buffer_size: int) -> None:
        self.run_id = run_id
        self._hub: FanoutHub | None = hub
        self._capacity = buffer_size
        self._queue: deque[Event | Lagged] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._lagged = False
        self._last_seq = 0

    @property
    def lagged(self) -> bool:
        """Whether the subscription was cut off for falling behind."""
        return self._lagged

    @property
    def closed(self) -> bool:
        """Whether no more events will be queued (items already queued can still be read)."""
        return self._ended

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event | Lagged:
        while not self._queue:
            if self._ended:
                raise StopAsyncIteration
            await self.wait()
        return self._queue.popleft()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def drain(self) -> list[Event | Lagged]:
        """Take every queued item without waiting (possibly none): lets a writer batch a burst into one send."""
        items = list(self._queue)
        self._queue.clear()
        return items

    async def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until an item is queued or the subscription has ended, at most ``timeout_s`` seconds.

        Cancelling the wait loses nothing: items stay queued until read.

        Returns:
            True when an item is ready or the subscription has ended (then :meth:`drain` returns what is
            left, possibly nothing), False when the timeout passed first.
        """
        if self._queue or self._ended:
            return True
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout_s, _wake, waiter) if timeout_s is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        return bool(self._queue) or self._ended

    def close(self) -> None:
        """Stop the subscription now and drop whatever is queued; an ``async for`` on it ends. Idempotent."""
        self._queue.clear()
        self._end()

    # ------------------------------------------------------------------ called by the hub

    def _offer(self, event: Event) -> None:
        # Strictly increasing seqs: a batch delivered twice (or out of order) must not repeat events.
        if self._ended or event.seq <= self._last_seq:
            return
        if len(self._queue) >= self._capacity:
            # The marker takes one slot beyond capacity so that it is always delivered.
            self._lagged = True
            self._queue.append(Lagged(self.run_id, self._last_seq))
            self._end()
            return
        self._queue.append(event)
        self._last_seq = event.seq
        if self._waiter is not None:
            _wake(self._waiter)

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._hub is not None:
            self._hub._remove(self)
            self._hub = None
        if self._waiter is not None:
            _wake(self._waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class FanoutHub:
    """Routes committed events to the subscriptions of their run.

    Args:
        buffer_size: Events a subscription may hold unread before it is cut off as lagged. Bounds the memory
            a slow client can pin (about ``buffer_size`` events per subscriber).
        tracker: Told when a run gains its first subscription (before :meth:`subscribe` returns, so before the
            stream reads the log) and when it loses its last: an accept worker's
            :class:`~aobd.planes.watched.WatchedRuns`, which lets the orchestrators publish only watched runs.
    """

    def __init__(self, buffer_size: int = 1024, *, tracker: RunTracker | None = None) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, not {buffer_size}")
        self.buffer_size = buffer_size
        self.tracker = tracker
        self._runs: dict[str, set[Subscription]] = {}
        self._count = 0
        self._closed = False

    def publish(self, events: Sequence[Event]) -> None:
        """Queue ``events`` for the subscribers of their runs. Never blocks and never raises for a subscriber.

        Installed as an engine listener (``engine.listeners.append(hub.publish)``): called with each committed
        batch, in commit order per run; a batch may hold events of several runs.
        """
        if not self._count:
            # The common case on a busy engine: nobody is watching, so publishing costs one check per batch.
            return
        runs = self._runs
        for event in events:
            subscribers = runs.get(event.run_id)
            if subscribers:
                # A copy: a subscriber that lags leaves the set while we iterate.
                for subscription in tuple(subscribers):
                    subscription._offer(event)

    def subscribe(self, run_id: str) -> Subscription:
        """A subscription to the events of ``run_id`` published from now on.

        Earlier events are not included: read them from the event log *after* subscribing, and skip the seqs
        seen twice, so that nothing falls between the two. After :meth:`close`, the subscription is already
        ended.
        """
        subscription = Subscription(self, run_id, self.buffer_size)
        if self._closed:
            subscription._end()
            return subscription
        subscribers = self._runs.get(run_id)
        if subscribers is None:
            subscribers = self._runs[run_id] = set()
            if self.tracker is not None:
                self.tracker.watch(run_id)
        subscribers.add(subscription)
        self._count += 1
        return subscription

    def watching(self, run_id: str) -> bool:
        """Whether any subscription follows ``run_id``: lets a remote feed skip decoding events nobody reads."""
        return run_id in self._runs

    def subscriber_count(self) -> int:
        """The number of open subscriptions over all runs."""
        return self._count

    def close(self) -> None:
        """End every subscription (each still yields what it had queued) and refuse new ones."""
        self._closed = True
        for subscribers in list(self._runs.values()):
            for subscription in tuple(subscribers):
                subscription._end()

    def _remove(self, subscription: Subscription) -> None:
        subscribers = self._runs.get(subscription.run_id)
        if subscribers is None or subscription not in subscribers:
            return
        subscribers.discard(subscription)
        self._count -= 1
        if not subscribers:
            del self._runs[subscription.run_id]
            if self.tracker is not None:
                self.tracker.unwatch(subscription.run_id)
