"""A run's lock: :class:`asyncio.Lock`'s contract and algorithm, compiled with the engine.

The engine takes a run's lock for every step (``async with slot.lock``). ``asyncio.Lock`` is Python code in
CPython 3.11: ``__aenter__``, ``acquire``, ``__aexit__``, ``release`` and ``_wake_up_first`` are five interpreted
calls per use, about 6% of the instructions of a W6 run on the compiled engine (callgrind, docs/performance.md).
This is the same algorithm, FIFO and cancellation-safe in the same way, compiled (``aobd._impl``), so an
uncontended use is a flag test and a set. It is for one event loop, as the engine is.
"""

from __future__ import annotations

import asyncio
import collections
from types import TracebackType


class RunLock:
    """A mutual exclusion lock for coroutines of one event loop; ``async with lock:`` as with ``asyncio.Lock``."""

    __slots__ = ("_locked", "_waiters")

    def __init__(self) -> None:
        self._locked = False
        self._waiters: collections.deque[asyncio.Future[bool]] | None = None

    def locked(self) -> bool:
        return self._locked

    async def acquire(self) -> bool:
        """Wait until the lock is free and take it. Waiters are served in the order they came; a waiter cancelled
        after it was woken passes the turn to the next one."""
        waiters = self._waiters
        if not self._locked and (not waiters or all(w.cancelled() for w in waiters)):
            self._locked = True
            return True
        if waiters is None:
            waiters = self._waiters = collections.deque()
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        waiters.append(future)
        try:
            try:
                await future
            finally:
                waiters.remove(future)
        except asyncio.CancelledError:
            if not self._locked:
                self._wake_up_first()
            raise
        self._locked = True
        return True

    def release(self) -> None:
        """Free the lock and wake the first waiter.

        Raises:
            RuntimeError: the lock is not held.
        """
        if not self._locked:
            raise RuntimeError("Lock is not acquired.")
        self._locked = False
        self._wake_up_first()

    def _wake_up_first(self) -> None:
        waiters = self._waiters
        if waiters:
            first = waiters[0]
            if not first.done():
                first.set_result(True)

    async def __aenter__(self) -> None:
        if not self._locked and not self._waiters:
            self._locked = True  # the uncontended case, without a second coroutine
            return
        await self.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
