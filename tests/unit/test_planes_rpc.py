"""The Service over zmq (aobd.planes.rpc): errors keep their class, calls overlap, routing follows the shard."""

from __future__ import annotations

import asyncio
import inspect
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aobd.agents.jobs import AgentJob, AgentJobQueue, job_id_of
from aobd.api import schemas as s
from aobd.config import Config
from aobd.daemon.service import Caller, Service
from aobd.errors import (
    AobdError,
    Conflict,
    NodeError,
    NotFound,
    PatchError,
    RateLimited,
    Unavailable,
    WorkflowInvalid,
)
from aobd.metrics import Metrics, merge_expositions
from aobd.planes.paths import shard_of
from aobd.planes.rpc import METHODS, RemoteError, RpcServer, ServiceProxy
from tests.conftest import run_async

CALLER = Caller("acme", "write", "token:acme")

_ERRORS: dict[str, Exception] = {
    "invalid": WorkflowInvalid("bad workflow", details=[{"pointer": "/nodes/0", "code": "missing"}]),
    "limited": RateLimited("slow down", retry_after_s=1.5, workspace="acme", kind="run_start"),
    "node": NodeError("handler failed", code="handler_error", retryable=False),
    "patch": PatchError("bad op", op_index=2, path="/nodes/-"),
    "conflict": Conflict("run is completed"),
    "bug": ZeroDivisionError("division by zero"),
}


class FakeService:
    """Just enough of Service, answering with who served the call."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.arrived = 0
        self.all_arrived = asyncio.Event()
        self.agent_jobs = AgentJobQueue()

    async def get_run(self, caller: Caller, run_id: str) -> dict[str, Any]:
        return {"run_id": run_id, "served_by": self.index, "caller": [caller.workspace, caller.role, caller.name]}

    async def start_run(
        self, caller: Caller, body: s.RunStart, *, wait_s: float = 0.0, run_id: str | None = None
    ) -> dict[str, Any]:
        assert isinstance(body, s.RunStart) and isinstance(caller, Caller)
        return {"run_id": run_id, "served_by": self.index, "inputs": body.inputs, "wait_s": wait_s}

    async def cancel(self, caller: Caller, run_id: str, reason: str) -> dict[str, Any]:
        raise _ERRORS[reason]

    async def events(self, caller: Caller, run_id: str, after_seq: int = 0) -> list[Any]:
        # A barrier: no call answers before all 50 are in the server at once, and then later ones answer first.
        self.arrived += 1
        if self.arrived == 50:
            self.all_arrived.set()
        await self.all_arrived.wait()
        await asyncio.sleep((50 - after_seq) / 1000)
        return [after_seq]

    async def check_run(self, caller: Caller, run_id: str) -> None:
        await asyncio.sleep(3600)

    async def list_approvals(self, caller: Caller, status: str | None) -> list[s.ApprovalInfo]:
        return [s.ApprovalInfo(f"tkt{self.index}", "r1", "ask", "pending", [], None, None)]

    async def decide_approval(self, caller: Caller, ticket: str, body: s.ApprovalDecision) -> s.ApprovalInfo:
        if ticket != f"tkt{self.index}":
            raise NotFound(f"no approval ticket {ticket!r} in this workspace")
        return s.ApprovalInfo(ticket, "r1", "ask", "approved", [], None, caller.name)

    async def close(self) -> None:  # not in the allow-list: must not be callable remotely
        raise AssertionError("close was called over RPC")


@pytest.fixture
def sockets() -> Iterator[Path]:
    # Short: unix socket paths are limited to 107 bytes, and pytest's tmp_path is deep.
    path = Path(tempfile.mkdtemp(prefix="aobd-rpc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _with_planes(
    sockets: Path, n: int, scenario: Any, *, timeout_s: float = 5.0, services: list[FakeService] | None = None
) -> Any:
    endpoints = [f"ipc://{sockets}/orch-{i}.rpc" for i in range(n)]
    services = services or [FakeService(i) for i in range(n)]
    servers = [RpcServer(service, e) for service, e in zip(services, endpoints, strict=True)]
    for server in servers:
        await server.start()
    proxy = ServiceProxy(Config(data_dir=str(sockets)), endpoints=endpoints, timeout_s=timeout_s)
    await proxy.start()
    try:
        return await scenario(proxy)
    finally:
        await proxy.close()
        for server in servers:
            await server.close()


@pytest.mark.parametrize("kind", sorted(_ERRORS))
def test_errors_cross_the_wire_as_the_same_class_code_message_and_details(sockets: Path, kind: str) -> None:
    async def scenario(proxy: ServiceProxy) -> BaseException:
        with pytest.raises(Exception) as info:
            await proxy.cancel(CALLER, "r1", kind)
        return info.value

    got = run_async(_with_planes(sockets, 1, scenario))
    sent = _ERRORS[kind]
    if not isinstance(sent, AobdError):
        assert isinstance(got, RemoteError) and "ZeroDivisionError" in str(got)  # the Api answers 500
        return
    assert type(got) is type(sent)
    assert isinstance(got, AobdError)
    assert (got.code, got.message, got.details) == (sent.code, sent.message, sent.details)
    assert str(got) == str(sent)
    if isinstance(sent, RateLimited):
        assert isinstance(got, RateLimited) and got.retry_after_s == 1.5
    if isinstance(sent, NodeError):
        assert isinstance(got, NodeError) and got.retryable is False and got.code == "handler_error"
    if isinstance(sent, PatchError):
        assert isinstance(got, PatchError) and (got.op_index, got.path) == (2, "/nodes/-")


def test_calls_overlap_on_one_socket_and_each_gets_its_own_answer(sockets: Path) -> None:
    async def scenario(proxy: ServiceProxy) -> list[list[Any]]:
        return await asyncio.gather(*(proxy.events(CALLER, "r1", i) for i in range(50)))

    answers = run_async(_with_planes(sockets, 1, scenario))
    assert answers == [[i] for i in range(50)]


def test_calls_go_to_the_shard_of_their_run_and_starts_to_the_shard_of_the_new_id(sockets: Path) -> None:
    run_ids = [f"r{i:020x}" for i in range(40)]

    async def scenario(proxy: ServiceProxy) -> tuple[list[Any], list[Any]]:
        reads = [await proxy.get_run(CALLER, run_id) for run_id in run_ids]
        starts = [await proxy.start_run(CALLER, s.RunStart(workflow="w", inputs={"x": i})) for i in range(20)]
        return reads, starts

    reads, starts = run_async(_with_planes(sockets, 3, scenario))
    assert [r["served_by"] for r in reads] == [shard_of(r, 3) for r in run_ids]
    assert {r["served_by"] for r in reads} == {0, 1, 2}
    assert reads[0]["caller"] == ["acme", "write", "token:acme"]
    for i, started in enumerate(starts):
        assert started["served_by"] == shard_of(started["run_id"], 3)
        assert started["inputs"] == {"x": i}


def test_approvals_are_gathered_from_every_orchestrator_and_decided_by_the_owner(sockets: Path) -> None:
    async def scenario(proxy: ServiceProxy) -> tuple[list[s.ApprovalInfo], s.ApprovalInfo]:
        listed = await proxy.list_approvals(CALLER, None)
        decided = await proxy.decide_approval(CALLER, "tkt1", s.ApprovalDecision(decision="approve"))
        with pytest.raises(NotFound):
            await proxy.decide_approval(CALLER, "tkt9", s.ApprovalDecision(decision="approve"))
        return listed, decided

    listed, decided = run_async(_with_planes(sockets, 3, scenario))
    assert sorted(a.ticket for a in listed) == ["tkt0", "tkt1", "tkt2"]
    assert decided.status == "approved" and decided.decided_by == "token:acme"


def test_an_orchestrator_that_does_not_answer_is_unavailable(sockets: Path) -> None:
    async def scenario(proxy: ServiceProxy) -> None:
        with pytest.raises(Unavailable, match="did not answer check_run"):
            await proxy.check_run(CALLER, "r1")
        # The channel still works after a timeout.
        assert (await proxy.get_run(CALLER, "r1"))["served_by"] == 0

    run_async(_with_planes(sockets, 1, scenario, timeout_s=0.3))

    async def nobody() -> None:
        proxy = ServiceProxy(Config(), endpoints=[f"ipc://{sockets}/missing.rpc"], timeout_s=0.2)
        await proxy.start()
        try:
            with pytest.raises(Unavailable):
                await proxy.get_run(CALLER, "r1")
        finally:
            await proxy.close()

    run_async(nobody())


def test_a_call_that_timed_out_before_any_orchestrator_listened_is_never_delivered(sockets: Path) -> None:
    endpoint = f"ipc://{sockets}/late.rpc"
    service = FakeService(0)
    served: list[str] = []
    answer = service.get_run

    async def get_run(caller: Caller, run_id: str) -> dict[str, Any]:
        served.append(run_id)
        return await answer(caller, run_id)

    service.get_run = get_run  # type: ignore[method-assign]

    async def scenario() -> None:
        proxy = ServiceProxy(Config(data_dir=str(sockets)), endpoints=[endpoint], timeout_s=0.2)
        await proxy.start()
        server = RpcServer(service, endpoint)
        try:
            with pytest.raises(Unavailable):
                await proxy.get_run(CALLER, "r-given-up")  # queued: nobody is bound yet
            await server.start()  # the orchestrator comes up after its caller gave up
            proxy.timeout_s = 5.0
            assert (await proxy.get_run(CALLER, "r-later"))["run_id"] == "r-later"
            await asyncio.sleep(0.1)
            assert served == ["r-later"]
        finally:
            await proxy.close()
            await server.close()

    run_async(scenario())


def test_only_allowed_methods_are_served(sockets: Path) -> None:
    async def scenario(proxy: ServiceProxy) -> None:
        with pytest.raises(RemoteError, match="not served"):
            await proxy._call(0, "close")

    run_async(_with_planes(sockets, 1, scenario))


def test_arguments_arrive_typed_and_bad_ones_are_refused_by_name(sockets: Path) -> None:
    """The server converts wire arguments with the method's annotations; a call that does not fit them never runs."""

    async def scenario(proxy: ServiceProxy) -> None:
        got = await proxy._call(0, "start_run", CALLER, s.RunStart(workflow="w", inputs={"x": 1}), wait_s=2, run_id="r")
        assert got == {"run_id": "r", "served_by": 0, "inputs": {"x": 1}, "wait_s": 2.0}
        bad = {
            r"Expected `object`, got `int` - at `\$.body`": ((CALLER, 7), {}),  # not a RunStart
            "unknown field `colour`": ((CALLER, s.RunStart(workflow="w")), {"colour": "red"}),
            "at most 2": ((CALLER, s.RunStart(workflow="w"), 1.0), {}),  # wait_s is keyword-only
            "given twice": ((CALLER,), {"caller": CALLER}),
            "missing required field `body`": ((CALLER,), {}),
        }
        for message, (args, kwargs) in bad.items():
            with pytest.raises(RemoteError, match=message):
                await proxy._call(0, "start_run", *args, **kwargs)

    run_async(_with_planes(sockets, 1, scenario))


def test_the_proxy_has_the_service_call_surface() -> None:
    """The accept worker hands a ServiceProxy to the Api where it expects a Service."""
    for name in sorted(METHODS):
        expected = inspect.signature(getattr(Service, name))
        got = inspect.signature(getattr(ServiceProxy, name))
        assert list(got.parameters) == list(expected.parameters), name
        if name != "status":  # the one the Api awaits when it must (a proxy cannot answer synchronously)
            assert inspect.iscoroutinefunction(getattr(ServiceProxy, name)), name
            assert inspect.iscoroutinefunction(getattr(Service, name)), name


def _job(run_id: str) -> AgentJob:
    return AgentJob(job_id_of(run_id, "ext", 1), run_id, "ext", 1, "acme", {}, {}, {})


def test_a_claim_asks_every_orchestrator_and_gives_back_what_the_losers_lease_later(sockets: Path) -> None:
    services = [FakeService(i) for i in range(3)]
    # Run ids of each shard, so that each job sits where its run is driven.
    by_shard = {shard_of(f"r{i:020x}", 3): f"r{i:020x}" for i in range(50)}

    async def scenario(proxy: ServiceProxy) -> None:
        services[1].agent_jobs.offer(_job(by_shard[1]))
        claimed = await proxy.agent_jobs.claim("acme", "runner-a", 2.0, 30.0)
        assert claimed is not None and claimed.run_id == by_shard[1]
        # The claims sent to orchestrators 0 and 2 are still waiting there; one of them now leases a new job...
        services[2].agent_jobs.offer(_job(by_shard[2]))
        for _ in range(200):
            await asyncio.sleep(0.01)
            infos = {j.job_id: j for j in await proxy.agent_jobs.pending("acme")}
            late = infos.get(job_id_of(by_shard[2], "ext", 1))
            if late is not None and late.claims == 1 and late.state == "offered":
                break
        else:
            raise AssertionError(f"the late lease was not given back: {infos}")
        # ...which went back at once: another runner gets it, and the first job stays with its runner.
        again = await proxy.agent_jobs.claim("acme", "runner-b", 1.0, 30.0)
        assert again is not None and again.run_id == by_shard[2]
        assert infos[claimed.job_id].state == "leased" and infos[claimed.job_id].runner == "runner-a"
        lease = await proxy.agent_jobs.heartbeat("acme", claimed.job_id, claimed.lease_id, 10.0)
        assert lease.lease_id == claimed.lease_id and 9 < lease.lease_expires_in_s <= 10
        with pytest.raises(Conflict):
            await proxy.agent_jobs.heartbeat("acme", claimed.job_id, "not-the-lease", None)

    run_async(_with_planes(sockets, 3, scenario, services=services))


def test_the_merged_metrics_come_from_orchestrator_0_in_the_format_the_scraper_asks(sockets: Path) -> None:
    openmetrics_accept = "application/openmetrics-text; version=1.0.0"

    class Orchestrator(FakeService):
        async def metrics_exposition(self, accept: str | None = None) -> tuple[bytes, str] | None:
            return merge_expositions([(f"orchestrator-{self.index}", Metrics(impl="c").render()[0])], accept)

    async def scenario(proxy: ServiceProxy) -> list[tuple[bytes, str] | None]:
        return [await proxy.metrics_exposition(), await proxy.metrics_exposition(openmetrics_accept)]

    services: list[FakeService] = [Orchestrator(i) for i in range(2)]
    text, openmetrics = run_async(_with_planes(sockets, 2, scenario, services=services))
    assert text is not None and openmetrics is not None
    assert text[1] == "text/plain; version=0.0.4; charset=utf-8"
    assert openmetrics[1].startswith(openmetrics_accept) and openmetrics[0].endswith(b"# EOF\n")
    for body, _ in (text, openmetrics):
        assert b'plane="orchestrator-0"' in body and b"orchestrator-1" not in body
