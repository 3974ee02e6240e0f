"""The ASGI application of the HTTP API (DESIGN.md section 9).

One route table (``ROUTES``) drives dispatch, authorization and the OpenAPI document, so a route cannot exist
without a role and a schema. Request bodies are read with a size limit (413 before the whole body is read)
and decoded with msgspec into the Structs of ``aobd.api.schemas``; every error leaves as
``{"error": {"code", "message", "details"}}``.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import msgspec
import structlog

from aobd.api import schemas as s
from aobd.api.auth import Authenticator, make_limiter
from aobd.daemon.service import Caller, Service
from aobd.errors import (
    AobdError,
    BadRequest,
    Conflict,
    Forbidden,
    Misdirected,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
    Unavailable,
    WorkflowInvalid,
)
from aobd.model.canonical import canonical_json

from .forward import FORWARDED_ADMIN, FORWARDED_BY, PEER_TOKEN, Forwarder, to_owner

log = structlog.get_logger("aobd.api")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_encoder = msgspec.json.Encoder()
_STATUS_OF: list[tuple[type[AobdError], int]] = [
    (BadRequest, 400),
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (PayloadTooLarge, 413),
    (WorkflowInvalid, 422),
    (RateLimited, 429),
    (Unavailable, 503),
]


@dataclass(slots=True)
class Request:
    scope: Scope
    receive: Receive
    send: Send
    params: dict[str, str]
    query: dict[str, str]
    caller: Caller
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return _header(self.scope, name.lower())

    def decode(self, kind: type[Any]) -> Any:
        if not self.body:
            raise BadRequest("this operation needs a JSON request body")
        try:
            value = msgspec.json.decode(self.body, type=kind)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"invalid request body: {exc}", details=[{"problem": str(exc)}]) from None
        except msgspec.DecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise BadRequest("request body is nested too deeply") from None
        if _may_not_be_canonical(self.body):
            try:
                # The engine stores canonical JSON (orjson): integers within 64 bits, nesting under 255 levels.
                canonical_json(msgspec.to_builtins(value))
            except (TypeError, RecursionError) as exc:
                raise BadRequest(f"request body cannot be stored as canonical JSON: {exc}") from None
        return value


def _may_not_be_canonical(body: bytes) -> bool:
    """Whether a JSON body might hold what canonical JSON refuses: an integer of 19 digits or more (64-bit
    integers have at most 20), or 255 nested levels (which need as many brackets). A body with neither is
    storable, which spares most requests re-encoding their whole body to find out.

    The digit run is found by mapping every digit to ``0`` and everything else to a space, then searching for 19
    zeros: both steps run in C, 1.5 us for a W6 start's 1 KiB body against 8.3 us for the regex ``\\d{19}``."""
    return body.count(b"[") + body.count(b"{") >= 255 or _LONG_DIGIT_RUN in body.translate(_DIGITS_AS_ZERO)


_DIGITS_AS_ZERO = bytes(ord("0") if ord("0") <= i <= ord("9") else ord(" ") for i in range(256))
_LONG_DIGIT_RUN = b"0" * 19


@dataclass(slots=True)
class Response:
    body: Any = None
    status: int = 200
    content_type: str = "application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    raw: bytes | None = None


Handler = Callable[["Api", Request], Awaitable[Any]]

#: Returned by handlers that wrote their own response (streams).
STREAMED = object()


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    #: Minimum role, or None for unauthenticated routes.
    role: str | None
    op_id: str
    summary: str
    body: type[Any] | None = None
    response: Any = None
    status: int = 200
    query: tuple[tuple[str, type[Any]], ...] = ()
    #: "run" when the {id} parameter names a run (for the workspace matrix test).
    owner: str | None = None

    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.path) + "$")


class Api:
    """The ASGI callable. ``listen`` is reported by /v1/admin/status."""

    def __init__(
        self, service: Service, *, listen: str = "", hub: Any = None, metrics: Any = None, limiter: Any = None
    ) -> None:
        self.service = service
        self.config = service.config
        self.listen = listen
        self.hub = hub
        self.metrics = metrics
        self.auth = Authenticator(self.config.auth.tokens, peer_token=self.config.cluster.peer_token)
        self.limiter = limiter if limiter is not None else make_limiter(self.config)
        self._routes = [(r, r.pattern()) for r in ROUTES]
        self._forwarder: Forwarder | None = None

    def reload(self, config: Any) -> None:
        """SIGHUP: tokens (the peer token too), rate limits and body limits change live."""
        self.config = config
        self.auth = Authenticator(config.auth.tokens, peer_token=config.cluster.peer_token)
        self.limiter.reconfigure(config.limits)
        fallback = getattr(self.limiter, "fallback", None)
        if fallback is not None:
            fallback.reconfigure(config.limits)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind in ("http", "websocket"):
            await self._dispatch(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
        """(route, params, path_exists): a path with another method is a 405, no path a 404."""
        exists = False
        for route, pattern in self._routes:
            m = pattern.match(path)
            if m is None:
                continue
            exists = True
            if route.method == method:
                return route, {k: unquote(v) for k, v in m.groupdict().items()}, True
        return None, {}, exists

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        method = "WS" if scope["type"] == "websocket" else scope["method"]
        route, params, exists = self.match(method, scope["path"])
        status = 500
        try:
            if route is None:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                raise (_MethodNotAllowed if exists else NotFound)(f"no route {method} {scope['path']}")
            caller = self._authorize(scope, route)
            query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
            request = Request(scope, receive, send, params, query, caller)
            if route.body is not None or method in ("POST", "PUT", "PATCH"):
                request.body = await self._read_body(scope, receive)
            try:
                result = await route.handler(self, request)
            except Misdirected as exc:
                result = await self._forward(request, exc)
            if result is STREAMED:
                # A stream's lifetime is not a request latency: keep it out of the latency histogram.
                status, started = 200, -1.0
                return
            response = result if isinstance(result, Response) else Response(result, route.status)
            status = response.status
            await self._send(send, response)
        except AobdError as exc:
            status = 405 if isinstance(exc, _MethodNotAllowed) else _status_of(exc)
            if isinstance(exc, RateLimited) and self.metrics is not None:
                caller_ws = exc.details[0].get("workspace", "unknown") if exc.details else "unknown"
                self.metrics.observe_rate_limited(caller_ws, exc.details[0].get("kind", "unknown"))
            await self._send_error(scope, send, exc, status)
        except Exception:
            log.exception("unhandled error", path=scope.get("path"), method=method)
            status = 500
            await self._send_error(scope, send, AobdError("internal error; see the daemon log"), 500)
        finally:
            if self.metrics is not None and started >= 0:
                self.metrics.observe_request(
                    route.op_id if route else "unmatched", method, status, time.perf_counter() - started
                )

    async def _forward(self, request: Request, exc: Misdirected) -> Response:
        """A command for a run another daemon drives: its answer, when it can be asked (a known owner, not
        forwarded already, and for the admin socket a peer token); otherwise the misdirection itself (409)."""
        scope = request.scope
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        url, sent = to_owner(
            exc,
            headers,
            daemon_id=self._daemon_id(),
            admin=scope.get("extensions", {}).get("aobd.caller"),  # the admin socket: no token to pass on
            peer_token=self.config.cluster.peer_token,
        )
        if self._forwarder is None:
            self._forwarder = Forwarder()
        status, content_type, body = await self._forwarder.forward(
            scope["method"], scope["path"], scope.get("query_string", b""), sent, request.body, url
        )
        return Response(status=status, content_type=content_type, raw=body)

    def _daemon_id(self) -> str:
        return getattr(self.service.cluster, "daemon_id", "") or self.config.cluster.daemon_id or "unknown"

    async def close(self) -> None:
        await self.limiter.close()
        if self._forwarder is not None:
            await self._forwarder.close()

    def _authorize(self, scope: Scope, route: Route) -> Caller:
        preset = scope.get("extensions", {}).get("aobd.caller")
        if preset is not None:
            caller: Caller = preset  # the admin unix socket vouches for the peer
        elif (claim := _header(scope, FORWARDED_ADMIN)) is not None:
            # A command another daemon's admin socket forwarded. The header claims admin, so without the right
            # peer token it is refused (401), never ignored: ignoring it would run the command as whoever the
            # rest of the request names, not as the caller it claims to be.
            caller = self.auth.forwarded_admin(claim, _header(scope, PEER_TOKEN), _header(scope, FORWARDED_BY))
        elif route.role is None or (route.op_id == "metrics" and self.config.api.metrics_public):
            return Caller("default", "read", "anonymous")
        else:
            headers = dict(scope.get("headers", []))
            caller = self.auth.authenticate(headers.get(b"authorization", b"").decode("latin-1"))
        if route.role is not None and not caller.allows(route.role):
            raise Forbidden(f"{route.method} {route.path} needs role {route.role!r}; this token has {caller.role!r}")
        return caller

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.config.api.max_body_bytes
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > limit:
                raise PayloadTooLarge(
                    f"request body of {int(v)} bytes exceeds the limit of {limit} bytes (api.max_body_bytes)"
                )
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise BadRequest("client disconnected while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes (api.max_body_bytes)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _send(self, send: Send, response: Response) -> None:
        if response.raw is not None:
            body = response.raw
        elif response.body is None and response.status == 204:
            body = b""
        else:
            body = _encoder.encode(response.body)
        headers = [(b"content-type", response.content_type.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": response.status, "headers": headers + response.headers})
        await send({"type": "http.response.body", "body": body})

    async def _send_error(self, scope: Scope, send: Send, exc: AobdError, status: int) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008 if status < 500 else 1011, "reason": exc.message[:120]})
            return
        extra: list[tuple[bytes, bytes]] = []
        if isinstance(exc, RateLimited):
            extra.append((b"retry-after", str(max(1, round(exc.retry_after_s))).encode()))
        body = {"error": {"code": exc.code, "message": exc.message, "details": exc.details}}
        try:
            await self._send(send, Response(body, status, headers=extra))
        except Exception:  # the response had already started (a stream): nothing more can be said
            log.debug("could not send error response", status=status)


def _header(scope: Scope, name: str) -> str | None:
    """The first value of header ``name`` (lower case), decoded as latin-1."""
    key = name.encode()
    for k, v in scope.get("headers", []):
        if k == key:
            return str(v.decode("latin-1"))
    return None


class _MethodNotAllowed(AobdError):
    code = "method_not_allowed"


def _status_of(exc: AobdError) -> int:
    for kind, status in _STATUS_OF:
        if isinstance(exc, kind):
            return status
    return 400


# ---------------------------------------------------------------------------------------------- handlers


def _uint(raw: str, most: int) -> int | None:
    """``raw`` as an integer from 0 to ``most``, or None (ASCII digits only: ``"²".isdigit()`` is true)."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(most)) or int(raw) > most:
        return None
    return int(raw)


def _limit(request: Request, default: int = 100, most: int = 10_000) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    value = _uint(raw, most)
    if value is None or value < 1:
        raise BadRequest(f"query parameter limit must be an integer from 1 to {most}, not {raw!r}")
    return value


async def put_workflow(api: Api, r: Request) -> Any:
    return await api.service.put_workflow(r.caller, r.decode(s.WorkflowPut))


async def list_workflows(api: Api, r: Request) -> Any:
    return await api.service.list_workflows(r.caller)


async def get_workflow(api: Api, r: Request) -> Any:
    return await api.service.get_workflow(r.caller, r.params["name"], r.query.get("tag"))


async def start_run(api: Api, r: Request) -> Any:
    body = r.decode(s.RunStart)
    raw_wait = r.query.get("wait", "0")
    try:
        wait_s = float(raw_wait)
    except ValueError:
        wait_s = -1.0
    if not 0 <= wait_s <= 300:
        raise BadRequest(f"query parameter wait must be seconds from 0 to 300, not {raw_wait!r}")
    await api.limiter.check(r.caller.workspace, "run_start")
    return Response(await api.service.start_run(r.caller, body, wait_s=wait_s), 201)


async def list_runs(api: Api, r: Request) -> Any:
    status = r.query.get("status")
    if status is not None and status not in ("running", "waiting", "completed", "failed", "cancelled"):
        raise BadRequest(f"query parameter status must be a run status, not {status!r}")
    return await api.service.list_runs(r.caller, status, _limit(r))


async def get_run(api: Api, r: Request) -> Any:
    return await api.service.get_run(r.caller, r.params["id"])


async def run_events(api: Api, r: Request) -> Any:
    run_id = r.params["id"]
    accept = r.header("accept") or ""
    after = r.header("last-event-id") or r.query.get("after") or "0"
    if _uint(after, s.MAX_SEQ) is None:
        raise BadRequest(f"Last-Event-ID / after must be an event seq, not {after!r}")
    if "text/event-stream" not in accept:
        return await api.service.events(r.caller, run_id, int(after))
    await api.service.check_run(r.caller, run_id)
    from aobd.api.streams import serve_sse

    await serve_sse(
        r.scope,
        r.receive,
        r.send,
        log=api.service.log,
        hub=api.hub,
        run_id=run_id,
        after_seq=int(after),
        node=r.query.get("node"),
        heartbeat_s=api.config.api.heartbeat_s,
    )
    return STREAMED


async def run_ws(api: Api, r: Request) -> Any:
    run_id = r.params["id"]
    await api.service.check_run(r.caller, run_id)
    from aobd.api.streams import serve_websocket

    after = r.query.get("after", "0")
    await serve_websocket(
        r.scope,
        r.receive,
        r.send,
        log=api.service.log,
        hub=api.hub,
        run_id=run_id,
        after_seq=_uint(after, s.MAX_SEQ) or 0,
        node=r.query.get("node"),
        heartbeat_s=api.config.api.heartbeat_s,
    )
    return STREAMED


async def cancel_run(api: Api, r: Request) -> Any:
    body = r.decode(s.CancelRequest) if r.body else s.CancelRequest()
    return await api.service.cancel(r.caller, r.params["id"], body.reason)


async def replay_run(api: Api, r: Request) -> Any:
    body = r.decode(s.ReplayRequest)
    await api.limiter.check(r.caller.workspace, "run_start")
    return Response(await api.service.replay(r.caller, r.params["id"], body.from_, body.mode), 201)


async def propose_patch(api: Api, r: Request) -> Any:
    body = r.decode(s.PatchPost)
    await api.limiter.check(r.caller.workspace, "patch")
    return Response(await api.service.propose_patch(r.caller, r.params["id"], body), 201)


async def list_patches(api: Api, r: Request) -> Any:
    return await api.service.list_patches(r.caller, r.params["id"])


async def get_patch(api: Api, r: Request) -> Any:
    return await api.service.get_patch(r.caller, r.params["id"])


def _decide(action: str) -> Handler:
    async def decide(api: Api, r: Request) -> Any:
        body = r.decode(s.PatchDecision) if r.body else s.PatchDecision()
        return await api.service.decide_patch(r.caller, r.params["id"], action, body.reason)

    decide.__name__ = f"{action}_patch"
    return decide


async def list_approvals(api: Api, r: Request) -> Any:
    status = r.query.get("status")
    if status is not None and status not in ("pending", "approved", "rejected"):
        raise BadRequest(f"query parameter status must be pending, approved or rejected, not {status!r}")
    return await api.service.list_approvals(r.caller, status)


async def decide_approval(api: Api, r: Request) -> Any:
    return await api.service.decide_approval(r.caller, r.params["ticket"], r.decode(s.ApprovalDecision))


async def get_blob(api: Api, r: Request) -> Any:
    data = await api.service.get_blob(r.caller, r.params["ref"])
    return Response(raw=data, content_type="application/octet-stream")


async def metrics(api: Api, r: Request) -> Any:
    if api.metrics is None:
        raise Unavailable("metrics are not enabled")
    accept = r.header("accept")
    # The multi-process daemon: every process's metrics, merged; otherwise this process's registry is the daemon's.
    merged = await api.service.metrics_exposition(accept)
    body, content_type = merged if merged is not None else api.metrics.render(accept)
    return Response(raw=body, content_type=content_type)


async def healthz(api: Api, r: Request) -> Any:
    return s.Health("ok")


async def readyz(api: Api, r: Request) -> Any:
    if api.service.draining:
        return Response(s.Health("draining"), 503)
    if not api.service.ready:
        return Response(s.Health("starting"), 503)
    # The multi-process daemon: its orchestrators and a runner must be up too, not only this process.
    planes_ready = getattr(api.service, "planes_ready", None)
    if planes_ready is not None and not planes_ready():
        return Response(s.Health("starting"), 503)
    return s.Health("ok")


async def openapi(api: Api, r: Request) -> Any:
    from aobd.api.openapi import openapi_document

    return openapi_document(ROUTES)


async def admin_status(api: Api, r: Request) -> Any:
    status: Any = api.service.status(api.listen)
    # An accept worker's ServiceProxy asks the orchestrators, so its status is a coroutine.
    return await status if inspect.isawaitable(status) else status


async def admin_drain(api: Api, r: Request) -> Any:
    drain = r.scope.get("extensions", {}).get("aobd.drain")
    if drain is None:
        raise Unavailable("this server cannot drain itself")
    api.service.draining = True  # refuse new runs from this moment, before the stop is even scheduled
    drain()
    return api.service.status(api.listen)


async def admin_config(api: Api, r: Request) -> Any:
    return api.service.config_view()


_RUN = "run"
ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/workflows",
        put_workflow,
        "write",
        "putWorkflow",
        "Register a workflow version",
        s.WorkflowPut,
        s.WorkflowRef,
        201,
    ),
    Route(
        "GET", "/v1/workflows", list_workflows, "read", "listWorkflows", "List workflows", None, list[s.WorkflowInfo]
    ),
    Route(
        "GET",
        "/v1/workflows/{name}",
        get_workflow,
        "read",
        "getWorkflow",
        "Get a workflow and its definition",
        None,
        s.WorkflowInfo,
        query=(("tag", str),),
    ),
    Route(
        "POST",
        "/v1/runs",
        start_run,
        "write",
        "startRun",
        "Start a run (with ?wait=SECONDS, answer when it finished or the wait is over)",
        s.RunStart,
        s.RunSummary,
        201,
        query=(("wait", float),),
    ),
    Route(
        "GET",
        "/v1/runs",
        list_runs,
        "read",
        "listRuns",
        "List runs",
        None,
        list[s.RunInfoOut],
        query=(("status", str), ("limit", int)),
    ),
    Route("GET", "/v1/runs/{id}", get_run, "read", "getRun", "Get a run summary", None, s.RunSummary, owner=_RUN),
    Route(
        "GET",
        "/v1/runs/{id}/events",
        run_events,
        "read",
        "getRunEvents",
        "A run's events (JSON, or SSE with Accept: text/event-stream)",
        None,
        list[dict[str, Any]],
        query=(("after", int), ("node", str)),
        owner=_RUN,
    ),
    Route(
        "WS",
        "/v1/runs/{id}/ws",
        run_ws,
        "read",
        "streamRunEvents",
        "A run's events over WebSocket",
        None,
        None,
        owner=_RUN,
    ),
    Route(
        "POST",
        "/v1/runs/{id}/cancel",
        cancel_run,
        "write",
        "cancelRun",
        "Cancel a run",
        s.CancelRequest,
        s.RunSummary,
        owner=_RUN,
    ),
    Route(
        "POST",
        "/v1/runs/{id}/replay",
        replay_run,
        "write",
        "replayRun",
        "Replay a run from a node",
        s.ReplayRequest,
        s.RunSummary,
        201,
        owner=_RUN,
    ),
    Route(
        "POST",
        "/v1/runs/{id}/patches",
        propose_patch,
        "write",
        "proposePatch",
        "Propose a patch to a running run",
        s.PatchPost,
        s.PatchInfo,
        201,
        owner=_RUN,
    ),
    Route(
        "GET",
        "/v1/runs/{id}/patches",
        list_patches,
        "read",
        "listPatches",
        "A run's patches",
        None,
        list[s.PatchInfo],
        owner=_RUN,
    ),
    Route("GET", "/v1/patches/{id}", get_patch, "read", "getPatch", "Get a patch", None, s.PatchInfo, owner="patch"),
    Route(
        "POST",
        "/v1/patches/{id}/approve",
        _decide("approve"),
        "write",
        "approvePatch",
        "Approve a pending patch",
        s.PatchDecision,
        s.PatchInfo,
        owner="patch",
    ),
    Route(
        "POST",
        "/v1/patches/{id}/reject",
        _decide("reject"),
        "write",
        "rejectPatch",
        "Reject a pending patch",
        s.PatchDecision,
        s.PatchInfo,
        owner="patch",
    ),
    Route(
        "POST",
        "/v1/patches/{id}/rollback",
        _decide("rollback"),
        "write",
        "rollbackPatch",
        "Roll back an applied patch",
        s.PatchDecision,
        s.PatchInfo,
        owner="patch",
    ),
    Route(
        "GET",
        "/v1/approvals",
        list_approvals,
        "read",
        "listApprovals",
        "Approval tickets",
        None,
        list[s.ApprovalInfo],
        query=(("status", str),),
    ),
    Route(
        "POST",
        "/v1/approvals/{ticket}",
        decide_approval,
        "write",
        "decideApproval",
        "Decide an approval ticket",
        s.ApprovalDecision,
        s.ApprovalInfo,
        owner="ticket",
    ),
    Route("GET", "/v1/cas/{ref}", get_blob, "read", "getBlob", "A content-addressed blob", None, bytes, owner="blob"),
    Route("GET", "/v1/admin/status", admin_status, "admin", "adminStatus", "Daemon status", None, s.Status),
    Route(
        "POST",
        "/v1/admin/drain",
        admin_drain,
        "admin",
        "adminDrain",
        "Drain the daemon (stop taking runs, finish in-flight work, exit)",
        None,
        s.Status,
    ),
    Route(
        "GET",
        "/v1/admin/config",
        admin_config,
        "admin",
        "adminConfig",
        "Effective configuration, secrets masked",
        None,
        dict[str, Any],
    ),
    Route("GET", "/metrics", metrics, "read", "metrics", "Prometheus metrics", None, str),
    Route("GET", "/healthz", healthz, None, "healthz", "Liveness", None, s.Health),
    Route("GET", "/readyz", readyz, None, "readyz", "Readiness", None, s.Health),
    Route("GET", "/openapi.json", openapi, "read", "openapi", "This document", None, dict[str, Any]),
)

# External agent runners' routes live with their queue; the table is built once Route exists (see that module).
from aobd.api.agent_routes import AGENT_ROUTES  # noqa: E402

ROUTES = ROUTES + AGENT_ROUTES
