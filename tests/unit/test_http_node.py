"""The ``http`` node executor against a local aiohttp server on 127.0.0.1 that each test allow-lists."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from aiohttp import web
from multidict import CIMultiDict

from aobd.errors import NodeError
from aobd.nodes.base import NodeContext
from aobd.nodes.http import HttpNodeClient, execute_http

T = TypeVar("T")
CTX = NodeContext(run_id="run1", node_id="fetch", attempt=1, idempotency_key="run1:fetch", timeout_s=5.0)


@dataclass
class Seen:
    """What the test server received."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Server:
    port: int
    seen: list[Seen] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def allow(self) -> list[str]:
        return [f"127.0.0.1:{self.port}"]


def _app(seen: list[Seen]) -> web.Application:
    async def record(request: web.Request) -> None:
        seen.append(Seen(request.method, request.path_qs, request.headers.copy(), await request.read()))

    async def echo(request: web.Request) -> web.StreamResponse:
        await record(request)
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "idempotency_key": request.headers.get("Idempotency-Key"),
                "content_type": request.headers.get("Content-Type"),
                "body": body.decode() if body else None,
            }
        )

    async def text(request: web.Request) -> web.StreamResponse:
        await record(request)
        return web.Response(text="plain words", content_type="text/plain")

    async def mislabeled(request: web.Request) -> web.StreamResponse:
        await record(request)
        return web.Response(text="{not json", content_type="application/json")

    async def vendor_json(request: web.Request) -> web.StreamResponse:
        await record(request)
        return web.Response(text='{"a": [1, 2]}', content_type="application/problem+json")

    async def empty(request: web.Request) -> web.StreamResponse:
        await record(request)
        return web.Response(status=204)

    async def status(request: web.Request) -> web.StreamResponse:
        await record(request)
        code = int(request.match_info["code"])
        headers = {"Retry-After": "7"} if code in (429, 503) else {}
        return web.json_response({"error": f"status {code}"}, status=code, headers=headers)

    async def slow(request: web.Request) -> web.StreamResponse:
        await record(request)
        await asyncio.sleep(30)
        return web.Response(text="too late")

    async def redirect(request: web.Request) -> web.StreamResponse:
        await record(request)
        code = int(request.query.get("code", "307"))
        return web.Response(status=code, headers={"Location": request.query["to"]})

    async def loop(request: web.Request) -> web.StreamResponse:
        await record(request)
        n = int(request.match_info["n"])
        return web.Response(status=302, headers={"Location": f"/loop/{n + 1}"})

    async def big(request: web.Request) -> web.StreamResponse:
        await record(request)
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(8):
            await response.write(b"x" * 1024)
        return response

    async def multi(request: web.Request) -> web.StreamResponse:
        await record(request)
        response = web.Response(text="ok")
        response.headers.add("X-Tag", "a")
        response.headers.add("X-Tag", "b")
        return response

    app = web.Application()
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_get("/text", text)
    app.router.add_get("/mislabeled", mislabeled)
    app.router.add_get("/vendor", vendor_json)
    app.router.add_get("/empty", empty)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/slow", slow)
    app.router.add_route("*", "/redirect", redirect)
    app.router.add_get("/loop/{n}", loop)
    app.router.add_get("/big", big)
    app.router.add_get("/multi", multi)
    return app


@asynccontextmanager
async def serve() -> AsyncIterator[Server]:
    seen: list[Seen] = []
    runner = web.AppRunner(_app(seen), handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield Server(runner.addresses[0][1], seen)
    finally:
        await runner.cleanup()


@asynccontextmanager
async def tcp_listener() -> AsyncIterator[tuple[int, list[int]]]:
    """A bare TCP listener that counts connections: proof that nothing connected."""
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        await server.wait_closed()


def with_server(
    scenario: Callable[[Server, HttpNodeClient], Awaitable[T]], *, allow: list[str] | None = None, **kw: Any
) -> T:
    async def main() -> T:
        async with serve() as server, HttpNodeClient(allow=allow or server.allow, **kw) as client:
            return await scenario(server, client)

    return asyncio.run(main())


def node_error(scenario: Callable[[Server, HttpNodeClient], Awaitable[Any]], **kw: Any) -> NodeError:
    with pytest.raises(NodeError) as info:
        with_server(scenario, **kw)
    return info.value


# ------------------------------------------------------------------------------------------------- requests


def test_get_json_with_quoted_placeholders_and_idempotency_key() -> None:
    async def scenario(server: Server, client: HttpNodeClient) -> dict[str, Any]:
        config = {"url": server.url("/echo/items/{id}?q={q}&n={n}&ok={ok}")}
        inputs = {"id": "a/b c?#@x:1", "q": "x&y=z", "n": 42, "ok": True}
        return await execute_http(config, inputs, CTX, client)

    output = with_server(scenario)
    assert output["status"] == 200
    assert output["headers"]["content-type"].startswith("application/json")
    assert output["body"] == {
        "method": "GET",
        # "/", "?", "#", "&" and "=" stay encoded; yarl spells "@" and ":" plainly, as a path may.
        "path": "/echo/items/a%2Fb%20c%3F%23@x:1?q=x%26y%3Dz&n=42&ok=true",
        "idempotency_key": "run1:fetch",
        "content_type": None,
        "body": None,
    }


def test_placeholder_value_cannot_move_the_host() -> None:
    async def scenario(server: Server, client: HttpNodeClient) -> dict[str, Any]:
        return await execute_http({"url": server.url("/echo/{p}")}, {"p": "@169.254.169.254/x"}, CTX, client)

    output = with_server(scenario)
    assert output["body"]["path"] == "/echo/@169.254.169.254%2Fx"


def test_post_sends_inputs_as_json_when_no_body_is_configured() -> None:
    async def scenario(server: Server, client: HttpNodeClient) -> dict[str, Any]:
        return await execute_http(
            {"method": "post", "url": server.url("/echo/t")}, {"ticket": 7, "tags": ["a"]}, CTX, client
        )

    body = with_server(scenario)["body"]
    assert body["method"] == "POST"
    assert body["content_type"] == "application/json"
    assert body["body"] == '{"ticket":7,"tags":["a"]}'


def test_configured_body_is_sent_verbatim_and_null_sends_none() -> None:
    async def scenario(server: Server, client: HttpNodeClient) -> list[Any]:
        constant = await execute_http(
            {"method": "PUT", "url": server.url("/echo/t"), "body": {"x": "{id}"}}, {"id": 1}, CTX, client
        )
        nothing = await execute_http(
            {"method": "POST", "url": server.url("/echo/t"), "body": None}, {"id": 1}, CTX, client
        )
        return [constant["body"]["body"], nothing["body"]["body"]]

    assert with_server(scenario) == ['{"x":"{id}"}', None]


def test_headers_with_placeholders_and_idempotency_key_override() -> None:
    async def scenario(server: Server, client: HttpNodeClient) -> Seen:
        config = {
            "url": server.url("/echo/h"),
            "headers": {"Authorization": "Bearer {token}", "X-Count": 3, "idempotency-key": "custom-{id}"},
        }
        await execute_http(config, {"token": "t0k", "id": "9"}, CTX, client)
        return server.seen[-1]

    seen = with_server(scenario)
    assert seen.headers["Authorization"] == "Bearer t0k"
    assert seen.headers["X-Count"] == "3"
    assert seen.headers.getall("Idempotency-Key") == ["custom-9"]
    assert seen.headers["User-Agent"].startswith("aobd/")


def test_response_bodies_text_json_and_empty() -> None:
    async def scenario(server: Server, client: HttpNodeClient) -> list[Any]:
        paths = ["/text", "/mislabeled", "/vendor", "/empty", "/multi"]
        outputs = [await execute_http({"url": server.url(p)}, {}, CTX, client) for p in paths]
        return [o["body"] for o in outputs] + [outputs[-1]["headers"]["x-tag"], outputs[3]["status"]]

    assert with_server(scenario) == ["plain words", "{not json", {"a": [1, 2]}, None, "ok", "a, b", 204]


# --------------------------------------------------------------------------------------------- status codes


@pytest.mark.parametrize(
    ("code", "retryable"), [(500, True), (502, True), (503, True), (400, False), (401, False), (404, False),
                            (408, True), (429, True), (422, False)]
)  # fmt: skip
def test_status_errors(code: int, retryable: bool) -> None:
    async def scenario(server: Server, client: HttpNodeClient) -> None:
        await execute_http({"url": server.url(f"/status/{code}")}, {}, CTX, client)

    err = node_error(scenario)
    assert (err.code, err.retryable) == ("http_status", retryable)
    assert f"HTTP {code}" in err.message
    assert err.details[0]["status"] == code
    assert f"status {code}" in err.details[0]["body"]
    if code in (429, 503):
        assert err.details[0]["retry_after"] == "7"


def test_timeout_is_retryable() -> None:
    async def scenario(server: Server, client: HttpNodeClient) -> None:
        ctx = NodeContext("run1", "fetch", 1, "run1:fetch", timeout_s=0.2)
        await execute_http({"url": server.url("/slow")}, {}, ctx, client)

    err = node_error(scenario)
    assert (err.code, err.retryable) == ("http_timeout", True)


def test_connection_refused_is_retryable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def scenario(server: Server, client: HttpNodeClient) -> None:
        await execute_http({"url": f"http://127.0.0.1:{port}/"}, {}, CTX, client)

    err = node_error(scenario, allow=[f"127.0.0.1:{port}"])
    assert (err.code, err.retryable) == ("http_connection_error", True)


def test_response_too_large() -> None:
    async def scenario(server: Server, client: HttpNodeClient) -> None:
        await execute_http({"url": server.url("/big")}, {}, CTX, client)

    err = node_error(scenario, max_response_bytes=4096)
    assert (err.code, err.retryable) == ("http_response_too_large", False)


# ------------------------------------------------------------------------------------------------ SSRF guard


def test_denied_target_makes_no_connection() -> None:
    async def main() -> tuple[NodeError, list[int]]:
        async with tcp_listener() as (port, accepted), HttpNodeClient() as client:
            with pytest.raises(NodeError) as info:
                await execute_http({"url": f"http://127.0.0.1:{port}/admin"}, {}, CTX, client)
            return info.value, accepted

    err, accepted = asyncio.run(main())
    assert (err.code, err.retryable) == ("ssrf_denied", False)
    assert "loopback (127.0.0.0/8)" in err.message
    assert err.details[0]["reason"] == "loopback"
    assert accepted == []


def test_allow_list_is_exact_about_the_port() -> None:
    async def main() -> tuple[NodeError, list[int]]:
        async with (
            serve() as server,
            tcp_listener() as (port, accepted),
            HttpNodeClient(allow=server.allow) as client,
        ):
            ok = await execute_http({"url": server.url("/text")}, {}, CTX, client)
            assert ok["body"] == "plain words"
            with pytest.raises(NodeError) as info:
                await execute_http({"url": f"http://127.0.0.1:{port}/"}, {}, CTX, client)
            return info.value, accepted

    err, accepted = asyncio.run(main())
    assert err.code == "ssrf_denied"
    assert accepted == []


def test_redirect_to_denied_host_is_refused_and_never_requested() -> None:
    async def main() -> tuple[NodeError, list[int], list[Seen]]:
        async with (
            serve() as server,
            tcp_listener() as (port, accepted),
            HttpNodeClient(allow=server.allow) as client,
        ):
            for to in [f"http://localhost:{port}/", f"http://127.0.0.1:{port}/", "http://169.254.169.254/"]:
                config = {"url": server.url("/redirect?to={to}")}
                with pytest.raises(NodeError) as info:
                    await execute_http(config, {"to": to}, CTX, client)
                assert (info.value.code, info.value.retryable) == ("ssrf_denied", False)
                assert info.value.message.startswith("redirect 1 from http://127.0.0.1:")
            return info.value, accepted, server.seen

    err, accepted, seen = asyncio.run(main())
    assert "metadata" in err.message
    assert accepted == []  # the second hop never even connected
    assert [s.path_qs.split("?")[0] for s in seen] == ["/redirect"] * 3


def test_redirects_within_the_allow_list_are_followed() -> None:
    async def scenario(server: Server, client: HttpNodeClient) -> list[Any]:
        post = {"method": "POST", "url": server.url("/redirect?code=303&to=/echo/after")}
        after_303 = await execute_http(post, {"a": 1}, CTX, client)
        keep = {"method": "POST", "url": server.url("/redirect?code=307&to=/echo/kept")}
        after_307 = await execute_http(keep, {"a": 1}, CTX, client)
        return [after_303["body"], after_307["body"]]

    after_303, after_307 = with_server(scenario)
    assert (after_303["method"], after_303["path"], after_303["body"]) == ("GET", "/echo/after", None)
    assert (after_307["method"], after_307["path"], after_307["body"]) == ("POST", "/echo/kept", '{"a":1}')
    assert after_307["idempotency_key"] == "run1:fetch"


def test_too_many_redirects() -> None:
    async def scenario(server: Server, client: HttpNodeClient) -> None:
        await execute_http({"url": server.url("/loop/0")}, {}, CTX, client)

    err = node_error(scenario)
    assert (err.code, err.retryable) == ("http_too_many_redirects", False)
    assert len(err.details[0]["redirects"]) == 6


def test_names_are_pinned_to_the_judged_address() -> None:
    calls: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["127.0.0.1"]

    async def main() -> tuple[dict[str, Any], list[Seen]]:
        async with serve() as server:
            allow = [f"api.test:{server.port}"]
            async with HttpNodeClient(allow=allow, resolver=resolver) as client:
                url = f"http://api.test:{server.port}/echo/pinned"
                return await execute_http({"url": url}, {}, CTX, client), server.seen

    output, seen = asyncio.run(main())
    assert output["body"]["path"] == "/echo/pinned"
    assert seen[0].headers["Host"].startswith("api.test:")
    assert calls == ["api.test"]  # one lookup, by the guard; aiohttp asked the pinning resolver


def test_unresolvable_host_is_retryable() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    async def main() -> None:
        async with HttpNodeClient(resolver=resolver) as client:
            await execute_http({"url": "https://api.example.com/"}, {}, CTX, client)

    with pytest.raises(NodeError) as info:
        asyncio.run(main())
    assert (info.value.code, info.value.retryable) == ("host_unresolvable", True)


# ------------------------------------------------------------------------------------------- invalid config


@pytest.mark.parametrize(
    ("config", "inputs", "fragment"),
    [
        ({"url": "http://x.test/", "method": "TRACE"}, {}, "config.method"),
        ({}, {}, "config.url is required"),
        ({"url": "http://x.test/{missing}"}, {"id": 1}, "no input 'missing'"),
        ({"url": "http://x.test/{id}"}, {"id": {"a": 1}}, "only strings, numbers and booleans"),
        ({"url": "http://x.test/{id}"}, {"id": None}, "is null"),
        ({"url": "http://x.test/a/{id}/b"}, {"id": ".."}, "climb the URL path"),
        ({"url": "http://x.test/", "headers": {"X-A": "{v}"}}, {"v": "a\r\nB: c"}, "CR, LF"),
        ({"url": "http://x.test/", "headers": {"Host": "evil"}}, {}, "set by the HTTP client"),
        ({"url": "http://x.test/", "headers": ["X-A"]}, {}, "config.headers must be an object"),
        ({"url": "http://x.test/", "headers": {"X A:": "v"}}, {}, "not a valid header name"),
        ({"url": "http://x.test/", "method": "POST", "body": {"b": b"raw"}}, {}, "not JSON"),
    ],
)
def test_invalid_requests_are_not_retryable(config: dict[str, Any], inputs: dict[str, Any], fragment: str) -> None:
    async def no_dns(host: str, port: int) -> list[str]:
        raise AssertionError("an invalid request must fail before any lookup")

    async def main() -> None:
        async with HttpNodeClient(resolver=no_dns) as client:
            await execute_http(config, inputs, CTX, client)

    with pytest.raises(NodeError) as info:
        asyncio.run(main())
    assert (info.value.code, info.value.retryable) == ("http_invalid_request", False)
    assert fragment in info.value.message


def test_dot_segments_are_fine_outside_the_path() -> None:
    async def scenario(server: Server, client: HttpNodeClient) -> Seen:
        await execute_http({"url": server.url("/echo/x?up={v}")}, {"v": ".."}, CTX, client)
        return server.seen[-1]

    assert with_server(scenario).path_qs == "/echo/x?up=.."


def test_client_can_be_closed_and_reused() -> None:
    async def scenario(server: Server, client: HttpNodeClient) -> list[int]:
        first = await execute_http({"url": server.url("/text")}, {}, CTX, client)
        await client.close()
        second = await execute_http({"url": server.url("/text")}, {}, CTX, client)
        return [first["status"], second["status"]]

    assert with_server(scenario) == [200, 200]
