"""The agent job queue under a hand-moved clock: claims, leases, late answers, isolation, withdrawal."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from aobd.agents import runner as runner_module
from aobd.agents.base import AgentAnswer
from aobd.agents.jobs import AgentJob, AgentJobQueue, execute_external, job_id_of, public_config
from aobd.agents.runner import execute_job
from aobd.errors import Conflict, NodeError, NotFound, Unavailable
from aobd.model.workflow import Node
from aobd.nodes.base import NodeContext
from tests.conftest import run_async


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def job(node_id: str = "ext", workspace: str = "acme", attempt: int = 1, deadline: float | None = None) -> AgentJob:
    return AgentJob(
        job_id=job_id_of("r1", node_id, attempt),
        run_id="r1",
        node_id=node_id,
        attempt=attempt,
        workspace=workspace,
        inputs={"x": 1},
        config={"provider": "scripted", "script": [{"output": node_id}]},
        document={"name": "w", "nodes": []},
        deadline=deadline,
        version="sha256:abc",
    )


def queue() -> tuple[AgentJobQueue, FakeClock]:
    clock = FakeClock()
    return AgentJobQueue(clock), clock


def test_a_parked_claim_wakes_when_a_job_is_offered() -> None:
    async def main() -> None:
        q, _ = queue()
        claim = asyncio.ensure_future(q.claim("acme", "runner-a", wait_s=30, lease_s=10))
        await asyncio.sleep(0.01)
        assert not claim.done()
        future = q.offer(job())
        claimed = await asyncio.wait_for(claim, 1)
        assert claimed is not None and claimed.job.job_id == "r1:ext:1" and claimed.runner == "runner-a"
        assert claimed.lease_deadline == q.clock() + 10
        q.complete("acme", "r1:ext:1", claimed.lease_id, AgentAnswer(output={"ok": True}))
        assert (await future).output == {"ok": True}
        assert q.pending("acme") == [] and len(q) == 0

    run_async(main())


def test_a_claim_with_nothing_to_do_returns_none_after_its_wait() -> None:
    async def main() -> None:
        q, _ = queue()
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await q.claim("acme", "a", wait_s=0.05, lease_s=10) is None
        assert loop.time() - started >= 0.04
        assert await q.claim("acme", "a", wait_s=0, lease_s=10) is None

    run_async(main())


def test_jobs_are_handed_out_oldest_first() -> None:
    async def main() -> None:
        q, _ = queue()
        for node_id in ("first", "second"):
            q.offer(job(node_id))
        got = [await q.claim("acme", "a", 0, 10) for _ in range(3)]
        assert [c.job.node_id if c else None for c in got] == ["first", "second", None]
        for fut_id in ("r1:first:1", "r1:second:1"):
            q.cancel(fut_id)

    run_async(main())


def test_an_expired_lease_makes_the_job_claimable_and_refuses_the_old_holder() -> None:
    async def main() -> None:
        q, clock = queue()
        future = q.offer(job())
        first = await q.claim("acme", "runner-a", 0, lease_s=5)
        assert first is not None
        assert await q.claim("acme", "runner-b", 0, lease_s=5) is None  # leased: not claimable
        clock.advance(5)  # the lease lapses exactly at its deadline
        second = await q.claim("acme", "runner-b", 0, lease_s=5)
        assert second is not None and second.job.job_id == first.job.job_id
        assert second.lease_id != first.lease_id
        # The old holder's heartbeat and late answer are refused, naming the runner that holds the job now.
        with pytest.raises(Conflict, match=r"held by another runner.*'runner-b'") as late:
            q.complete("acme", first.job.job_id, first.lease_id, AgentAnswer(output="late"))
        assert late.value.details[0]["holder"] == "runner-b"
        with pytest.raises(Conflict, match="runner-b"):
            q.heartbeat("acme", first.job.job_id, first.lease_id)
        assert q.pending("acme")[0].claims == 2
        q.complete("acme", second.job.job_id, second.lease_id, AgentAnswer(output="on time"))
        assert (await future).output == "on time"
        # After the answer the job is gone: anything further about it is NotFound.
        with pytest.raises(NotFound):
            q.complete("acme", second.job.job_id, second.lease_id, AgentAnswer(output="twice"))

    run_async(main())


def test_a_lapsed_lease_is_refused_even_when_nobody_took_the_job_over() -> None:
    async def main() -> None:
        q, clock = queue()
        q.offer(job())
        claimed = await q.claim("acme", "a", 0, lease_s=5)
        assert claimed is not None
        clock.advance(6)
        with pytest.raises(Conflict, match=r"lease expired or held by another runner.*lapsed") as err:
            q.complete("acme", claimed.job.job_id, claimed.lease_id, AgentAnswer(output="late"))
        assert err.value.details[0]["holder"] is None
        assert q.pending("acme")[0].state == "offered"
        q.cancel(claimed.job.job_id)

    run_async(main())


def test_heartbeats_extend_the_lease() -> None:
    async def main() -> None:
        q, clock = queue()
        q.offer(job())
        claimed = await q.claim("acme", "a", 0, lease_s=5)
        assert claimed is not None
        for _ in range(4):
            clock.advance(4)  # 16 s in all, far past the first lease, never 5 s without a beat
            renewed = q.heartbeat("acme", claimed.job.job_id, claimed.lease_id)
            assert renewed.lease_deadline == clock.now + 5
            assert await q.claim("acme", "b", 0, lease_s=5) is None
        longer = q.heartbeat("acme", claimed.job.job_id, claimed.lease_id, lease_s=60)
        assert longer.lease_deadline == clock.now + 60
        clock.advance(59)
        assert await q.claim("acme", "b", 0, lease_s=5) is None
        info = q.pending("acme")[0]
        assert (info.state, info.runner, info.lease_expires_in_s) == ("leased", "a", 1.0)
        q.cancel(claimed.job.job_id)

    run_async(main())


def test_a_parked_claim_takes_over_when_the_holders_lease_lapses() -> None:
    async def main() -> None:
        # The real clock: the parked claimer must wake by itself at the lease deadline, no offer involved.
        q = AgentJobQueue()
        q.offer(job())
        first = await q.claim("acme", "doomed", 0, lease_s=0.05)
        assert first is not None
        second = await asyncio.wait_for(q.claim("acme", "survivor", wait_s=5, lease_s=10), 2)
        assert second is not None and second.runner == "survivor" and second.job.job_id == first.job.job_id
        q.cancel(first.job.job_id)

    run_async(main())


def test_racing_claimers_get_exactly_one_job() -> None:
    async def main() -> None:
        q, _ = queue()
        claims = [asyncio.ensure_future(q.claim("acme", f"r{i}", wait_s=0.2, lease_s=10)) for i in range(8)]
        await asyncio.sleep(0.01)
        q.offer(job())
        results = await asyncio.gather(*claims)
        winners = [c for c in results if c is not None]
        assert len(winners) == 1
        # Offered before anyone waits: still exactly one.
        q.offer(job("again"))
        results = await asyncio.gather(*(q.claim("acme", f"s{i}", 0, 10) for i in range(8)))
        assert sum(c is not None for c in results) == 1
        for info in q.pending("acme"):
            q.cancel(info.job_id)

    run_async(main())


def test_cancel_withdraws_the_job_and_later_results_are_not_found() -> None:
    async def main() -> None:
        q, _ = queue()
        future = q.offer(job())
        claimed = await q.claim("acme", "a", 0, 10)
        assert claimed is not None
        assert q.cancel("r1:ext:1") is True and q.cancel("r1:ext:1") is False
        assert future.cancelled() and q.pending("acme") == []
        with pytest.raises(NotFound):
            q.complete("acme", "r1:ext:1", claimed.lease_id, AgentAnswer(output="late"))
        with pytest.raises(NotFound):
            q.heartbeat("acme", "r1:ext:1", claimed.lease_id)
        # Cancelling the future itself (what a cancelled attempt task does) withdraws the job too.
        other = q.offer(job("other"))
        other.cancel()
        await asyncio.sleep(0)
        assert q.pending("acme") == [] and await q.claim("acme", "a", 0, 10) is None

    run_async(main())


def test_workspaces_are_isolated() -> None:
    async def main() -> None:
        q, _ = queue()
        q.offer(job(workspace="acme"))
        assert await q.claim("other", "b", 0.02, 10) is None
        assert q.pending("other") == []
        claimed = await q.claim("acme", "a", 0, 10)
        assert claimed is not None
        # Another workspace cannot even learn that the job exists, lease id or not.
        for call in (
            lambda: q.heartbeat("other", claimed.job.job_id, claimed.lease_id),
            lambda: q.complete("other", claimed.job.job_id, claimed.lease_id, AgentAnswer()),
            lambda: q.job("other", claimed.job.job_id),
        ):
            with pytest.raises(NotFound):
                call()
        assert [i.job_id for i in q.pending("acme")] == ["r1:ext:1"]
        q.cancel("r1:ext:1")

    run_async(main())


def test_an_error_result_fails_the_attempt_and_release_hands_the_job_on() -> None:
    async def main() -> None:
        q, _ = queue()
        future = q.offer(job())
        claimed = await q.claim("acme", "a", 0, 10)
        assert claimed is not None
        q.release("acme", claimed.job.job_id, claimed.lease_id)
        again = await q.claim("acme", "b", 0, 10)
        assert again is not None and again.runner == "b"
        q.complete("acme", again.job.job_id, again.lease_id, NodeError("model refused", code="agent_error"))
        with pytest.raises(NodeError, match="model refused"):
            await future

    run_async(main())


def test_a_job_past_its_deadline_is_not_handed_out() -> None:
    async def main() -> None:
        q, clock = queue()
        q.offer(job(deadline=clock.now + 10))
        assert q.pending("acme")[0].deadline_in_s == 10
        clock.advance(10)
        assert await q.claim("acme", "a", 0, 10) is None
        q.cancel("r1:ext:1")

    run_async(main())


def test_the_same_attempt_cannot_be_offered_twice() -> None:
    async def main() -> None:
        q, _ = queue()
        q.offer(job())
        with pytest.raises(Conflict):
            q.offer(job())
        q.cancel("r1:ext:1")

    run_async(main())


# ---------------------------------------------------------------------------------------------- the executor


def ctx(timeout_s: float = 5.0) -> NodeContext:
    return NodeContext(
        run_id="r1",
        node_id="ext",
        attempt=2,
        idempotency_key="r1:ext",
        timeout_s=timeout_s,
        workspace="acme",
        services={"version": "sha256:v", "document": {"name": "w", "nodes": []}},
    )


NODE = Node(
    id="ext",
    type="agent",
    config={"runner": "external", "provider": "openai", "api_key_env": "OPENAI_KEY", "max_tokens": 5},
)


def test_execute_external_offers_the_attempt_and_returns_the_runners_answer() -> None:
    async def main() -> None:
        q = AgentJobQueue()
        attempt = asyncio.ensure_future(execute_external(NODE, {"q": "?"}, ctx(), q))
        claimed = await q.claim("acme", "a", 1, 10)
        assert claimed is not None
        offered = claimed.job
        assert (offered.job_id, offered.attempt, offered.version) == ("r1:ext:2", 2, "sha256:v")
        assert offered.inputs == {"q": "?"} and offered.document == {"name": "w", "nodes": []}
        assert offered.config == NODE.config  # names of secrets are kept, and max_tokens is no secret
        assert offered.deadline is not None and 4 < offered.deadline - q.clock() <= 5
        q.complete("acme", offered.job_id, claimed.lease_id, AgentAnswer(output=42))
        assert (await attempt).output == 42
        assert len(q) == 0

    run_async(main())


def test_execute_external_times_out_saying_who_held_the_job_and_withdraws_it() -> None:
    async def main() -> None:
        q = AgentJobQueue()
        with pytest.raises(NodeError, match="no runner claimed it") as err:
            await execute_external(NODE, {}, ctx(timeout_s=0.05), q)
        assert err.value.code == "agent_timeout" and err.value.retryable
        assert len(q) == 0
        attempt = asyncio.ensure_future(execute_external(NODE, {}, ctx(timeout_s=0.2), q))
        claimed = await q.claim("acme", "slowpoke", 1, 10)
        assert claimed is not None
        with pytest.raises(NodeError, match="'slowpoke' holds it"):
            await attempt
        with pytest.raises(NotFound):
            q.complete("acme", claimed.job.job_id, claimed.lease_id, AgentAnswer(output="late"))

    run_async(main())


def test_a_cancelled_attempt_withdraws_its_job() -> None:
    async def main() -> None:
        q = AgentJobQueue()
        attempt = asyncio.ensure_future(execute_external(NODE, {}, ctx(), q))
        await asyncio.sleep(0.01)
        assert len(q) == 1
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attempt
        assert len(q) == 0 and q.pending("acme") == []

    run_async(main())


def test_a_job_withdrawn_under_a_running_attempt_fails_it_instead_of_hanging() -> None:
    async def main() -> None:
        q = AgentJobQueue()
        attempt = asyncio.ensure_future(execute_external(NODE, {}, ctx(), q))
        await asyncio.sleep(0.01)
        q.cancel("r1:ext:2")
        with pytest.raises(NodeError, match="withdrawn"):
            await attempt

    run_async(main())


def test_public_config_leaves_out_secret_values_but_keeps_where_the_runner_finds_its_key() -> None:
    config: dict[str, Any] = {
        "provider": "openai",
        "api_key_env": "OPENAI_API_KEY",
        "api_key_file": "/run/secrets/key",
        "api_key": "sk-123",
        "access_token": "t",
        "headers": {"X-Api-Key": "k", "Authorization": "Bearer x", "Accept": "application/json"},
        "max_tokens": 100,
        "author": "someone",
    }
    assert public_config(config) == {
        "provider": "openai",
        "api_key_env": "OPENAI_API_KEY",
        "api_key_file": "/run/secrets/key",
        "headers": {"Accept": "application/json"},
        "max_tokens": 100,
        "author": "someone",
    }


# ---------------------------------------------------------------------------------------------- the runner's agent


def test_the_reference_runner_executes_scripted_jobs_per_attempt() -> None:
    script = [{"error": "flaky"}, {"output": {"n": 2}, "patch": {"ops": [], "reason": "none"}}]
    claimed: dict[str, Any] = {"job_id": "r:n:1", "run_id": "r", "node_id": "n", "attempt": 1, "version": "sha256:v"}
    claimed["config"] = {"provider": "scripted", "script": script}
    first = run_async(execute_job(claimed))
    assert first.error is not None and first.error["code"] == "agent_error" and first.error["retryable"]
    second = run_async(execute_job({**claimed, "attempt": 2}))
    assert second.answer is not None and second.answer.output == {"n": 2}
    assert second.answer.patch is not None and second.answer.patch.author == "agent:n"
    unknown = run_async(execute_job({**claimed, "config": {"provider": "llama"}}))
    assert unknown.error is not None and unknown.error["code"] == "no_provider" and not unknown.error["retryable"]


def test_close_ends_parked_claims_and_refuses_new_ones_but_honours_held_leases() -> None:
    async def main() -> None:
        q, _ = queue()
        future = q.offer(job())
        held = await q.claim("acme", "a", 0, 10)
        assert held is not None
        parked = asyncio.ensure_future(q.claim("acme", "b", wait_s=30, lease_s=10))
        await asyncio.sleep(0.01)
        q.close()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(parked, 1)
        with pytest.raises(Unavailable):
            await q.claim("other", "c", 0, 10)
        q.heartbeat("acme", held.job.job_id, held.lease_id)
        q.complete("acme", held.job.job_id, held.lease_id, AgentAnswer(output="in time"))
        assert (await future).output == "in time"

    run_async(main())


# ---------------------------------------------------------------------------------------------- the runner's loop


class FakeDaemon:
    """The three agent-job endpoints over a real queue, enough for the reference runner."""

    def __init__(self, queue: AgentJobQueue) -> None:
        self.queue = queue
        self.results: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/agent-jobs/claim", self._claim)
        app.router.add_post("/v1/agent-jobs/{id}/heartbeat", self._heartbeat)
        app.router.add_post("/v1/agent-jobs/{id}/result", self._result)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _claim(self, request: web.Request) -> web.Response:
        body = await request.json()
        claimed = await self.queue.claim("default", body["runner"], body["wait_s"], body["lease_s"])
        if claimed is None:
            return web.Response(status=204)
        job = claimed.job
        return web.json_response(
            {
                "job_id": job.job_id,
                "lease_id": claimed.lease_id,
                "lease_expires_in_s": claimed.lease_deadline - self.queue.clock(),
                "run_id": job.run_id,
                "node_id": job.node_id,
                "attempt": job.attempt,
                "inputs": job.inputs,
                "config": job.config,
                "document": job.document,
            }
        )

    async def _heartbeat(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            self.queue.heartbeat("default", request.match_info["id"], body["lease_id"])
        except (Conflict, NotFound) as exc:
            return web.json_response({"error": exc.to_dict()}, status=409 if isinstance(exc, Conflict) else 404)
        return web.json_response({})

    async def _result(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.results.append(body)
        answer = AgentAnswer(output=body.get("output"))
        try:
            self.queue.complete("default", request.match_info["id"], body["lease_id"], answer)
        except (Conflict, NotFound) as exc:
            return web.json_response({"error": exc.to_dict()}, status=409 if isinstance(exc, Conflict) else 404)
        return web.json_response({"status": "accepted"})


def slow_execution(started: asyncio.Event, seconds: float) -> Any:
    async def execute(claimed: Any, http_allow: Any = ()) -> Any:
        started.set()
        await asyncio.sleep(seconds)
        return runner_module.Outcome(answer=AgentAnswer(output={"slow": True}))

    return execute


def test_a_runner_asked_to_stop_finishes_its_job_first(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        started = asyncio.Event()
        monkeypatch.setattr(runner_module, "execute_job", slow_execution(started, 0.5))
        q = AgentJobQueue()
        fake = FakeDaemon(q)
        url = await fake.start()
        try:
            future = q.offer(job(workspace="default"))
            options = runner_module.Options(url=url, token=None, name="r", lease_s=0.3, wait_s=5)
            async with aiohttp.ClientSession() as session:
                runner = runner_module.Runner(options, session)
                loop_task = asyncio.ensure_future(runner.run())
                await asyncio.wait_for(started.wait(), 5)
                runner.stopping.set()  # SIGTERM mid-job; the job outlives its 0.3 s lease thanks to heartbeats
                assert await asyncio.wait_for(loop_task, 5) == 0
            assert (await future).output == {"slow": True}
            assert [r["output"] for r in fake.results] == [{"slow": True}]
        finally:
            await fake.close()

    run_async(main())


def test_a_runner_whose_job_was_withdrawn_abandons_it(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        started = asyncio.Event()
        monkeypatch.setattr(runner_module, "execute_job", slow_execution(started, 30))
        q = AgentJobQueue()
        fake = FakeDaemon(q)
        url = await fake.start()
        try:
            q.offer(job(workspace="default"))
            options = runner_module.Options(url=url, token=None, name="r", once=True, lease_s=0.3, wait_s=5)
            async with aiohttp.ClientSession() as session:
                run = asyncio.ensure_future(runner_module.Runner(options, session).run())
                await asyncio.wait_for(started.wait(), 5)
                q.cancel("r1:ext:1")  # the attempt timed out: the next heartbeat hears 404 and the work stops
                assert await asyncio.wait_for(run, 5) == 1
            assert fake.results == []
        finally:
            await fake.close()

    run_async(main())
