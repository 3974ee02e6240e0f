"""The accept workers' shared rate limits: one budget per (workspace, kind) for every process of a daemon,
with exactly the semantics of the in-process buckets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aobd.api.auth import RateLimiter
from aobd.config import LimitsConfig
from aobd.errors import RateLimited
from aobd.planes import ratelimit
from aobd.planes.ratelimit import SharedRateLimiter

LIMITS = LimitsConfig(run_starts_per_s=2.0, run_starts_burst=3, patches_per_s=0.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _outcomes(limiter: object, clock: Clock, script: list[tuple[float, str]]) -> list[str]:
    """Advance the clock and check, step by step: 'ok' or the retry-after the refusal names."""
    out = []
    for advance, workspace in script:
        clock.now += advance
        try:
            limiter.check(workspace, "run_start")  # type: ignore[attr-defined]
            out.append("ok")
        except RateLimited as exc:
            out.append(f"wait {exc.retry_after_s:.2f}")
    return out


SCRIPT = [(0, "a"), (0, "a"), (0, "a"), (0, "a"), (0, "b"), (0.25, "a"), (0.25, "a"), (0, "a"), (10, "a"), (0, "a")]


def test_the_shared_buckets_decide_exactly_as_the_in_process_ones(tmp_path: Path) -> None:
    clock_a, clock_b = Clock(), Clock()
    shared = SharedRateLimiter(tmp_path / "limits", LIMITS, clock=clock_a)
    expected = _outcomes(RateLimiter(LIMITS, clock=clock_b), clock_b, SCRIPT)
    assert _outcomes(shared, clock_a, SCRIPT) == expected
    assert expected[:5] == ["ok", "ok", "ok", "wait 0.50", "ok"]  # burst 3, then refused; "b" has its own bucket
    shared.close()


def test_two_workers_share_one_budget(tmp_path: Path) -> None:
    clock = Clock()
    first = SharedRateLimiter(tmp_path / "limits", LIMITS, clock=clock)
    second = SharedRateLimiter(tmp_path / "limits", LIMITS, clock=clock)
    first.check("acme", "run_start")
    second.check("acme", "run_start")
    first.check("acme", "run_start")
    with pytest.raises(RateLimited):
        second.check("acme", "run_start")  # the burst of 3 is spent across both
    clock.now += 0.5  # one token back at 2/s
    second.check("acme", "run_start")
    with pytest.raises(RateLimited):
        first.check("acme", "run_start")
    first.check("acme", "patch")  # patches_per_s = 0: unlimited
    first.close()
    second.close()


def test_separate_processes_share_one_budget(tmp_path: Path) -> None:
    """Real processes: each takes one start from a burst of 3; the fourth is refused wherever it comes from."""
    code = (
        "import sys; from aobd.config import LimitsConfig; from aobd.planes.ratelimit import SharedRateLimiter; "
        "from aobd.errors import RateLimited\n"
        "limiter = SharedRateLimiter(sys.argv[1], LimitsConfig(run_starts_per_s=0.001, run_starts_burst=3))\n"
        "try:\n    limiter.check('acme', 'run_start'); print('ok')\nexcept RateLimited:\n    print('refused')\n"
    )
    answers = [
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "limits")], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(5)
    ]
    assert answers == ["ok", "ok", "ok", "refused", "refused"]


def test_a_full_table_limits_further_workspaces_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "SLOTS", 2)
    clock = Clock()
    limiter = SharedRateLimiter(
        tmp_path / "limits", LimitsConfig(run_starts_per_s=1.0, run_starts_burst=1), clock=clock
    )
    for workspace in ("a", "b", "c"):  # "c" finds no slot
        limiter.check(workspace, "run_start")
    for workspace in ("a", "b", "c"):
        with pytest.raises(RateLimited):
            limiter.check(workspace, "run_start")  # still limited, "c" by this process's own bucket
    limiter.close()
