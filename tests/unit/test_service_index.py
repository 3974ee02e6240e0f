"""The daemon's index of committed events (``Service._on_events``): which workspace may read which CAS blobs, and
the approvals waiting for a decision."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec

from aobd.api import schemas as s
from aobd.config import Config
from aobd.daemon.service import Caller
from aobd.model import events as ev
from tests.conftest import edge, fn, run_async, started_service, workflow


def test_a_workspace_owns_every_blob_its_run_recorded_and_no_other_does(tmp_path: Path) -> None:
    async def main() -> None:
        async with started_service(Config(data_dir=str(tmp_path))) as service:
            team, other = Caller("team", "write", "test"), Caller("other", "write", "test")
            # Every recorded value differs from the others: a's inputs (its output too, echo), b's inputs, b's output
            # (noop: null), the run's inputs and outputs; so each kind of event must have recorded its own ref.
            a = fn("a", **{"in": {"ticket": "inputs.v"}})
            b = fn("b", "builtin:noop", **{"in": {"got": "nodes.a.output.ticket"}})
            document = workflow([a, b], [edge("a", "b")])
            body = msgspec.convert({"definition": document, "inputs": {"v": 7}}, s.RunStart)
            summary = await service.start_run(team, body, wait_s=10)
            assert summary["status"] == "completed"
            events = await service.engine.events(summary["run_id"])
            refs: set[str] = set()
            for e in events:
                if isinstance(e, ev.RunCreated):
                    refs |= {e.base_ref, e.inputs_ref}
                elif isinstance(e, ev.NodeStarted):
                    refs.add(e.inputs_ref)
                elif isinstance(e, ev.NodeCompleted):
                    refs.add(e.output_ref)
                elif isinstance(e, ev.RunCompleted):
                    assert e.outputs_ref
                    refs.add(e.outputs_ref)
            assert len(refs) == 6  # the document, the run's inputs, a's, b's inputs, b's output, the run's outputs
            for ref in refs:
                assert (await service.get_blob(team, ref)) == await service.cas.get(ref)
                assert not await service.meta.owns_ref(other.workspace, ref), ref

    run_async(main())


def test_an_approval_is_listed_while_it_waits_and_not_after_its_run_is_cancelled(tmp_path: Path) -> None:
    async def main() -> None:
        async with started_service(Config(data_dir=str(tmp_path))) as service:
            caller = Caller("default", "write", "test")
            gate = {"id": "gate", "type": "approval", "config": {"assignees": ["ops"], "timeout": "2h"}}
            body = msgspec.convert({"definition": workflow([fn("a"), gate], [edge("a", "gate")])}, s.RunStart)
            run_id = (await service.start_run(caller, body))["run_id"]
            other_run = (await service.start_run(caller, body))["run_id"]
            for _ in range(200):  # the approval is requested once node a has completed
                pending = await service.list_approvals(caller, "pending")
                if len(pending) == 2:
                    break
                await asyncio.sleep(0.01)
            assert sorted((a.run_id, a.node_id) for a in pending) == sorted([(run_id, "gate"), (other_run, "gate")])
            assert await service.list_approvals(Caller("other", "write", "test"), None) == []
            await service.cancel(caller, run_id, "changed my mind")
            # Only the cancelled run's approval leaves the list.
            assert [a.run_id for a in await service.list_approvals(caller, "pending")] == [other_run]

    run_async(main())
