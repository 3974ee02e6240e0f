"""OpenAPI 3.1 document generated from the route table and the msgspec Structs (no hand-written schema)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import msgspec

from aobd import __version__
from aobd.api import schemas as s

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


def openapi_document(routes: Sequence[Any]) -> dict[str, Any]:
    return _build(tuple(routes))


@lru_cache(maxsize=4)
def _build(routes: tuple[Any, ...]) -> dict[str, Any]:
    types: list[Any] = [s.ErrorResponse]
    for route in routes:
        for kind in (route.body, route.response):
            if kind is not None and kind not in (bytes, str):
                types.append(kind)
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    schema_of = dict(zip(types, schemas, strict=True))
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
                "schema": {"type": "integer", "minimum": 1} if kind is int else {"type": "string"},
            }
            for name, kind in route.query
        ]
        if params:
            op["parameters"] = params
        if route.body is not None:
            op["requestBody"] = {
                "required": route.method == "POST" and route.op_id not in _OPTIONAL_BODY,
                "content": {"application/json": {"schema": schema_of[route.body]}},
            }
        op["responses"] = {str(route.status): _response(route, schema_of)}
        if route.role is not None:
            op["security"] = [{"bearer": []}]
        for code, text in _ERRORS.items():
            op["responses"].setdefault(
                code, {"description": text, "content": {"application/json": {"schema": schema_of[s.ErrorResponse]}}}
            )
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
