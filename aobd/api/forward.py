"""Forwarding a command to the daemon of the cluster that drives its run (see aobd.cluster.directory).

The request goes on as it came (method, path, query, body, the caller's bearer token) with ``aobd-forwarded-by``
naming this daemon; the owner's answer, whatever it is, is the answer. A request that arrives forwarded is never
forwarded again: if ownership moved meanwhile, the caller gets the owner's "misdirected" answer and retries.
"""

from __future__ import annotations

from typing import Any

import structlog

from aobd.errors import Unavailable

log = structlog.get_logger("aobd.api.forward")

FORWARDED_BY = "aobd-forwarded-by"
#: Headers that travel with a forwarded request; hop-by-hop and connection headers do not.
_PASSED = ("authorization", "content-type", "accept")
TIMEOUT_S = 30.0


class Forwarder:
    def __init__(self, daemon_id: str) -> None:
        self.daemon_id = daemon_id
        self._session: Any = None

    async def forward(
        self, method: str, path: str, query: bytes, headers: dict[str, str], body: bytes, url: str
    ) -> Any:
        """``(status, content_type, body)`` of the owner's answer."""
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))
        target = f"{url}{path}" + (f"?{query.decode('latin-1')}" if query else "")
        sent = {k: v for k, v in headers.items() if k in _PASSED}
        sent[FORWARDED_BY] = self.daemon_id
        try:
            async with self._session.request(method, target, data=body or None, headers=sent) as reply:
                return reply.status, reply.headers.get("content-type", "application/json"), await reply.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("forwarding to the run's owner failed", url=url, path=path, error=str(exc))
            raise Unavailable(f"the daemon driving this run ({url}) did not answer; retry") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
