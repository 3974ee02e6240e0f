"""SIGKILL a process appending to a SqliteEventLog, repeatedly, and check that no acknowledged append is lost.

The child appends from many coroutines (two of them racing on each of half the runs, so conflicts and retries
happen too) and prints ``run_id seq`` after every acknowledged append. The parent kills it at a random moment,
restarts it on the same file (it resumes from ``last_seq``) and, after the last round, checks that every
acknowledged seq is stored, that every run's seqs are 1..n without gaps, that the run index agrees with the
events, and that SQLite's integrity check passes.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aobd.store.sqlite_log import SqliteEventLog

RUNS = 32
ROUNDS = 10

CHILD = r"""
import asyncio
import sys

from aobd.errors import ConflictError
from aobd.store.protocols import EventRecord, RunIndex
from aobd.store.sqlite_log import SqliteEventLog


async def writer(log, run_id):
    while True:
        last = await log.last_seq(run_id)
        count = 1 + last % 3
        seqs = range(last + 1, last + 1 + count)
        records = [EventRecord(run_id, s, "e", float(s), b"x" * 120) for s in seqs]
        try:
            await log.append(run_id, records, index=RunIndex(workflow="crash"))
        except ConflictError:
            continue
        print(run_id, last + count, flush=True)


async def main(path, runs):
    log = SqliteEventLog(path)
    writers = [writer(log, f"run{i:02}") for i in range(runs)]
    writers += [writer(log, f"run{i:02}") for i in range(0, runs, 2)]
    await asyncio.gather(*writers)


asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _collect(stream: object, lines: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.append(line)


@pytest.mark.integration
def test_sigkill_never_loses_an_acknowledged_append(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    path = tmp_path / "events.db"
    repo = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
    }
    acknowledged: dict[str, int] = {}
    total_acks = 0

    for round_no in range(ROUNDS):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(RUNS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=repo,
        )
        lines: list[str] = []
        reader = threading.Thread(target=_collect, args=(proc.stdout, lines), daemon=True)
        reader.start()
        try:
            # Kill only once appends are flowing, then at a random moment among them.
            deadline = time.monotonic() + 10
            while len(lines) < 20 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert proc.poll() is None, f"child died in round {round_no}: {proc.stderr.read()}"  # type: ignore[union-attr]
            assert len(lines) >= 20, f"child made no progress in round {round_no} (seed {seed})"
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            reader.join(timeout=5)
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.close()
            proc.stderr.close()
        for line in lines:
            if not line.endswith("\n"):
                continue  # cut short by the kill: never acknowledged
            run_id, seq = line.split()
            acknowledged[run_id] = max(acknowledged.get(run_id, 0), int(seq))
            total_acks += 1

    assert total_acks > 100, f"only {total_acks} acknowledged appends: the test proved little (seed {seed})"

    async def check() -> None:
        async with SqliteEventLog(path) as log:
            assert log.integrity_check() == "ok"
            for run_id, acked in acknowledged.items():
                events = await log.read(run_id)
                seqs = [event.seq for event in events]
                assert seqs == list(range(1, len(seqs) + 1)), f"{run_id} has gaps (seed {seed})"
                assert len(seqs) >= acked, f"{run_id}: seq {acked} acknowledged, {len(seqs)} stored (seed {seed})"
                info = await log.get_run(run_id)
                assert info is not None and info.last_seq == len(seqs) and info.workflow == "crash"
            unacknowledged_runs = {info.run_id for info in await log.list_runs()} - set(acknowledged)
            for run_id in unacknowledged_runs:  # runs whose only appends were cut short must still be consistent
                info = await log.get_run(run_id)
                assert info is not None and [e.seq for e in await log.read(run_id)] == list(range(1, info.last_seq + 1))

    asyncio.run(check())
