"""The engine's run lock keeps asyncio.Lock's contract: one holder, waiters served first come first served, a
cancelled waiter neither takes the lock nor stalls the next one, and releasing a free lock is an error. Each case
runs on RunLock and on asyncio.Lock, so the two cannot drift apart (and on both builds: AOBD_IMPL)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from aobd.engine.runlock import RunLock
from tests.conftest import run_async

LOCKS: list[Callable[[], Any]] = [RunLock, asyncio.Lock]


@pytest.mark.parametrize("make", LOCKS, ids=["RunLock", "asyncio.Lock"])
def test_waiters_take_the_lock_in_the_order_they_came(make: Callable[[], Any]) -> None:
    async def main() -> list[int]:
        lock = make()
        order: list[int] = []

        async def worker(n: int) -> None:
            async with lock:
                order.append(n)
                await asyncio.sleep(0)  # hold it across a loop turn: the others queue

        await asyncio.gather(*(worker(n) for n in range(5)))
        assert not lock.locked()
        return order

    assert run_async(main()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("make", LOCKS, ids=["RunLock", "asyncio.Lock"])
def test_a_cancelled_waiter_does_not_hold_up_the_next(make: Callable[[], Any]) -> None:
    async def main() -> None:
        lock = make()
        await lock.acquire()
        cancelled = asyncio.create_task(lock.acquire())
        served = asyncio.create_task(lock.acquire())
        await asyncio.sleep(0)
        lock.release()  # wakes the first waiter...
        cancelled.cancel()  # ...which is cancelled before it runs: the turn passes on
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert await asyncio.wait_for(served, 1.0) is True
        assert lock.locked()
        lock.release()
        assert not lock.locked()

    run_async(main())


@pytest.mark.parametrize("make", LOCKS, ids=["RunLock", "asyncio.Lock"])
def test_an_exception_inside_releases_the_lock(make: Callable[[], Any]) -> None:
    async def main() -> None:
        lock = make()
        with pytest.raises(KeyError):
            async with lock:
                raise KeyError("step failed")
        assert not lock.locked()
        async with lock:
            assert lock.locked()

    run_async(main())


@pytest.mark.parametrize("make", LOCKS, ids=["RunLock", "asyncio.Lock"])
def test_releasing_a_free_lock_is_an_error(make: Callable[[], Any]) -> None:
    with pytest.raises(RuntimeError, match="not acquired"):
        make().release()
