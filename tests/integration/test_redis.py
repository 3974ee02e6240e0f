"""RedisCache and RedisRateLimiter against the machine's Redis (tests.services.redis_url()).

Each test works under a key prefix of its own and deletes its keys at the end. Two RedisRateLimiter instances
on separate connections stand for two daemons.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from aobd.api.auth import RateLimiter
from aobd.config import LimitsConfig
from aobd.errors import RateLimited, Unavailable
from aobd.store.redis_cache import RedisCache, RedisRateLimiter, redacted_url
from tests.conftest import run_async
from tests.services import redis_url, service_missing

try:
    import redis
    import redis.asyncio
except ImportError:
    redis = None  # type: ignore[assignment]

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def redis_py() -> None:
    if redis is None:
        service_missing("redis-py", "it is not installed: pip install 'aobd[cluster]'")


# Nothing listens here: connection refused at once.
DOWN_URL = "redis://127.0.0.1:1/0"


@pytest.fixture
def url() -> str:
    return redis_url()


@pytest.fixture
def prefix(url: str) -> Iterator[str]:
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    prefix = f"aobd-test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def limits(*, run_starts: tuple[float, int] = (0.0, 1), patches: tuple[float, int] = (0.0, 1)) -> LimitsConfig:
    return LimitsConfig(
        run_starts_per_s=run_starts[0],
        run_starts_burst=run_starts[1],
        patches_per_s=patches[0],
        patches_burst=patches[1],
    )


async def outcomes(limiter: RedisRateLimiter, workspace: str, kind: str, n: int) -> list[Any]:
    results = []
    for _ in range(n):
        try:
            await limiter.check(workspace, kind)
            results.append("ok")
        except RateLimited as exc:
            results.append(exc)
    return results


# -- cache ---------------------------------------------------------------------------------------------------


def test_cache_get_set_overwrite_and_namespace(url: str, prefix: str) -> None:
    async def main() -> None:
        cache = RedisCache(url, namespace=prefix + "cache:")
        try:
            key = "sha256:" + "ab" * 32
            assert await cache.get(key) is None
            await cache.set(key, b"\x00result\xff", ttl_s=60)
            assert await cache.get(key) == b"\x00result\xff"
            await cache.set(key, b"newer", ttl_s=60)
            assert await cache.get(key) == b"newer"
            await cache.set("empty", b"", ttl_s=60)
            assert await cache.get("empty") == b""
            raw = redis.asyncio.Redis.from_url(url)
            try:
                assert await raw.get(prefix + "cache:" + key) == b"newer"  # stored under the namespace
                assert 59_000 < await raw.pttl(prefix + "cache:" + key) <= 60_000
            finally:
                await raw.aclose()
            other = RedisCache(url, namespace=prefix + "other:")
            assert await other.get(key) is None
            await other.close()
            assert cache.errors == 0
        finally:
            await cache.close()

    run_async(main())


def test_cache_entries_expire(url: str, prefix: str) -> None:
    async def main() -> None:
        cache = RedisCache(url, namespace=prefix)
        try:
            await cache.set("short", b"v", ttl_s=0.15)
            await cache.set("long", b"v", ttl_s=30)
            assert await cache.get("short") == b"v"
            await asyncio.sleep(0.3)
            assert await cache.get("short") is None
            assert await cache.get("long") == b"v"
            with pytest.raises(ValueError, match="positive"):
                await cache.set("k", b"v", ttl_s=0)
        finally:
            await cache.close()

    run_async(main())


def test_cache_with_redis_down_misses_instead_of_failing() -> None:
    async def main() -> None:
        cache = RedisCache(DOWN_URL)
        try:
            await cache.set("k", b"v", ttl_s=10)
            assert await cache.get("k") is None
            assert cache.errors == 2
        finally:
            await cache.close()

    run_async(main())


def test_passwords_never_reach_logs_or_errors() -> None:
    assert redacted_url("redis://:s3cret@cache.internal:6380/2") == "redis://:***@cache.internal:6380/2"
    assert redacted_url("rediss://aobd:s3cret@[::1]/0") == "rediss://aobd:***@[::1]/0"
    assert redacted_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert "s3cret" not in repr(RedisCache("redis://:s3cret@127.0.0.1:1/0"))


# -- rate limiter --------------------------------------------------------------------------------------------


def test_two_daemons_share_one_budget(url: str, prefix: str) -> None:
    config = limits(run_starts=(0.001, 5), patches=(0.001, 2))  # refills ~never within the test

    async def main() -> None:
        first = RedisRateLimiter(url, config, namespace=prefix)
        second = RedisRateLimiter(url, config, namespace=prefix)
        try:
            got = await outcomes(first, "acme", "run_start", 3) + await outcomes(second, "acme", "run_start", 3)
            assert got[:5] == ["ok"] * 5
            assert isinstance(got[5], RateLimited)
            assert isinstance((await outcomes(first, "acme", "run_start", 1))[0], RateLimited)
            # Buckets are per workspace and per kind.
            assert await outcomes(second, "other", "run_start", 1) == ["ok"]
            assert await outcomes(first, "acme", "patch", 2) == ["ok", "ok"]
            assert isinstance((await outcomes(second, "acme", "patch", 1))[0], RateLimited)
        finally:
            await first.close()
            await second.close()

    run_async(main())


def test_concurrent_checks_from_two_daemons_take_exactly_the_burst(url: str, prefix: str) -> None:
    config = limits(run_starts=(0.001, 25))

    async def main() -> None:
        daemons = [RedisRateLimiter(url, config, namespace=prefix) for _ in range(2)]
        try:
            results = await asyncio.gather(
                *(daemons[i % 2].check("ws", "run_start") for i in range(60)), return_exceptions=True
            )
            assert sum(result is None for result in results) == 25  # the script is atomic: no token twice
            assert all(isinstance(result, RateLimited) for result in results if result is not None)
        finally:
            for limiter in daemons:
                await limiter.close()

    run_async(main())


def test_retry_after_is_when_the_next_token_arrives(url: str, prefix: str) -> None:
    config = limits(run_starts=(10.0, 2))  # one token every 100 ms

    async def main() -> None:
        limiter = RedisRateLimiter(url, config, namespace=prefix)
        try:
            assert await outcomes(limiter, "ws", "run_start", 2) == ["ok", "ok"]
            with pytest.raises(RateLimited) as caught:
                await limiter.check("ws", "run_start")
            error = caught.value
            assert 0.05 < error.retry_after_s <= 0.1
            assert error.code == "rate_limited"
            assert error.details == [{"retry_after_s": error.retry_after_s, "workspace": "ws", "kind": "run_start"}]
            assert "workspace 'ws' exceeds 10 run starts per second" in str(error)
            await asyncio.sleep(error.retry_after_s + 0.02)
            await limiter.check("ws", "run_start")  # the token it promised is there
        finally:
            await limiter.close()

    run_async(main())


def test_bucket_state_lives_in_redis_with_an_expiry(url: str, prefix: str) -> None:
    async def main() -> None:
        limiter = RedisRateLimiter(url, limits(patches=(2.0, 4)), namespace=prefix)
        raw = redis.asyncio.Redis.from_url(url)
        try:
            await limiter.check("team:a", "patch")
            key = prefix + "patch:team:a"
            state = await raw.hgetall(key)
            assert float(state[b"level"]) == pytest.approx(3.0, abs=0.01)
            seconds, micros = await raw.time()
            assert abs(int(state[b"stamp"]) - (seconds * 1_000_000 + micros)) < 5_000_000  # Redis's clock, in µs
            assert 0 < await raw.pttl(key) <= 3000  # full again after burst / rate = 2 s, plus 1 s
        finally:
            await raw.aclose()
            await limiter.close()

    run_async(main())


def test_disabled_limits_do_not_touch_redis() -> None:
    async def main() -> None:
        limiter = RedisRateLimiter(DOWN_URL, limits())
        try:
            for _ in range(100):
                await limiter.check("ws", "run_start")
            assert limiter.errors == 0
            with pytest.raises(KeyError):
                await limiter.check("ws", "no_such_kind")
        finally:
            await limiter.close()

    run_async(main())


def test_redis_down_falls_back_to_the_in_process_limiter_or_refuses() -> None:
    config = limits(run_starts=(0.001, 2))

    async def main() -> None:
        with_fallback = RedisRateLimiter(DOWN_URL, config, fallback=RateLimiter(config))
        without = RedisRateLimiter("redis://:s3cret@127.0.0.1:1/0", config)
        try:
            got = await outcomes(with_fallback, "ws", "run_start", 3)
            assert got[:2] == ["ok", "ok"] and isinstance(got[2], RateLimited)
            assert with_fallback.errors == 3
            with pytest.raises(Unavailable, match="cannot reach Redis") as caught:
                await without.check("ws", "run_start")
            assert "s3cret" not in str(caught.value)
        finally:
            await with_fallback.close()
            await without.close()

    run_async(main())


def test_reconfigure_changes_rates_without_reconnecting(url: str, prefix: str) -> None:
    async def main() -> None:
        limiter = RedisRateLimiter(url, limits(), namespace=prefix)
        try:
            assert await outcomes(limiter, "ws", "patch", 3) == ["ok"] * 3  # disabled
            limiter.reconfigure(limits(patches=(0.001, 1)))
            got = await outcomes(limiter, "ws", "patch", 2)
            assert got[0] == "ok" and isinstance(got[1], RateLimited)
        finally:
            await limiter.close()

    run_async(main())
