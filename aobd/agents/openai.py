"""The ``openai`` agent provider: one chat-completions exchange with any OpenAI-compatible server per attempt.

The request asks for the one answer shape (``{"output": ..., "patch": {"ops": [...], "reason": ...}}``) through a
JSON-schema ``response_format``; an answer that comes back as a tool call is accepted too. The system message
tells the model its role, the answer shape, the patch rules of DESIGN.md section 3 and a compact view of the
run's current workflow (ids, array indices, types, configs with secrets redacted, edges; never other nodes'
outputs). The user message carries ``config.prompt`` and the node's inputs as JSON.

The provider only *proposes*: a patch that breaks the rules is returned as the model wrote it, and the engine
judges it. Its ``author`` is always ``agent:<node id>`` and its ``base`` the run's current version, whatever the
model wrote, so a model cannot pass its patch off as someone else's.

Transport goes through :class:`~aobd.nodes.http.HttpNodeClient`: ``config.base_url`` is judged by the SSRF guard
(``security.http_allow`` admits a local server) and the connection is pinned to the judged addresses.

Failures raise :class:`~aobd.errors.NodeError`:

=========================== =========== =============================================================
code                        retryable   when
=========================== =========== =============================================================
``bad_config``              no          ``config.base_url`` or ``config.model`` missing or malformed
``agent_no_key``            no          ``api_key_env``/``api_key_file`` is set but yields no key
``ssrf_denied``             no          the SSRF guard refuses ``base_url`` (or a redirect)
``agent_rate_limited``      yes         429 on every try (3), or Retry-After would pass the deadline
``agent_server_error``      yes         5xx on every try (3), or the backoff would pass the deadline
``agent_request_rejected``  no          any other 4xx (bad key, unknown model, bad request)
``agent_timeout``           yes         no response within ``request_timeout_ms`` or the attempt timeout
``agent_unreachable``       yes         DNS or connection failure
``agent_tls_error``         no          the server's certificate or TLS handshake was refused
``agent_bad_answer``        yes         the response, the message's JSON or the answer's shape is wrong
=========================== =========== =============================================================

The API key goes only into the ``Authorization`` header: it is never logged, never part of
:attr:`AgentAnswer.exchange` and scrubbed from error messages and stored response text (servers quote it).
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

import msgspec
import orjson
import structlog

from aobd.errors import NodeError
from aobd.model.workflow import Policy
from aobd.nodes.base import NodeContext
from aobd.nodes.http import HttpNodeClient, HttpResponse

from .base import AgentAnswer, parse_answer

__all__ = ["ANSWER_SCHEMA", "build_messages", "openai_answer", "workflow_view"]

#: Tries per attempt on 429 and 5xx (the engine's retry policy decides about further attempts).
MAX_TRIES: Final = 3
DEFAULT_REQUEST_TIMEOUT_S: Final = 60.0
#: First backoff after a 429/5xx without Retry-After; doubles per try, with +-20% jitter.
_BACKOFF_BASE_S = 0.5
_EXCERPT_CHARS: Final = 200
#: Longest config string shown in the workflow view; prompts and bodies of other nodes are cut there.
_VIEW_STRING_CHARS: Final = 300
_SCHEMA_NAME: Final = "aobd_agent_answer"
_REDACTED: Final = "<redacted>"
_SECRET_NAME = re.compile(
    r"pass(word|wd)?|secret|token|api[-_]?key|auth|cookie|credential|private[-_]?key|signature|session", re.I
)
#: Config keys that name where a secret lives, not the secret.
_SECRET_REFERENCES: Final = frozenset({"api_key_env", "api_key_file"})
_QUERY_PARAM = re.compile(r"([?&])([^=&#]+)=([^&#]*)")
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?```$", re.S)

_log = structlog.get_logger("aobd.agents.openai")

_OP_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "op": {"type": "string", "enum": ["add", "remove", "replace", "move", "copy", "test"]},
        "path": {"type": "string", "description": "JSON Pointer (RFC 6901) into the workflow document"},
        "from": {"type": "string", "description": "source pointer, for move and copy"},
        "value": {"description": "any JSON, for add, replace and test"},
    },
    "required": ["op", "path"],
}

#: The JSON schema of an agent answer, sent as the ``response_format`` (not strict: ``output`` is any JSON).
ANSWER_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "output": {"description": "this node's output: any JSON value that downstream nodes read"},
        "patch": {
            "type": "object",
            "description": "optional change to this run's workflow graph",
            "properties": {
                "ops": {"type": "array", "items": _OP_SCHEMA, "description": "RFC 6902 JSON Patch operations"},
                "reason": {"type": "string", "description": "why the graph should change, for the people reviewing"},
            },
            "required": ["ops", "reason"],
            "additionalProperties": False,
        },
    },
    "required": ["output"],
    "additionalProperties": False,
}


# ------------------------------------------------------------------------------------------------- the prompt


def _short(text: str, limit: int = _VIEW_STRING_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def _redact_url(url: str) -> str:
    def hide(match: re.Match[str]) -> str:
        sep, name, value = match.groups()
        return f"{sep}{name}={_REDACTED}" if _SECRET_NAME.search(name) and value else match.group(0)

    return _QUERY_PARAM.sub(hide, url)


def _redact(value: Any, key: str = "") -> Any:
    """A config value as the model may see it: secrets replaced, long strings cut, scripts summarized."""
    if isinstance(value, Mapping):
        shown: dict[str, Any] = {}
        for name, item in value.items():
            name = str(name)
            if name == "headers" and isinstance(item, Mapping):
                # Header values are credentials often enough (X-Api-Key, custom auth schemes) to hide them all.
                shown[name] = dict.fromkeys(map(str, item), _REDACTED)
            elif name == "script" and isinstance(item, list):
                shown[name] = f"<{len(item)} scripted answers>"
            elif name not in _SECRET_REFERENCES and _SECRET_NAME.search(name) and item not in (None, ""):
                shown[name] = _REDACTED
            else:
                shown[name] = _redact(item, name)
        return shown
    if isinstance(value, list):
        return [_redact(item, key) for item in value]
    if isinstance(value, str):
        return _short(_redact_url(value) if key == "url" else value)
    return value


def _policy(document: Mapping[str, Any]) -> Policy:
    try:
        return msgspec.convert(document.get("policy") or {}, Policy)
    except msgspec.ValidationError:
        return Policy()  # the engine validated the document; this only shapes the prompt


def _ancestors(node_id: str, edges: Sequence[Mapping[str, Any]]) -> set[str]:
    parents: dict[str, list[str]] = {}
    for edge in edges:
        parents.setdefault(str(edge.get("to")), []).append(str(edge.get("from")))
    seen: set[str] = set()
    stack = list(parents.get(node_id, ()))
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(parents.get(current, ()))
    return seen


def _statuses(
    node_ids: Sequence[str], node_id: str, edges: Sequence[Mapping[str, Any]], node_status: Mapping[str, str] | None
) -> tuple[dict[str, str], bool]:
    """Status per node, and whether it is exact (given by the engine) or inferred from the graph."""
    if node_status is not None:
        return {nid: node_status.get(nid, "pending") for nid in node_ids}, True
    # This node can only run once everything upstream has completed or been skipped; elsewhere we cannot know.
    upstream = _ancestors(node_id, edges)
    inferred = {nid: "done" if nid in upstream else "unknown" for nid in node_ids}
    inferred[node_id] = "running"
    return inferred, False


def _dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def workflow_view(
    document: Mapping[str, Any], node_id: str, node_status: Mapping[str, str] | None = None
) -> tuple[str, list[str]]:
    """The compact text view of a materialized workflow that the model is shown, and the immutable node ids.

    One JSON line per node and edge, with the array index a JSON Pointer needs (``/nodes/3``). Configs are
    redacted (:func:`_redact`); node outputs are never included.
    """
    raw_nodes = document.get("nodes")
    raw_edges = document.get("edges")
    nodes = [n for n in raw_nodes if isinstance(n, Mapping)] if isinstance(raw_nodes, list) else []
    edges = [e for e in raw_edges if isinstance(e, Mapping)] if isinstance(raw_edges, list) else []
    ids = [str(n.get("id")) for n in nodes]
    statuses, exact = _statuses(ids, node_id, edges, node_status)
    if exact:
        immutable = [nid for nid in ids if statuses[nid] != "pending"]
    else:
        immutable = [nid for nid in ids if statuses[nid] in ("done", "running")]
    lines = [f"workflow {_dumps(document.get('name'))}"]
    lines.append("nodes (JSON Pointer /nodes/<index>):")
    for index, node in enumerate(nodes):
        entry: dict[str, Any] = {"index": index, "id": node.get("id"), "type": node.get("type")}
        entry["status"] = statuses[ids[index]] + (" (this is you)" if ids[index] == node_id else "")
        if node.get("description"):
            entry["description"] = _short(str(node["description"]))
        if node.get("config"):
            entry["config"] = _redact(node["config"])
        if node.get("in"):
            entry["in"] = node["in"]
        if node.get("on_error") not in (None, "fail"):
            entry["on_error"] = node["on_error"]
        lines.append(f"  {_dumps(entry)}")
    lines.append("edges (JSON Pointer /edges/<index>):" if edges else "edges: none")
    for index, edge in enumerate(edges):
        lines.append(f"  {_dumps({'index': index, **edge})}")
    outputs = document.get("outputs")
    lines.append(f"outputs: {_dumps(outputs) if outputs is not None else 'none (the sink nodes outputs)'}")
    if not exact:
        lines.append("(status 'done': finished upstream of you; 'unknown': may be pending or already running)")
    return "\n".join(lines), immutable


def _system_message(document: Mapping[str, Any], node_id: str, node_status: Mapping[str, str] | None) -> str:
    view, immutable = workflow_view(document, node_id, node_status)
    policy = _policy(document)
    mode = {
        "auto": "applied at once when they pass the rules",
        "approve": "held until a person approves them",
        "deny": "all refused: this workflow does not accept patches, so do not propose one",
    }[policy.patches]
    frozen = ", ".join(immutable) or "none"
    return f"""You are the agent node "{node_id}" in a run of an aobd workflow: a DAG of nodes stored as data.
Read your task and inputs (next message), then answer with ONE JSON object and nothing else:
  {{"output": <any JSON: your result, read by downstream nodes as nodes.{node_id}.output>,
   "patch": {{"ops": [<RFC 6902 JSON Patch operations>], "reason": "<why the graph should change>"}}}}
"patch" is optional: leave it out unless the workflow graph itself has to change for this run.

PATCH RULES. A patch is checked against the current workflow below; if any rule fails, the whole patch is
rejected and the run goes on unchanged.
1. Ops follow RFC 6902 exactly (add, remove, replace, move, copy, test) with JSON Pointers into the document
   below: "/nodes/<index>", "/edges/<index>", "/outputs/<name>"; append with "/nodes/-" and "/edges/-".
2. Only /nodes, /edges and /outputs may change.
3. The result must be a valid workflow: node ids unique and matching [A-Za-z_][A-Za-z0-9_]{{0,63}}, every edge
   {{"from", "to", "when"?}} between existing nodes, no cycles. A node is {{"id", "type", "config", "in"}} where "in"
   maps input names to JMESPath over {{"inputs": ..., "nodes": {{<id>: {{"output": ...}}}}}}.
4. Nodes that have started, finished or been skipped may not be changed or removed, and no edge into them may
   be added, removed or changed. Now that means: {frozen}. Edges FROM them (and from you) to new nodes are how
   new work is attached: an edge from "{node_id}" to a node you add is followed as soon as you answer.
5. Limits per run: at most {policy.max_spawned_nodes} nodes added by patches, at most {policy.max_patches} patches,
   agents added by agents nested at most {policy.max_agent_depth} deep; node types a patch may add:
   {", ".join(policy.allowed_node_types)}.
6. Every http node URL must be a public http(s) URL: private, loopback, link-local and cloud metadata
   addresses are refused. Never put credentials in URLs.
7. Patches are {mode}.

CURRENT WORKFLOW (your inputs are in the next message; other nodes' outputs are not shown):
{view}"""


def build_messages(
    config: Mapping[str, Any],
    inputs: Mapping[str, Any],
    *,
    node_id: str,
    document: Mapping[str, Any],
    node_status: Mapping[str, str] | None = None,
) -> list[dict[str, str]]:
    """The chat messages of one agent request: the system message (role, answer shape, patch rules, workflow
    view) and the user message (``config.prompt`` and the inputs as JSON)."""
    prompt = str(config.get("prompt") or "Decide this node's output from its inputs.")
    user = f"{prompt}\n\nYour inputs (JSON):\n{_dumps(dict(inputs))}"
    return [
        {"role": "system", "content": _system_message(document, node_id, node_status)},
        {"role": "user", "content": user},
    ]


# ------------------------------------------------------------------------------------------------ the request


def _bad_config(node_id: str, message: str) -> NodeError:
    return NodeError(f"agent {node_id!r}: {message}", code="bad_config", retryable=False)


def _endpoint(config: Mapping[str, Any], node_id: str) -> str:
    base_url = config.get("base_url")
    if not isinstance(base_url, str) or not base_url.strip():
        raise _bad_config(node_id, "config.base_url is required, e.g. 'https://api.openai.com/v1'")
    base = base_url.strip().rstrip("/")
    return base if base.endswith("/chat/completions") else f"{base}/chat/completions"


def _request_body(config: Mapping[str, Any], messages: list[dict[str, str]], node_id: str) -> dict[str, Any]:
    model = config.get("model")
    if not isinstance(model, str) or not model:
        raise _bad_config(node_id, "config.model is required (the model name the server knows)")
    body: dict[str, Any] = {"model": model, "messages": messages}
    if config.get("temperature") is not None:
        body["temperature"] = config["temperature"]
    if config.get("max_tokens") is not None:
        body["max_tokens"] = config["max_tokens"]
    body["response_format"] = {
        "type": "json_schema",
        "json_schema": {"name": _SCHEMA_NAME, "strict": False, "schema": ANSWER_SCHEMA},
    }
    return body


def _read_key_file(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except (OSError, UnicodeError):
        return None


async def _api_key(config: Mapping[str, Any], env: Mapping[str, str], node_id: str) -> str | None:
    """The key from ``env[config.api_key_env]``, else ``config.api_key_file``; ``None`` when neither is set."""
    var, path = config.get("api_key_env"), config.get("api_key_file")
    if not var and not path:
        return None  # a local server without authentication
    key = (env.get(var) or "").strip() if var else ""
    if not key and path:
        from_file = await asyncio.to_thread(_read_key_file, str(path))
        key = from_file or ""
    if not key:
        where = []
        if var:
            where.append(f"environment variable {var} is not set or empty (config.api_key_env)")
        if path:
            where.append(f"file {path} is missing, unreadable or empty (config.api_key_file)")
        raise NodeError(f"agent {node_id!r} has no API key: {'; '.join(where)}", code="agent_no_key", retryable=False)
    if not key.isascii() or not key.isprintable() or " " in key:
        source = f"environment variable {var}" if var else f"file {path}"
        raise NodeError(
            f"agent {node_id!r}: the API key in {source} has characters an HTTP header cannot carry",
            code="agent_no_key",
            retryable=False,
        )
    return key


class _Scrubber:
    """Removes the API key from any text a server sent back before it is stored or shown."""

    def __init__(self, key: str | None) -> None:
        self.key = key

    def text(self, value: str) -> str:
        return value.replace(self.key, "<api key>") if self.key else value

    def json(self, value: Any) -> Any:
        if not self.key:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.json(item) for item in value]
        if isinstance(value, dict):
            return {self.text(str(k)): self.json(v) for k, v in value.items()}
        return value


def _retry_after_s(response: HttpResponse, now: float) -> float | None:
    """Seconds to wait as the server asks: ``retry-after-ms`` (OpenAI), ``Retry-After`` seconds or HTTP-date."""
    headers = response.headers
    try:
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000.0)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - now)
    except (ValueError, TypeError, OverflowError):
        return None  # unparsable: fall back to our own backoff


def _excerpt(text: str, limit: int = _EXCERPT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _error_text(response: HttpResponse, scrub: _Scrubber) -> str:
    """What the server said about an error: OpenAI's ``error.message`` when present, else a body excerpt."""
    decoded = response.decoded_body()
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), dict):
        message = decoded["error"].get("message")
        if message:
            return _excerpt(scrub.text(str(message)))
    if decoded is None:
        return ""
    return _excerpt(scrub.text(decoded if isinstance(decoded, str) else _dumps(decoded)))


_TRANSPORT_CODES: Final = {
    "http_timeout": ("agent_timeout", True),
    "http_connection_error": ("agent_unreachable", True),
    "host_unresolvable": ("agent_unreachable", True),
    "http_tls_error": ("agent_tls_error", False),
    "http_too_many_redirects": ("agent_request_rejected", False),
    "http_response_too_large": ("agent_bad_answer", False),
    "http_invalid_request": ("agent_request_rejected", False),
}


def _transport_error(exc: NodeError, node_id: str, scrub: _Scrubber) -> NodeError:
    code, retryable = _TRANSPORT_CODES.get(exc.code, (exc.code, exc.retryable))
    err = NodeError(f"agent {node_id!r}: {scrub.text(exc.message)}", code=code, retryable=retryable)
    err.details = scrub.json(exc.details)
    return err


class _Exchange:
    """The record of one attempt's HTTP exchange: bodies, statuses and timings, never headers."""

    def __init__(self, url: str, body: dict[str, Any], scrub: _Scrubber) -> None:
        self.url = url
        self.body = body
        self.scrub = scrub
        self.tries: list[dict[str, Any]] = []
        self.started = time.time()

    def to_bytes(self, response: HttpResponse, elapsed_s: float) -> bytes:
        decoded = response.decoded_body()
        record = {
            "provider": "openai",
            "request": {"method": "POST", "url": self.url, "body": self.body},
            "response": {"status": response.status, "body": self.scrub.json(decoded)},
            "tries": self.tries,
            "started_at": self.started,
            "elapsed_ms": round(elapsed_s * 1000.0, 3),
        }
        return orjson.dumps(record, default=str)


async def openai_answer(
    config: Mapping[str, Any],
    inputs: dict[str, Any],
    ctx: NodeContext,
    *,
    document: dict[str, Any],
    http_allow: Sequence[str],
    env: Mapping[str, str],
    node_status: Mapping[str, str] | None = None,
) -> AgentAnswer:
    """Ask an OpenAI-compatible chat-completions server for one agent answer.

    Args:
        config: the agent node's ``config`` (see :class:`~aobd.model.workflow.AgentConfig`).
        inputs: the node's resolved ``in`` bindings, sent as JSON in the user message.
        ctx: the attempt's context; ``ctx.timeout_s`` (when positive) bounds the whole call, retries included.
        document: the run's current materialized workflow, shown to the model in compact form.
        http_allow: ``security.http_allow``; ``base_url`` must pass the SSRF guard with it.
        env: where ``config.api_key_env`` is looked up (``os.environ`` in the daemon).
        node_status: node id -> run status, when the caller knows it; without it the view marks this node
            running and its ancestors done, and says the rest is unknown.

    Returns:
        The answer with ``usage`` from the response and ``exchange`` (JSON bytes: request and response bodies,
        statuses and timings; no headers, no key).

    Raises:
        NodeError: with the codes tabulated in the module docstring.
    """
    node_id = ctx.node_id
    url = _endpoint(config, node_id)
    body = _request_body(
        config, build_messages(config, inputs, node_id=node_id, document=document, node_status=node_status), node_id
    )
    key = await _api_key(config, env, node_id)
    scrub = _Scrubber(key)
    headers = {"Accept": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request_timeout_s = _request_timeout_s(config, node_id)

    loop = asyncio.get_running_loop()
    started = loop.time()
    attempt_s = ctx.timeout_s if ctx.timeout_s and ctx.timeout_s > 0 else None
    # The driver cancels the attempt at ctx.timeout_s; ending a little earlier lets this call say what it was
    # waiting for (agent_timeout, agent_rate_limited) instead of a bare cancellation.
    deadline = started + attempt_s - min(0.25, attempt_s * 0.05) if attempt_s else None
    exchange = _Exchange(url, body, scrub)

    async with HttpNodeClient(allow=http_allow, timeout_s=request_timeout_s) as client:
        for attempt_try in range(1, MAX_TRIES + 1):
            timeout_s = request_timeout_s
            if deadline is not None:
                timeout_s = min(timeout_s, deadline - loop.time())
                if timeout_s <= 0:
                    raise _timeout(node_id, url, request_timeout_s, attempt_s)
            sent = loop.time()
            try:
                response = await client.request("POST", url, headers=headers, json_body=body, timeout_s=timeout_s)
            except NodeError as exc:
                if exc.code == "http_timeout":
                    raise _timeout(node_id, url, request_timeout_s, attempt_s, timeout_s) from None
                raise _transport_error(exc, node_id, scrub) from None
            took = loop.time() - sent
            record: dict[str, Any] = {"status": response.status, "elapsed_ms": round(took * 1000.0, 3)}
            exchange.tries.append(record)
            if response.status < 400:
                answer = _answer(response, node_id, scrub, base=ctx.services.get("version"))
                return msgspec.structs.replace(answer, exchange=exchange.to_bytes(response, loop.time() - started))
            note = ""
            if (response.status == 429 or response.status >= 500) and attempt_try < MAX_TRIES:
                wait = _retry_after_s(response, time.time())
                if wait is not None:
                    record["retry_after_s"] = wait
                else:
                    wait = _BACKOFF_BASE_S * 2 ** (attempt_try - 1) * random.uniform(0.8, 1.2)
                if deadline is None or loop.time() + wait < deadline:
                    _log.warning(
                        "agent request will be retried",
                        node_id=node_id,
                        status=response.status,
                        try_number=attempt_try,
                        wait_s=round(wait, 3),
                    )
                    await asyncio.sleep(wait)
                    continue
                note = f"; not retried: waiting {wait:g}s would pass the attempt timeout ({attempt_s:g}s)"
            raise _status_error(response, node_id, url, scrub, attempt_try, note)
    raise AssertionError("unreachable: the last try returns or raises")  # pragma: no cover


def _request_timeout_s(config: Mapping[str, Any], node_id: str) -> float:
    value = config.get("request_timeout_ms")
    if value is None:
        return DEFAULT_REQUEST_TIMEOUT_S
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise _bad_config(node_id, f"config.request_timeout_ms must be a positive number of ms, not {value!r}")
    return float(value) / 1000.0


def _timeout(
    node_id: str, url: str, request_s: float, attempt_s: float | None, waited_s: float | None = None
) -> NodeError:
    waited = request_s if waited_s is None else waited_s
    limit = f"request_timeout_ms={request_s * 1000:g}"
    if attempt_s is not None:
        limit += f", attempt timeout {attempt_s:g}s"
    return NodeError(
        f"agent {node_id!r}: no answer from {url} within {max(waited, 0.0):.3g}s ({limit})",
        code="agent_timeout",
        retryable=True,
    )


def _tries(count: int) -> str:
    return "1 try" if count == 1 else f"{count} tries"


def _status_error(
    response: HttpResponse, node_id: str, url: str, scrub: _Scrubber, tries: int, note: str = ""
) -> NodeError:
    status = response.status
    said = _error_text(response, scrub)
    suffix = (f": {said}" if said else "") + note
    detail: dict[str, Any] = {"status": status, "url": url, "tries": tries}
    if status == 429:
        message = f"agent {node_id!r}: {url} is rate limiting (HTTP 429) after {_tries(tries)}{suffix}"
        err = NodeError(message, code="agent_rate_limited", retryable=True)
    elif status >= 500:
        message = f"agent {node_id!r}: {url} failed with HTTP {status} after {_tries(tries)}{suffix}"
        err = NodeError(message, code="agent_server_error", retryable=True)
    else:
        hint = {401: " (check the API key)", 403: " (the key may lack access)", 404: " (check base_url and model)"}
        message = f"agent {node_id!r}: {url} rejected the request with HTTP {status}{hint.get(status, '')}{suffix}"
        err = NodeError(message, code="agent_request_rejected", retryable=False)
    err.details = [detail]
    return err


# ------------------------------------------------------------------------------------------------- the answer


def _bad_answer(node_id: str, problem: str, excerpt: str | None = None) -> NodeError:
    message = f"agent {node_id!r}: bad answer: {problem}"
    if excerpt is not None:
        message += f" (got: {_excerpt(excerpt)!r})"
    return NodeError(message, code="agent_bad_answer", retryable=True)


def _message_text(content: Any) -> str | None:
    """Message content as text: a string, or the text parts of a content array."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [str(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "".join(parts) if parts else None
    return None


def _answer_json(completion: Any, node_id: str, scrub: _Scrubber) -> Any:
    """The parsed answer object from a ``chat.completion``: the first tool call's arguments, else the content."""
    choices = completion.get("choices") if isinstance(completion, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise _bad_answer(node_id, "the response has no choices[0].message", scrub.text(_dumps(completion)))
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        function = calls[0].get("function") if isinstance(calls[0], dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, dict):
            return arguments
        text, where = arguments, "tool call arguments"
    else:
        text, where = _message_text(message.get("content")), "message content"
    if not isinstance(text, str) or not text.strip():
        refusal = message.get("refusal")
        if refusal:
            raise _bad_answer(node_id, "the model refused", scrub.text(str(refusal)))
        raise _bad_answer(node_id, f"the {where} is empty (finish_reason {finish!r})")
    stripped = text.strip()
    fenced = _FENCE.match(stripped)  # some models wrap JSON in a Markdown fence despite the response format
    try:
        return orjson.loads(fenced.group(1) if fenced else stripped)
    except orjson.JSONDecodeError:
        why = f"the {where} is not JSON"
        if finish == "length":
            why += " (cut off by max_tokens: finish_reason 'length')"
        raise _bad_answer(node_id, why, scrub.text(stripped)) from None


def _checked_shape(raw: Any, node_id: str, scrub: _Scrubber) -> dict[str, Any]:
    """``{"output", "patch"?}`` with ``patch`` ``{"ops": [objects], "reason"?}``; the ops' content is the
    engine's to judge (rule 1 names a malformed op in RFC 6902's words)."""
    shown = scrub.text(_dumps(raw))
    if not isinstance(raw, dict):
        raise _bad_answer(node_id, f"expected an object {{output, patch?}}, got {type(raw).__name__}", shown)
    extra = sorted(set(raw) - {"output", "patch"})
    if extra:
        raise _bad_answer(node_id, f"unexpected keys {extra}: the answer has only 'output' and 'patch'", shown)
    if "output" not in raw:
        raise _bad_answer(node_id, "the answer has no 'output'", shown)
    patch = raw.get("patch")
    if patch is None:
        return {"output": raw["output"]}
    if not isinstance(patch, dict):
        raise _bad_answer(node_id, "'patch' must be an object {ops, reason}", shown)
    ops = patch.get("ops")
    if not isinstance(ops, list) or not all(isinstance(op, dict) for op in ops):
        raise _bad_answer(node_id, "'patch.ops' must be a list of RFC 6902 operation objects", shown)
    reason = patch.get("reason", "")
    if not isinstance(reason, str):
        raise _bad_answer(node_id, "'patch.reason' must be a string", shown)
    # author and base are the engine's facts, not the model's to claim.
    return {"output": raw["output"], "patch": {"ops": ops, "reason": reason}}


def _answer(response: HttpResponse, node_id: str, scrub: _Scrubber, *, base: str | None) -> AgentAnswer:
    try:
        completion = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        raise _bad_answer(
            node_id, f"HTTP {response.status} body is not JSON", scrub.text(response.body.decode("utf-8", "replace"))
        ) from None
    shaped = _checked_shape(_answer_json(completion, node_id, scrub), node_id, scrub)
    try:
        answer = parse_answer(shaped, author=f"agent:{node_id}", base=base)
    except NodeError as exc:  # _checked_shape should have caught it; keep the provider's code anyway
        raise _bad_answer(node_id, exc.message) from None
    usage = completion.get("usage") if isinstance(completion, dict) else None
    return msgspec.structs.replace(answer, usage=usage if isinstance(usage, dict) else None)
