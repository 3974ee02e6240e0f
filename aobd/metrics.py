"""Prometheus metrics of the daemon, served by ``GET /metrics``.

Everything lives on one dedicated :class:`~prometheus_client.CollectorRegistry` owned by :class:`Metrics`, never
the process-global one, so tests and several daemons in one process do not share counters. Run, node, patch and
approval metrics are derived from committed events by :class:`MetricsListener` (an engine listener), so they
count what is durable rather than what was attempted; the daemon and the API feed the rest directly
(``queue_depth``, :meth:`Metrics.observe_request`, :meth:`Metrics.observe_rate_limited`), and the event log's
group-commit counters are read at scrape time (:meth:`Metrics.observe_store`).

Names follow the Prometheus conventions: ``aobd_`` prefix, base units (seconds), ``_total`` on counters. No label
takes a per-run value (run id, node id, ticket): every label value comes from a small closed set or from a
bounded first-come set (:class:`_LabelValues`) whose overflow collapses into ``"_other"``, so a client sending
made-up workflow names or HTTP methods cannot grow the series count.

Metrics are per process. In the multi-process daemon each child sends its exposition with its heartbeat, and
``GET /metrics`` on any accept worker answers with orchestrator 0's merge of all of them
(:func:`merge_expositions`): counters and histograms summed over processes, per-process runtime metrics labelled
with their ``plane``, the health table once. prometheus_client
adds a ``_created`` series beside every counter and histogram unless ``PROMETHEUS_DISABLE_CREATED_SERIES=true``
(set by ``systemd/aobd.service``); that switch is process-global, so this module leaves it alone.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

from aobd import __version__
from aobd.loopmetrics import LoopCounter, LoopHistogram
from aobd.model import events as ev

#: Label value standing for every value past a label's limit.
OTHER: Final = "_other"
#: Label value for a missing one (an event written before the field existed, an empty node type).
UNKNOWN: Final = "unknown"

# Node attempts span a trivial function (~50 us) to an LLM agent call or an http node at its timeout (minutes).
NODE_SECONDS_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
)  # fmt: skip
# API requests are sub-millisecond reads up to multi-second run starts with big definitions.
HTTP_SECONDS_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Every method a client may send is a label value unless it is limited; these are all the API routes use.
_HTTP_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_RUN_END_STATUS: Final[dict[type[ev.Event], str]] = {
    ev.RunCompleted: "completed",
    ev.RunFailed: "failed",
    ev.RunCancelled: "cancelled",
}


class _LabelValues:
    """The first ``limit`` distinct values of a label keep their name; later ones become :data:`OTHER`.

    First come rather than most frequent: a series must not change its label once exported. Not locked: two
    threads racing on a new value can admit one value past the limit, which is harmless.
    """

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if not value:
            return UNKNOWN
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


#: The attributes of ``store.metrics`` exported by :meth:`Metrics.observe_store` (``GroupCommitMetrics`` of the
#: SQLite log); a backend may have a subset, missing ones read as 0.
STORE_STATS: Final = (
    "commits", "appends", "records", "conflicts", "failures", "checkpoints",
    "last_batch_size", "max_batch_size", "last_commit_seconds", "commit_seconds_total",
)  # fmt: skip


class _EventLogCollector:
    """Reads an event log's group-commit counters at scrape time; the writer thread pays nothing per commit.

    The store keeps totals, not per-commit samples, so latency and batch size are exported as summaries without
    quantiles (``_count`` and ``_sum``: ``rate(_sum) / rate(_count)`` is the mean over any window), not as
    histograms: buckets cannot be rebuilt from totals. Percentiles need the writer to observe each commit.
    Attributes are read without a lock, so ``_count`` and ``_sum`` may be one commit apart; each is exact.
    """

    def __init__(self, store: object) -> None:
        self._store = store

    def describe(self) -> Iterable[Metric]:
        # Lets the registry reject a second collector exporting the same names.
        return self._families(dict.fromkeys(STORE_STATS, 0))

    def collect(self) -> Iterable[Metric]:
        stats = getattr(self._store, "metrics", None)
        return self._families({name: getattr(stats, name, 0) for name in STORE_STATS})

    @staticmethod
    def _families(v: dict[str, float]) -> list[Metric]:
        p = "aobd_eventlog_"
        return [
            SummaryMetricFamily(
                p + "commit_duration_seconds",
                "Event log transactions (BEGIN to COMMIT, including the WAL fsync): count and total seconds.",
                count_value=int(v["commits"]),
                sum_value=v["commit_seconds_total"],
            ),
            SummaryMetricFamily(
                p + "batch_size",
                "Appends committed per event log transaction (group commit): transactions and appends.",
                count_value=int(v["commits"]),
                sum_value=v["appends"],
            ),
            CounterMetricFamily(p + "records", "Events committed to the event log.", value=v["records"]),
            CounterMetricFamily(
                p + "conflicts", "Appends refused by the expected-seq check (another writer).", value=v["conflicts"]
            ),
            CounterMetricFamily(p + "failures", "Appends failed by a storage error.", value=v["failures"]),
            CounterMetricFamily(p + "checkpoints", "WAL checkpoints run by the writer.", value=v["checkpoints"]),
            GaugeMetricFamily(
                p + "last_commit_duration_seconds", "The most recent transaction.", value=v["last_commit_seconds"]
            ),
            GaugeMetricFamily(p + "last_batch_size", "Appends in the most recent group.", value=v["last_batch_size"]),
            GaugeMetricFamily(
                p + "max_batch_size", "Largest group since the event log was opened.", value=v["max_batch_size"]
            ),
        ]


class _FanoutCollector:
    """An orchestrator's publisher to the fanout plane (:class:`aobd.planes.fanout.EventPublisher`), read at
    scrape time."""

    def __init__(self, publisher: Any) -> None:
        self._publisher = publisher

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        messages = CounterMetricFamily(
            "aobd_fanout_messages",
            "Messages of committed events published to the fanout plane for live streams; dropped: the plane was "
            "at its high-water mark (the streams catch up from the log).",
            labels=["outcome"],
        )
        messages.add_metric(["sent"], self._publisher.sent)
        messages.add_metric(["dropped"], self._publisher.dropped)
        return [messages]


class _AdmissionCollector:
    """An engine's admission of new runs (:class:`aobd.engine.admission.Admission`), read at scrape time."""

    def __init__(self, admission: Any) -> None:
        self._admission = admission

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        a = self._admission
        return [
            GaugeMetricFamily(
                "aobd_runs_computing",
                "Runs holding an admission place: started and not yet waiting on anything outside the process.",
                value=a.computing,
            ),
            GaugeMetricFamily(
                "aobd_runs_waiting_to_start",
                "New runs waiting for an admission place ([engine] max_computing_runs), not yet recorded.",
                value=a.waiting(),
            ),
            SummaryMetricFamily(
                "aobd_run_admission_wait_seconds",
                "Runs that waited for an admission place before starting: count and total seconds.",
                count_value=a.admitted_after_wait,
                sum_value=a.wait_seconds,
            ),
        ]


class _PlanesCollector:
    """The supervisor's health table (as an orchestrator last received it) as metrics, read at scrape time.

    Every orchestrator exports the same table; it is the supervisor's, so a scrape of any one of them is whole.
    """

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        return self._families([])

    def collect(self) -> Iterable[Metric]:
        return self._families(list(self._snapshot().get("children", [])))

    @staticmethod
    def _families(children: list[dict[str, Any]]) -> list[Metric]:
        up = GaugeMetricFamily("aobd_plane_up", "1 while a plane's child process is up.", labels=["role", "index"])
        beat = GaugeMetricFamily(
            "aobd_plane_heartbeat_age_seconds", "Seconds since the child's last heartbeat.", labels=["role", "index"]
        )
        restarts = CounterMetricFamily(
            "aobd_plane_restarts", "Child processes restarted by the supervisor, by role.", labels=["role"]
        )
        by_role: dict[str, float] = {}
        for c in children:
            labels = [str(c.get("role")), str(c.get("index"))]
            up.add_metric(labels, 1.0 if c.get("state") == "up" else 0.0)
            if c.get("last_heartbeat_s") is not None:
                beat.add_metric(labels, float(c["last_heartbeat_s"]))
            by_role[labels[0]] = by_role.get(labels[0], 0.0) + float(c.get("restarts", 0))
        for role, count in sorted(by_role.items()):
            restarts.add_metric([role], count)
        return [up, beat, restarts]


class Metrics:
    """Every metric of one daemon process, on its own registry.

    Args:
        impl: the ``aobd._fast`` implementation for ``aobd_build_info``; read from ``aobd._fast.__impl__`` if None.
        process_metrics: also export the standard ``process_*`` and ``python_gc_*`` metrics.
        max_label_values: distinct values kept per open-ended label (workflow, route, workspace...) before the
            rest are counted as ``"_other"``.
    """

    def __init__(self, *, impl: str | None = None, process_metrics: bool = True, max_label_values: int = 1000) -> None:
        if impl is None:
            from aobd import _fast  # the implementation chooser; imported here so importing metrics stays cheap

            impl = _fast.__impl__
        self.registry = CollectorRegistry()
        r = self.registry
        self._store_collector: _EventLogCollector | None = None

        self.workflow_label = _LabelValues(max_label_values)
        self.node_type_label = _LabelValues(200)
        self.reason_label = _LabelValues(200)
        self._route_label = _LabelValues(max_label_values)
        self._workspace_label = _LabelValues(max_label_values)
        self._kind_label = _LabelValues(50)

        self.build_info = Gauge(
            "aobd_build_info",
            "Always 1; the labels describe the running daemon.",
            ["version", "impl", "python"],
            registry=r,
        )
        self.build_info.labels(__version__, impl, platform.python_version()).set(1)

        # The metrics updated per event or per request are aobd.loopmetrics' lock-free kind (updated from the
        # event loop only); the rest are prometheus_client's.
        self.runs_started = LoopCounter("aobd_runs_started", "Runs created (RunCreated).", ["workflow"], registry=r)
        self.runs_finished = LoopCounter(
            "aobd_runs_finished",
            "Runs that reached a terminal status: completed, failed or cancelled.",
            ["workflow", "status"],
            registry=r,
        )
        self.runs_active = Gauge("aobd_runs_active", "Runs created and not yet finished.", registry=r)

        self.node_attempt_seconds = LoopHistogram(
            "aobd_node_attempt_duration_seconds",
            "Duration of executed node attempts by outcome (completed or failed); replay-reused outputs excluded.",
            ["node_type", "outcome"],
            buckets=NODE_SECONDS_BUCKETS,
            registry=r,
        )
        self.node_attempts = LoopCounter(
            "aobd_node_attempts",
            "Node attempts finished, by outcome (completed or failed).",
            ["node_type", "outcome"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "aobd_queue_depth", "Node attempts dispatched and not yet finished (set by the daemon).", registry=r
        )

        self.patches_proposed = Counter("aobd_patches_proposed", "Patches proposed to running workflows.", registry=r)
        self.patches_applied = Counter("aobd_patches_applied", "Patches validated and applied.", registry=r)
        self.patches_rejected = Counter(
            "aobd_patches_rejected", "Patches refused, by the code of their first reason.", ["reason"], registry=r
        )
        self.patches_rolled_back = Counter("aobd_patches_rolled_back", "Applied patches rolled back.", registry=r)
        self.approvals_pending = Gauge(
            "aobd_approvals_pending",
            "Decisions awaiting a person: approval node tickets (kind=node) and held patches (kind=patch).",
            ["kind"],
            registry=r,
        )
        self.events = LoopCounter("aobd_events", "Events committed to the event log, by type.", ["type"], registry=r)

        self.stream_subscribers = Gauge(
            "aobd_stream_subscribers", "Open SSE and WebSocket event subscriptions.", registry=r
        )

        self.http_requests = LoopCounter(
            "aobd_http_requests",
            "HTTP API requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_request_seconds = LoopHistogram(
            "aobd_http_request_duration_seconds",
            "HTTP API request latency, until the response is sent.",
            ["route", "method"],
            buckets=HTTP_SECONDS_BUCKETS,
            registry=r,
        )
        self.rate_limited = Counter(
            "aobd_rate_limited", "Requests refused by a workspace rate limit.", ["workspace", "kind"], registry=r
        )
        self.inline_demotions = Counter(
            "aobd_inline_handlers_demoted",
            "Sync handlers an orchestrator stopped running inline and sends to the runner plane"
            ' ([planes] inline_sync_handlers = "auto"): too slow, or running when an orchestrator died.',
            ["reason"],
            registry=r,
        )

        # Exported at zero before the first event, so rate() and absent() behave from the first scrape.
        for kind in ("node", "patch"):
            self.approvals_pending.labels(kind)
        if process_metrics:
            ProcessCollector(registry=r)
            GCCollector(registry=r)

    # -- fed by the daemon and the API -----------------------------------------------------------------------

    def observe_request(self, route: str, method: str, status: int | str, seconds: float) -> None:
        """Count one API request. ``route`` is the route's name (never the raw path, which holds ids)."""
        route = self._route_label(route)
        method = method.upper()
        if method not in _HTTP_METHODS:
            method = OTHER
        self.http_requests.labels(route, method, _status_label(status)).inc()
        self.http_request_seconds.labels(route, method).observe(seconds)

    def observe_rate_limited(self, workspace: str, kind: str) -> None:
        """Count one request refused by the ``kind`` limit (``run_start``, ``patch``...) of ``workspace``."""
        self.rate_limited.labels(self._workspace_label(workspace), self._kind_label(kind)).inc()

    def track_subscribers(self, count: Callable[[], float]) -> None:
        """Read the subscriber gauge from ``count`` at scrape time (e.g. ``hub.subscriber_count``)."""
        self.stream_subscribers.set_function(count)

    def observe_store(self, store: object) -> bool:
        """Export the group-commit counters of ``store.metrics`` (read at scrape time).

        Replaces a previously observed store. Returns False, exporting nothing, when the store keeps no such
        counters (the in-memory backend).
        """
        if not hasattr(getattr(store, "metrics", None), "commits"):
            return False
        if self._store_collector is not None:
            self.registry.unregister(self._store_collector)
        self._store_collector = _EventLogCollector(store)
        self.registry.register(self._store_collector)
        return True

    def track_admission(self, admission: Any) -> None:
        """Export an engine's admission places and waits (``aobd_runs_computing``, ``aobd_runs_waiting_to_start``,
        ``aobd_run_admission_wait_seconds``), read per scrape."""
        self.registry.register(_AdmissionCollector(admission))

    def track_fanout(self, publisher: Any) -> None:
        """Export an orchestrator's messages to the fanout plane (``aobd_fanout_messages_total{outcome}``), read
        per scrape."""
        self.registry.register(_FanoutCollector(publisher))

    def track_planes(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Export the multi-process daemon's health table (``aobd_plane_*``), read from ``snapshot`` per scrape."""
        self.registry.register(_PlanesCollector(snapshot))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition for ``GET /metrics``: (body, content type).

        Prometheus text format 0.0.4 by default; OpenMetrics when ``accept`` (the request's Accept header) asks.
        """
        return _render(self.registry, accept)


def _render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    # The one content negotiation of /metrics, for a process's own registry and for the planes' merge alike.
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type


def _status_label(status: int | str) -> str:
    code = str(status)
    return code if len(code) == 3 and code.isdigit() and code[0] in "12345" else OTHER


class MetricsListener:
    """An engine listener (``engine.listeners.append(MetricsListener(metrics))``) turning committed events
    into run, node, patch and approval metrics.

    It remembers the workflow of each live run (from RunCreated) to label the run's end, and the approvals each
    live run waits for. Both maps drop a run when it ends and hold at most ``max_tracked_runs`` runs: beyond
    that the oldest are forgotten (they are no longer counted as active, and finish as ``workflow="unknown"``),
    so a listener that never sees some runs end cannot grow without bound. Call :meth:`restore` with the events
    of runs resumed after a restart, which this process did not see start.
    """

    def __init__(self, metrics: Metrics, *, max_tracked_runs: int = 100_000) -> None:
        self.metrics = metrics
        self.max_tracked_runs = max_tracked_runs
        # Insertion ordered, so the first key is the oldest run.
        self._workflows: dict[str, str] = {}
        self._pending: dict[str, dict[str, str]] = {}  # run_id -> {ticket or patch_id: kind}
        # Label children resolved once: labels() maps the label values to their child on every call. Keyed by raw
        # node type, a closed set (workflow validation refuses unknown types).
        self._attempt_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._event_children: dict[type[ev.Event], Any] = {}
        self._pending_gauges = {kind: metrics.approvals_pending.labels(kind) for kind in ("node", "patch")}
        # One dict lookup per event, also for the most frequent (NodeScheduled, NodeStarted) that only count.
        self._handlers: dict[type[ev.Event], Callable[[Any, bool], None]] = {
            ev.RunCreated: self._run_created,
            ev.RunCompleted: self._run_ended,
            ev.RunFailed: self._run_ended,
            ev.RunCancelled: self._run_ended,
            ev.NodeCompleted: self._node_completed,
            ev.NodeFailed: self._node_failed,
            ev.ApprovalRequested: self._approval_requested,
            ev.ApprovalDecided: self._approval_decided,
            ev.PatchProposed: self._patch_proposed,
            ev.PatchApplied: self._patch_applied,
            ev.PatchRejected: self._patch_rejected,
            ev.PatchRolledBack: self._patch_rolled_back,
        }

    def __call__(self, events: Sequence[ev.Event]) -> None:
        children, handlers = self._event_children, self._handlers
        for event in events:
            kind = type(event)
            child = children.get(kind)
            if child is None:
                child = children[kind] = self.metrics.events.labels(ev.event_type(event))
            child.value += 1.0  # a lock-free counter's own number (CounterChild.inc without the call)
            handler = handlers.get(kind)
            if handler is not None:
                handler(event, True)

    def restore(self, events: Iterable[ev.Event]) -> None:
        """Rebuild the live state (active runs, pending approvals) from a run's history without counting it."""
        for event in events:
            handler = self._handlers.get(type(event))
            if handler is not None:
                handler(event, False)

    @property
    def tracked_runs(self) -> int:
        """Runs currently remembered (live runs, up to ``max_tracked_runs``)."""
        return len(self._workflows)

    # -- one handler per event type; ``count`` is False when restoring -----------------------------------------

    def _run_created(self, e: ev.RunCreated, count: bool) -> None:
        workflow = self.metrics.workflow_label(e.workflow)
        self._track(e.run_id, workflow)
        if count:
            self.metrics.runs_started.labels(workflow).inc()

    def _run_ended(self, e: ev.RunCompleted | ev.RunFailed | ev.RunCancelled, count: bool) -> None:
        workflow = self._untrack(e.run_id)
        if count:
            self.metrics.runs_finished.labels(workflow, _RUN_END_STATUS[type(e)]).inc()

    def _node_completed(self, e: ev.NodeCompleted, count: bool) -> None:
        # A replay that reused an output executed nothing.
        if count and e.reused_from is None:
            self._attempt(e.node_type, "completed", e.duration_ms)

    def _node_failed(self, e: ev.NodeFailed, count: bool) -> None:
        if count:
            self._attempt(e.node_type, "failed", e.duration_ms)

    def _attempt(self, node_type: str, outcome: str, duration_ms: float) -> None:
        key = (node_type, outcome)
        children = self._attempt_children.get(key)
        if children is None:
            label = self.metrics.node_type_label(node_type)
            children = self._attempt_children[key] = (
                self.metrics.node_attempt_seconds.labels(label, outcome),
                self.metrics.node_attempts.labels(label, outcome),
            )
        histogram, counter = children
        histogram.observe(duration_ms / 1000.0)
        counter.inc()

    def _approval_requested(self, e: ev.ApprovalRequested, count: bool) -> None:
        self._add_pending(e.run_id, e.ticket, "node")

    def _approval_decided(self, e: ev.ApprovalDecided, count: bool) -> None:
        self._drop_pending(e.run_id, e.ticket)

    def _patch_proposed(self, e: ev.PatchProposed, count: bool) -> None:
        # Pending until judged: usually in the same step, later when the run's policy holds it for a person.
        self._add_pending(e.run_id, e.patch_id, "patch")
        if count:
            self.metrics.patches_proposed.inc()

    def _patch_applied(self, e: ev.PatchApplied, count: bool) -> None:
        self._drop_pending(e.run_id, e.patch_id)
        if count:
            self.metrics.patches_applied.inc()

    def _patch_rejected(self, e: ev.PatchRejected, count: bool) -> None:
        self._drop_pending(e.run_id, e.patch_id)
        if count:
            code = e.reasons[0].get("code") if e.reasons else None
            reason = self.metrics.reason_label(code if isinstance(code, str) else None)
            self.metrics.patches_rejected.labels(reason).inc()

    def _patch_rolled_back(self, e: ev.PatchRolledBack, count: bool) -> None:
        if count:
            self.metrics.patches_rolled_back.inc()

    # -- live state ------------------------------------------------------------------------------------------

    def _track(self, run_id: str, workflow: str) -> None:
        if run_id in self._workflows:
            return  # restore() after the run was already seen
        while len(self._workflows) >= self.max_tracked_runs:
            self._untrack(next(iter(self._workflows)))
        self._workflows[run_id] = workflow
        self.metrics.runs_active.inc()

    def _untrack(self, run_id: str) -> str:
        for kind in self._pending.pop(run_id, {}).values():
            self._pending_gauges[kind].dec()
        workflow = self._workflows.pop(run_id, None)
        if workflow is None:
            return UNKNOWN
        self.metrics.runs_active.dec()
        return workflow

    def _add_pending(self, run_id: str, key: str, kind: str) -> None:
        if run_id not in self._workflows:
            return  # a run we do not track (forgotten, or not restored) would never be cleared
        pending = self._pending.setdefault(run_id, {})
        if key not in pending:
            pending[key] = kind
            self._pending_gauges[kind].inc()

    def _drop_pending(self, run_id: str, key: str) -> None:
        pending = self._pending.get(run_id)
        if pending is None:
            return
        kind = pending.pop(key, None)
        if kind is not None:
            self._pending_gauges[kind].dec()
        if not pending:
            del self._pending[run_id]


# ---------------------------------------------------------------------------------------------- the planes' merge

#: Gauges that describe one process each, where the daemon's value is the largest (not the sum).
_MAX_GAUGES = frozenset(
    {
        "aobd_build_info",
        "aobd_eventlog_last_commit_duration_seconds",
        "aobd_eventlog_last_batch_size",
        "aobd_eventlog_max_batch_size",
    }
)
#: Per-process runtime metrics (prometheus_client's process and GC collectors): kept apart, labelled ``plane``.
_PER_PROCESS_PREFIXES = ("process_", "python_")
#: The supervisor's health table, which every orchestrator exports alike: taken once.
_ONCE_PREFIX = "aobd_plane_"


def merge_expositions(parts: Sequence[tuple[str, bytes]], accept: str | None = None) -> tuple[bytes, str]:
    """One exposition for the whole daemon from each process's own, as ``(body, content type)`` in the format
    ``accept`` (the request's Accept header) asks for, decided as :meth:`Metrics.render` does: OpenMetrics or
    Prometheus text 0.0.4.

    ``parts`` is ``(plane, exposition)`` per process, ``plane`` naming it (``"accept-1"``), each exposition in
    Prometheus text 0.0.4 (``Metrics.render()`` with no Accept). Counters, histograms, summaries and additive
    gauges (runs active, queue depth, subscribers) are summed over processes for each label set; gauges that
    describe one process (:data:`_MAX_GAUGES`) take the largest; ``process_*`` and ``python_*`` keep one series
    per process with a ``plane`` label; ``aobd_plane_*`` (the supervisor's table, the same in every orchestrator)
    is taken once. ``*_created`` series are left out in both formats, where they are optional: a sum of
    processes' start times means nothing. Units are not carried (0.0.4 has no ``# UNIT``; aobd sets none).
    """
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for plane, text in parts:
        for family in text_string_to_metric_families(text.decode("utf-8", "replace")):
            name = family.name
            per_process = name.startswith(_PER_PROCESS_PREFIXES)
            if name.endswith("_created") or (name.startswith(_ONCE_PREFIX) and name in families):
                continue
            if name not in families:
                # The parser names a counter's family without ``_total`` and keeps the suffix on its samples: the
                # shape both encoders write (``# TYPE x counter``, then ``x_total``).
                families[name] = Metric(name, family.documentation, family.type, family.unit)
                values[name] = {}
            merged = values[name]
            for sample in family.samples:
                pairs = {**sample.labels, "plane": plane} if per_process else sample.labels
                key = (sample.name, tuple(sorted(pairs.items())))
                old = merged.get(key)
                if old is None:
                    merged[key] = sample.value
                elif name in _MAX_GAUGES:
                    merged[key] = max(old, sample.value)
                else:
                    merged[key] = old + sample.value
    # First-seen order keeps each label set's samples together (a histogram's buckets, count and sum), as
    # OpenMetrics requires.
    for name, family in families.items():
        for (sample_name, label_pairs), value in values[name].items():
            family.add_sample(sample_name, dict(label_pairs), value)

    class _Merged:
        def collect(self) -> Iterable[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return _render(registry, accept)
