"""aobd.loopmetrics: the lock-free counters and histograms expose exactly what prometheus_client's would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from aobd.loopmetrics import LoopCounter, LoopHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)
OBSERVED = (0.0005, 0.001, 0.002, 0.01, 0.5, 3.0, 1e9)


def _fill(registry: CollectorRegistry, counter_type: type, histogram_type: type) -> None:
    counter = counter_type("t_requests", "Requests.", ["route", "status"], registry=registry)
    counter.labels("start", "201").inc()
    counter.labels("start", "201").inc(2.5)
    counter.labels("get", "404").inc()
    histogram = histogram_type("t_seconds", "Latency.", ["route"], buckets=BUCKETS, registry=registry)
    for value in OBSERVED:
        histogram.labels("start").observe(value)
    histogram.labels("get").observe(0.05)


def _without_created(text: bytes) -> list[str]:
    return [line for line in text.decode().splitlines() if "_created" not in line]


@pytest.mark.parametrize("render", [generate_latest, generate_openmetrics])
def test_the_exposition_is_the_same_as_prometheus_clients(render: object) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    _fill(ours, LoopCounter, LoopHistogram)
    _fill(theirs, Counter, Histogram)
    assert _without_created(render(ours)) == _without_created(render(theirs))  # type: ignore[operator]


def test_a_bucket_holds_values_up_to_and_including_its_bound() -> None:
    registry = CollectorRegistry()
    histogram = LoopHistogram("t_seconds", "Latency.", buckets=BUCKETS, registry=registry)
    for value in (0.001, 0.0010001, 1.0, 2.0):
        histogram.labels().observe(value)
    assert registry.get_sample_value("t_seconds_bucket", {"le": "0.001"}) == 1
    assert registry.get_sample_value("t_seconds_bucket", {"le": "0.01"}) == 2
    assert registry.get_sample_value("t_seconds_bucket", {"le": "1.0"}) == 3
    assert registry.get_sample_value("t_seconds_bucket", {"le": "+Inf"}) == 4
    assert registry.get_sample_value("t_seconds_count", {}) == 4
    assert registry.get_sample_value("t_seconds_sum", {}) == pytest.approx(3.0020001)


def test_counters_refuse_to_go_down_and_labels_must_match() -> None:
    counter = LoopCounter("t_total_things", "Things.", ["kind"], registry=CollectorRegistry())
    with pytest.raises(ValueError, match="only go up"):
        counter.labels("a").inc(-1)
    with pytest.raises(ValueError, match="takes labels"):
        counter.labels("a", "b")
    with pytest.raises(ValueError, match="takes labels"):
        LoopHistogram("t_h", "H.", ["kind"], buckets=BUCKETS, registry=CollectorRegistry()).labels()
