"""Every SSRF payload of ``../shared/testdata/ssrf-payloads.tsv`` gets its expected verdict.

Payloads are never fetched for real. DNS names resolve through a stub that answers with the row's
``intended_target``; requests made through the ``http`` executor carry an aiohttp trace that fails the test
the moment a request to a payload would start. The two verdicts about the connection itself are shown live
against local servers on 127.0.0.1: ``block-at-connect`` (the connection goes to the address that was judged,
with no second lookup for a rebinding server to answer) and ``block-on-redirect`` (every hop is judged, and a
refused hop is never connected to).

Source: swisskyrepo/PayloadsAllTheThings @ f9fa514 (MIT), via the shared testdata README.
"""

from __future__ import annotations

import asyncio
import csv
import ipaddress
import re
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from aobd.errors import NodeError, SsrfDenied
from aobd.nodes.base import NodeContext
from aobd.nodes.http import HttpNodeClient, execute_http
from aobd.security.ssrf import PinnedResolver, UrlGuard, pin_target, resolve_redirect, static_check_url

T = TypeVar("T")
TESTDATA = Path(__file__).resolve().parents[2].parent / "shared" / "testdata"
PAYLOADS = TESTDATA / "ssrf-payloads.tsv"
CTX = NodeContext(run_id="r", node_id="fetch", attempt=1, idempotency_key="r:fetch", timeout_s=5.0)

# intended_target values that describe a service rather than spell an address.
NAMED_TARGETS: dict[str, list[str]] = {
    "AWS IMDS": ["169.254.169.254"],
    "AWS IMDSv2 token (PUT)": ["169.254.169.254"],
    "AWS IMDS via internal DNS": ["169.254.169.254"],
    "AWS IMDS IPv6": ["fd00:ec2::254"],
    "ECS task credentials": ["169.254.170.2"],
    "GCP metadata": ["169.254.169.254"],
    "Azure IMDS": ["169.254.169.254"],
    "DigitalOcean metadata": ["169.254.169.254"],
    "Oracle Cloud metadata": ["192.0.0.192"],
    "Alibaba metadata": ["100.100.100.200"],
    "etcd on loopback": ["127.0.0.1"],
    "Docker API on loopback": ["127.0.0.1"],
    "SMTP on loopback": ["127.0.0.1"],
    "memcached via ldap": ["127.0.0.1"],
    "local file": [],  # file:, netdoc: never reach a resolver
    "non-http scheme": [],
}


@dataclass(frozen=True)
class Row:
    line: int
    payload: str
    category: str
    intended_target: str
    expected_verdict: str
    source: str
    note: str

    @property
    def verdict(self) -> str:
        return self.expected_verdict.split(" ", 1)[0]

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.category}"


def load_rows() -> list[Row]:
    with PAYLOADS.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        assert header == [
            "payload",
            "category",
            "intended_target",
            "expected_verdict",
            "source",
            "section_or_note",
        ]
        return [Row(line, *fields) for line, fields in enumerate(reader, start=2)]


ROWS = load_rows()


def intended_addresses(text: str) -> list[str]:
    """Addresses in an ``intended_target``: ``"127.0.0.1/::1"`` gives both, ``"127.0.0.1:22"`` the address,
    a CIDR its first host; words are ignored and service descriptions looked up in ``NAMED_TARGETS``."""
    if text in NAMED_TARGETS:
        return NAMED_TARGETS[text]
    found: list[str] = []
    for token in re.split(r"[\s()]+|/(?!\d)", text):
        if not token:
            continue
        try:
            if "/" in token:
                found.append(str(next(ipaddress.ip_network(token, strict=False).hosts())))
            else:
                found.append(str(ipaddress.ip_address(token)))
            continue
        except ValueError:
            pass
        v4_port = re.fullmatch(r"(\d{1,3}(?:\.\d{1,3}){3}):\d+", token)
        if v4_port:
            found.append(v4_port.group(1))
    return found


class RowResolver:
    """Every name resolves to the row's intended target; calls are recorded."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)  # one answer per lookup, the last one repeated (DNS rebinding)
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        answer = self.answers[min(len(self.calls), len(self.answers)) - 1]
        if not answer:
            raise OSError(f"the stub has no address for {host}")
        return list(answer)


def run(awaitable: Awaitable[T]) -> T:
    async def main() -> T:
        return await awaitable

    return asyncio.run(main())


def request_log(*, forbid: bool) -> tuple[aiohttp.TraceConfig, list[str]]:
    """A trace recording every request that starts; with ``forbid`` it also stops it before it connects."""
    started: list[str] = []

    async def on_request_start(session: Any, context: Any, params: aiohttp.TraceRequestStartParams) -> None:
        started.append(str(params.url))
        if forbid:
            raise AssertionError(f"a request to {params.url} was about to leave")

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    return trace, started


async def execute_refused(url: str, resolver: RowResolver, **client_kw: Any) -> tuple[NodeError, list[str]]:
    trace, started = request_log(forbid=True)
    async with HttpNodeClient(resolver=resolver, trace_configs=[trace], **client_kw) as client:
        with pytest.raises(NodeError) as info:
            await execute_http({"url": url}, {}, CTX, client)
    return info.value, started


def test_the_file_has_all_74_rows_with_known_verdicts() -> None:
    assert len(ROWS) == 74
    verdicts = {row.verdict for row in ROWS}
    assert verdicts == {
        "block",
        "reject-malformed",
        "normalize-then-judge",
        "block-at-connect",
        "block-on-redirect",
    }


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_payload(row: Row) -> None:
    handler = {
        "block": check_block,
        "reject-malformed": check_reject_malformed,
        "normalize-then-judge": check_normalize_then_judge,
        "block-at-connect": check_block_at_connect,
        "block-on-redirect": check_block_on_redirect,
    }[row.verdict]
    handler(row)


# --------------------------------------------------------------------------------------------------- block


def check_block(row: Row) -> None:
    addresses = intended_addresses(row.intended_target)
    non_http = row.category.startswith("scheme-")
    assert addresses or non_http, f"the stub cannot tell where {row.intended_target!r} points"

    resolver = RowResolver(addresses)
    with pytest.raises(SsrfDenied) as info:
        run(UrlGuard(resolver=resolver).check_url(row.payload))
    reasons = {d["reason"] for d in info.value.details}
    assert "unresolvable" not in reasons, info.value.message  # refused on its merits, not for lack of DNS
    if non_http:
        assert reasons == {"malformed"}
        assert resolver.calls == []

    err, started = run(execute_refused(row.payload, RowResolver(addresses)))
    assert (err.code, err.retryable) == ("ssrf_denied", False)
    assert started == []


def check_reject_malformed(row: Row) -> None:
    resolver = RowResolver(intended_addresses(row.intended_target))
    with pytest.raises(SsrfDenied) as info:
        run(UrlGuard(resolver=resolver).check_url(row.payload))
    assert info.value.details[0]["reason"] == "malformed"
    assert resolver.calls == []
    assert static_check_url(row.payload) != []  # patch validation catches it without I/O

    err, started = run(execute_refused(row.payload, resolver))
    assert (err.code, err.retryable) == ("ssrf_denied", False)
    assert started == []


# ------------------------------------------------------------------------------------ normalize-then-judge


def check_normalize_then_judge(row: Row) -> None:
    assert row.intended_target.startswith("example.com")
    # Normalized (NFKC/IDNA) before anything looks at it: DNS is asked for example.com, a public host.
    resolver = RowResolver(["93.184.215.14"])
    target = run(UrlGuard(resolver=resolver).check_url(row.payload))
    assert (target.host, target.url) == ("example.com", URL("http://example.com"))
    assert resolver.calls == ["example.com"]
    # ...so a name deny-list cannot be bypassed by spelling the name differently,
    with pytest.raises(SsrfDenied) as by_name:
        run(UrlGuard(resolver=RowResolver(["93.184.215.14"]), deny_names=["example.com"]).check_url(row.payload))
    assert by_name.value.details[0]["reason"] == "denied_name"
    # ...and the normalized name is judged by where it leads, like any other.
    for internal, reason in [
        ("127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("169.254.169.254", "metadata"),
    ]:
        with pytest.raises(SsrfDenied) as by_address:
            run(UrlGuard(resolver=RowResolver([internal])).check_url(row.payload))
        assert by_address.value.details[0]["reason"] == reason
    # The same trick on the names that always mean loopback or metadata is refused without DNS.
    for spelled in ["http://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ/", "http://ⓜⓔⓣⓐⓓⓐⓣⓐ.ⓖⓞⓞⓖⓛⓔ.ⓘⓝⓣⓔⓡⓝⓐⓛ/"]:
        assert static_check_url(spelled) != []


# ---------------------------------------------------------------------------------------- local servers


@asynccontextmanager
async def echo_server() -> AsyncIterator[tuple[int, list[str]]]:
    """Echoes Host and path; ``/--to/?url=X`` redirects to X with a 307, as r3dir.me does."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(f"{request.host}{request.path_qs}")
        if request.path == "/--to/":
            return web.Response(status=307, headers={"Location": request.query["url"]})
        return web.json_response({"host": request.host, "path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], seen
    finally:
        await runner.cleanup()


@asynccontextmanager
async def tcp_listener() -> AsyncIterator[tuple[int, list[int]]]:
    """A bare listener counting connections: proof that a refused hop was never even connected to."""
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


# ------------------------------------------------------------------------------------------ block-at-connect


def check_block_at_connect(row: Row) -> None:
    first, second = intended_addresses(row.intended_target)
    assert (first, second) == ("1.2.3.4", "169.254.169.254")
    host = URL(row.payload).raw_host
    assert host is not None

    async def judged_then_pinned() -> None:
        resolver = RowResolver([first], [second])
        guard = UrlGuard(resolver=resolver)
        target = await guard.check_url(row.payload)
        assert target.addresses == (first,)
        with pin_target(target):
            answers = await PinnedResolver().resolve(host, 80)
        assert [a["host"] for a in answers] == [first]  # the address judged, not a fresh lookup
        assert resolver.calls == [host]
        with pytest.raises(SsrfDenied) as info:  # the next request asks again and gets the rebound answer
            await guard.check_url(row.payload)
        assert info.value.details[0]["reason"] == "metadata"

    run(judged_then_pinned())

    # A round-robin answer carrying both is refused outright: every address must pass.
    with pytest.raises(SsrfDenied):
        run(UrlGuard(resolver=RowResolver([first, second])).check_url(row.payload))

    async def live() -> None:
        # Same name and rebinding, with the allowed answer being a local server so the request really happens.
        async with echo_server() as (port, seen):
            resolver = RowResolver(["127.0.0.1"], [second])
            trace, started = request_log(forbid=False)
            allow = [f"127.0.0.1:{port}"]
            async with HttpNodeClient(allow=allow, resolver=resolver, trace_configs=[trace]) as client:
                url = f"http://{host}:{port}/latest/meta-data/"
                output = await execute_http({"url": url}, {}, CTX, client)
                assert output["body"] == {"host": f"{host}:{port}", "path": "/latest/meta-data/"}
                assert resolver.calls == [host]  # aiohttp connected through the pinned answer
                with pytest.raises(NodeError) as info:
                    await execute_http({"url": url}, {}, CTX, client)
                assert (info.value.code, info.value.retryable) == ("ssrf_denied", False)
                assert "169.254.169.254" in info.value.message
            assert started == [url]
            assert seen == [f"{host}:{port}/latest/meta-data/"]

    run(live())


# ----------------------------------------------------------------------------------------- block-on-redirect


def check_block_on_redirect(row: Row) -> None:
    payload = URL(row.payload)
    assert payload.raw_host == "307.r3dir.me" and payload.query["url"] == "http://localhost"
    assert row.intended_target == "redirect to http://localhost"

    async def judged_per_hop() -> None:
        guard = UrlGuard(resolver=RowResolver(["1.2.3.4"]))
        first = await guard.check_url(row.payload)  # the first hop is a public host and passes
        with pytest.raises(SsrfDenied) as info:
            await guard.check_url(resolve_redirect(first.url, payload.query["url"]))
        assert info.value.details[0]["reason"] == "loopback"

    run(judged_per_hop())

    async def live() -> None:
        # The open redirector is played by a local server under the same name (plain http: no TLS locally);
        # the hop it redirects to is a real listener on localhost that must never see a connection.
        async with echo_server() as (port, seen), tcp_listener() as (target_port, accepted):
            allow = [f"307.r3dir.me:{port}"]
            async with HttpNodeClient(allow=allow, resolver=RowResolver(["127.0.0.1"])) as client:
                first_hop = f"http://307.r3dir.me:{port}/--to/?url=http://localhost:{target_port}/"
                with pytest.raises(NodeError) as info:
                    await execute_http({"url": first_hop}, {}, CTX, client)
            assert (info.value.code, info.value.retryable) == ("ssrf_denied", False)
            assert info.value.message.startswith("redirect 1 from http://307.r3dir.me:")
            assert "loopback" in info.value.message
            assert seen == [f"307.r3dir.me:{port}/--to/?url=http://localhost:{target_port}/"]
            assert accepted == []

    run(live())
