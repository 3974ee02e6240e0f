"""Counters and histograms for the event loop's hot path: plain numbers, no lock, collected at scrape time.

prometheus_client's ``Counter`` and ``Histogram`` take a mutex on every ``inc`` and ``observe`` (and ``labels()``
takes another and builds a tuple), so they can be updated from any thread. The daemon updates its per-event
metrics from one thread, its event loop, about 40 times per W6 run: through prometheus_client that was about a
third of what an orchestrator's Service adds to the engine (``perf.instructions --layer service``,
docs/performance.md). These keep a float per label set (and a count per bucket) that the loop adds to, and
yield the same families, names, labels and buckets at ``collect()``, as any custom collector does.

The rule: update one instance from one thread. A scrape may come from another thread; it reads numbers and copies
the children's table in one C call, so it sees each value whole (a series' buckets may be one observation apart
from its sum, as a scrape racing a prometheus_client histogram may too).

The exposition differs from prometheus_client's in one way: no ``_created`` series, which this daemon's
``systemd/aobd.service`` switches off anyway and :func:`aobd.metrics.merge_expositions` leaves out.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class CounterChild:
    """One label set of a :class:`LoopCounter`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"counters only go up; cannot add {amount}")
        self.value += amount


class HistogramChild:
    """One label set of a :class:`LoopHistogram`: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # The first bucket whose upper bound is >= amount (Prometheus' "le"); the last bound is +Inf.
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


_Child = TypeVar("_Child", CounterChild, HistogramChild)


class _LoopMetric(Collector, Generic[_Child]):
    """What a labelled loop metric shares: its name, its label names and a child per label set."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _Child] = {}
        registry.register(self)

    def _new_child(self) -> _Child:
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError

    def labels(self, *values: str) -> _Child:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, not {values}")
            child = self._children[values] = self._new_child()
        return child

    def describe(self) -> list[Metric]:
        return [self._family()]


class LoopCounter(_LoopMetric[CounterChild]):
    """A labelled counter (``name`` without ``_total``, as prometheus_client's ``Counter`` takes it)."""

    def __init__(
        self, name: str, documentation: str, labelnames: Iterable[str] = (), *, registry: CollectorRegistry
    ) -> None:
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def inc(self, amount: float = 1.0) -> None:
        """For a counter without labels."""
        self.labels().inc(amount)

    def collect(self) -> list[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        return [family]


class LoopHistogram(_LoopMetric[HistogramChild]):
    """A labelled histogram with fixed bucket bounds (+Inf is added)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self.bounds = tuple(bounds)
        self._les = [floatToGoString(b) for b in bounds]
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> list[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            counts, total = list(child.counts), child.sum
            cumulative, buckets = 0, []
            for le, count in zip(self._les, counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(values, buckets, total)
        return [family]
