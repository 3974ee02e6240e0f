"""Open streams and long-polls do not lock other clients out of the API.

Each SSE subscriber and each ``POST /v1/runs?wait=`` holds its HTTP request for as long as it lasts. granian's
default for an embedded server serves 128 requests per worker at once, so the 129th subscriber, and every request
after it, waited in the listen backlog (and, once that was full, in SYN retransmits of 1, 3, 7, 15 s) until a
stream ended. ``[api] max_concurrent_requests`` now sets that bound (default 8192).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest

from tests.integration.daemon import Daemon, free_port

STREAMS = 200  # well past granian's 128


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("capacity")
    d = Daemon(base / "data", free_port()).start()
    yield d
    assert d.stop() == 0, d.output()


def test_the_api_answers_while_hundreds_of_streams_are_open(daemon: Daemon) -> None:
    gate = {"id": "gate", "type": "approval", "config": {"assignees": ["ops"], "timeout": "2h"}}
    run_id = daemon.request("POST", "/v1/runs", {"definition": {"name": "held", "nodes": [gate]}}).body["run_id"]

    async def main() -> None:
        # A client timeout far above a served request's time, far below the minutes a locked-out one waited.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=20, sock_read=20)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:
            streams = []
            try:

                async def subscribe() -> int:
                    resp = await http.get(
                        f"{daemon.url}/v1/runs/{run_id}/events", headers={"Accept": "text/event-stream"}
                    )
                    streams.append(resp)
                    await resp.content.readuntil(b"\n\n")  # the first event: the stream is being served
                    return resp.status

                statuses = await asyncio.gather(*(subscribe() for _ in range(STREAMS)))
                assert statuses == [200] * STREAMS
                async with http.get(f"{daemon.url}/v1/runs/{run_id}") as resp:
                    assert resp.status == 200 and (await resp.json())["status"] == "waiting"
            finally:
                for resp in streams:
                    resp.close()

    asyncio.run(main())
