"""MemoryCache, the embedded cache: values, expiry on an injected clock, and the size bound (LRU)."""

from __future__ import annotations

import pytest

from aobd.store.redis_cache import Cache, MemoryCache
from tests.conftest import run_async


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_get_set_overwrite() -> None:
    async def main() -> None:
        cache: Cache = MemoryCache()
        assert await cache.get("k") is None
        await cache.set("k", b"\x00value", ttl_s=10)
        assert await cache.get("k") == b"\x00value"
        await cache.set("k", b"newer", ttl_s=10)
        assert await cache.get("k") == b"newer"
        await cache.set("empty", b"", ttl_s=10)
        assert await cache.get("empty") == b""
        await cache.close()
        assert await cache.get("k") is None

    run_async(main())


def test_entries_expire_after_their_ttl() -> None:
    clock = FakeClock()

    async def main() -> None:
        cache = MemoryCache(clock=clock)
        await cache.set("short", b"s", ttl_s=1.5)
        await cache.set("long", b"l", ttl_s=60)
        clock.now += 1.4
        assert await cache.get("short") == b"s"
        clock.now += 0.1
        assert await cache.get("short") is None
        assert await cache.get("long") == b"l"
        assert len(cache) == 1 and cache.size_bytes == 1
        await cache.set("short", b"again", ttl_s=1)  # a new set starts a new TTL
        clock.now += 0.5
        assert await cache.get("short") == b"again"

    run_async(main())


def test_size_bound_evicts_least_recently_used() -> None:
    async def main() -> None:
        cache = MemoryCache(max_bytes=300)
        for key in "abc":
            await cache.set(key, key.encode() * 100, ttl_s=60)
        assert await cache.get("a") is not None  # a becomes the most recently used
        await cache.set("d", b"d" * 100, ttl_s=60)
        assert [await cache.get(key) is not None for key in "abcd"] == [True, False, True, True]
        assert cache.size_bytes == 300
        await cache.set("c", b"c" * 50, ttl_s=60)  # replacing a value accounts for the old one
        assert cache.size_bytes == 250
        await cache.set("huge", b"h" * 301, ttl_s=60)  # larger than the whole cache: not stored, evicts nothing
        assert await cache.get("huge") is None and len(cache) == 3

    run_async(main())


def test_stored_values_are_copies() -> None:
    async def main() -> None:
        cache = MemoryCache()
        value = bytearray(b"mutable")
        await cache.set("k", value, ttl_s=10)  # type: ignore[arg-type]  # bytes-like from a careless caller
        value[:] = b"changed"
        assert await cache.get("k") == b"mutable"

    run_async(main())


@pytest.mark.parametrize("ttl", [0, -1, float("nan")])
def test_ttl_must_be_positive(ttl: float) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="positive"):
            await MemoryCache().set("k", b"v", ttl_s=ttl)

    run_async(main())
