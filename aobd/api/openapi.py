"""OpenAPI 3.1 document generated from the route table and the msgspec Structs.

What the Structs cannot say is in the small tables below, next to the handler code they mirror: query parameters
the handlers parse by hand, headers they read, responses besides the success and the errors, and the workflow
rules ``aobd.model.validate`` checks that JSON Schema can express. ``tests/integration/test_openapi_fuzz.py`` holds
the document to the daemon's behaviour with schemathesis.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import msgspec

from aobd import __version__
from aobd.api import schemas as s
from aobd.model.workflow import NODE_ID_RE, Workflow

_ERRORS = {
    "400": "The request is malformed (body, parameters)",
    "401": "Missing or unknown bearer token",
    "403": "The token's role does not allow this",
    "404": "No such object in this workspace",
    "409": "The object's state does not allow this",
    "413": "Request body too large",
    "422": "The workflow document is invalid",
    "429": "Rate limited (see Retry-After)",
    "503": "Draining or a dependency is unavailable",
}

_SEQ = {"type": "integer", "minimum": 0, "maximum": s.MAX_SEQ}

#: Query parameters as the handlers in ``aobd.api.app`` check them (they parse the query string by hand); any
#: other parameter is described by its type in the route table.
_QUERY: dict[tuple[str, str], dict[str, Any]] = {
    ("startRun", "wait"): {"type": "number", "minimum": 0, "maximum": 300},
    ("listRuns", "status"): msgspec.json.schema(s.RunStatus),
    ("listRuns", "limit"): {"type": "integer", "minimum": 1, "maximum": 10_000},
    ("getRunEvents", "after"): _SEQ,
    ("listApprovals", "status"): msgspec.json.schema(s.ApprovalStatus),
}

#: Request headers an operation reads, besides Authorization.
_HEADERS: dict[str, list[dict[str, Any]]] = {
    "getRunEvents": [
        {
            "name": "Last-Event-ID",
            "in": "header",
            "required": False,
            "description": "Resume after this event seq (SSE reconnection); wins over the after parameter",
            "schema": _SEQ,
        }
    ],
}

#: Responses an operation gives besides its success and ``_ERRORS`` (which they replace for that status); a None
#: body type means no body.
_RESPONSES: dict[str, dict[str, tuple[str, Any]]] = {
    "readyz": {"503": ("Starting or draining", s.Health)},
    "claimAgentJob": {"204": ("No job arrived within wait_s", None)},
}

#: Request bodies whose ``definition`` is a workflow document (``aobd.model.workflow.Workflow``).
_DEFINITION_BODIES = (s.WorkflowPut, s.RunStart)


def openapi_document(routes: Sequence[Any]) -> dict[str, Any]:
    return _build(tuple(routes))


@lru_cache(maxsize=4)
def _build(routes: tuple[Any, ...]) -> dict[str, Any]:
    extra = [kind for more in _RESPONSES.values() for _, kind in more.values() if kind is not None]
    types: list[Any] = [s.ErrorResponse, Workflow, *extra]
    for route in routes:
        for kind in (route.body, route.response):
            if kind is not None and kind not in (bytes, str):
                types.append(kind)
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    schema_of = dict(zip(types, schemas, strict=True))
    _document_definitions(components)
    paths: dict[str, Any] = {}
    for route in routes:
        if route.method == "WS":
            continue  # OpenAPI cannot describe a WebSocket; documented in docs/api.md
        op: dict[str, Any] = {
            "operationId": route.op_id,
            "summary": route.summary,
            "tags": [route.path.split("/")[2] if route.path.startswith("/v1/") else "ops"],
        }
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
            for name in _path_params(route.path)
        ]
        params += [
            {
                "name": name,
                "in": "query",
                "required": False,
                "schema": _QUERY.get((route.op_id, name)) or msgspec.json.schema(kind),
            }
            for name, kind in route.query
        ]
        params += _HEADERS.get(route.op_id, [])
        if params:
            op["parameters"] = params
        if route.body is not None:
            op["requestBody"] = {
                "required": route.method == "POST" and route.op_id not in _OPTIONAL_BODY,
                "content": {"application/json": {"schema": schema_of[route.body]}},
            }
        op["responses"] = {str(route.status): _response(route, schema_of)}
        for code, (text, kind) in _RESPONSES.get(route.op_id, {}).items():
            op["responses"][code] = {"description": text}
            if kind is not None:
                op["responses"][code]["content"] = {"application/json": {"schema": schema_of[kind]}}
        if route.role is not None:
            op["security"] = [{"bearer": []}]
        for code, text in _ERRORS.items():
            error: dict[str, Any] = {
                "description": text,
                "content": {"application/json": {"schema": schema_of[s.ErrorResponse]}},
            }
            if code == "429":
                error["headers"] = {
                    "Retry-After": {
                        "description": "Seconds to wait before retrying",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1},
                    }
                }
            op["responses"].setdefault(code, error)
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "aobd",
            "version": __version__,
            "description": "Workflow orchestration for agentic workflows",
        },
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


_OPTIONAL_BODY = {"cancelRun", "approvePatch", "rejectPatch", "rollbackPatch"}


def _document_definitions(components: dict[str, Any]) -> None:
    """The ``definition`` of a request is a workflow document: say so, instead of "any object"."""
    # Rules aobd.model.validate checks beyond the Structs' types, where JSON Schema can say them.
    components["Workflow"]["properties"]["nodes"]["minItems"] = 1
    components["Node"]["properties"]["id"]["pattern"] = NODE_ID_RE.pattern
    ref = {"$ref": "#/components/schemas/Workflow"}
    for kind in _DEFINITION_BODIES:
        prop = components[kind.__name__]["properties"]["definition"]
        nullable = any(branch.get("type") == "null" for branch in prop.get("anyOf", ()))
        new: dict[str, Any] = {"anyOf": [ref, {"type": "null"}], "default": None} if nullable else dict(ref)
        new["description"] = "A workflow document (DESIGN.md section 2); its node configs are checked per node type"
        components[kind.__name__]["properties"]["definition"] = new


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _response(route: Any, schema_of: dict[Any, Any]) -> dict[str, Any]:
    if route.response is bytes:
        return {
            "description": "blob",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    if route.response is str:
        return {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    content: dict[str, Any] = {"application/json": {"schema": schema_of[route.response]}}
    if route.op_id == "getRunEvents":
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {"description": route.summary, "content": content}
