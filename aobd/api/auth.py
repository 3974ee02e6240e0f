"""Bearer tokens, roles, workspaces and per-workspace rate limits."""

from __future__ import annotations

import hmac
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from aobd.config import Config, LimitsConfig, TokenConfig
from aobd.daemon.service import Caller
from aobd.errors import Unauthorized
from aobd.tokenbucket import rate_limited, rates_of, take_token


class Authenticator:
    """Maps ``Authorization: Bearer <token>`` to a :class:`Caller`.

    Without configured tokens the daemon is open (it then listens on loopback only, see the supervisor), and
    every caller is the admin of the ``default`` workspace.
    """

    def __init__(self, tokens: Sequence[TokenConfig], *, peer_token: str = "") -> None:
        self._tokens = [
            (t.token.encode(), Caller(t.workspace, t.role, t.name or f"token:{t.workspace}")) for t in tokens
        ]
        self._peer_token = peer_token.encode()

    @property
    def open(self) -> bool:
        return not self._tokens

    def authenticate(self, authorization: str) -> Caller:
        if self.open:
            return Caller("default", "admin", "local")
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret:
            raise Unauthorized("this route needs 'Authorization: Bearer <token>'")
        given = secret.strip().encode()
        for token, caller in self._tokens:
            # Constant-time comparison: response timing must not reveal how much of a token matched.
            if hmac.compare_digest(token, given):
                return caller
        raise Unauthorized("unknown token")

    def forwarded_admin(self, claim: str, secret: str | None, forwarded_by: str | None) -> Caller:
        """The admin-socket caller another daemon of the cluster forwarded a command for (``aobd.api.forward``).

        Args:
            claim: the ``aobd-forwarded-admin`` header, ``workspace=<ws>&caller=<name>``.
            secret: the ``aobd-peer-token`` header, or None.
            forwarded_by: the ``aobd-forwarded-by`` header (the forwarding daemon), or None.

        Returns:
            The admin of the claimed workspace, named ``admin:<name> via <daemon>`` in what it records.

        Raises:
            Unauthorized: this daemon has no peer token, or ``secret`` is not it, or the claim is malformed.
        """
        if not self._peer_token:
            raise Unauthorized(
                "aobd-forwarded-admin is accepted only by a daemon with cluster.peer_token set; this one has none"
            )
        # Constant-time, as for tokens: the peer token grants admin of any workspace.
        if secret is None or not hmac.compare_digest(self._peer_token, secret.encode("latin-1", "replace")):
            raise Unauthorized(
                "aobd-forwarded-admin needs this cluster's peer token in aobd-peer-token "
                "(cluster.peer_token must be the same on every daemon)"
            )
        fields = parse_qs(claim, keep_blank_values=True)
        workspace, name = fields.get("workspace", [""])[-1], fields.get("caller", [""])[-1]
        if not workspace or not name or not forwarded_by:
            raise Unauthorized(
                "a forwarded admin command must name its workspace and caller (aobd-forwarded-admin: "
                "workspace=<ws>&caller=<name>) and the daemon that forwarded it (aobd-forwarded-by)"
            )
        return Caller(workspace, "admin", f"admin:{name} via {forwarded_by}", via="peer")


class _Bucket:
    __slots__ = ("level", "stamp")

    def __init__(self, level: float, stamp: float) -> None:
        self.level = level
        self.stamp = stamp


class RateLimiter:
    """Token buckets per (workspace, kind), in this process; ``RedisRateLimiter`` shares them between daemons
    and falls back to one of these while Redis is down."""

    def __init__(self, limits: LimitsConfig, clock: object = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self.reconfigure(limits)

    def reconfigure(self, limits: LimitsConfig) -> None:
        self._rates = rates_of(limits)

    def check(self, workspace: str, kind: str) -> None:
        rate, burst = self._rates[kind]
        if rate <= 0:
            return
        now = self._clock()  # type: ignore[operator]
        bucket = self._buckets.get((workspace, kind))
        if bucket is None:
            bucket = self._buckets[(workspace, kind)] = _Bucket(float(burst), now)
        allowed, bucket.level = take_token(bucket.level, bucket.stamp, now, rate, burst)
        bucket.stamp = now
        if not allowed:
            raise rate_limited(workspace, kind, rate, (1.0 - bucket.level) / rate)


class LocalLimiter:
    """The API's limiter interface (async ``check``, ``reconfigure``, ``close``) over this daemon's own buckets
    (a :class:`RateLimiter`, or the accept workers' shared ones)."""

    def __init__(self, limits: LimitsConfig, *, buckets: Any = None) -> None:
        self.buckets = buckets if buckets is not None else RateLimiter(limits)

    async def check(self, workspace: str, kind: str) -> None:
        self.buckets.check(workspace, kind)

    def reconfigure(self, limits: LimitsConfig) -> None:
        self.buckets.reconfigure(limits)

    async def close(self) -> None:
        close = getattr(self.buckets, "close", None)
        if close is not None:
            close()


def make_limiter(config: Config, *, shared_path: str | Path | None = None) -> Any:
    """Shared through Redis when ``redis.url`` is set (each daemon limits alone while Redis is down), otherwise
    in process. With ``shared_path`` (the accept workers of the multi-process daemon), "in process" and "alone"
    mean in a file every worker of the daemon maps (:mod:`aobd.planes.ratelimit`), so N workers do not grant N
    times the configured rate."""
    local: Any
    if shared_path is not None:
        from aobd.planes.ratelimit import SharedRateLimiter

        local = SharedRateLimiter(shared_path, config.limits)
    else:
        local = RateLimiter(config.limits)
    if not config.redis.url:
        return LocalLimiter(config.limits, buckets=local)
    from aobd.store.redis_cache import RedisRateLimiter

    return RedisRateLimiter(config.redis.url, config.limits, fallback=local)
