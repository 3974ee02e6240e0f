"""An OpenAI-compatible chat-completions server that answers from a script, for tests, demos and the showcase.

It speaks the real protocol (``POST /v1/chat/completions`` returning ``chat.completion`` objects, errors in
OpenAI's ``{"error": {...}}`` shape, ``Retry-After`` on 429), so the ``openai`` agent provider is exercised
exactly as it would be against a hosted model, with no network and no model.

Each chat-completions request consumes the next *behaviour* of the script; the last one repeats:

* ``{"answer": {...}}``: the dict, JSON-encoded, as the assistant message ``content`` (``finish_reason`` ``stop``).
* ``{"tool_call": {...}}``: the dict as the JSON ``arguments`` of one ``aobd_agent_answer`` function call
  (``content`` null, ``finish_reason`` ``tool_calls``).
* ``{"raw": "text"}``: the text as is, which is how a malformed answer is scripted.
* ``{"status": 429, "retry_after": 0.05, "message": "..."}``: an error response; ``retry_after`` (seconds,
  fractions allowed) becomes the ``Retry-After`` header.
* ``"delay_s": 2.0`` may accompany any of these: the server waits that long before answering.
* ``"usage"`` and ``"finish_reason"`` override what the server would report.

Requests refused for a wrong bearer token (401) or a malformed body (400) do not consume a behaviour.
Every request is recorded in :attr:`StubLLM.requests` (path, headers and body) for assertions.

From a shell (the showcase example uses this)::

    python -m aobd.agents.stub_server --port 8089 --script answers.json [--api-key-env STUB_KEY]

where ``answers.json`` holds the list of behaviours (or ``{"responses": [...]}``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

__all__ = ["RecordedRequest", "StubLLM", "main"]

TOOL_NAME = "aobd_agent_answer"
_BEHAVIOUR_KEYS = frozenset({"answer", "tool_call", "raw", "status"})


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the stub received it."""

    method: str
    path: str
    #: Header names as sent (look them up case-insensitively with :meth:`header`).
    headers: dict[str, str]
    #: The parsed JSON body, or the raw text when it did not parse (``None`` when empty).
    body: Any

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)


def _check_behaviours(responses: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if not responses:
        raise ValueError("StubLLM needs at least one behaviour")
    checked = []
    for index, behaviour in enumerate(responses):
        if not isinstance(behaviour, Mapping):
            raise ValueError(f"behaviour {index} must be an object, not {type(behaviour).__name__}")
        kinds = _BEHAVIOUR_KEYS & behaviour.keys()
        if len(kinds) != 1:
            raise ValueError(
                f"behaviour {index} must have exactly one of answer, tool_call, raw or status; it has {sorted(kinds)}"
            )
        checked.append(dict(behaviour))
    return checked


def _openai_error(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


_ERROR_KINDS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_error",
}


class StubLLM:
    """A scripted OpenAI-compatible chat-completions server on aiohttp.

    Example::

        stub = StubLLM([{"status": 429, "retry_after": 0.05}, {"answer": {"output": {"ok": True}}}], api_key="k")
        base_url = await stub.start()  # "http://127.0.0.1:<port>/v1"
        try:
            ...
        finally:
            await stub.close()
    """

    def __init__(
        self,
        responses: Sequence[Mapping[str, Any]],
        *,
        api_key: str | None = None,
        model: str = "stub-model",
    ) -> None:
        """Args:
        responses: behaviours consumed in order, the last repeating (see the module docstring).
        api_key: when set, requests must carry ``Authorization: Bearer <api_key>`` or get a 401.
        model: the model name reported when a request names none (``GET /v1/models`` lists it).
        """
        self.responses = _check_behaviours(responses)
        self.api_key = api_key
        self.model = model
        #: Every request received, in order, including refused ones.
        self.requests: list[RecordedRequest] = []
        #: How many behaviours have been consumed.
        self.served = 0
        self.base_url: str | None = None
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._ids = itertools.count(1)

    @property
    def completions(self) -> list[RecordedRequest]:
        """The chat-completions requests received (what the provider sent)."""
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: any free port) and return the base URL, ``http://host:port/v1``."""
        if self._runner is not None:
            raise RuntimeError("StubLLM is already started")
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.base_url = f"http://{shown}:{bound[1]}/v1"
        return self.base_url

    async def close(self) -> None:
        """Stop listening; delayed answers still pending are abandoned."""
        runner, self._runner = self._runner, None
        if self._closing is not None:
            self._closing.set()
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> StubLLM:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ----------------------------------------------------------------------------------------------- handlers

    async def _record(self, request: web.Request) -> RecordedRequest:
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = raw.decode("utf-8", errors="replace")
        seen = RecordedRequest(request.method, request.path, dict(request.headers), body)
        self.requests.append(seen)
        return seen

    def _unauthorized(self, seen: RecordedRequest) -> web.Response | None:
        if self.api_key is None:
            return None
        header = seen.header("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token == self.api_key:
            return None
        # Like the real service, the message quotes the key it got: providers must keep it out of their errors.
        message = f"Incorrect API key provided: {token}." if token else "You didn't provide an API key."
        return web.json_response(_openai_error(message, "invalid_request_error", "invalid_api_key"), status=401)

    async def _models(self, request: web.Request) -> web.Response:
        seen = await self._record(request)
        refused = self._unauthorized(seen)
        if refused is not None:
            return refused
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "aobd"}]}
        )

    async def _chat(self, request: web.Request) -> web.Response:
        seen = await self._record(request)
        refused = self._unauthorized(seen)
        if refused is not None:
            return refused
        body = seen.body
        problem = _invalid_body(body)
        if problem is not None:
            return web.json_response(_openai_error(problem, "invalid_request_error"), status=400)
        behaviour = self.responses[min(self.served, len(self.responses) - 1)]
        self.served += 1
        delay = float(behaviour.get("delay_s") or 0.0)
        if delay > 0 and self._closing is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
        if "status" in behaviour:
            return self._error_response(behaviour)
        return web.json_response(self._completion(body, behaviour))

    @staticmethod
    def _error_response(behaviour: Mapping[str, Any]) -> web.Response:
        status = int(behaviour["status"])
        headers = {}
        if behaviour.get("retry_after") is not None:
            headers["Retry-After"] = f"{float(behaviour['retry_after']):g}"
        message = str(behaviour.get("message") or f"stub error {status}")
        kind = _ERROR_KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return web.json_response(_openai_error(message, kind), status=status, headers=headers)

    def _completion(self, request: Mapping[str, Any], behaviour: Mapping[str, Any]) -> dict[str, Any]:
        number = next(self._ids)
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        if "tool_call" in behaviour:
            arguments = orjson.dumps(behaviour["tool_call"]).decode()
            message["tool_calls"] = [
                {
                    "id": f"call_stub{number}",
                    "type": "function",
                    "function": {"name": TOOL_NAME, "arguments": arguments},
                }
            ]
            finish, produced = "tool_calls", arguments
        elif "raw" in behaviour:
            produced = str(behaviour["raw"])
            message["content"], finish = produced, "stop"
        else:
            produced = orjson.dumps(behaviour["answer"]).decode()
            message["content"], finish = produced, "stop"
        # A rough four-characters-per-token count: enough to see usage flow through.
        prompt_tokens = sum(len(str(m.get("content") or "")) for m in request["messages"]) // 4 + 1
        completion_tokens = len(produced) // 4 + 1
        usage = behaviour.get("usage") or {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return {
            "id": f"chatcmpl-stub{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model") or self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": behaviour.get("finish_reason", finish),
                }
            ],
            "usage": usage,
            "system_fingerprint": "fp_aobd_stub",
        }


def _invalid_body(body: Any) -> str | None:
    """What a real server would refuse with a 400, in its words; ``None`` when acceptable."""
    if not isinstance(body, dict):
        return "We could not parse the JSON body of your request."
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            return f"Invalid value for 'messages[{index}].role'"
    return None


# ------------------------------------------------------------------------------------------------------ CLI


def _load_script(path: str) -> list[dict[str, Any]]:
    data = orjson.loads(Path(path).read_bytes())
    if isinstance(data, dict):
        data = data.get("responses")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of behaviours or {{'responses': [...]}}")
    return data


async def _serve(args: argparse.Namespace) -> None:
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise SystemExit(f"stub_server: --api-key-env {args.api_key_env}: the variable is not set")
    stub = StubLLM(_load_script(args.script) if args.script else [{"answer": {"output": None}}], api_key=api_key)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    base_url = await stub.start(args.host, args.port)
    print(f"stub LLM serving {base_url}", flush=True)
    try:
        await stop.wait()
    finally:
        await stub.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aobd.agents.stub_server --port 8089 --script FILE.json``: serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m aobd.agents.stub_server", description="A scripted OpenAI-compatible chat-completions server."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8089, help="port (default 8089; 0 picks a free one)")
    parser.add_argument("--script", help="JSON file: the list of behaviours (default: one empty answer)")
    parser.add_argument("--api-key-env", help="require 'Authorization: Bearer $VAR' (name of the variable)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except (OSError, ValueError) as exc:
        print(f"stub_server: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
