"""Admission of new runs: how many runs one engine computes at once, and the order the others start in.

At saturation, a run's hop (one node's end to the next one's start) is Little's law: the runs in flight over the
steps the loop completes per second. Past the loop's capacity, each run added only lengthens every run's hops:
in-process W6 at 256 runs in flight ran no faster than at 64, and its hops took four times as long
(docs/performance.md). So an engine computes at most ``limit`` runs at once. A new run waits, before anything of
it is recorded, until a computing run finishes or gives its place up by waiting on something outside the loop:
a runner, an HTTP call, an agent, a child run, an approval, a timer. A run that comes back from such a wait
carries on at once, ahead of every waiting new run, so a run started is never slowed by the runs that arrive
after it. Waiting runs start highest priority first, and in arrival order within a priority.

Every method is called from the event loop's thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from aobd.errors import Unavailable

#: ``[engine] max_computing_runs``. On 2 cores, W6 over HTTP/2 at 256 runs in flight ran 6% and 22% faster with 128
#: than with 64 (two alternated pairs) and as fast as with no limit, at hops of 4.3-4.8 ms p50 against 7.5-8.2 with
#: no limit (docs/performance.md, tuning/planes.md).
DEFAULT_LIMIT: Final = 128
#: From the highest priority to the lowest (``POST /v1/runs`` ``priority``).
PRIORITIES: Final = ("high", "medium", "low")


class Admission:
    """Places for computing runs: ``limit`` of them (0: no limit), handed on to waiting runs as they free up."""

    __slots__ = ("_queues", "admitted_after_wait", "computing", "limit", "wait_seconds")

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"an admission limit is 0 (none) or more, not {limit}")
        self.limit = limit
        #: Places taken now: runs admitted that neither finished nor gave theirs up.
        self.computing = 0
        self._queues: dict[str, deque[asyncio.Future[None]]] = {p: deque() for p in PRIORITIES}
        #: Runs that had to wait for their place, and how long they waited in all (seconds).
        self.admitted_after_wait = 0
        self.wait_seconds = 0.0

    def waiting(self) -> int:
        """Runs waiting for a place now."""
        return sum(len(queue) for queue in self._queues.values())

    def take(self) -> bool:
        """Take a place if one is free and no run waits for one already (no overtaking); False otherwise."""
        if not self.limit or (self.computing < self.limit and not self.waiting()):
            self.computing += 1
            return True
        return False

    async def wait(self, priority: str = "medium", timeout_s: float | None = None) -> None:
        """Wait for a place, behind the runs of the same or a higher priority that wait already. Cancelled while
        waiting, or out of time (:class:`~aobd.errors.Unavailable` after ``timeout_s``), the caller holds no
        place."""
        queue = self._queues.get(priority, self._queues["medium"])
        place = asyncio.get_running_loop().create_future()
        queue.append(place)
        since = time.perf_counter()
        try:
            if timeout_s is None:
                await place
            else:
                async with asyncio.timeout(timeout_s):
                    await place
        except TimeoutError:
            if place.cancelled():  # otherwise it was handed over just as the time ran out: take it
                with contextlib.suppress(ValueError):
                    queue.remove(place)
                raise Unavailable(
                    f"{self.computing} runs are computing and {self.waiting()} more wait to start; this one "
                    f"waited {timeout_s:g} s and was not started (nothing was recorded: retry later)",
                    details=[{"max_computing_runs": self.limit, "waited_s": timeout_s}],
                ) from None
        except asyncio.CancelledError:
            if place.cancelled():
                with contextlib.suppress(ValueError):  # leave() may have dropped it already
                    queue.remove(place)
            else:
                self.leave()  # a place was handed over just as the caller gave up: pass it on
            raise
        self.admitted_after_wait += 1
        self.wait_seconds += time.perf_counter() - since

    def leave(self) -> None:
        """Give a place up: to the first waiting run of the highest priority, or back to the pool."""
        for queue in self._queues.values():
            while queue:
                place = queue.popleft()
                if not place.done():  # not a waiter cancelled since
                    place.set_result(None)  # the place passes on: ``computing`` stays
                    return
        self.computing -= 1

    def refuse_waiting(self, error: Callable[[], Exception]) -> int:
        """Fail every waiting run's start with an ``error()`` of its own (the engine is draining: a run that has
        not started must not start now); the number refused."""
        refused = 0
        for queue in self._queues.values():
            while queue:
                place = queue.popleft()
                if not place.done():
                    place.set_exception(error())
                    refused += 1
        return refused
