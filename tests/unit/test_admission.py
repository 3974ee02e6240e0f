"""Admission of new runs: at most ``max_computing_runs`` runs computing at once, the rest start in order."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest

from aobd.api import schemas as s
from aobd.config import Config, EngineConfig
from aobd.daemon.service import Caller
from aobd.engine.admission import Admission
from aobd.engine.driver import Engine
from aobd.errors import Unavailable
from aobd.model import events as ev
from aobd.store.memory import MemoryCas, MemoryEventLog
from tests.conftest import edge, fn, run_async, started_service, workflow

CHAIN = workflow([fn("a"), fn("b"), fn("c")], [edge("a", "b"), edge("b", "c")])
GATED = workflow(
    [{"id": "gate", "type": "approval", "config": {"assignees": ["ops"]}}, fn("after")], [edge("gate", "after")]
)


async def spin(turns: int = 20) -> None:
    """Let every ready task run as far as it can."""
    for _ in range(turns):
        await asyncio.sleep(0)


def test_waiting_runs_start_by_priority_then_in_arrival_order() -> None:
    async def go() -> list[str]:
        admission = Admission(1)
        assert admission.take()  # the only place
        started: list[str] = []

        async def start(name: str, priority: str) -> None:
            await admission.wait(priority)
            started.append(name)

        tasks = []
        for name, priority in (("low", "low"), ("medium-1", "medium"), ("high", "high"), ("medium-2", "medium")):
            tasks.append(asyncio.create_task(start(name, priority)))
            await spin()
        assert admission.waiting() == 4 and started == []
        for _ in range(4):
            admission.leave()
            await spin()
        await asyncio.gather(*tasks)
        assert admission.computing == 1  # each leave handed the place on; the last holder still has it
        assert admission.admitted_after_wait == 4 and admission.wait_seconds > 0
        return started

    assert run_async(go()) == ["high", "medium-1", "medium-2", "low"]


def test_a_waiter_that_gives_up_holds_no_place() -> None:
    async def go() -> Admission:
        admission = Admission(1)
        assert admission.take()
        gave_up = asyncio.create_task(admission.wait())
        handed_then_cancelled = asyncio.create_task(admission.wait())
        await spin()
        gave_up.cancel()  # cancelled while waiting
        await spin()
        assert admission.waiting() == 1
        admission.leave()  # hands the place to the second waiter...
        handed_then_cancelled.cancel()  # ...which gives up before it could run: the place must not be lost
        for task in (gave_up, handed_then_cancelled):
            with pytest.raises(asyncio.CancelledError):
                await task
        return admission

    admission = run_async(go())
    assert admission.computing == 0 and admission.waiting() == 0


def test_no_limit_admits_everyone_and_a_negative_one_is_refused() -> None:
    async def go() -> int:
        admission = Admission(0)
        for _ in range(1000):
            assert admission.take()
        return admission.computing

    assert run_async(go()) == 1000
    with pytest.raises(ValueError, match="0 \\(none\\) or more"):
        Admission(-1)


def test_the_engine_computes_at_most_its_limit_of_runs_and_completes_them_all() -> None:
    in_progress: set[str] = set()
    most = 0

    def watch(events: list[ev.Event]) -> None:
        nonlocal most
        for e in events:
            if isinstance(e, ev.RunCreated):
                in_progress.add(e.run_id)
            elif isinstance(e, ev.RunCompleted):
                in_progress.discard(e.run_id)
        most = max(most, len(in_progress))

    async def go() -> list[dict[str, Any]]:
        eng = Engine(MemoryEventLog(), MemoryCas(), max_computing_runs=2)
        eng.listeners.append(watch)
        try:
            return await asyncio.gather(*(eng.run(CHAIN, {"n": i}) for i in range(8)))
        finally:
            await eng.close()

    summaries = run_async(go())
    assert [s["status"] for s in summaries] == ["completed"] * 8
    assert all(s["nodes"]["c"]["status"] == "completed" for s in summaries)
    assert most == 2  # sync-only runs hold their place from their first event to their last


def test_a_run_waiting_for_its_place_has_recorded_nothing_and_one_that_gives_up_never_starts() -> None:
    async def go() -> None:
        eng = Engine(MemoryEventLog(), MemoryCas(), max_computing_runs=1)
        try:
            assert eng.admission.take()  # another run computing
            waiting = asyncio.create_task(eng.start_run(CHAIN, {}, run_id="r-waits"))
            abandoned = asyncio.create_task(eng.start_run(CHAIN, {}, run_id="r-abandoned"))
            await spin()
            assert eng.admission.waiting() == 2
            assert await eng.log.get_run("r-waits") is None and await eng.log.read("r-waits") == []
            abandoned.cancel()
            with pytest.raises(asyncio.CancelledError):
                await abandoned
            eng.admission.leave()
            assert await waiting == "r-waits"
            assert (await eng.wait("r-waits"))["status"] == "completed"
            assert await eng.log.get_run("r-abandoned") is None
            assert eng.admission.computing == 0 and eng.admission.waiting() == 0
        finally:
            await eng.close()

    run_async(go())


def test_a_run_waiting_on_an_approval_gives_its_place_to_the_next_run() -> None:
    async def go() -> tuple[str, str]:
        eng = Engine(MemoryEventLog(), MemoryCas(), max_computing_runs=1)
        try:
            gated = await eng.start_run(GATED, {})
            machine = await eng.load(gated)
            assert machine.public_status() == "waiting"
            # With the gate's run still holding the only place, this would wait for ever.
            after = await asyncio.wait_for(eng.run(CHAIN, {"k": 1}), 5)
            ticket = machine.nodes["gate"].ticket
            assert ticket
            await eng.decide_approval(gated, ticket, "approve", "dana")
            # A run coming back from its wait carries on without a place (it never queues behind new runs).
            done = await asyncio.wait_for(eng.wait(gated), 5)
            assert eng.admission.computing == 0
            return after["status"], done["status"]
        finally:
            await eng.close()

    assert run_async(go()) == ("completed", "completed")


def test_a_start_that_waits_too_long_is_refused_with_nothing_recorded() -> None:
    async def go() -> Admission:
        admission = Admission(1)
        assert admission.take()
        assert not admission.take()  # full
        with pytest.raises(Unavailable, match=r"waited 0\.05 s and was not started"):
            await admission.wait(timeout_s=0.05)
        return admission

    admission = run_async(go())
    assert admission.computing == 1 and admission.waiting() == 0


def test_the_service_answers_a_start_it_cannot_admit_in_time_with_503_and_a_retry_starts_the_run(
    tmp_path: Path,
) -> None:
    config = Config(data_dir=str(tmp_path), engine=EngineConfig(max_computing_runs=1, start_wait_s=0.05))

    async def main() -> None:
        async with started_service(config) as service:
            caller = Caller("default", "write", "test")
            body = msgspec.convert(
                {"definition": CHAIN, "inputs": {}, "idempotency_key": "order-7", "priority": "high"}, s.RunStart
            )
            assert service.engine.admission.take()  # another run computing
            waiting = asyncio.create_task(service.start_run(caller, body, wait_s=10))
            for _ in range(1000):  # the start claims its idempotency key in a thread first
                if service.engine.admission.waiting():
                    break
                await asyncio.sleep(0.005)
            assert service.status("test").planes["admission"] == {"limit": 1, "computing": 1, "waiting": 1}
            with pytest.raises(Unavailable):
                await waiting
            with pytest.raises(Unavailable) as refused:
                await service.start_run(caller, body, wait_s=10)
            assert refused.value.to_dict()["details"] == [{"max_computing_runs": 1, "waited_s": 0.05}]
            assert await service.log.list_runs(limit=10) == []
            service.engine.admission.leave()
            retried = await service.start_run(caller, body, wait_s=10)
            assert retried["status"] == "completed"
            assert [r.run_id for r in await service.log.list_runs(limit=10)] == [retried["run_id"]]

    run_async(main())


def test_a_draining_engine_refuses_the_runs_waiting_to_start() -> None:
    async def go() -> None:
        eng = Engine(MemoryEventLog(), MemoryCas(), max_computing_runs=1)
        try:
            assert eng.admission.take()  # a run computing
            waiting = [asyncio.create_task(eng.start_run(CHAIN, {}, run_id=f"r-{i}")) for i in range(2)]
            await spin()
            assert eng.admission.waiting() == 2
            assert await eng.drain(1.0)
            for task in waiting:
                with pytest.raises(Unavailable, match="draining"):
                    await task
            assert [await eng.log.get_run(f"r-{i}") for i in range(2)] == [None, None]
            assert eng.admission.waiting() == 0 and eng.admission.computing == 1  # the computing run keeps its place
        finally:
            await eng.close()

    run_async(go())
