"""The cache interface (memoized node results) and its backends, plus the rate limiter shared through Redis.

* :class:`MemoryCache`: the embedded default, in process, bounded by size, least recently used out first.
* :class:`RedisCache`: the same interface in Redis, shared by every daemon. A cache is an optimization, so a
  Redis outage is a miss (``get`` returns ``None``, ``set`` does nothing), logged at most every
  :data:`WARN_EVERY_S` and counted in ``errors``; it never fails the node whose result was being memoized.
* :class:`RedisRateLimiter`: the per-(workspace, kind) token buckets of :class:`aobd.api.auth.RateLimiter`, kept
  in Redis so that every daemon draws from one budget. Each check is one atomic Lua script (EVALSHA) that reads
  the clock with ``TIME``: only Redis's clock is used, so daemons whose clocks disagree still agree on the
  buckets. Needs Redis >= 5 (scripts replicate their effects, which allows ``TIME`` before a write).

redis-py is imported when a Redis backend is built, with an install hint if it is missing.
"""

from __future__ import annotations

import collections
import math
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog

from aobd.config import LimitsConfig
from aobd.errors import ConfigError, Unavailable
from aobd.tokenbucket import rate_limited, rates_of

if TYPE_CHECKING:
    import redis.asyncio

INSTALL_HINT: Final = "pip install 'aobd[cluster]'"
#: Least seconds between two log lines about the same backend failing (an outage must not flood the log).
WARN_EVERY_S: Final = 30.0
DEFAULT_CACHE_NAMESPACE: Final = "aobd:cache:"
DEFAULT_LIMIT_NAMESPACE: Final = "aobd:ratelimit:"

log = structlog.get_logger("aobd.store.cache")


class Cache(Protocol):
    """Memoized node results: opaque bytes under a caller-provided content hash, kept for a while."""

    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or ``None`` (never stored, expired, evicted, or backend down)."""
        ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store ``value`` under ``key`` for ``ttl_s`` seconds (> 0), replacing what was there."""
        ...

    async def close(self) -> None: ...


class SyncRateLimiter(Protocol):
    """What :class:`aobd.api.auth.RateLimiter` offers; :class:`RedisRateLimiter` falls back to one."""

    def check(self, workspace: str, kind: str) -> None: ...


# -- in process ----------------------------------------------------------------------------------------------


class MemoryCache:
    """A :class:`Cache` in process memory, bounded by the total size of its values.

    Args:
        max_bytes: the most value bytes held; the least recently used entries go first past it, and a value
            larger than this is not stored at all.
        clock: seconds, monotonic (injected by tests).
    """

    def __init__(self, *, max_bytes: int = 64 * 1024 * 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: collections.OrderedDict[str, tuple[float, bytes]] = collections.OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """The bytes of the values held now (expired ones included until they are touched or evicted)."""
        return self._bytes

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, value = entry
        if self._clock() >= expires_at:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        _check_ttl(ttl_s)
        value = bytes(value)
        self._drop(key)
        if len(value) > self.max_bytes:
            return
        self._entries[key] = (self._clock() + ttl_s, value)
        self._bytes += len(value)
        while self._bytes > self.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self._bytes -= len(old)

    async def close(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[1])


# -- Redis ---------------------------------------------------------------------------------------------------


class RedisCache:
    """A :class:`Cache` in Redis, shared by every daemon that points at it.

    Args:
        url: ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS); the password is never logged.
        namespace: prefix of every key (``aobd:cache:`` then the caller's key).
        timeout_s: socket connect and read timeout; a slower Redis is treated as down.
        client: a ``redis.asyncio.Redis`` to use instead of one built from ``url``; the caller closes it.

    Raises:
        ConfigError: redis-py is not installed, or ``url`` is not a Redis URL.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = DEFAULT_CACHE_NAMESPACE,
        timeout_s: float = 1.0,
        client: redis.asyncio.Redis | None = None,
    ) -> None:
        self.namespace = namespace
        self.location = redacted_url(url)
        self._owns_client = client is None
        self._redis = client if client is not None else _connect(url, timeout_s)
        #: Operations that failed because Redis was unreachable or errored (each was a miss or a no-op).
        self.errors = 0
        self._warned_at = -WARN_EVERY_S

    def __repr__(self) -> str:
        return f"RedisCache({self.location!r}, namespace={self.namespace!r})"

    async def get(self, key: str) -> bytes | None:
        from redis.exceptions import RedisError

        try:
            value = await self._redis.get(self.namespace + key)
        except (RedisError, OSError) as exc:
            self._failed("get", exc)
            return None
        if isinstance(value, str):  # a caller's client made with decode_responses=True
            return value.encode()
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        _check_ttl(ttl_s)
        from redis.exceptions import RedisError

        try:
            # Milliseconds, rounded up: a sub-second TTL must not become 0 (which Redis refuses).
            await self._redis.set(self.namespace + key, value, px=max(1, _ceil_ms(ttl_s)))
        except (RedisError, OSError) as exc:
            self._failed("set", exc)

    async def close(self) -> None:
        if self._owns_client:
            await self._redis.aclose()

    def _failed(self, op: str, exc: BaseException) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("redis_cache_unavailable", op=op, redis=self.location, error=str(exc), errors=self.errors)


# KEYS[1]: the bucket (a hash of level and stamp). ARGV: rate (tokens per second, > 0), burst (tokens).
# Returns 0 when a token was taken, else the microseconds until one will be there.
# The stamp is integer microseconds of Redis's clock, written with %.17g so no digit is lost (Lua's tostring
# keeps 14). If the clock steps back (a failover to a replica whose clock is behind), the bucket waits for it
# to pass the stamp instead of refilling from a negative interval.
_TOKEN_BUCKET_LUA: Final = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 'level', 'stamp')
local level = tonumber(state[1])
local stamp = tonumber(state[2])
if level == nil or stamp == nil then
  level = burst
  stamp = now
end
if now > stamp then
  level = math.min(burst, level + (now - stamp) * rate / 1000000)
  stamp = now
end
local wait_us = 0
if level >= 1 then
  level = level - 1
else
  wait_us = math.ceil((1 - level) * 1000000 / rate)
end
redis.call('HSET', KEYS[1], 'level', string.format('%.17g', level), 'stamp', string.format('%.17g', stamp))
-- A bucket untouched for burst / rate seconds is full again, the same as no bucket: let Redis drop it.
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait_us
"""


class RedisRateLimiter:
    """Token buckets per (workspace, kind) in Redis: the budget of :class:`aobd.api.auth.RateLimiter`, shared.

    ``check`` is a coroutine (the in-process limiter's is a plain function); see :meth:`check`.

    Args:
        url: ``redis://[user:password@]host:port/db``; the password is never logged.
        limits: the rates and bursts (``[limits]`` of the config); a rate of 0 disables that limit.
        namespace: prefix of every bucket key (``aobd:ratelimit:<kind>:<workspace>``).
        fallback: an in-process limiter used while Redis is unreachable (each daemon then limits alone); with
            none, checks fail with :class:`~aobd.errors.Unavailable` until Redis is back.
        timeout_s: socket connect and read timeout; it bounds what a check can add to a request.
        client: a ``redis.asyncio.Redis`` to use instead of one built from ``url``; the caller closes it.

    Raises:
        ConfigError: redis-py is not installed, or ``url`` is not a Redis URL.
    """

    def __init__(
        self,
        url: str,
        limits: LimitsConfig,
        *,
        namespace: str = DEFAULT_LIMIT_NAMESPACE,
        fallback: SyncRateLimiter | None = None,
        timeout_s: float = 1.0,
        client: redis.asyncio.Redis | None = None,
    ) -> None:
        self.namespace = namespace
        self.location = redacted_url(url)
        self.fallback = fallback
        self._owns_client = client is None
        self._redis = client if client is not None else _connect(url, timeout_s)
        # register_script sends EVALSHA and loads the script only when Redis answers NOSCRIPT (first use, or
        # after a restart or SCRIPT FLUSH).
        self._script = self._redis.register_script(_TOKEN_BUCKET_LUA)
        self._rates: dict[str, tuple[float, int]] = {}
        self.reconfigure(limits)
        #: Checks that Redis could not answer (each went to the fallback or raised Unavailable).
        self.errors = 0
        self._warned_at = -WARN_EVERY_S

    def __repr__(self) -> str:
        return f"RedisRateLimiter({self.location!r}, namespace={self.namespace!r})"

    def reconfigure(self, limits: LimitsConfig) -> None:
        """Take new rates and bursts (SIGHUP) without reconnecting; buckets keep their levels."""
        self._rates = rates_of(limits)

    async def check(self, workspace: str, kind: str) -> None:
        """Take one token from the bucket of (``workspace``, ``kind``), shared by every daemon.

        Call it where the in-process limiter's ``check`` is called, awaited:
        ``await limiter.check(caller.workspace, "run_start")``.

        Raises:
            RateLimited: the bucket is empty; ``retry_after_s`` is when the next token arrives.
            Unavailable: Redis cannot be reached and there is no fallback.
            KeyError: ``kind`` is not ``run_start`` or ``patch``.
        """
        rate, burst = self._rates[kind]
        if rate <= 0:
            return
        from redis.exceptions import RedisError

        key = f"{self.namespace}{kind}:{workspace}"  # kind first: it has no ':', so no two pairs share a key
        try:
            wait_us = int(await self._script(keys=[key], args=[repr(float(rate)), burst]))
        except (RedisError, OSError) as exc:
            self._failed(exc)
            if self.fallback is None:
                raise Unavailable(
                    f"the rate limiter cannot reach Redis at {self.location}: {exc}",
                    details=[{"redis": self.location, "workspace": workspace, "kind": kind}],
                ) from exc
            self.fallback.check(workspace, kind)
            return
        if wait_us > 0:
            raise rate_limited(workspace, kind, rate, wait_us / 1_000_000)

    async def close(self) -> None:
        if self._owns_client:
            await self._redis.aclose()

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "redis_rate_limiter_unavailable",
                redis=self.location,
                error=str(exc),
                errors=self.errors,
                fallback="in-process" if self.fallback is not None else "none (503)",
            )


def redacted_url(url: str) -> str:
    """``url`` without its password (``redis://user:***@host:6379/0``), fit for logs and errors."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = urllib.parse.unquote(parts.username or "")
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal: urlsplit dropped the brackets
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _connect(url: str, timeout_s: float) -> redis.asyncio.Redis:
    try:
        import redis.asyncio
    except ImportError as exc:
        raise ConfigError(
            f"the Redis cache and rate limiter need redis-py, which is not installed: {INSTALL_HINT}"
        ) from exc
    try:
        # Connects on first use, not here: building a backend does no I/O.
        return redis.asyncio.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    except ValueError as exc:
        raise ConfigError(f"{redacted_url(url)!r} is not a Redis URL: {exc}") from exc


def _check_ttl(ttl_s: Any) -> None:
    if not ttl_s > 0:
        raise ValueError(f"a cache TTL must be positive seconds, not {ttl_s!r}")


def _ceil_ms(seconds: float) -> int:
    return math.ceil(seconds * 1000)
