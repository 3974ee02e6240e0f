"""The floor: the least durable work W6 needs, written as directly as possible, beside aobd in the same run.

    python -m perf.floor [--runs 3000] [--concurrency 64] [--json] [--no-aobd] [--full-only] [--ceiling]
                         [--default-gc] [--switch-interval-ms MS]

What W6 cannot do without, and nothing more: each run records its creation, each node's completion (with its
output) and the run's completion as msgspec-encoded events in one SQLite database (WAL, ``synchronous=FULL``),
and a node starts only once its predecessor's completion is durable. Concurrent runs share commits (group
commit: one writer takes every append queued while the previous commit was being fsynced). No validation, no
routing table, no CAS, no retries, no scheduled/started events, no listeners. aobd then runs the same number of
W6 runs in-process (``perf.w6 --mode inprocess``) at the same concurrency in the same session, and the ratio
``aobd / floor`` is what issue 6 asks to keep at 0.6 or above.

aobd runs twice, both durable (every step committed, fsynced, before the next node starts): in full fidelity
(``aobd``, ``aobd_to_floor``: 20 events per run, every node's NodeScheduled and NodeStarted included) and in
fast-path mode (``aobd_fast``, ``aobd_fast_to_floor``: the 8 events the floor writes, DESIGN.md section 5).

``--ceiling`` adds aobd on the in-memory store in each fidelity (``aobd_memory``, ``aobd_memory_fast``): nothing
durable, no commit to wait for, only the engine's own work. It is what no storage change can exceed, so a ratio
to the floor below 0.6 there says the engine's CPU, not the log, is what keeps the durable ratio under the goal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from aobd.gctune import DEFAULT_SWITCH_INTERVAL_MS, tune_gc, tune_switch_interval


class Created(msgspec.Struct, tag=True):
    run_id: str
    seq: int
    ts: float
    inputs: dict[str, Any]


class Completed(msgspec.Struct, tag=True):
    run_id: str
    seq: int
    ts: float
    node_id: str
    output: dict[str, Any]


class Finished(msgspec.Struct, tag=True):
    run_id: str
    seq: int
    ts: float
    outputs: dict[str, Any]


Row = tuple[str, int, bytes]


class GroupCommitLog:
    """One connection; every append queued during a commit goes into the next one."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute(
            "CREATE TABLE events (run_id TEXT, seq INTEGER, data BLOB, PRIMARY KEY (run_id, seq)) WITHOUT ROWID"
        )
        self.pending: list[tuple[list[Row], asyncio.Future[None]]] = []
        self.wakeup = asyncio.Event()
        self.commits = 0
        self.task = asyncio.create_task(self._writer())

    async def append(self, rows: list[Row]) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((rows, future))
        self.wakeup.set()
        await future

    def _write(self, rows: list[Row]) -> None:
        self.conn.execute("BEGIN")
        self.conn.executemany("INSERT INTO events VALUES (?, ?, ?)", rows)
        self.conn.execute("COMMIT")

    async def _writer(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            batch, self.pending = self.pending, []
            if not batch:
                continue
            # The commit's fsync runs off the loop, so the runs keep computing and queueing meanwhile.
            await asyncio.to_thread(self._write, [row for rows, _ in batch for row in rows])
            self.commits += 1
            for _, future in batch:
                future.set_result(None)

    async def close(self) -> None:
        self.task.cancel()
        self.conn.close()


async def run_floor(runs: int, concurrency: int, data_dir: Path) -> dict[str, Any]:
    log = GroupCommitLog(data_dir / "floor.db")
    encode = msgspec.json.Encoder().encode
    gate = asyncio.Semaphore(concurrency)
    results: list[int] = []

    async def one(n: int) -> None:
        run_id = f"r{n:08d}"
        seq = 0

        def row(event: Created | Completed | Finished) -> Row:
            return (run_id, event.seq, encode(event))

        def completed(node_id: str, output: dict[str, Any]) -> Row:
            nonlocal seq
            seq += 1
            return row(Completed(run_id, seq, time.time(), node_id, output))

        async with gate:
            seq = 1
            await log.append([row(Created(run_id, 1, time.time(), {"x": 1}))])
            x = 1
            for node_id in ("s1", "s2", "s3"):
                x += 1
                await log.append([completed(node_id, {"x": x})])
            b1, b2 = x * 2, x * 3
            await asyncio.gather(log.append([completed("b1", {"x": b1})]), log.append([completed("b2", {"x": b2})]))
            total = b1 + b2
            seq += 1
            done = row(Finished(run_id, seq, time.time(), {"x": total}))
            await log.append([completed("j", {"x": total}), done])
            results.append(total)

    await one(-1)  # warm-up
    results.clear()
    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(runs)))
    elapsed = time.perf_counter() - started
    commits = log.commits
    await log.close()
    return {
        "system": "floor",
        "runs": runs,
        "concurrency": concurrency,
        "completed": sum(1 for r in results if r == 20),
        "seconds": round(elapsed, 3),
        "workflows_per_s": round(runs / elapsed, 1),
        "node_executions_per_s": round(6 * runs / elapsed, 1),
        "events_per_commit": round(8 * runs / max(commits, 1), 1),
    }


def _key(store: str, fidelity: str) -> str:
    """``aobd``, ``aobd_fast``, ``aobd_memory``, ``aobd_memory_fast``: the result's key for one aobd run."""
    return "aobd" + ("_memory" if store == "memory" else "") + ("_fast" if fidelity == "fast" else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--no-aobd", action="store_true", help="measure the floor only")
    parser.add_argument("--full-only", action="store_true", help="run aobd in full fidelity only, not fast-path")
    parser.add_argument(
        "--ceiling", action="store_true", help="also run aobd on the in-memory store: the engine's own ceiling"
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument(
        "--default-gc", action="store_true", help="keep CPython's collector thresholds (both sides use the same)"
    )
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=DEFAULT_SWITCH_INTERVAL_MS,
        help="the GIL switch interval of aobd's processes, for both sides (0: CPython's 5 ms)",
    )
    args = parser.parse_args(argv)
    tune_switch_interval(args.switch_interval_ms)
    if not args.default_gc:
        tune_gc()  # the settings of aobd's own processes, for the floor too: the same process runs both
    import uvloop

    from perf.w6 import run_inprocess

    with (
        tempfile.TemporaryDirectory(prefix="aobd-floor-") as tmp,
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        floor = runner.run(run_floor(args.runs, args.concurrency, Path(tmp)))
        result: dict[str, Any] = {"floor": floor}
        # (result key, store, fidelity) of each aobd run beside the floor.
        wanted = [] if args.no_aobd else ["full"] if args.full_only else ["full", "fast"]
        stores = ["sqlite", "memory"] if args.ceiling else ["sqlite"]
        rows = [(_key(store, fidelity), store, fidelity) for store in stores for fidelity in wanted]
        for key, store, fidelity in rows:
            aobd_dir = Path(tmp) / key
            aobd_dir.mkdir()
            aobd = runner.run(run_inprocess(args.runs, args.concurrency, store, fidelity, aobd_dir))
            result[key] = aobd
            result[f"{key}_to_floor"] = round(aobd["workflows_per_s"] / floor["workflows_per_s"], 3)
    if not args.json:
        print(f"floor: {floor['workflows_per_s']} workflows/s ({floor['events_per_commit']} events per commit)")
        for key, store, fidelity in rows:
            durability = "in memory, nothing durable" if store == "memory" else "durable"
            print(f"aobd in-process, {fidelity}, {durability}: {result[key]['workflows_per_s']} workflows/s")
            print(f"  / floor: {result[f'{key}_to_floor']} (goal >= 0.6)")
    print(json.dumps(result))
    complete = floor["completed"] == args.runs and all(result[key]["completed"] == args.runs for key, _, _ in rows)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
