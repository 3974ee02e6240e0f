"""What one W6 run costs the engine's event loop, by layer, with nothing durable: ``python -m perf.bench_engine``.

Three rows per fidelity, each the best of ``--repeats`` rounds of ``--runs`` W6 runs:

* ``machine``: the run machine alone (``RunMachine.start`` and the six ``node_completed`` calls, the handlers'
  outputs given), no driver, no loop;
* ``machine + encode``: the same, and each step's events encoded into the log's records as the driver does;
* ``engine, memory store``: ``Engine.run`` at ``--concurrency`` runs in flight on the in-memory log and CAS, the
  event loop thread's CPU per run (``time.thread_time``): the machine, the driver, asyncio and the store.

The last row is what in-process W6 costs the loop before any durability: no change to the event log or the disk
can take aobd below it (docs/performance.md, "the engine's ceiling"). Run it beside ``AOBD_IMPL=python`` to see
what compiling the engine's modules gives.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

from aobd.engine.driver import Engine
from aobd.engine.effects import Dispatch, Step
from aobd.engine.machine import RunMachine
from aobd.gctune import tune_gc
from aobd.model import events as ev
from aobd.model.ir import IRCache
from aobd.store.memory import MemoryCas, MemoryEventLog
from aobd.store.protocols import EventRecord
from perf.w6 import w6_document

#: W6's outputs for ``{"x": 1}``.
OUTPUTS = {"s1": {"x": 2}, "s2": {"x": 3}, "s3": {"x": 4}, "b1": {"x": 8}, "b2": {"x": 12}, "j": {"x": 20}}


def machine_run(doc: dict[str, Any], cache: IRCache, fidelity: str, encode: bool, n: int) -> None:
    """One W6 run through the machine alone; ``encode``: also build the log's records of every step."""

    def records(machine: RunMachine, step: Step) -> None:
        if encode:
            [EventRecord(machine.run_id, e.seq, ev.event_type(e), e.ts, ev.encode_event(e)) for e in step.events]

    machine, step = RunMachine.start(f"r{n}", doc, {"x": 1}, time.time(), fidelity=fidelity, ir_cache=cache)
    records(machine, step)
    ready = [e.node_id for e in step.effects if isinstance(e, Dispatch)]
    while ready:
        following = []
        for node_id in ready:
            step = machine.node_completed(node_id, 1, OUTPUTS[node_id], time.time())
            records(machine, step)
            following += [e.node_id for e in step.effects if isinstance(e, Dispatch)]
        ready = following


def best_us(measure: Callable[[], float], repeats: int) -> float:
    return min(measure() for _ in range(repeats)) * 1e6


def machine_us(fidelity: str, encode: bool, runs: int, repeats: int) -> float:
    doc, cache = w6_document(), IRCache()

    def measure() -> float:
        started = time.perf_counter()
        for n in range(runs):
            machine_run(doc, cache, fidelity, encode, n)
        return (time.perf_counter() - started) / runs

    return best_us(measure, repeats)


async def engine_us(fidelity: str, runs: int, concurrency: int, repeats: int) -> float:
    doc = w6_document()

    async def one(engine: Engine, gate: asyncio.Semaphore) -> None:
        async with gate:
            await engine.run(doc, {"x": 1})

    best = float("inf")
    for _ in range(repeats):
        engine = Engine(MemoryEventLog(), MemoryCas(), fidelity=fidelity)
        await engine.run(doc, {"x": 1})  # warm-up: imports, IR compile
        gate = asyncio.Semaphore(concurrency)
        started = time.thread_time()
        await asyncio.gather(*(one(engine, gate) for _ in range(runs)))
        best = min(best, (time.thread_time() - started) / runs)
        await engine.close()
    return best * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_engine", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    tune_gc()  # as aobd's own processes do
    import uvloop

    from aobd import _fast

    print(f"W6, best of {args.repeats} x {args.runs} runs, impl={_fast.__impl__}; us per run")
    for fidelity in ("full", "fast"):
        alone = machine_us(fidelity, False, args.runs, args.repeats)
        encoded = machine_us(fidelity, True, args.runs, args.repeats)
        loop = uvloop.run(engine_us(fidelity, args.runs, args.concurrency, args.repeats))
        print(f"{fidelity:>4}  machine {alone:6.1f}  machine + encode {encoded:6.1f}  engine, memory store {loop:6.1f}")


if __name__ == "__main__":
    main()
