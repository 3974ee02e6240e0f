"""The engine writes each blob to the CAS once, even when many runs carrying it start at the same moment, and a
step is never committed without its blobs."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

import pytest

from aobd.engine.driver import Engine
from aobd.errors import StoreError
from aobd.store.memory import MemoryCas, MemoryEventLog
from tests.conftest import fn, run_async, workflow


class CountingCas(MemoryCas):
    """Counts the blobs written; each write yields to the loop first, as a real store's I/O would."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.written: Counter[bytes] = Counter()
        self.fail = fail

    async def put_many(self, blobs: Sequence[bytes]) -> list[str]:
        await asyncio.sleep(0.01)
        if self.fail:
            raise StoreError("the CAS is full")
        self.written.update(blobs)
        return await super().put_many(blobs)


DOC = workflow([fn("a", "builtin:echo"), fn("b", "builtin:echo")], [{"from": "a", "to": "b"}], name="blobs")


def test_runs_starting_together_write_each_blob_once() -> None:
    async def main() -> None:
        cas = CountingCas()
        engine = Engine(MemoryEventLog(), cas)
        summaries = await asyncio.gather(*(engine.run(DOC, {"v": 1}) for _ in range(50)))
        assert {s["status"] for s in summaries} == {"completed"}
        assert cas.written and set(cas.written.values()) == {1}, cas.written
        await engine.close()

    run_async(main())


def test_when_the_shared_write_fails_every_run_waiting_for_it_fails_to_start() -> None:
    async def main() -> None:
        engine = Engine(MemoryEventLog(), CountingCas(fail=True))
        results = await asyncio.gather(*(engine.start_run(DOC, {"v": 1}) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, StoreError) for r in results), results
        assert await engine.log.list_runs(limit=10) == []  # nothing committed without its blobs
        await engine.close()

    run_async(main())


@pytest.mark.parametrize("count", [1, 3])
def test_a_blob_known_durable_is_not_written_again(count: int) -> None:
    async def main() -> None:
        cas = CountingCas()
        engine = Engine(MemoryEventLog(), cas)
        for _ in range(count):
            assert (await engine.run(DOC, {"v": 1}))["status"] == "completed"
        assert set(cas.written.values()) == {1}
        await engine.close()

    run_async(main())
