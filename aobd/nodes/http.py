"""The ``http`` node: one SSRF-guarded HTTP request per attempt.

Config (``node.config``):

* ``method``: ``GET`` (default), ``HEAD``, ``POST``, ``PUT``, ``PATCH``, ``DELETE`` or ``OPTIONS``.
* ``url``: an absolute ``http``/``https`` URL. ``{name}`` placeholders are filled from the node's inputs,
  each value percent-encoded as a whole (``/``, ``?``, ``#``, ``@`` and ``:`` included), so an input can never
  change the host, port or path structure; a value of ``.`` or ``..`` in the path is refused (it would climb
  a level). Strings are used as is, numbers and booleans in JSON spelling; ``null``, objects and arrays are
  refused.
* ``headers``: ``{name: value}``; values may hold placeholders, filled verbatim (CR and LF refused). ``Host``,
  ``Content-Length``, ``Transfer-Encoding`` and ``Connection`` are the client's business and refused.
* ``body``: any JSON, sent as is (placeholders are *not* filled in it: shape it with the node's ``in``
  bindings). When ``body`` is absent and the method is ``POST``, ``PUT`` or ``PATCH``, the node's inputs are
  sent as the JSON body; ``"body": null`` sends no body. ``Content-Type: application/json`` unless set.

Every request carries ``Idempotency-Key: <ctx.idempotency_key>`` (``<run_id>:<node_id>``, stable across
attempts), unless ``config.headers`` sets that header itself.

Output: ``{"status": int, "headers": {lower-case name: value}, "body": ...}``. Repeated response fields are
joined with ``", "``. The body is parsed JSON when the ``Content-Type`` is JSON (``application/json`` or
``*/*+json``) and parses; otherwise text, decoded with the declared charset (UTF-8 by default, undecodable
bytes replaced); ``null`` when the response has no body.

Failures raise :class:`~aobd.errors.NodeError`:

=========================== =========== ==========================================================
code                        retryable   when
=========================== =========== ==========================================================
``ssrf_denied``             no          the URL, or a redirect hop, is refused by the SSRF guard
``host_unresolvable``       yes         the host did not resolve (DNS may recover)
``http_invalid_request``    no          the config or the inputs do not make a valid request
``http_timeout``            yes         no complete response within the attempt's timeout
``http_connection_error``   yes         connecting, sending or reading failed
``http_tls_error``          no          the server's certificate or TLS handshake was refused
``http_status``             5xx, 408,   the final response is 4xx or 5xx (``details`` carry the
                            429 only    status, a body excerpt and ``Retry-After``)
``http_too_many_redirects`` no          more than ``max_redirects`` (5) redirects
``http_response_too_large`` no          the body exceeds ``max_response_bytes``
=========================== =========== ==========================================================

Redirects are followed here, not by aiohttp: at most five, each ``Location`` re-checked by the guard and the
connection pinned to the addresses judged for it. ``303`` (and ``301``/``302`` after a ``POST``) continue as
``GET`` without a body; ``Authorization``, ``Cookie`` and ``Proxy-Authorization`` are dropped when a redirect
leaves the origin. The client keeps no cookies and ignores proxy environment variables, so one node's
responses can never influence another's request and every connection goes where the guard said.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import orjson
from multidict import CIMultiDict
from yarl import URL

from aobd import __version__
from aobd.errors import NodeError, SsrfDenied
from aobd.nodes.base import NodeContext
from aobd.security.ssrf import (
    TEMPLATE_PLACEHOLDER,
    PinnedResolver,
    Resolver,
    Target,
    UnresolvableHost,
    UrlGuard,
    pin_target,
    resolve_redirect,
)

__all__ = ["HttpNodeClient", "HttpResponse", "execute_http"]

METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_BODY_BY_DEFAULT: Final = ("POST", "PUT", "PATCH")
_REDIRECTS: Final = (301, 302, 303, 307, 308)
_FORBIDDEN_HEADERS: Final = ("host", "content-length", "transfer-encoding", "connection")
_CREDENTIAL_HEADERS: Final = ("authorization", "cookie", "proxy-authorization")
_RETRYABLE_4XX: Final = (408, 429)
_NO_BODY: Final[Any] = object()
_EXCERPT_CHARS = 500
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """The final (non-redirect) response of one request, body fully read."""

    status: int
    reason: str
    #: Lower-case names; repeated fields joined with ``", "``.
    headers: dict[str, str]
    body: bytes
    #: Lower-case MIME type without parameters, ``""`` when absent.
    content_type: str
    charset: str | None
    #: The URL that answered, after redirects.
    url: str
    #: Every URL requested before it, in order.
    redirects: tuple[str, ...] = ()

    def decoded_body(self) -> Any:
        """JSON when the content type is JSON and parses, else text; ``None`` for an empty body."""
        if not self.body:
            return None
        if self.content_type == "application/json" or self.content_type.endswith("+json"):
            try:
                return orjson.loads(self.body)
            except orjson.JSONDecodeError:
                pass  # a server that mislabels its body still gets its text returned
        try:
            return self.body.decode(self.charset or "utf-8", errors="replace")
        except LookupError:  # unknown charset name
            return self.body.decode("utf-8", errors="replace")


def _error(message: str, code: str, *, retryable: bool, details: list[dict[str, Any]] | None = None) -> NodeError:
    err = NodeError(message, code=code, retryable=retryable)
    if details:
        err.details = details
    return err


def _denied(exc: SsrfDenied, prefix: str = "") -> NodeError:
    retryable = isinstance(exc, UnresolvableHost)
    return _error(prefix + exc.message, exc.code, retryable=retryable, details=exc.details)


class HttpNodeClient:
    """The HTTP client of ``http`` nodes: one pooled aiohttp session behind the SSRF guard.

    The session is created on first use, inside the running loop, and stays bound to that loop; ``await
    close()`` releases it (``async with HttpNodeClient(...)`` does that too). Its connector resolves through
    :class:`~aobd.security.ssrf.PinnedResolver` with the DNS cache off, so every connection goes to an address
    the guard judged for that very request.
    """

    def __init__(
        self,
        *,
        allow: Sequence[str] = (),
        resolver: Resolver | None = None,
        guard: UrlGuard | None = None,
        timeout_s: float = 30.0,
        max_redirects: int = 5,
        max_response_bytes: int = 16 * 1024 * 1024,
        max_connections: int = 100,
        user_agent: str = f"aobd/{__version__}",
        trace_configs: Sequence[aiohttp.TraceConfig] = (),
    ) -> None:
        """Args:
        allow: ``security.http_allow`` entries; ignored when ``guard`` is given.
        resolver: DNS resolver for the guard (``loop.getaddrinfo`` by default); ignored with ``guard``.
        guard: a ready :class:`~aobd.security.ssrf.UrlGuard`.
        timeout_s: default per-request timeout (DNS, connect, redirects and body included).
        max_redirects: redirects followed before failing with ``http_too_many_redirects``.
        max_response_bytes: largest response body read (after decompression).
        max_connections: connection pool size.
        user_agent: default ``User-Agent``.
        trace_configs: aiohttp request tracing hooks (metrics, tests).
        """
        self.guard = guard or UrlGuard(allow, resolver=resolver)
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.max_response_bytes = max_response_bytes
        self._max_connections = max_connections
        self._user_agent = user_agent
        self._trace_configs = list(trace_configs)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> HttpNodeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session and its connections; the client may be used again afterwards."""
        session, self._session, self._loop = self._session, None, None
        if session is not None and not session.closed:
            await session.close()

    def _session_here(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is not None and not self._session.closed:
            if self._loop is not loop:
                raise RuntimeError("HttpNodeClient is bound to the event loop it was first used in")
            return self._session
        connector = aiohttp.TCPConnector(resolver=PinnedResolver(), use_dns_cache=False, limit=self._max_connections)
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,  # an HTTP(S)_PROXY variable would send every request somewhere unjudged
            timeout=aiohttp.ClientTimeout(total=None),  # one deadline per request, set in request()
            headers={"User-Agent": self._user_agent},
            trace_configs=self._trace_configs or None,
        )
        self._loop = loop
        return self._session

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        json_body: Any = _NO_BODY,
        timeout_s: float | None = None,
    ) -> HttpResponse:
        """Send one request through the guard, following redirects; any status is returned, not raised.

        Args:
            method: an HTTP method.
            url: the absolute URL.
            headers: request headers.
            json_body: sent JSON-encoded when given (``None`` sends ``null``).
            timeout_s: deadline for the whole exchange; the client default when ``None``.

        Raises:
            NodeError: see the module docstring for codes and retryability.
        """
        data: bytes | None = None
        send_headers: CIMultiDict[str] = CIMultiDict(headers or {})
        if json_body is not _NO_BODY:
            try:
                data = orjson.dumps(json_body)
            except TypeError as exc:
                raise _error(f"the request body is not JSON: {exc}", "http_invalid_request", retryable=False) from exc
            send_headers.setdefault("Content-Type", "application/json")
        deadline = self.timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(deadline):
                return await self._exchange(method.upper(), url, send_headers, data)
        except TimeoutError as exc:
            raise _error(f"{method} {url} timed out after {deadline:g}s", "http_timeout", retryable=True) from exc

    async def _exchange(self, method: str, url: str, headers: CIMultiDict[str], data: bytes | None) -> HttpResponse:
        session = self._session_here()
        hops: list[str] = []
        try:
            target = await self.guard.check_url(url)
        except SsrfDenied as exc:
            raise _denied(exc) from exc
        while True:
            status, location, response = await self._send_once(session, method, target, headers, data, hops)
            if response is not None:
                return response
            assert location is not None
            hops.append(str(target.url))
            if len(hops) > self.max_redirects:
                raise _error(
                    f"{hops[0]} redirected more than {self.max_redirects} times (last to {location})",
                    "http_too_many_redirects",
                    retryable=False,
                    details=[{"redirects": hops}],
                )
            prefix = f"redirect {len(hops)} from {target.url} (HTTP {status}) refused: "
            try:
                next_target = await self.guard.check_url(resolve_redirect(target.url, location))
            except SsrfDenied as exc:
                raise _denied(exc, prefix) from exc
            if (status == 303 and method != "HEAD") or (status in (301, 302) and method == "POST"):
                method, data = "GET", None
                headers.popall("Content-Type", None)
            if _origin(next_target.url) != _origin(target.url):
                for name in _CREDENTIAL_HEADERS:
                    headers.popall(name, None)
            target = next_target

    async def _send_once(
        self,
        session: aiohttp.ClientSession,
        method: str,
        target: Target,
        headers: CIMultiDict[str],
        data: bytes | None,
        hops: list[str],
    ) -> tuple[int, str | None, HttpResponse | None]:
        """One request to a judged target: ``(status, location, None)`` for a redirect, else the response."""
        try:
            with pin_target(target):
                async with session.request(
                    method, target.url, headers=headers, data=data, allow_redirects=False
                ) as resp:
                    location = resp.headers.get("Location") if resp.status in _REDIRECTS else None
                    if location is not None:
                        return resp.status, location, None
                    body = await self._read_body(resp, target)
                    fields: dict[str, str] = {}
                    for name, value in resp.headers.items():
                        key = name.lower()
                        fields[key] = f"{fields[key]}, {value}" if key in fields else value
                    response = HttpResponse(
                        status=resp.status,
                        reason=resp.reason or "",
                        headers=fields,
                        body=body,
                        content_type=resp.content_type.lower() if "Content-Type" in resp.headers else "",
                        charset=resp.charset,
                        url=str(target.url),
                        redirects=tuple(hops),
                    )
                    return resp.status, None, response
        except aiohttp.ClientConnectorCertificateError as exc:
            raise _error(
                f"{method} {target.url}: TLS certificate refused: {exc}", "http_tls_error", retryable=False
            ) from exc
        except aiohttp.ClientSSLError as exc:
            raise _error(f"{method} {target.url}: TLS failed: {exc}", "http_tls_error", retryable=False) from exc
        except aiohttp.ClientConnectorDNSError as exc:
            # Only the pinning resolver answers here, so this means the connection was about to leave the
            # addresses the guard judged.
            raise _error(
                f"{method} {target.url}: connection refused by address pinning: {exc}",
                "ssrf_denied",
                retryable=False,
            ) from exc
        except aiohttp.InvalidURL as exc:
            raise _error(f"{method} {target.url}: invalid URL: {exc}", "http_invalid_request", retryable=False) from exc
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                raise
            raise _error(
                f"{method} {target.url}: {type(exc).__name__}: {exc}", "http_connection_error", retryable=True
            ) from exc

    async def _read_body(self, resp: aiohttp.ClientResponse, target: Target) -> bytes:
        limit = self.max_response_bytes
        too_large = f"{target.url} answered with a body larger than {limit} bytes"
        if resp.content_length is not None and resp.content_length > limit:
            raise _error(too_large, "http_response_too_large", retryable=False)
        body = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:  # counted after decompression, so a compression bomb stops here too
                raise _error(too_large, "http_response_too_large", retryable=False)
        return bytes(body)


def _origin(url: URL) -> tuple[str, str | None, int | None]:
    return url.scheme, url.raw_host, url.port


# ------------------------------------------------------------------------------------------- node executor


def _invalid(message: str) -> NodeError:
    return _error(message, "http_invalid_request", retryable=False)


def _placeholder_text(value: Any, name: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return orjson.dumps(value).decode()
    kind = "null" if value is None else type(value).__name__
    raise _invalid(f"config.{where}: input {name!r} is {kind}; only strings, numbers and booleans can be filled in")


def _fill(template: str, inputs: Mapping[str, Any], where: str, *, url: bool) -> str:
    path_end = len(template)
    if url:
        after_scheme = template.find("://") + 3 if "://" in template else 0
        ends = [i for i in (template.find("?", after_scheme), template.find("#", after_scheme)) if i >= 0]
        path_end = min(ends, default=len(template))

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in inputs:
            known = ", ".join(sorted(inputs)) or "none"
            raise _invalid(f"config.{where} uses {{{name}}} but the node has no input {name!r} (inputs: {known})")
        text = _placeholder_text(inputs[name], name, where)
        if not url:
            return text
        if match.start() < path_end and text in (".", ".."):
            raise _invalid(f"config.{where}: input {name!r} is {text!r}, which would climb the URL path")
        return quote(text, safe="")

    return TEMPLATE_PLACEHOLDER.sub(substitute, template)


def _build_headers(config: Mapping[str, Any], inputs: Mapping[str, Any], ctx: NodeContext) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict({"Idempotency-Key": ctx.idempotency_key})
    configured = config.get("headers") or {}
    if not isinstance(configured, Mapping):
        raise _invalid(f"config.headers must be an object of name: value, not {type(configured).__name__}")
    for name, value in configured.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise _invalid(f"config.headers: {name!r} is not a valid header name")
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise _invalid(f"config.headers.{name}: header values must be strings or numbers")
        if name.lower() in _FORBIDDEN_HEADERS:
            raise _invalid(f"config.headers.{name}: this header is set by the HTTP client, not by the node")
        text = _fill(str(value), inputs, f"headers.{name}", url=False)
        if any(ch in text for ch in "\r\n\0"):
            raise _invalid(f"config.headers.{name}: the value contains CR, LF or NUL")
        headers[name] = text  # replaces the Idempotency-Key default, case-insensitively
    return headers


async def execute_http(
    config: Mapping[str, Any], inputs: Mapping[str, Any], ctx: NodeContext, client: HttpNodeClient
) -> dict[str, Any]:
    """Run one attempt of an ``http`` node (see the module docstring for config, output and errors).

    Args:
        config: the node's ``config``.
        inputs: the node's resolved ``in`` bindings.
        ctx: the attempt's context; ``ctx.timeout_s`` bounds the whole exchange when positive.
        client: the shared :class:`HttpNodeClient`.

    Returns:
        ``{"status", "headers", "body"}`` for a response below 400.

    Raises:
        NodeError: with ``code`` and ``retryable`` as tabulated in the module docstring.
    """
    method = str(config.get("method", "GET")).upper()
    if method not in METHODS:
        raise _invalid(f"config.method {config.get('method')!r} is not one of {', '.join(METHODS)}")
    template = config.get("url")
    if not isinstance(template, str) or not template:
        raise _invalid("config.url is required: an absolute http:// or https:// URL")
    url = _fill(template, inputs, "url", url=True)
    headers = _build_headers(config, inputs, ctx)
    if "body" in config:
        body = _NO_BODY if config["body"] is None else config["body"]
    else:
        body = dict(inputs) if method in _BODY_BY_DEFAULT else _NO_BODY
    timeout = ctx.timeout_s if ctx.timeout_s and ctx.timeout_s > 0 else None
    response = await client.request(method, url, headers=headers, json_body=body, timeout_s=timeout)
    if response.status >= 400:
        raise _status_error(method, response)
    return {"status": response.status, "headers": response.headers, "body": response.decoded_body()}


def _status_error(method: str, response: HttpResponse) -> NodeError:
    status = response.status
    retryable = status >= 500 or status in _RETRYABLE_4XX
    decoded = response.decoded_body()
    excerpt = decoded if isinstance(decoded, str) else orjson.dumps(decoded).decode() if decoded else ""
    excerpt = excerpt[:_EXCERPT_CHARS]
    detail: dict[str, Any] = {"status": status, "url": response.url, "body": excerpt}
    if "retry-after" in response.headers:
        detail["retry_after"] = response.headers["retry-after"]
    message = f"{method} {response.url} returned HTTP {status} {response.reason}".rstrip()
    if excerpt:
        message += f": {excerpt[:200]}"
    return _error(message, "http_status", retryable=retryable, details=[detail])
