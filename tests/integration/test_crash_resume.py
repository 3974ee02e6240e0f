"""Crash safety (issue: core engine, item 8): SIGKILL a process driving 50 concurrent runs at random moments,
several times, then ``aobd resume``: every run completes, each (run, node) has exactly one NodeCompleted,
every run's seq is gap-free, and the SQLite database passes integrity_check."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from aobd.model import events as ev
from aobd.store.sqlite_log import SqliteEventLog

ROOT = Path(__file__).resolve().parents[2]
RUNS = 50
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _kill_after(cmd: list[str], delay: float, wait_for: str | None = None) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(), cwd=ROOT)
    try:
        if wait_for is not None:
            assert proc.stdout is not None
            deadline = time.monotonic() + 60
            for line in proc.stdout:
                if line.startswith(wait_for) or time.monotonic() > deadline:
                    break
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


async def _unfinished(data: str) -> int:
    log = SqliteEventLog(Path(data) / "events.db")
    try:
        return len(await log.unfinished_runs())
    finally:
        await log.close()


def test_sigkill_at_random_moments_then_resume_finishes_every_run_exactly_once(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("AOBD_CRASH_SEED", "7")))
    data = str(tmp_path / "data")
    _kill_after(
        [sys.executable, "-m", "tests.integration.crash_worker", data, str(RUNS)],
        rng.uniform(0.05, 0.3),
        wait_for="started",
    )
    unfinished = [asyncio.run(_unfinished(data))]
    for _ in range(3):
        _kill_after(
            [sys.executable, "-m", "aobd.cli.main", "resume", "--data-dir", data, "--json"],
            rng.uniform(0.5, 0.9),
        )
        unfinished.append(asyncio.run(_unfinished(data)))
    # The kills landed mid-work: runs were unfinished after the first kill and after at least one resume kill.
    assert unfinished[0] > 0 and max(unfinished[1:]) > 0, unfinished

    final = subprocess.run(
        [sys.executable, "-m", "aobd.cli.main", "resume", "--data-dir", data, "--json"],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
        cwd=ROOT,
    )
    assert final.returncode == 0, final.stderr[-2000:]

    async def check() -> None:
        log = SqliteEventLog(Path(data) / "events.db")
        try:
            runs = await log.list_runs(limit=10_000)
            top = [r for r in runs if r.parent_run_id is None]
            assert len(top) == RUNS
            assert {r.status for r in runs} == {"completed"}
            for info in runs:
                events = [ev.decode_event(r.data) for r in await log.read(info.run_id)]
                assert [e.seq for e in events] == list(range(1, len(events) + 1)), info.run_id
                completions = Counter(e.node_id for e in events if isinstance(e, ev.NodeCompleted))
                assert completions and max(completions.values()) == 1, (info.run_id, completions)
                assert isinstance(events[-1], ev.RunCompleted)
                scheduled = {e.node_id for e in events if isinstance(e, ev.NodeScheduled)}
                assert scheduled <= set(completions), info.run_id
            assert await asyncio.to_thread(log.integrity_check) == "ok"
        finally:
            await log.close()

    asyncio.run(check())
    summaries = [json.loads(line) for line in final.stdout.splitlines() if line.startswith("{")]
    assert all(s["status"] == "completed" for s in summaries)
