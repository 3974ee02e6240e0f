"""Forwarding a command to the daemon of the cluster that drives its run (see aobd.cluster.directory).

The request goes on as it came (method, path, query, body, the caller's bearer token) with ``aobd-forwarded-by``
naming this daemon; the owner's answer, whatever it is, is the answer. A request that arrives forwarded is never
forwarded again: if ownership moved meanwhile, the caller gets the owner's "misdirected" answer and retries.

A command from the admin socket has no token to pass on. With ``cluster.peer_token`` set, it goes with that
secret (``aobd-peer-token``) and ``aobd-forwarded-admin`` naming the socket's caller (its workspace and name);
the owner accepts it as that caller, admin of that workspace, only if the secret is its own
(:meth:`aobd.api.auth.Authenticator.forwarded_admin`). Without the secret it stays a 409 naming the owner.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import structlog

from aobd.errors import Misdirected, Unavailable

if TYPE_CHECKING:
    from aobd.daemon.service import Caller

log = structlog.get_logger("aobd.api.forward")

FORWARDED_BY = "aobd-forwarded-by"
#: ``workspace=<ws>&caller=<name>`` (URL-encoded): the admin-socket caller a peer daemon forwards a command for.
FORWARDED_ADMIN = "aobd-forwarded-admin"
#: The cluster's shared secret (``cluster.peer_token``), without which ``aobd-forwarded-admin`` is refused.
PEER_TOKEN = "aobd-peer-token"
#: Headers that travel with a forwarded request; hop-by-hop and connection headers do not.
_PASSED = ("authorization", "content-type", "accept")
TIMEOUT_S = 30.0


def to_owner(
    exc: Misdirected,
    headers: Mapping[str, str],
    *,
    daemon_id: str,
    admin: Caller | None = None,
    peer_token: str = "",
) -> tuple[str, dict[str, str]]:
    """Where a misdirected command goes on to (the owner's URL), and with which headers.

    Args:
        exc: the misdirection, naming the owner when this daemon knows it.
        headers: the request's headers, names in lower case.
        daemon_id: this daemon, named in ``aobd-forwarded-by``.
        admin: the admin socket's caller, when the request came over the socket (it has no token).
        peer_token: ``cluster.peer_token``; empty: admin-socket commands are not forwarded.

    Raises:
        Misdirected: the command cannot go on (owner unknown, forwarded once already, or an admin-socket
            caller without a peer token); its 409 names the owner, and the setting that would have forwarded it.
    """
    url = exc.owner_url
    if url is None or FORWARDED_BY in headers:
        raise exc
    sent = {k: v for k, v in headers.items() if k in _PASSED}
    if admin is not None:
        if not peer_token:
            raise Misdirected(
                f"{exc.message} (commands over the admin socket are forwarded to the run's owner only when "
                "cluster.peer_token is set, the same on every daemon)",
                owner=exc.owner,
                owner_url=exc.owner_url,
            )
        # The socket vouched for its caller here; the shared secret vouches for this daemon to the owner.
        sent.pop("authorization", None)
        sent[PEER_TOKEN] = peer_token
        sent[FORWARDED_ADMIN] = urlencode({"workspace": admin.workspace, "caller": admin.name})
    sent[FORWARDED_BY] = daemon_id
    return url, sent


class Forwarder:
    """One HTTP client session to the other daemons, opened at the first forward."""

    def __init__(self) -> None:
        self._session: Any = None

    async def forward(
        self, method: str, path: str, query: bytes, headers: dict[str, str], body: bytes, url: str
    ) -> Any:
        """``(status, content_type, body)`` of the owner's answer; ``url`` and ``headers`` from :func:`to_owner`."""
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))
        target = f"{url}{path}" + (f"?{query.decode('latin-1')}" if query else "")
        try:
            async with self._session.request(method, target, data=body or None, headers=headers) as reply:
                return reply.status, reply.headers.get("content-type", "application/json"), await reply.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("forwarding to the run's owner failed", url=url, path=path, error=str(exc))
            raise Unavailable(f"the daemon driving this run ({url}) did not answer; retry") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
