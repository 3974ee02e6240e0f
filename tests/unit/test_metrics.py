"""Prometheus metrics: events in, exposition out (parsed back, and linted by promtool)."""

from __future__ import annotations

import platform
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from aobd import __version__, _fast
from aobd.engine.admission import Admission
from aobd.metrics import OTHER, UNKNOWN, Metrics, MetricsListener, merge_expositions
from aobd.model import events as ev
from aobd.store.sqlite_log import GroupCommitMetrics
from tests.conftest import require_services

Labels = tuple[tuple[str, str], ...]


def samples(metrics: Metrics) -> dict[tuple[str, Labels], float]:
    """Every sample of the rendered text, parsed back: {(name, sorted labels): value}."""
    body, _ = metrics.render()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, tuple(sorted(labels.items()))), 0.0)


class RunEvents:
    """Builds one run's events with consecutive seqs and a clock, as the engine would commit them."""

    def __init__(self, run_id: str, workflow: str, t0: float = 1_700_000_000.0) -> None:
        self.run_id = run_id
        self.workflow = workflow
        self.seq = 0
        self.ts = t0

    def _common(self) -> dict[str, Any]:
        self.seq += 1
        self.ts += 0.001
        return {"run_id": self.run_id, "seq": self.seq, "ts": self.ts}

    def created(self, **extra: Any) -> ev.RunCreated:
        return ev.RunCreated(
            **self._common(),
            workflow=self.workflow,
            base_version="sha256:" + "a" * 64,
            base_ref="sha256:" + "a" * 64,
            inputs_ref="sha256:" + "b" * 64,
            **extra,
        )

    def node(self, node_id: str, node_type: str, ms: float, attempt: int = 1, **extra: Any) -> list[ev.Event]:
        return [
            ev.NodeScheduled(**self._common(), node_id=node_id, attempt=attempt),
            ev.NodeStarted(**self._common(), node_id=node_id, attempt=attempt, inputs_ref="sha256:" + "c" * 64),
            ev.NodeCompleted(
                **self._common(),
                node_id=node_id,
                attempt=attempt,
                output_ref="sha256:" + "d" * 64,
                node_type=node_type,
                duration_ms=ms,
                **extra,
            ),
        ]

    def failed(self, node_id: str, node_type: str, ms: float, attempt: int, retry: bool) -> list[ev.Event]:
        return [
            ev.NodeStarted(**self._common(), node_id=node_id, attempt=attempt, inputs_ref="sha256:" + "c" * 64),
            ev.NodeFailed(
                **self._common(),
                node_id=node_id,
                attempt=attempt,
                error={"code": "handler_error", "message": "boom"},
                retryable=retry,
                node_type=node_type,
                retry_at=self.ts + 1 if retry else None,
                duration_ms=ms,
            ),
        ]

    def proposed(self, patch_id: str) -> ev.PatchProposed:
        ops = [{"op": "add", "path": "/nodes/-", "value": {"id": "extra", "type": "function"}}]
        return ev.PatchProposed(**self._common(), patch_id=patch_id, author="agent:plan", ops=ops, node_id="plan")

    def applied(self, patch_id: str) -> ev.PatchApplied:
        v = "sha256:" + "e" * 64
        return ev.PatchApplied(**self._common(), patch_id=patch_id, version=v, version_ref=v, added_nodes=["extra"])

    def rejected(self, patch_id: str, *codes: str) -> ev.PatchRejected:
        reasons = [{"code": code, "message": f"refused: {code}", "rule": 1} for code in codes]
        return ev.PatchRejected(**self._common(), patch_id=patch_id, reasons=reasons)

    def approval(self, node_id: str, ticket: str) -> ev.ApprovalRequested:
        return ev.ApprovalRequested(**self._common(), node_id=node_id, ticket=ticket, assignees=["ops"])

    def decided(self, node_id: str, ticket: str) -> ev.ApprovalDecided:
        return ev.ApprovalDecided(**self._common(), node_id=node_id, ticket=ticket, decision="approve", by="alice")

    def completed(self) -> ev.RunCompleted:
        return ev.RunCompleted(**self._common(), outputs={"route": "billing"})

    def run_failed(self, node_id: str) -> ev.RunFailed:
        return ev.RunFailed(**self._common(), error={"code": "node_failed", "message": "boom"}, node_id=node_id)

    def cancelled(self) -> ev.RunCancelled:
        return ev.RunCancelled(**self._common(), reason="operator", by="admin")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def listener(metrics: Metrics) -> MetricsListener:
    return MetricsListener(metrics)


def feed_realistic_day(listener: MetricsListener) -> Iterator[str]:
    """Three runs and a replay, interleaved as the engine commits steps; yields a checkpoint name between steps."""
    a = RunEvents("run_a", "triage")
    b = RunEvents("run_b", "triage")
    c = RunEvents("run_c", "ingest")
    # a: fetch, an agent whose first patch is refused and second applied, an approval, done.
    listener([a.created(), *a.node("fetch", "function", 2.0)])
    listener([b.created(), *b.failed("call", "http", 120.0, attempt=1, retry=True)])
    listener([c.created(), c.approval("review", "tkt_c")])
    listener([*a.node("plan", "agent", 850.0), a.proposed("p1"), a.rejected("p1", "past_changed", "bad_op")])
    listener([a.proposed("p2"), a.applied("p2"), *a.node("extra", "function", 0.4)])
    listener([a.approval("approve", "tkt_a")])
    yield "waiting"
    listener([a.decided("approve", "tkt_a"), a.completed()])
    # b: the retry fails too, and the run with it.
    listener([*b.failed("call", "http", 30_000.0, attempt=2, retry=False), b.run_failed("call")])
    # c: cancelled while its approval is still pending.
    listener([c.cancelled()])
    # A replay of a reuses fetch's output (nothing runs) and executes plan again.
    r = RunEvents("run_r", "triage")
    listener([r.created(parent_run_id="run_a")])
    listener([*r.node("fetch", "function", 0.0, reused_from="run_a"), *r.node("plan", "agent", 700.0), r.completed()])
    yield "done"


def test_events_become_run_node_patch_and_approval_metrics(metrics: Metrics, listener: MetricsListener) -> None:
    day = feed_realistic_day(listener)

    assert next(day) == "waiting"
    assert value(metrics, "aobd_runs_active") == 3
    assert value(metrics, "aobd_approvals_pending", kind="node") == 2
    assert value(metrics, "aobd_approvals_pending", kind="patch") == 0

    assert next(day) == "done"
    s = samples(metrics)

    def v(name: str, **labels: str) -> float:
        return s.get((name, tuple(sorted(labels.items()))), 0.0)

    assert v("aobd_runs_started_total", workflow="triage") == 3
    assert v("aobd_runs_started_total", workflow="ingest") == 1
    assert v("aobd_runs_finished_total", workflow="triage", status="completed") == 2
    assert v("aobd_runs_finished_total", workflow="triage", status="failed") == 1
    assert v("aobd_runs_finished_total", workflow="ingest", status="cancelled") == 1
    assert v("aobd_runs_active") == 0
    assert listener.tracked_runs == 0
    # c's ticket went with its run; a's was decided.
    assert v("aobd_approvals_pending", kind="node") == 0

    # Executed attempts only: the replay's reused fetch is not one.
    fn_done = {"node_type": "function", "outcome": "completed"}
    assert v("aobd_node_attempts_total", **fn_done) == 2
    assert v("aobd_node_attempt_duration_seconds_count", **fn_done) == 2
    assert v("aobd_node_attempt_duration_seconds_sum", **fn_done) == pytest.approx(0.0024)
    assert v("aobd_node_attempt_duration_seconds_bucket", **fn_done, le="0.0005") == 1
    assert v("aobd_node_attempt_duration_seconds_bucket", **fn_done, le="0.0025") == 2
    assert v("aobd_node_attempts_total", node_type="agent", outcome="completed") == 2
    assert v("aobd_node_attempt_duration_seconds_bucket", node_type="agent", outcome="completed", le="0.5") == 0
    assert v("aobd_node_attempt_duration_seconds_bucket", node_type="agent", outcome="completed", le="1.0") == 2
    http_failed = {"node_type": "http", "outcome": "failed"}
    assert v("aobd_node_attempts_total", **http_failed) == 2
    assert v("aobd_node_attempt_duration_seconds_sum", **http_failed) == pytest.approx(30.12)
    assert v("aobd_node_attempt_duration_seconds_bucket", **http_failed, le="10.0") == 1
    assert v("aobd_node_attempt_duration_seconds_bucket", **http_failed, le="+Inf") == 2

    assert v("aobd_patches_proposed_total") == 2
    assert v("aobd_patches_applied_total") == 1
    # Labelled by the first reason only.
    assert v("aobd_patches_rejected_total", reason="past_changed") == 1
    assert ("aobd_patches_rejected_total", (("reason", "bad_op"),)) not in s

    assert v("aobd_events_total", type="RunCreated") == 4
    assert v("aobd_events_total", type="NodeCompleted") == 5
    assert v("aobd_events_total", type="NodeFailed") == 2

    # No label anywhere carries a run, node, ticket or patch id.
    ids = {"run_a", "run_b", "run_c", "run_r", "fetch", "plan", "call", "review", "tkt_a", "tkt_c", "p1", "p2"}
    assert not {value for _, labels in s for _, value in labels} & ids


def test_a_patch_held_for_review_is_a_pending_approval(metrics: Metrics, listener: MetricsListener) -> None:
    run = RunEvents("run_h", "triage")
    listener([run.created(), run.proposed("p_held")])
    assert value(metrics, "aobd_approvals_pending", kind="patch") == 1
    listener([run.applied("p_held")])
    assert value(metrics, "aobd_approvals_pending", kind="patch") == 0
    listener([run.proposed("p_held2")])
    listener([run.completed()])
    assert value(metrics, "aobd_approvals_pending", kind="patch") == 0


def test_build_info(metrics: Metrics) -> None:
    labels = {"version": __version__, "impl": _fast.__impl__, "python": platform.python_version()}
    assert value(metrics, "aobd_build_info", **labels) == 1
    assert value(Metrics(impl="python"), "aobd_build_info", **{**labels, "impl": "python"}) == 1


def test_registries_are_not_shared() -> None:
    first, second = Metrics(), Metrics()
    MetricsListener(first)([RunEvents("run_1", "w").created()])
    assert value(first, "aobd_runs_started_total", workflow="w") == 1
    assert value(second, "aobd_runs_started_total", workflow="w") == 0


def test_run_map_is_bounded(metrics: Metrics) -> None:
    listener = MetricsListener(metrics, max_tracked_runs=2)
    runs = [RunEvents(f"run_{i}", "w") for i in range(3)]
    listener([run.created() for run in runs])
    listener([runs[0].approval("review", "tkt_0")])  # run_0 was forgotten: nothing to clear later either
    assert listener.tracked_runs == 2
    assert value(metrics, "aobd_runs_active") == 2
    assert value(metrics, "aobd_approvals_pending", kind="node") == 0
    listener([run.completed() for run in runs])
    assert value(metrics, "aobd_runs_finished_total", workflow=UNKNOWN, status="completed") == 1
    assert value(metrics, "aobd_runs_finished_total", workflow="w", status="completed") == 2
    assert value(metrics, "aobd_runs_active") == 0
    assert listener.tracked_runs == 0


def test_restore_rebuilds_live_state_without_counting(metrics: Metrics, listener: MetricsListener) -> None:
    run = RunEvents("run_old", "triage")
    history = [run.created(), *run.node("fetch", "function", 1.0), run.approval("review", "tkt_old")]
    listener.restore(history)
    assert value(metrics, "aobd_runs_active") == 1
    assert value(metrics, "aobd_approvals_pending", kind="node") == 1
    assert value(metrics, "aobd_runs_started_total", workflow="triage") == 0
    assert value(metrics, "aobd_node_attempts_total", node_type="function", outcome="completed") == 0

    listener([run.decided("review", "tkt_old"), run.completed()])
    assert value(metrics, "aobd_runs_finished_total", workflow="triage", status="completed") == 1
    assert value(metrics, "aobd_runs_active") == 0
    assert value(metrics, "aobd_approvals_pending", kind="node") == 0


def test_open_ended_labels_are_capped() -> None:
    metrics = Metrics(max_label_values=2)
    listener = MetricsListener(metrics)
    listener([RunEvents(f"run_{name}", name).created() for name in ("a", "b", "c", "d")])
    assert value(metrics, "aobd_runs_started_total", workflow="a") == 1
    assert value(metrics, "aobd_runs_started_total", workflow="b") == 1
    assert value(metrics, "aobd_runs_started_total", workflow=OTHER) == 2
    for i in range(5):
        metrics.observe_rate_limited(f"ws{i}", "run_start")
    assert value(metrics, "aobd_rate_limited_total", workspace=OTHER, kind="run_start") == 3


def test_http_requests(metrics: Metrics) -> None:
    metrics.observe_request("get_run", "GET", 200, 0.0007)
    metrics.observe_request("get_run", "get", 404, 0.0002)
    metrics.observe_request("unmatched", "BREW", 405, 0.0001)
    metrics.observe_request("start_run", "POST", 999, 0.02)
    assert value(metrics, "aobd_http_requests_total", route="get_run", method="GET", status="200") == 1
    assert value(metrics, "aobd_http_requests_total", route="get_run", method="GET", status="404") == 1
    assert value(metrics, "aobd_http_requests_total", route="unmatched", method=OTHER, status="405") == 1
    assert value(metrics, "aobd_http_requests_total", route="start_run", method="POST", status=OTHER) == 1
    assert value(metrics, "aobd_http_request_duration_seconds_count", route="get_run", method="GET") == 2
    assert value(metrics, "aobd_http_request_duration_seconds_bucket", route="get_run", method="GET", le="0.0005") == 1


def test_gauges_set_by_the_daemon(metrics: Metrics) -> None:
    metrics.queue_depth.set(17)
    subscribers = [object(), object(), object()]
    metrics.track_subscribers(lambda: len(subscribers))
    assert value(metrics, "aobd_queue_depth") == 17
    assert value(metrics, "aobd_stream_subscribers") == 3
    subscribers.pop()
    assert value(metrics, "aobd_stream_subscribers") == 2


def test_admission_places_and_waits_are_read_at_scrape_time(metrics: Metrics) -> None:
    admission = Admission(4)
    metrics.track_admission(admission)
    admission.computing, admission.admitted_after_wait, admission.wait_seconds = 4, 10, 0.25
    assert value(metrics, "aobd_runs_computing") == 4
    assert value(metrics, "aobd_runs_waiting_to_start") == 0
    assert value(metrics, "aobd_run_admission_wait_seconds_count") == 10
    assert value(metrics, "aobd_run_admission_wait_seconds_sum") == 0.25
    admission.computing = 1
    assert value(metrics, "aobd_runs_computing") == 1


def test_messages_to_the_fanout_plane_are_read_at_scrape_time(metrics: Metrics) -> None:
    class Publisher:
        sent, dropped = 0, 0

    publisher = Publisher()
    metrics.track_fanout(publisher)
    publisher.sent, publisher.dropped = 12, 3
    assert value(metrics, "aobd_fanout_messages_total", outcome="sent") == 12
    assert value(metrics, "aobd_fanout_messages_total", outcome="dropped") == 3


class _Store:
    def __init__(self) -> None:
        self.metrics = GroupCommitMetrics()


def test_event_log_counters_are_read_at_scrape_time(metrics: Metrics) -> None:
    store = _Store()
    assert metrics.observe_store(store)
    assert value(metrics, "aobd_eventlog_commit_duration_seconds_count") == 0

    m = store.metrics
    m.commits, m.appends, m.records, m.conflicts = 4, 300, 900, 2
    m.commit_seconds_total, m.last_commit_seconds = 0.012, 0.004
    m.last_batch_size, m.max_batch_size, m.checkpoints = 80, 120, 1
    assert value(metrics, "aobd_eventlog_commit_duration_seconds_count") == 4
    assert value(metrics, "aobd_eventlog_commit_duration_seconds_sum") == pytest.approx(0.012)
    assert value(metrics, "aobd_eventlog_batch_size_count") == 4
    assert value(metrics, "aobd_eventlog_batch_size_sum") == 300
    assert value(metrics, "aobd_eventlog_records_total") == 900
    assert value(metrics, "aobd_eventlog_conflicts_total") == 2
    assert value(metrics, "aobd_eventlog_checkpoints_total") == 1
    assert value(metrics, "aobd_eventlog_last_commit_duration_seconds") == pytest.approx(0.004)
    assert value(metrics, "aobd_eventlog_max_batch_size") == 120

    # A reopened store replaces the old one instead of clashing with it.
    assert metrics.observe_store(_Store())
    assert value(metrics, "aobd_eventlog_records_total") == 0
    # A backend without group-commit counters exports nothing.
    assert not metrics.observe_store(object())


def test_content_negotiation(metrics: Metrics) -> None:
    body, content_type = metrics.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b"aobd_build_info" in body
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


@pytest.mark.integration  # runs a subprocess, so not strictly a unit test; it needs no service though
def test_exposition_passes_promtool(metrics: Metrics, listener: MetricsListener) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        hint = "promtool is not installed (Debian/Ubuntu: apt-get install prometheus)"
        if require_services():
            pytest.fail(f"{hint}; AOBD_REQUIRE_SERVICES=1 makes this a failure")
        pytest.skip(hint)
    for _ in feed_realistic_day(listener):
        pass
    metrics.observe_store(_Store())
    metrics.observe_request("get_run", "GET", 200, 0.001)
    metrics.observe_rate_limited("acme", "patch")
    body, _ = metrics.render()
    # The multi-process daemon's merge of two such processes (aobd.metrics.merge_expositions) must lint too.
    merged, _ = merge_expositions([("orchestrator-0", body), ("accept-0", Metrics(impl="c").render()[0])])
    for exposition in (body, merged):
        result = subprocess.run(
            [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=60, check=False
        )
        problems = (result.stdout + result.stderr).decode()
        assert result.returncode == 0, problems
    assert problems.strip() == ""


OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def _planes_parts() -> list[tuple[str, bytes]]:
    """Four processes' expositions as their heartbeats carry them (text 0.0.4), rendered once."""
    orchestrator, accept_0, accept_1 = Metrics(impl="c"), Metrics(impl="c"), Metrics(impl="c")
    orchestrator.runs_started.labels("w6").inc(5)
    orchestrator.runs_active.set(2)
    orchestrator.observe_store(_Store())
    for worker, n in ((accept_0, 2), (accept_1, 3)):
        for _ in range(n):
            worker.observe_request("startRun", "POST", 201, 0.004)
    accept_1.observe_request("getRun", "GET", 200, 0.0002)  # a label set only the second worker has
    table = {"children": [{"role": "runner", "index": 0, "pid": 7, "state": "up", "restarts": 1}]}
    orchestrator.track_planes(lambda: table)
    other = Metrics(impl="c")
    other.track_planes(lambda: table)
    return [
        ("orchestrator-0", orchestrator.render()[0]),
        ("orchestrator-1", other.render()[0]),
        ("accept-0", accept_0.render()[0]),
        ("accept-1", accept_1.render()[0]),
    ]


def _parsed(body: bytes, content_type: str) -> dict[tuple[str, Labels], float]:
    if content_type.startswith("application/openmetrics-text"):
        families = list(openmetrics_families(body.decode()))  # strict: raises on anything OpenMetrics forbids
    else:
        families = list(text_string_to_metric_families(body.decode()))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


@pytest.mark.parametrize("accept", [None, OPENMETRICS])
def test_the_planes_merge_sums_what_adds_up_and_keeps_each_process_apart_where_it_does_not(
    accept: str | None,
) -> None:
    body, content_type = merge_expositions(_planes_parts(), accept)
    samples = _parsed(body, content_type)
    assert samples[("aobd_runs_started_total", (("workflow", "w6"),))] == 5
    assert samples[("aobd_runs_active", ())] == 2
    started = (("method", "POST"), ("route", "startRun"), ("status", "201"))
    assert samples[("aobd_http_requests_total", started)] == 5  # summed over the accept workers
    bucket = ("aobd_http_request_duration_seconds_bucket", (("le", "+Inf"), ("method", "POST"), ("route", "startRun")))
    assert samples[bucket] == 5
    assert samples[("aobd_http_requests_total", (("method", "GET"), ("route", "getRun"), ("status", "200")))] == 1
    assert samples[("aobd_plane_up", (("index", "0"), ("role", "runner")))] == 1  # once, not once per orchestrator
    assert samples[("aobd_plane_restarts_total", (("role", "runner"),))] == 1
    build = [v for (name, _), v in samples.items() if name == "aobd_build_info"]
    assert build == [1]
    planes = {dict(labels)["plane"] for (name, labels) in samples if name == "process_cpu_seconds_total"}
    assert planes == {"orchestrator-0", "orchestrator-1", "accept-0", "accept-1"}
    assert b"_created" not in body


def test_the_planes_merge_answers_openmetrics_when_asked_with_the_same_values() -> None:
    parts = _planes_parts()
    text, text_type = merge_expositions(parts)
    assert text_type == "text/plain; version=0.0.4; charset=utf-8"
    assert not text.endswith(b"# EOF\n")
    # Prometheus's own scrape header: OpenMetrics first, text as a fallback; the same rule as Metrics.render.
    accept = f"{OPENMETRICS},application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5"
    body, content_type = merge_expositions(parts, accept)
    assert content_type == Metrics(impl="c").render(accept)[1]
    assert content_type.startswith(OPENMETRICS)
    assert body.endswith(b"\n# EOF\n") and body.count(b"# EOF") == 1
    assert _parsed(body, content_type) == _parsed(text, text_type)
    families = {f.name: f for f in openmetrics_families(body.decode())}
    # A counter is one family without the suffix, its samples with it, and no _created after the merge.
    requests = families["aobd_http_requests"]
    assert requests.type == "counter"
    assert {s.name for s in requests.samples} == {"aobd_http_requests_total"}
    assert families["aobd_eventlog_commit_duration_seconds"].type == "summary"
    assert families["aobd_http_request_duration_seconds"].type == "histogram"
