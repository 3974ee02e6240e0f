"""The pure parts of the multi-process daemon: restart backoff, job accounting and re-sends, the plan, paths."""

from __future__ import annotations

from pathlib import Path

import msgspec

from aobd.config import Config, PlanesConfig
from aobd.model.workflow import Node
from aobd.planes import paths
from aobd.planes.jobs import JobBook, RunnerBeat
from aobd.planes.supervisor import Backoff, plan
from aobd.runner.wire import NodeJob, NodeOutcome


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def job(i: int, deadline: float = 1e12) -> NodeJob:
    node = msgspec.convert({"id": f"n{i}", "type": "function", "config": {"handler": "builtin:noop"}}, Node)
    return NodeJob(f"j{i}", "r1", f"n{i}", 1, node, {}, 30.0, deadline)


def done(j: NodeJob) -> NodeOutcome:
    return NodeOutcome(j.job_id, j.run_id, j.node_id, j.attempt, True)


def test_backoff_doubles_up_to_the_maximum_and_resets_after_a_stable_run() -> None:
    b = Backoff(0.5, 3.0, stable_after=30.0)
    assert [b.after_exit(1.0) for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert b.after_exit(31.0) == 0.5  # it stayed up: the next crash is a new story
    assert b.after_exit(1.0) == 1.0


def test_jobs_go_to_runners_with_credit_least_loaded_first() -> None:
    book = JobBook(clock=Clock())
    book.beat(b"a", RunnerBeat(0, 10, credit=2))
    book.beat(b"b", RunnerBeat(1, 11, credit=3))
    for i in range(6):
        book.submit(job(i))
    batches = book.assign(0.0)
    assert {k: len(v) for k, v in batches.items()} == {b"b": 3, b"a": 2}
    assert len(book.queue) == 1  # no credit left: it waits for an outcome
    book.complete(b"a", [done(batches[b"a"][0])])
    assert [j.job_id for j in book.assign(0.0)[b"a"]] == ["j5"]


def test_jobs_past_their_deadline_are_not_sent() -> None:
    book = JobBook(clock=Clock())
    book.beat(b"a", RunnerBeat(0, 10, credit=5))
    book.submit(job(1, deadline=50.0))
    book.submit(job(2, deadline=500.0))
    assert [j.job_id for j in book.assign(100.0)[b"a"]] == ["j2"]
    assert book.expired == 1


def test_a_silent_runner_loses_its_unfinished_jobs_to_another() -> None:
    clock = Clock()
    book = JobBook(clock=clock, dead_after_s=3.0)
    book.beat(b"a", RunnerBeat(0, 10, credit=4))
    for i in range(3):
        book.submit(job(i))
    sent = book.assign(0.0)[b"a"]
    book.complete(b"a", [done(sent[0])])
    clock.now += 2.0
    book.beat(b"b", RunnerBeat(1, 11, credit=4))
    clock.now += 2.0
    assert book.reap() == [b"a"]
    assert book.resent == 2
    assert [j.job_id for j in book.assign(0.0)[b"b"]] == ["j1", "j2"]  # the oldest first


def test_a_restarted_runner_replaces_its_old_process_at_once() -> None:
    book = JobBook(clock=Clock())
    book.beat(b"r0.10", RunnerBeat(0, 10, credit=4))
    book.submit(job(1))
    book.assign(0.0)
    assert book.beat(b"r0.20", RunnerBeat(0, 20, credit=4)) == [b"r0.10"]
    assert [j.job_id for j in book.assign(0.0)[b"r0.20"]] == ["j1"]


def test_a_runner_registered_by_heartbeat_counts_jobs_of_an_earlier_orchestrator() -> None:
    book = JobBook(clock=Clock())
    book.beat(b"a", RunnerBeat(0, 10, credit=2, busy=2))  # an orchestrator restart: the runner still works
    book.submit(job(1))
    assert book.assign(0.0) == {}
    book.complete(b"a", [done(job(99))])  # one of the old jobs finished (its outcome is dropped upstream)
    assert [j.job_id for j in book.assign(0.0)[b"a"]] == ["j1"]


def test_outcomes_of_unknown_runners_and_jobs_are_harmless() -> None:
    book = JobBook(clock=Clock())
    book.complete(b"ghost", [done(job(1))])
    book.beat(b"a", RunnerBeat(0, 10, credit=1))
    book.complete(b"a", [done(job(1))])
    assert book.runners[b"a"].free == 1


def test_the_plan_without_the_accept_plane_is_one_orchestrator_serving_http() -> None:
    config = Config(planes=PlanesConfig(orchestrators=3, runners=2, accept_workers=0, runner_cpus=[1]))
    children = [(c.role, c.index, c.cpus) for c in plan(config)]
    assert children == [("orchestrator", 0, ()), ("runner", 0, (1,)), ("runner", 1, (1,))]


def test_by_default_one_orchestrator_on_sqlite_and_one_per_cpu_on_postgres_resolved_once() -> None:
    import os

    from aobd.config import AUTO_ORCHESTRATORS_MAX, StorageConfig, load_config, orchestrator_count
    from aobd.planes.supervisor import Supervisor

    usable = len(os.sched_getaffinity(0))
    postgres = Config(storage=StorageConfig(event_log="postgres"))
    assert orchestrator_count(Config()) == 1  # the embedded log takes one writer at a time
    assert orchestrator_count(postgres) == max(1, min(AUTO_ORCHESTRATORS_MAX, usable))
    assert orchestrator_count(Config(planes=PlanesConfig(orchestrators=3))) == 3
    supervisor = Supervisor(postgres, None, env={})
    expected = orchestrator_count(postgres)
    assert supervisor.config.planes.orchestrators == expected
    assert [c.spec.index for c in supervisor.children if c.spec.role == "orchestrator"] == list(range(expected))
    # The children load their config with this variable, so one pinned to a single CPU still agrees.
    assert supervisor.env["AOBD_PLANES_ORCHESTRATORS"] == str(expected)
    child_view = load_config(None, env={"AOBD_PLANES_ORCHESTRATORS": str(expected)})
    assert orchestrator_count(child_view) == expected


def test_socket_dir_falls_back_to_a_short_path_when_too_long(tmp_path: Path) -> None:
    short = Config(data_dir=str(tmp_path))
    assert paths.socket_dir(short) == (tmp_path / "planes").resolve()
    deep = tmp_path / ("d" * 120)
    long = Config(data_dir=str(deep))
    fallback = paths.socket_dir(long)
    assert len(paths.orchestrator_jobs(long, 999)) - len("ipc://") <= paths.MAX_SOCKET_PATH
    assert fallback == paths.socket_dir(Config(data_dir=str(deep)))  # every process computes the same
    assert fallback != paths.socket_dir(Config(data_dir=str(tmp_path / ("e" * 120))))


def test_shared_documents_are_published_once_by_version_and_cleaned_up(tmp_path: Path) -> None:
    from aobd.planes import shm_ir

    namespace = shm_ir.namespace_of(str(tmp_path))
    writer, reader = shm_ir.SharedDocuments(namespace), shm_ir.SharedDocuments(namespace)
    doc = {"name": "w", "nodes": [{"id": "a", "type": "function", "config": {"handler": "builtin:noop"}}]}
    try:
        assert reader.get("sha256:" + "ab" * 32) is None
        assert writer.publish("sha256:" + "ab" * 32, doc)
        assert not writer.publish("sha256:" + "ab" * 32, doc)  # same version, same bytes: nothing to do
        assert reader.get("sha256:" + "ab" * 32) == doc
        assert reader.node("sha256:" + "ab" * 32, "a") == doc["nodes"][0]
        patched = {**doc, "nodes": [*doc["nodes"], {"id": "b", "type": "function", "config": {}}]}
        writer.publish("sha256:" + "cd" * 32, patched)  # a patched run has a new version, hence a new segment
        assert reader.get("sha256:" + "cd" * 32) == patched and reader.get("sha256:" + "ab" * 32) == doc
    finally:
        writer.close()
        reader.close()
        assert shm_ir.cleanup(namespace) == 2
    assert shm_ir.SharedDocuments(namespace).get("sha256:" + "ab" * 32) is None


def test_the_daemon_is_ready_when_its_orchestrators_and_a_runner_are() -> None:
    from aobd.planes.health import planes_ready

    def table(*children: tuple[str, int, bool]) -> dict[str, object]:
        return {"children": [{"role": r, "index": i, "ready": ok} for r, i, ok in children]}

    up = table(("orchestrator", 0, True), ("orchestrator", 1, True), ("runner", 0, False), ("runner", 1, True))
    assert planes_ready(up)
    assert not planes_ready({})  # no table yet: not ready
    assert not planes_ready(table(("orchestrator", 0, True), ("orchestrator", 1, False), ("runner", 0, True)))
    assert not planes_ready(table(("orchestrator", 0, True), ("runner", 0, False)))  # nobody to run function nodes
    # An orchestrator asking about the rest (it serves HTTP itself and knows its own state).
    assert planes_ready(table(("orchestrator", 0, False), ("runner", 0, True)), orchestrators=False)
    assert planes_ready(table(("orchestrator", 0, True), ("fanout", 0, True)))  # no runner plane configured
