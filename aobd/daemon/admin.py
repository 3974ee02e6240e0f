"""The admin unix socket: the same HTTP API, for ``aobctl`` on this machine, without tokens.

The socket file is created 0600, and every connection's peer credentials (SO_PEERCRED) must name the
daemon's own user or root: file permissions alone can be loosened by a careless ``chmod``, the credential
check cannot. Requests are bridged into the ASGI app with the caller preset as the admin of the workspace
named by the ``X-Aobd-Workspace`` header (default ``default``). In a cluster, a command for a run another daemon
drives goes on to that daemon as this caller only with ``cluster.peer_token`` (:mod:`aobd.api.forward`). Served by
aiohttp because granian does not expose the peer socket of a unix connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from aobd.daemon.service import Caller

_PEERCRED = struct.Struct("3i")


def peer_uid(sock: socket.socket | None) -> int | None:
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    del pid, gid
    return uid


class AdminServer:
    def __init__(self, app: Any, path: Path, *, drain: Callable[[], None]) -> None:
        self.app = app
        self.path = path
        self.drain = drain
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a crashed daemon
        server = web.Application(client_max_size=self.app.config.api.max_body_bytes + 1)
        server.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(server, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.UnixSite(self._runner, str(self.path))
        old = os.umask(0o177)  # the socket is born 0600: no window where others could connect
        try:
            await site.start()
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        uid = peer_uid(request.transport.get_extra_info("socket") if request.transport else None)
        if uid is None or uid not in (os.getuid(), 0):
            return web.json_response(
                {"error": {"code": "forbidden", "message": f"uid {uid} may not use the admin socket", "details": []}},
                status=403,
            )
        body = await request.read()
        caller = Caller(request.headers.get("X-Aobd-Workspace", "default"), "admin", f"uid:{uid}", via="socket")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": "http",
            "path": request.path,
            "raw_path": request.raw_path.encode(),
            "query_string": request.query_string.encode(),
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()],
            "client": None,
            "server": None,
            "extensions": {"aobd.caller": caller, "aobd.drain": self.drain},
        }
        response: web.StreamResponse | None = None
        sent_body = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            # Streams wait here for the client to go away; aiohttp does not cancel handlers on disconnect.
            while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110
                await asyncio.sleep(0.25)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal response
            if message["type"] == "http.response.start":
                response = web.StreamResponse(status=message["status"])
                for k, v in message.get("headers", []):
                    if k.lower() != b"content-length":
                        response.headers.add(k.decode("latin-1"), v.decode("latin-1"))
                await response.prepare(request)
            elif message["type"] == "http.response.body" and response is not None:
                chunk = message.get("body", b"")
                if chunk:
                    await response.write(chunk)
                if not message.get("more_body", False):
                    await response.write_eof()

        await self.app(scope, receive, send)
        if response is None:
            return web.Response(status=500, text="no response")
        return response
