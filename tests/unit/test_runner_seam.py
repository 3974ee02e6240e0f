"""Attempts executed away from the owner (RemoteExecutor -> NodeJob -> Runner -> NodeOutcome) record exactly
what in-process execution records: outputs, failures with their codes and retryability, and priority."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from aobd.engine.driver import Engine
from aobd.model import events as ev
from aobd.runner import wire
from aobd.runner.remote import RemoteExecutor
from aobd.runner.wire import NodeJob, NodeOutcome
from aobd.runner.worker import Runner
from aobd.store.memory import MemoryCas, MemoryEventLog
from tests.conftest import EXAMPLES, fn, run_async, workflow


class WireTransport:
    """Jobs cross real msgpack frames (as over zmq or Kafka) to a Runner; outcomes come back the same way."""

    def __init__(self, runner: Runner, *, now: bool = False) -> None:
        self.runner = runner
        #: Execute as the runner plane does (``Runner.run_now``: sync handlers at once) rather than ``Runner.run``.
        self.now = now
        self.executor: RemoteExecutor | None = None
        self.jobs: list[NodeJob] = []
        self.lose = 0  # how many of the next jobs get no answer (a runner that died holding them)
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, job: NodeJob) -> None:
        self._take(job)

    def _take(self, job: NodeJob) -> None:
        job = wire.decode_jobs(wire.encode([job]))[0]
        self.jobs.append(job)
        if self.lose:
            self.lose -= 1
            return
        task = asyncio.get_running_loop().create_task(self._answer(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, job: NodeJob) -> None:
        if self.now:
            answer = self.runner.run_now(job)
            outcome = answer if isinstance(answer, NodeOutcome) else await answer
        else:
            outcome = await self.runner.run(job)
        assert self.executor is not None
        self.executor.deliver(wire.decode_outcomes(wire.encode([outcome]))[0])


class DispatchTransport(WireTransport):
    """Takes jobs without waiting, as the runner plane's transport does: the engine then dispatches attempts with
    no task each (``Engine._dispatch``) instead of awaiting the executor."""

    def submit_nowait(self, job: NodeJob) -> None:
        self._take(job)


#: How attempts reach the runner and run there: the engine awaiting the executor (``_execute``) or dispatching
#: without a task (``_dispatch``); the runner through ``Runner.run`` or ``Runner.run_now`` (the runner plane).
PATHS = ["execute-run", "execute-run_now", "dispatch-run_now"]


def remote_engine(
    handler_modules: list[str] | None = None, *, path: str = "execute-run"
) -> tuple[Engine, WireTransport]:
    kind = DispatchTransport if path.startswith("dispatch") else WireTransport
    transport = kind(Runner("runner-1", handler_modules=handler_modules), now=path.endswith("run_now"))
    executor = RemoteExecutor(transport, origin="orch-0")
    transport.executor = executor
    engine = Engine(MemoryEventLog(), MemoryCas())
    engine.executors["function"] = engine.executors["http"] = executor
    return engine, transport


async def history(engine: Engine, run_id: str) -> list[ev.Event]:
    return [ev.decode_event(r.data) for r in await engine.log.read(run_id)]


@pytest.mark.parametrize("path", PATHS)
def test_w6_through_a_runner_computes_the_same_result_exactly_once(monkeypatch: Any, path: str) -> None:
    import orjson

    monkeypatch.syspath_prepend(str(EXAMPLES / "w6"))
    document = orjson.loads((EXAMPLES / "w6" / "workflow.json").read_bytes())

    async def main() -> None:
        engine, transport = remote_engine(path=path)
        run_id = await engine.start_run(document, {"x": 1}, priority="high")
        summary = await engine.wait(run_id)
        assert summary["status"] == "completed" and summary["outputs"] == {"x": 20}
        events = await history(engine, run_id)
        assert Counter(e.node_id for e in events if isinstance(e, ev.NodeCompleted)) == dict.fromkeys(
            ["s1", "s2", "s3", "b1", "b2", "j"], 1
        )
        # every attempt (all function nodes) went to the runner, with the run's priority
        assert sorted(j.node_id for j in transport.jobs) == ["b1", "b2", "j", "s1", "s2", "s3"]
        assert {j.priority for j in transport.jobs} == {"high"}
        assert isinstance(events[0], ev.RunCreated) and events[0].priority == "high"
        await engine.close()

    run_async(main())


@pytest.mark.parametrize("path", PATHS)
def test_a_handler_that_raises_is_recorded_as_a_retryable_handler_error_with_its_frames(path: str) -> None:
    doc = workflow([fn("a", "json:loads", retry={"max_attempts": 2, "initial_ms": 1, "max_ms": 2})])

    async def main() -> None:
        engine, _ = remote_engine(path=path)
        run_id = await engine.start_run(doc, {"s": "x"})
        summary = await engine.wait(run_id)
        assert summary["status"] == "failed"
        failures = [e for e in await history(engine, run_id) if isinstance(e, ev.NodeFailed)]
        assert [f.attempt for f in failures] == [1, 2]  # retried: a handler bug may be transient
        assert failures[0].error["code"] == "handler_error"
        assert "TypeError" in failures[0].error["message"] and "traceback" in failures[0].error
        await engine.close()

    run_async(main())


@pytest.mark.parametrize("path", PATHS)
def test_the_runner_enforces_its_own_handler_allow_list(path: str) -> None:
    doc = workflow([fn("a", "json:dumps")])

    async def main() -> None:
        engine, _ = remote_engine(handler_modules=["examples"], path=path)
        run_id = await engine.start_run(doc, {})
        summary = await engine.wait(run_id)
        assert summary["status"] == "failed"
        failed = [e for e in await history(engine, run_id) if isinstance(e, ev.NodeFailed)]
        assert len(failed) == 1 and failed[0].error["code"] == "handler_not_allowed"  # not retried
        await engine.close()

    run_async(main())


@pytest.mark.parametrize("path", PATHS)
def test_a_job_that_never_comes_back_times_out_and_is_retried(path: str) -> None:
    doc = workflow([fn("a", timeout_ms=50, retry={"max_attempts": 2, "initial_ms": 1, "max_ms": 2})], [], name="lost")

    async def main() -> None:
        engine, transport = remote_engine(path=path)
        transport.lose = 1  # the second attempt reaches a live runner
        run_id = await engine.start_run(doc, {"v": 1})
        summary = await engine.wait(run_id)
        assert summary["status"] == "completed"
        events = await history(engine, run_id)
        assert [e.error["code"] for e in events if isinstance(e, ev.NodeFailed)] == ["timeout"]
        # the late answer to attempt 1 finds nobody waiting and is dropped, not recorded twice
        late = await transport.runner.run(transport.jobs[0])
        assert late.ok is False and late.error is not None and late.error["code"] == "expired"
        assert transport.executor is not None and transport.executor.deliver(late) is False
        await engine.close()

    run_async(main())


def test_outcomes_and_jobs_survive_the_wire_unchanged() -> None:
    outcome = NodeOutcome("j1", "r1", "n1", 2, False, error={"code": "x", "message": "m"}, retryable=False)
    assert wire.decode_outcome(wire.encode(outcome)) == outcome


def test_jobs_name_their_node_by_version_and_runners_read_the_patched_graph_from_shared_memory() -> None:
    import uuid

    from aobd.model.patch import PatchProposal
    from aobd.planes import shm_ir

    namespace = f"aobdtest{uuid.uuid4().hex[:8]}"
    doc = workflow([fn("a", "builtin:echo"), fn("b", "builtin:echo")], [{"from": "a", "to": "b"}], name="shm")
    # the patch swaps b's handler: a runner reading the base version would echo, the patched one returns null
    patch = PatchProposal(ops=[{"op": "replace", "path": "/nodes/1/config/handler", "value": "builtin:noop"}])

    async def main() -> None:
        orchestrator_side = shm_ir.SharedDocuments(namespace)
        # two runners, each with its own view of the segments (as two processes would have)
        runners = [
            Runner(f"runner-{i}", handler_modules=None, documents=shm_ir.SharedDocuments(namespace)) for i in (0, 1)
        ]
        transport = WireTransport(runners[0])
        executor = RemoteExecutor(transport, origin="orch-0", documents=orchestrator_side)
        transport.executor = executor
        engine = Engine(MemoryEventLog(), MemoryCas())
        engine.executors["function"] = executor
        try:
            base_run = await engine.start_run(doc, {"v": 1})
            base = await engine.wait(base_run)
            transport.runner = runners[1]
            patched_run = await engine.start_run(doc, {"v": 1}, overlays=[patch])
            patched = await engine.wait(patched_run)
            assert base["status"] == patched["status"] == "completed"
            outputs = {
                run_id: {e.node_id: e.output for e in await history(engine, run_id) if isinstance(e, ev.NodeCompleted)}
                for run_id in (base_run, patched_run)
            }
            assert outputs[base_run]["b"] is not None  # echo: the base version ran
            assert outputs[patched_run]["b"] is None  # the patched node ran, read from the patched version
            assert all(job.node is None and job.version for job in transport.jobs)
            assert len({job.version for job in transport.jobs}) == 2 and orchestrator_side.published == 2
            assert runners[0].documents.reads >= 1 and runners[1].documents.reads >= 1
        finally:
            await engine.close()
            for runner in runners:
                await runner.close()
            orchestrator_side.close()
            shm_ir.cleanup(namespace)

    run_async(main())


def test_run_now_answers_sync_handlers_at_once_and_leaves_the_rest_to_run() -> None:
    """The runner plane calls sync handlers in the receive callback (no task); async, blocking and not allowed
    handlers, and jobs past their deadline, come back as the coroutine of ``run``, with the same outcomes."""
    from aobd.model.workflow import Node

    def job(handler: str, deadline_in_s: float = 30.0, **config: Any) -> NodeJob:
        node = Node(id="a", type="function", config={"handler": handler, **config})
        return NodeJob("j1", "r1", "a", 1, node, {"x": 1}, 30.0, deadline=time.time() + deadline_in_s)

    async def main() -> None:
        runner = Runner("runner-1", handler_modules=["tests"])
        now = runner.run_now(job("tests.handlers:add_one"))
        assert isinstance(now, NodeOutcome) and now.ok and now.output == {"x": 2}
        failed = runner.run_now(job("tests.handlers:boom"))
        assert isinstance(failed, NodeOutcome) and not failed.ok and failed.error is not None
        assert failed.error["code"] == "handler_error" and failed.retryable
        later_ones = (
            job("tests.handlers:add_one", blocking=True),
            job("tests.handlers:async_double"),
            job("json:loads"),  # not allowed on this runner
        )
        for later in later_ones:
            answer = runner.run_now(later)
            assert not isinstance(answer, NodeOutcome)
            assert await answer == await runner.run(later)
        answer = runner.run_now(job("tests.handlers:add_one", deadline_in_s=-1.0))
        assert not isinstance(answer, NodeOutcome)
        assert (await answer).error == {"code": "expired", "message": "the job reached a runner after its deadline"}

    run_async(main())


def _count_appends(engine: Engine) -> Counter[str]:
    """Appends per run, counted around the engine's log."""
    counts: Counter[str] = Counter()
    append = engine.log.append

    async def counting(run_id: str, *args: Any, **kwargs: Any) -> Any:
        counts[run_id] += 1
        return await append(run_id, *args, **kwargs)

    engine.log.append = counting  # type: ignore[method-assign]
    return counts


def test_dispatched_siblings_answered_together_share_one_commit(monkeypatch: Any) -> None:
    """W6's branches b1 and b2 are answered in the same turn: the dispatch path records both in one step, where
    awaiting the executor commits once per attempt. Same events, same result."""
    import orjson

    monkeypatch.syspath_prepend(str(EXAMPLES / "w6"))
    document = orjson.loads((EXAMPLES / "w6" / "workflow.json").read_bytes())

    async def appends(path: str) -> tuple[int, list[str]]:
        engine, _ = remote_engine(path=path)
        counts = _count_appends(engine)
        run_id = await engine.start_run(document, {"x": 1})
        assert (await engine.wait(run_id))["outputs"] == {"x": 20}
        kinds = sorted(type(e).__name__ for e in await history(engine, run_id))
        assert engine.inflight() == 0
        await engine.close()
        return counts[run_id], kinds

    async def main() -> None:
        awaited, awaited_kinds = await appends("execute-run_now")
        dispatched, dispatched_kinds = await appends("dispatch-run_now")
        assert dispatched_kinds == awaited_kinds
        assert dispatched == awaited - 1  # b1 and b2 in one commit

    run_async(main())


async def _slow_attempt_out(name: str) -> tuple[Engine, WireTransport, str]:
    """A dispatched run whose only attempt (a handler that sleeps 5 s) has reached the runner."""
    engine, transport = remote_engine(path="dispatch-run_now")
    run_id = await engine.start_run(workflow([fn("a", "tests.handlers:slow")], [], name=name), {})
    async with asyncio.timeout(5):
        while not transport.jobs:  # noqa: ASYNC110 - the transport signals nothing
            await asyncio.sleep(0.01)
    return engine, transport, run_id


def test_cancelling_a_run_drops_its_dispatched_attempts() -> None:
    async def main() -> None:
        engine, transport, run_id = await _slow_attempt_out("slow")
        assert engine.inflight() == 1
        await engine.cancel(run_id, "no longer needed")
        assert engine.inflight() == 0
        assert transport.executor is not None and transport.executor.pending() == 0
        summary = await engine.wait(run_id)
        assert summary["status"] == "cancelled" and summary["nodes"]["a"]["status"] != "completed"
        await engine.close()

    run_async(main())


def test_drain_waits_for_dispatched_attempts_and_records_them() -> None:
    doc = workflow([fn("a", "tests.handlers:async_double", **{"in": {"x": "inputs.x"}})], [], name="drained")

    async def main() -> None:
        engine, _ = remote_engine(path="dispatch-run_now")
        run_id = await engine.start_run(doc, {"x": 4})
        assert engine.inflight() == 1
        assert await engine.drain(5.0) is True
        summary = await engine.wait(run_id)
        assert summary["status"] == "completed" and summary["outputs"] == {"a": {"x": 8}}
        await engine.close()

    run_async(main())


def test_releasing_a_run_forgets_its_dispatched_attempts_and_drops_their_late_outcomes() -> None:
    """A run whose partition moved to another daemon: this engine stops waiting for its attempts at once, and an
    outcome that still arrives is not recorded here (the new owner runs the attempt again)."""

    async def main() -> None:
        engine, transport, run_id = await _slow_attempt_out("moved")
        assert engine.release(run_id) is True
        assert engine.inflight() == 0 and not engine.drives(run_id)
        late = NodeOutcome(transport.jobs[0].job_id, run_id, "a", 1, True, "late")
        assert transport.executor is not None and transport.executor.deliver(late) is False
        assert not [e for e in await history(engine, run_id) if isinstance(e, ev.NodeCompleted)]
        await engine.close()

    run_async(main())
