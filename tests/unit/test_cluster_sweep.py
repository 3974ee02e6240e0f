"""The sweep that carries on a daemon's runs whose nudge never came: a run recorded by another daemon (which does
not drive it) and announced to nobody is carried on by the owner of its partition, and nothing else is taken."""

from __future__ import annotations

from aobd.bus.kafka import KafkaConfig, partition_of
from aobd.cluster.coordinator import ClusterCoordinator
from aobd.engine.driver import Engine
from aobd.store.memory import MemoryCas, MemoryEventLog
from perf.w6 import w6_document
from tests.conftest import run_async

CONFIG = KafkaConfig(partitions=2)


def creator_and_owner() -> tuple[Engine, Engine, ClusterCoordinator]:
    """Two daemons' engines on one log: one takes start requests, the other (with its coordinator) owns runs."""
    log, cas = MemoryEventLog(), MemoryCas()
    creator, owner = Engine(log, cas), Engine(log, cas)
    coordinator = ClusterCoordinator(owner, CONFIG, "owner")
    coordinator.partitions = 2
    return creator, owner, coordinator


def test_the_owner_carries_on_a_run_whose_nudge_never_came() -> None:
    async def main() -> None:
        creator, owner, coordinator = creator_and_owner()
        coordinator._owned = {0, 1}

        stray = await creator.start_run(w6_document(), {"x": 1}, drive=False)  # recorded; its nudge is lost
        assert (await owner.load(stray)).status == "running" and not owner.drives(stray)
        driven = await owner.start_run(w6_document(), {"x": 1})  # started here: driven here already

        assert await coordinator.resume_unannounced() == 1
        assert (await owner.wait(stray))["status"] == "completed"
        assert (await owner.wait(driven))["status"] == "completed"
        assert coordinator.status()["runs_carried_on_by_sweep"] == 1
        assert await coordinator.resume_unannounced() == 0  # finished runs are not taken again
        await creator.close()
        await owner.close()

    run_async(main())


def test_the_sweep_leaves_other_daemons_partitions_alone() -> None:
    async def main() -> None:
        creator, owner, coordinator = creator_and_owner()
        runs: list[str] = []
        while len({partition_of(r, 2) for r in runs}) < 2 or len(runs) < 4:  # runs in both partitions
            runs.append(await creator.start_run(w6_document(), {"x": 1}, drive=False))
        ours = {r for r in runs if partition_of(r, 2) == 0}
        coordinator._owned = {0}
        assert await coordinator.resume_unannounced() == len(ours)
        assert {r for r in runs if owner.drives(r) or (await owner.load(r)).status != "running"} == ours
        await creator.close()
        await owner.close()

    run_async(main())


def test_resuming_a_run_that_finished_meanwhile_holds_nothing() -> None:
    async def main() -> None:
        log, cas = MemoryEventLog(), MemoryCas()
        engine = Engine(log, cas)
        run_id = (await engine.run(w6_document(), {"x": 1}))["run_id"]
        other = Engine(log, cas)  # another daemon's, which found the run unfinished a moment ago
        await other.resume(run_id)
        assert not other.drives(run_id) and other.active_runs() == []
        await engine.close()
        await other.close()

    run_async(main())
