"""The ``openai`` agent provider against :class:`StubLLM` on loopback, which each test allow-lists."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from aobd.agents import openai as provider
from aobd.agents.base import AgentAnswer
from aobd.agents.openai import ANSWER_SCHEMA, openai_answer
from aobd.agents.stub_server import StubLLM, main
from aobd.errors import NodeError
from aobd.nodes.base import NodeContext
from aobd.nodes.http import HttpResponse

T = TypeVar("T")
KEY = "sk-test-0123456789abcdef"
VERSION = "sha256:" + "ab" * 32

DOCUMENT: dict[str, Any] = {
    "name": "triage",
    "policy": {"patches": "auto", "max_spawned_nodes": 4, "max_patches": 2, "allowed_node_types": ["function"]},
    "nodes": [
        {"id": "intake", "type": "function", "config": {"handler": "builtin:echo"}, "in": {"t": "inputs.ticket"}},
        {
            "id": "lookup",
            "type": "http",
            "config": {
                "url": "https://crm.example.com/a/{t}?api_key=crm-secret-1&fields=all",
                "headers": {"Authorization": "Bearer crm-secret-2", "Accept": "application/json"},
            },
            "in": {"t": "nodes.intake.output.t"},
        },
        {
            "id": "plan",
            "type": "agent",
            "config": {"provider": "openai", "model": "m", "api_key_env": "LLM_KEY", "prompt": "Route the ticket."},
            "in": {"ticket": "nodes.lookup.output.body"},
        },
        {
            "id": "other",
            "type": "agent",
            "config": {"provider": "scripted", "script": [{"output": "other-secret-answer"}]},
        },
        {"id": "notify", "type": "function", "config": {"handler": "builtin:echo"}},
    ],
    "edges": [
        {"from": "intake", "to": "lookup"},
        {"from": "lookup", "to": "plan"},
        {"from": "plan", "to": "notify", "when": "nodes.plan.output.route != 'spam'"},
    ],
    "outputs": {"route": "nodes.plan.output.route"},
}

VALID_PATCH = {
    "reason": "billing tickets need a drafted reply",
    "ops": [
        {"op": "add", "path": "/nodes/-", "value": {"id": "draft", "type": "function", "config": {"handler": "x:y"}}},
        {"op": "add", "path": "/edges/-", "value": {"from": "plan", "to": "draft"}},
    ],
}


def ctx(timeout_s: float = 10.0) -> NodeContext:
    return NodeContext(
        run_id="run1",
        node_id="plan",
        attempt=1,
        idempotency_key="run1:plan",
        timeout_s=timeout_s,
        services={"version": VERSION},
    )


def config(base_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "provider": "openai",
        "base_url": base_url,
        "model": "gpt-test",
        "api_key_env": "LLM_KEY",
        "prompt": "Route the ticket.",
        "temperature": 0.2,
        "max_tokens": 512,
        **extra,
    }


def with_stub(
    responses: Sequence[Mapping[str, Any]],
    scenario: Callable[[StubLLM, str], Awaitable[T]],
    *,
    api_key: str | None = KEY,
) -> tuple[T, StubLLM]:
    stub = StubLLM(responses, api_key=api_key)  # binds to no loop until start()

    async def go() -> T:
        base_url = await stub.start()
        try:
            return await scenario(stub, base_url)
        finally:
            await stub.close()

    return asyncio.run(go()), stub


def ask(
    responses: Sequence[Mapping[str, Any]],
    *,
    cfg: Mapping[str, Any] | None = None,
    timeout_s: float = 10.0,
    env: Mapping[str, str] | None = None,
    allow: Sequence[str] | None = None,
    inputs: dict[str, Any] | None = None,
    api_key: str | None = KEY,
) -> tuple[AgentAnswer | NodeError, StubLLM]:
    """One provider call against a fresh stub; returns the answer or the NodeError, and the stub."""

    async def scenario(stub: StubLLM, base_url: str) -> AgentAnswer | NodeError:
        port = base_url.split(":")[2].split("/")[0]
        try:
            return await openai_answer(
                {**config(base_url), **(cfg or {})},
                inputs if inputs is not None else {"ticket": {"id": 7, "text": "I was charged twice"}},
                ctx(timeout_s),
                document=DOCUMENT,
                http_allow=[f"127.0.0.1:{port}"] if allow is None else allow,
                env={"LLM_KEY": KEY} if env is None else env,
            )
        except NodeError as exc:
            return exc

    return with_stub(responses, scenario, api_key=api_key)


def answer_of(result: AgentAnswer | NodeError) -> AgentAnswer:
    assert isinstance(result, AgentAnswer), result
    return result


def error_of(result: AgentAnswer | NodeError) -> NodeError:
    assert isinstance(result, NodeError), result
    return result


# ---------------------------------------------------------------------------------------------------- answers


def test_valid_answer_with_patch_records_usage_and_exchange_without_key() -> None:
    result, stub = ask([{"answer": {"output": {"route": "billing"}, "patch": VALID_PATCH}}])
    answer = answer_of(result)
    assert answer.output == {"route": "billing"}
    assert answer.patch is not None
    assert answer.patch.ops == VALID_PATCH["ops"]
    assert answer.patch.reason == VALID_PATCH["reason"]
    assert answer.patch.author == "agent:plan"
    assert answer.patch.base == VERSION
    assert answer.usage is not None
    assert set(answer.usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert answer.usage["total_tokens"] == answer.usage["prompt_tokens"] + answer.usage["completion_tokens"] > 0

    (request,) = stub.completions
    assert request.header("Authorization") == f"Bearer {KEY}"
    body = request.body
    assert body["model"] == "gpt-test"
    assert body["temperature"] == 0.2
    assert body["max_tokens"] == 512
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "aobd_agent_answer", "strict": False, "schema": ANSWER_SCHEMA},
    }

    assert answer.exchange is not None
    assert KEY.encode() not in answer.exchange
    exchange = orjson.loads(answer.exchange)
    assert exchange["request"]["body"] == body
    assert exchange["request"]["url"].endswith("/v1/chat/completions")
    assert exchange["response"]["status"] == 200
    assert exchange["response"]["body"]["object"] == "chat.completion"
    assert exchange["response"]["body"]["usage"] == answer.usage
    assert [t["status"] for t in exchange["tries"]] == [200]
    assert exchange["elapsed_ms"] >= 0
    assert "headers" not in exchange["request"] and "headers" not in exchange["response"]


def test_optional_fields_are_left_out_and_no_key_means_no_authorization() -> None:
    cfg = {"temperature": None, "max_tokens": None, "api_key_env": None}
    result, stub = ask([{"answer": {"output": 1}}], cfg=cfg, api_key=None)
    assert answer_of(result).patch is None
    (request,) = stub.completions
    assert request.header("Authorization") is None
    assert "temperature" not in request.body and "max_tokens" not in request.body


def test_patch_breaking_the_rules_is_passed_through_for_the_engine_to_judge() -> None:
    bad = {
        "reason": "take over",
        "ops": [
            {"op": "remove", "path": "/nodes/0"},  # a finished node
            {"op": "replace", "path": "/policy/max_patches", "value": 1000},  # out of scope
            {
                "op": "add",
                "path": "/nodes/-",
                "value": {"id": "steal", "type": "http", "config": {"url": "http://169.254.169.254/"}},
            },
        ],
        "author": "human:admin",  # not the model's to claim
        "base": "sha256:forged",
    }
    answer = answer_of(ask([{"answer": {"output": None, "patch": bad}}])[0])
    assert answer.patch is not None
    assert answer.patch.ops == bad["ops"]
    assert answer.patch.author == "agent:plan"
    assert answer.patch.base == VERSION


def test_tool_call_answer() -> None:
    result, _ = ask([{"tool_call": {"output": {"route": "sales"}, "patch": VALID_PATCH}}])
    answer = answer_of(result)
    assert answer.output == {"route": "sales"}
    assert answer.patch is not None and answer.patch.ops == VALID_PATCH["ops"]
    exchange = orjson.loads(answer.exchange or b"")
    assert exchange["response"]["body"]["choices"][0]["finish_reason"] == "tool_calls"


def test_fenced_json_content_is_accepted() -> None:
    answer = answer_of(ask([{"raw": '```json\n{"output": {"route": "x"}}\n```'}])[0])
    assert answer.output == {"route": "x"}


def test_null_patch_means_no_patch() -> None:
    assert answer_of(ask([{"answer": {"output": 3, "patch": None}}])[0]).patch is None


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        ({"raw": "Sure! The route is billing."}, "not JSON"),
        ({"raw": '{"output": {"route": "bill'}, "not JSON"),
        ({"answer": {"route": "billing"}}, "unexpected keys ['route']"),
        ({"answer": {}}, "no 'output'"),
        ({"answer": ["output"]}, "expected an object"),
        ({"answer": {"output": 1, "patch": {"ops": "remove everything"}}}, "'patch.ops' must be a list"),
        ({"answer": {"output": 1, "patch": {"ops": [1, 2]}}}, "'patch.ops' must be a list"),
        ({"answer": {"output": 1, "patch": "add a node"}}, "'patch' must be an object"),
        ({"raw": ""}, "empty"),
        ({"raw": '{"output": {"route": "bill', "finish_reason": "length"}, "max_tokens"),
    ],
)
def test_malformed_answers_are_retryable_bad_answers(behaviour: dict[str, Any], expected: str) -> None:
    error = error_of(ask([behaviour])[0])
    assert error.code == "agent_bad_answer"
    assert error.retryable is True
    assert expected in error.message
    assert KEY not in error.message


def test_malformed_answer_message_carries_a_short_excerpt() -> None:
    error = error_of(ask([{"raw": "Here you go: " + "x" * 5000}])[0])
    assert "Here you go" in error.message
    assert len(error.message) < 400


# ----------------------------------------------------------------------------------------- transport failures


def _response(headers: dict[str, str]) -> HttpResponse:
    return HttpResponse(429, "Too Many Requests", headers, b"", "", None, "http://x/v1/chat/completions")


def test_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert provider._retry_after_s(_response({"retry-after": "2.5"}), now) == 2.5
    assert provider._retry_after_s(_response({"retry-after-ms": "150", "retry-after": "9"}), now) == 0.15
    date = email.utils.formatdate(now + 4, usegmt=True)
    assert provider._retry_after_s(_response({"retry-after": date}), now) == pytest.approx(4.0)
    assert provider._retry_after_s(_response({"retry-after": "soon"}), now) is None
    assert provider._retry_after_s(_response({"retry-after": "-3"}), now) == 0.0
    assert provider._retry_after_s(_response({}), now) is None


def test_server_slower_than_request_timeout_is_agent_timeout() -> None:
    started = time.monotonic()
    error = error_of(ask([{"delay_s": 5.0, "answer": {"output": 1}}], cfg={"request_timeout_ms": 200})[0])
    assert error.code == "agent_timeout"
    assert error.retryable is True
    assert "request_timeout_ms=200" in error.message
    assert time.monotonic() - started < 3.0


def test_attempt_timeout_bounds_a_longer_request_timeout() -> None:
    started = time.monotonic()
    error = error_of(ask([{"delay_s": 5.0, "answer": {"output": 1}}], timeout_s=0.5)[0])
    assert error.code == "agent_timeout"
    assert "attempt timeout 0.5s" in error.message
    assert time.monotonic() - started < 3.0


def test_429_then_success_is_retried_honouring_retry_after() -> None:
    result, stub = ask([{"status": 429, "retry_after": 0.6}, {"answer": {"output": "ok"}}])
    answer = answer_of(result)
    assert answer.output == "ok"
    assert len(stub.completions) == 2
    exchange = orjson.loads(answer.exchange or b"")
    assert [t["status"] for t in exchange["tries"]] == [429, 200]
    assert exchange["tries"][0]["retry_after_s"] == 0.6
    # The first backoff without Retry-After is at most 0.6s (0.5s +20%), so a longer gap proves it was honoured.
    assert exchange["elapsed_ms"] >= 600


def test_retry_after_beyond_the_attempt_timeout_fails_at_once() -> None:
    started = time.monotonic()
    result, stub = ask([{"status": 429, "retry_after": 30}, {"answer": {"output": "ok"}}], timeout_s=2.0)
    error = error_of(result)
    assert error.code == "agent_rate_limited"
    assert error.retryable is True
    assert "not retried" in error.message
    assert len(stub.completions) == 1
    assert time.monotonic() - started < 1.5


def test_429_on_every_try_is_agent_rate_limited() -> None:
    result, stub = ask([{"status": 429, "retry_after": 0.01, "message": "Rate limit reached for gpt-test"}])
    error = error_of(result)
    assert error.code == "agent_rate_limited"
    assert error.retryable is True
    assert "Rate limit reached" in error.message
    assert len(stub.completions) == 3


def test_500_three_times_is_agent_server_error_with_exponential_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provider, "_BACKOFF_BASE_S", 0.05)
    started = time.monotonic()
    result, stub = ask([{"status": 500}])
    error = error_of(result)
    assert error.code == "agent_server_error"
    assert error.retryable is True
    assert "after 3 tries" in error.message
    assert len(stub.completions) == 3
    assert error.details[0]["status"] == 500
    assert time.monotonic() - started >= 0.05 * 0.8 + 0.1 * 0.8


def test_500_then_success() -> None:
    result, stub = ask([{"status": 503, "retry_after": 0.01}, {"answer": {"output": "ok"}}])
    assert answer_of(result).output == "ok"
    assert len(stub.completions) == 2


def test_other_4xx_is_rejected_without_retry_and_scrubs_the_echoed_key() -> None:
    # The stub quotes the key it got in its 401, as OpenAI does: it must not reach the error message.
    result, stub = ask([{"answer": {"output": 1}}], env={"LLM_KEY": KEY + "-wrong"})
    error = error_of(result)
    assert error.code == "agent_request_rejected"
    assert error.retryable is False
    assert "HTTP 401" in error.message and "Incorrect API key provided" in error.message
    assert KEY not in error.message
    assert len(stub.requests) == 1


def test_400_from_the_server_is_rejected() -> None:
    error = error_of(ask([{"status": 400, "message": "model 'gpt-test' does not exist"}])[0])
    assert error.code == "agent_request_rejected"
    assert error.retryable is False
    assert "does not exist" in error.message


def test_connection_refused_is_agent_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the request: nothing listens there

    async def go() -> NodeError:
        with pytest.raises(NodeError) as info:
            await openai_answer(
                config(f"http://127.0.0.1:{port}/v1"),
                {},
                ctx(),
                document=DOCUMENT,
                http_allow=[f"127.0.0.1:{port}"],
                env={"LLM_KEY": KEY},
            )
        return info.value

    error = asyncio.run(go())
    assert error.code == "agent_unreachable"
    assert error.retryable is True
    assert KEY not in error.message


# ------------------------------------------------------------------------------------------- keys and SSRF


def test_missing_key_env_is_agent_no_key() -> None:
    result, stub = ask([{"answer": {"output": 1}}], env={})
    error = error_of(result)
    assert error.code == "agent_no_key"
    assert error.retryable is False
    assert "LLM_KEY" in error.message
    assert stub.requests == []


def test_key_file_is_read_and_stripped(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(f"  {KEY}\n")
    result, stub = ask([{"answer": {"output": 1}}], cfg={"api_key_env": None, "api_key_file": str(key_file)}, env={})
    assert answer_of(result).output == 1
    assert stub.completions[0].header("Authorization") == f"Bearer {KEY}"


def test_missing_key_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result, stub = ask([{"answer": {"output": 1}}], cfg={"api_key_file": str(missing)}, env={})
    error = error_of(result)
    assert error.code == "agent_no_key"
    assert str(missing) in error.message and "LLM_KEY" in error.message
    assert stub.requests == []


def test_loopback_base_url_not_allow_listed_is_refused_before_any_request() -> None:
    result, stub = ask([{"answer": {"output": 1}}], allow=[])
    error = error_of(result)
    assert error.code == "ssrf_denied"
    assert error.retryable is False
    assert "loopback" in error.message
    assert stub.requests == []


def test_bad_config_is_not_retryable() -> None:
    async def go(cfg: dict[str, Any]) -> NodeError:
        with pytest.raises(NodeError) as info:
            await openai_answer(cfg, {}, ctx(), document=DOCUMENT, http_allow=[], env={})
        return info.value

    assert asyncio.run(go({"model": "m"})).code == "bad_config"
    assert asyncio.run(go({"base_url": "http://127.0.0.1:1/v1"})).code == "bad_config"
    assert (
        asyncio.run(go({"base_url": "http://127.0.0.1:1/v1", "model": "m", "request_timeout_ms": 0})).retryable is False
    )


# ---------------------------------------------------------------------------------------------------- prompt


def test_system_prompt_has_rules_and_compact_view_without_secrets_or_outputs() -> None:
    result, stub = ask([{"answer": {"output": 1}}])
    answer_of(result)
    system, user = stub.completions[0].body["messages"]
    text = system["content"]
    # The rules, with this workflow's policy.
    for phrase in (
        "/nodes",
        "/edges",
        "/outputs",
        "RFC 6902",
        "public http(s) URL",
        "at most 4 nodes",
        "at most 2 patches",
    ):
        assert phrase in text, phrase
    assert "node types a patch may add:\n   function." in text
    # This node, and the ones upstream of it, are the immutable past.
    assert "Now that means: intake, lookup, plan." in text
    # The compact view: ids, indices, types, bindings and edges.
    for phrase in (
        '{"index":0,"id":"intake","type":"function","status":"done"',
        '"id":"plan","type":"agent","status":"running (this is you)"',
        '{"index":2,"from":"plan","to":"notify","when":"nodes.plan.output.route != \'spam\'"}',
        '"in":{"ticket":"nodes.lookup.output.body"}',
        '"api_key_env":"LLM_KEY"',
    ):
        assert phrase in text, phrase
    # No secrets, no scripted answers of other agents.
    for secret in ("crm-secret-1", "crm-secret-2", "other-secret-answer", KEY):
        assert secret not in text
    assert '"headers":{"Authorization":"<redacted>","Accept":"<redacted>"}' in text
    assert "api_key=<redacted>&fields=all" in text
    assert '"script":"<1 scripted answers>"' in text
    # The user message: the prompt and the inputs as JSON.
    assert user["content"].startswith("Route the ticket.")
    assert '{"ticket":{"id":7,"text":"I was charged twice"}}' in user["content"]


def test_exact_node_status_when_the_engine_gives_it() -> None:
    messages = provider.build_messages(
        {"prompt": "p"},
        {},
        node_id="plan",
        document=DOCUMENT,
        node_status={"intake": "completed", "lookup": "completed", "plan": "running", "other": "running"},
    )
    text = messages[0]["content"]
    assert "Now that means: intake, lookup, plan, other." in text
    assert '"id":"notify","type":"function","status":"pending"' in text


def test_deny_policy_is_stated() -> None:
    document = {**DOCUMENT, "policy": {"patches": "deny"}}
    text = provider.build_messages({}, {}, node_id="plan", document=document)[0]["content"]
    assert "do not propose one" in text


# -------------------------------------------------------------------------------------------------- the stub


def test_stub_refuses_malformed_requests_without_consuming_a_behaviour() -> None:
    async def scenario(stub: StubLLM, base_url: str) -> list[int]:
        import aiohttp

        statuses = []
        async with aiohttp.ClientSession() as session:
            bodies: list[dict[str, Any]] = [{"messages": []}, {"model": "m", "messages": [{"role": "robot"}]}]
            for body in bodies:
                async with session.post(f"{base_url}/chat/completions", json=body) as resp:
                    statuses.append(resp.status)
            async with session.get(f"{base_url}/models") as resp:
                statuses.append(resp.status)
        return statuses

    statuses, stub = with_stub([{"answer": {"output": 1}}], scenario, api_key=None)
    assert statuses == [400, 400, 200]
    assert stub.served == 0
    assert len(stub.requests) == 3


def test_stub_rejects_ambiguous_behaviours() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        StubLLM([{"answer": {}, "raw": "x"}])
    with pytest.raises(ValueError, match="at least one"):
        StubLLM([])


def test_stub_main_rejects_a_bad_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "script.json"
    script.write_text('{"not": "a list"}')
    assert main(["--port", "0", "--script", str(script)]) == 2
    assert "expected a list" in capsys.readouterr().err
