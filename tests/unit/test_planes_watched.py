"""The shared table of watched runs (aobd.planes.watched): orchestrators publish to the fanout plane only the runs
an accept worker's stream follows, and a stream still gets every event of the run it follows."""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from aobd.api.fanout import FanoutHub
from aobd.config import Config
from aobd.model.events import Event, RunCompleted, TimerFired, encode_event
from aobd.planes import fanout
from aobd.planes.watched import SLOTS, WatchedAnywhere, WatchedRuns, slot_of
from aobd.store.protocols import EventRecord
from tests.conftest import run_async


@pytest.fixture
def tmp() -> Iterator[Path]:
    # Short: unix socket paths must stay under 107 bytes.
    with tempfile.TemporaryDirectory(prefix="aobd-w-", dir="/tmp") as name:
        yield Path(name)


def same_slot_as(run_id: str) -> str:
    """Another run id that falls in the slot of ``run_id``."""
    slot = slot_of(run_id)
    return next(f"r{i}" for i in range(10 * SLOTS) if f"r{i}" != run_id and slot_of(f"r{i}") == slot)


def test_an_orchestrator_sees_the_runs_any_worker_watches_until_their_last_stream_ends(tmp: Path) -> None:
    # The orchestrator may map the files before the workers start: it creates them.
    orchestrator = WatchedAnywhere([tmp / "w0", tmp / "w1"])
    worker0, worker1 = WatchedRuns(tmp / "w0"), WatchedRuns(tmp / "w1")
    assert not orchestrator("r-a")
    worker1.watch("r-a")
    assert orchestrator("r-a")
    assert not orchestrator("r-b")

    # Two watched runs sharing a slot: the slot stays set until neither is watched.
    neighbour = same_slot_as("r-a")
    worker1.watch(neighbour)
    worker1.unwatch("r-a")
    assert orchestrator(neighbour)
    worker1.unwatch(neighbour)
    assert not orchestrator("r-a") and not orchestrator(neighbour)

    worker0.watch("r-c")
    worker1.watch("r-c")
    worker0.unwatch("r-c")
    assert orchestrator("r-c")  # the other worker still follows it
    worker0.close()
    worker1.close()
    orchestrator.close()


def test_a_restarted_worker_clears_what_its_predecessor_left_watched(tmp: Path) -> None:
    crashed = WatchedRuns(tmp / "w0")
    crashed.watch("r-a")  # and the process dies without closing
    orchestrator = WatchedAnywhere([tmp / "w0"])
    assert orchestrator("r-a")
    WatchedRuns(tmp / "w0")
    assert not orchestrator("r-a")


def test_the_hub_tells_its_tracker_before_subscribe_returns_and_after_the_last_stream_ends() -> None:
    calls: list[tuple[str, str]] = []

    class Tracker:
        def watch(self, run_id: str) -> None:
            calls.append(("watch", run_id))

        def unwatch(self, run_id: str) -> None:
            calls.append(("unwatch", run_id))

    hub = FanoutHub(tracker=Tracker())
    first = hub.subscribe("r1")
    assert calls == [("watch", "r1")]  # before the stream reads the log
    second = hub.subscribe("r1")
    first.close()
    assert calls == [("watch", "r1")]
    second.close()
    assert calls == [("watch", "r1"), ("unwatch", "r1")]
    hub.subscribe("r2")
    hub.close()  # ends every stream
    assert calls[-2:] == [("watch", "r2"), ("unwatch", "r2")]


def records(run_id: str, first: int, last: int) -> list[EventRecord]:
    events: list[Event] = [TimerFired(run_id=run_id, seq=s, ts=float(s), node_id=f"n{s}") for s in range(first, last)]
    events.append(RunCompleted(run_id=run_id, seq=last, ts=float(last)))
    return [EventRecord(run_id, e.seq, type(e).__name__, e.ts, encode_event(e)) for e in events]


def test_only_watched_runs_cross_the_fanout_plane_and_a_stream_gets_all_of_its_run(tmp: Path) -> None:
    """Orchestrator, fanout proxy and accept worker as in the planes, on real zmq sockets."""
    config = Config(data_dir=str(tmp / "data"))
    context: zmq.Context[Any] = zmq.Context()
    inbound, outbound = fanout.bind(config, context)
    proxy = threading.Thread(target=fanout.forward, args=(inbound, outbound), daemon=True)
    proxy.start()

    async def main() -> None:
        # What crosses the plane, as any accept worker receives it.
        tap = context.socket(zmq.SUB)
        tap.setsockopt(zmq.SUBSCRIBE, b"")
        tap.connect(fanout.paths.fanout_out(config))
        crossed: list[str] = []

        def read_tap() -> None:
            while tap.poll(0):
                crossed.extend(run_id for run_id, _ in fanout._batch.decode(tap.recv()))

        watched = WatchedRuns(tmp / "w0")
        hub = FanoutHub(tracker=watched)
        subscriber = fanout.FanoutSubscriber(config, hub, context=context)
        await subscriber.start()
        orchestrator = WatchedAnywhere([tmp / "w0"])
        publisher = fanout.EventPublisher(config, context=context, watched=orchestrator)
        try:
            # Nobody watches r-idle: its steps are never sent.
            publisher("r-idle", records("r-idle", 1, 3))
            publisher.flush()
            assert publisher.sent == 0

            followed = hub.subscribe("r-live")
            first, *rest = records("r-live", 1, 4)
            # PUB/SUB connects lazily: publish until both sockets are through (the hub drops repeated seqs).
            for _ in range(250):
                publisher("r-live", [first])
                publisher("r-idle", records("r-idle", 4, 5))
                publisher.flush()
                read_tap()
                if await followed.wait(0.02) and crossed:
                    break
            publisher("r-live", rest)
            publisher.flush()
            got: list[Any] = []
            while not got or not isinstance(got[-1], RunCompleted):
                assert await followed.wait(5.0), f"the stream stopped at {got}"
                got.extend(followed.drain())
            assert [e.seq for e in got] == [1, 2, 3, 4] and isinstance(got[-1], RunCompleted)
            await asyncio.sleep(0.05)
            read_tap()
            assert crossed and set(crossed) == {"r-live"}  # r-idle was left out at the source
        finally:
            tap.close()
            publisher.close()
            orchestrator.close()
            await subscriber.close()
            watched.close()

    try:
        run_async(main())
    finally:
        context.term()
        proxy.join(5)
