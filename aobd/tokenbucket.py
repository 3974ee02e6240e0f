"""Token-bucket arithmetic and the refusal that every rate limiter shares: the in-process buckets
(:class:`aobd.api.auth.RateLimiter`), the accept workers' shared file (:mod:`aobd.planes.ratelimit`) and Redis
(:mod:`aobd.store.redis_cache`, whose Lua script does the same step on Redis's clock)."""

from __future__ import annotations

from aobd.config import LimitsConfig
from aobd.errors import RateLimited


def rates_of(limits: LimitsConfig) -> dict[str, tuple[float, int]]:
    """(tokens per second, burst) for each kind of limited request; a rate of 0 or less: unlimited."""
    return {
        "run_start": (limits.run_starts_per_s, limits.run_starts_burst),
        "patch": (limits.patches_per_s, limits.patches_burst),
    }


def take_token(level: float, stamp: float, now: float, rate: float, burst: int) -> tuple[bool, float]:
    """One token bucket step: refill from ``stamp`` to ``now`` (up to ``burst``), then take a token if there is
    one. Returns (allowed, the level after)."""
    level = min(float(burst), level + (now - stamp) * rate)
    return (True, level - 1.0) if level >= 1.0 else (False, level)


def rate_limited(workspace: str, kind: str, rate: float, retry_after_s: float) -> RateLimited:
    return RateLimited(
        f"workspace {workspace!r} exceeds {rate:g} {kind.replace('_', ' ')}s per second",
        retry_after_s=retry_after_s,
        workspace=workspace,
        kind=kind,
    )
