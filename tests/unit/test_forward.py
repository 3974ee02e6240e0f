"""Forwarding admin-socket commands to a run's owner: the peer-token rule, the forwarding decision, and both
through the ASGI app with a stand-in service (no daemon, no sockets)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from aobd.api.app import Api
from aobd.api.auth import Authenticator
from aobd.api.forward import FORWARDED_ADMIN, FORWARDED_BY, PEER_TOKEN, to_owner
from aobd.config import AuthConfig, ClusterConfig, Config, TokenConfig, load_config, masked
from aobd.daemon.service import Caller
from aobd.errors import ConfigError, Misdirected, Unauthorized
from tests.conftest import run_async

SECRET = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
SOCKET_CALLER = Caller("acme", "admin", "uid:1000", via="socket")
CLAIM = "workspace=acme&caller=uid%3A1000"


def misdirected(owner_url: str | None = "http://d2:7070") -> Misdirected:
    return Misdirected("run r1 is driven by daemon d2", owner="d2" if owner_url else None, owner_url=owner_url)


# ------------------------------------------------------------------------------------------ the auth rule


def test_the_right_peer_token_makes_the_named_admin_caller() -> None:
    auth = Authenticator([], peer_token=SECRET)
    caller = auth.forwarded_admin(CLAIM, SECRET, "d1")
    assert caller == Caller("acme", "admin", "admin:uid:1000 via d1", via="peer")


@pytest.mark.parametrize("secret", [None, "", OTHER, SECRET[:-1], SECRET + "x", "é" * 32])
def test_a_wrong_or_missing_peer_token_is_refused(secret: str | None) -> None:
    with pytest.raises(Unauthorized, match="peer token"):
        Authenticator([], peer_token=SECRET).forwarded_admin(CLAIM, secret, "d1")


@pytest.mark.parametrize("secret", [None, "", SECRET])
def test_a_daemon_without_a_peer_token_refuses_every_forwarded_admin(secret: str | None) -> None:
    with pytest.raises(Unauthorized, match=r"cluster\.peer_token"):
        Authenticator([], peer_token="").forwarded_admin(CLAIM, secret, "d1")


@pytest.mark.parametrize(
    ("claim", "forwarded_by"),
    [("caller=uid%3A1000", "d1"), ("workspace=acme", "d1"), ("workspace=&caller=x", "d1"), (CLAIM, None)],
)
def test_a_forwarded_admin_must_name_workspace_caller_and_daemon(claim: str, forwarded_by: str | None) -> None:
    with pytest.raises(Unauthorized, match="must name"):
        Authenticator([], peer_token=SECRET).forwarded_admin(claim, SECRET, forwarded_by)


# ----------------------------------------------------------------------------------- the forwarding decision


def test_an_http_command_goes_on_with_its_own_token_and_no_peer_token() -> None:
    headers = {"authorization": "Bearer user-token", "content-type": "application/json", "host": "d1"}
    url, sent = to_owner(misdirected(), headers, daemon_id="d1", peer_token=SECRET)
    assert url == "http://d2:7070"
    assert sent == {"authorization": "Bearer user-token", "content-type": "application/json", FORWARDED_BY: "d1"}


def test_an_admin_socket_command_goes_on_with_the_peer_token_naming_its_caller() -> None:
    headers = {"content-type": "application/json", "authorization": "Bearer stray", "x-aobd-workspace": "acme"}
    url, sent = to_owner(misdirected(), headers, daemon_id="d1", admin=SOCKET_CALLER, peer_token=SECRET)
    assert url == "http://d2:7070"
    assert "authorization" not in sent and "x-aobd-workspace" not in sent
    assert sent[PEER_TOKEN] == SECRET and sent[FORWARDED_BY] == "d1"
    assert parse_qs(sent[FORWARDED_ADMIN]) == {"workspace": ["acme"], "caller": ["uid:1000"]}
    # What the owner makes of exactly these headers.
    owner = Authenticator([TokenConfig("user-token", "acme", "write")], peer_token=SECRET)
    assert owner.forwarded_admin(sent[FORWARDED_ADMIN], sent[PEER_TOKEN], sent[FORWARDED_BY]) == Caller(
        "acme", "admin", "admin:uid:1000 via d1", via="peer"
    )


def test_an_admin_socket_command_without_a_peer_token_is_the_409_naming_the_setting() -> None:
    with pytest.raises(Misdirected) as caught:
        to_owner(misdirected(), {}, daemon_id="d1", admin=SOCKET_CALLER, peer_token="")
    assert "cluster.peer_token" in caught.value.message and "driven by daemon d2" in caught.value.message
    assert caught.value.owner == "d2" and caught.value.owner_url == "http://d2:7070"


@pytest.mark.parametrize("admin", [None, SOCKET_CALLER])
def test_a_forwarded_command_or_one_without_a_known_owner_is_never_forwarded(admin: Caller | None) -> None:
    exc = misdirected()
    with pytest.raises(Misdirected) as caught:
        to_owner(exc, {FORWARDED_BY: "d0"}, daemon_id="d1", admin=admin, peer_token=SECRET)
    assert caught.value is exc
    unknown = misdirected(owner_url=None)
    with pytest.raises(Misdirected) as caught:
        to_owner(unknown, {}, daemon_id="d1", admin=admin, peer_token=SECRET)
    assert caught.value is unknown


# --------------------------------------------------------------------------------------- through the app


class _Service:
    """The two things the cancel route needs of a Service: it records who cancelled, or says who drives the run."""

    def __init__(self, config: Config, owner_url: str | None = None) -> None:
        self.config = config
        self.cluster = type("Cluster", (), {"daemon_id": "d1"})()
        self.owner_url = owner_url
        self.cancelled_by: list[Caller] = []

    async def cancel(self, caller: Caller, run_id: str, reason: str) -> dict[str, Any]:
        if self.owner_url is not None:
            raise Misdirected(f"run {run_id} is driven by daemon d2", owner="d2", owner_url=self.owner_url)
        self.cancelled_by.append(caller)
        return {"run_id": run_id, "status": "cancelled"}


class _Forwarder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, str]]] = []

    async def forward(
        self, method: str, path: str, query: bytes, headers: dict[str, str], body: bytes, url: str
    ) -> Any:
        self.sent.append((url, headers))
        return 200, "application/json", b'{"status": "cancelled"}'

    async def close(self) -> None:
        pass


def _config(peer_token: str = "", tokens: list[TokenConfig] | None = None) -> Config:
    return Config(cluster=ClusterConfig(enabled=True, peer_token=peer_token), auth=AuthConfig(tokens or []))


def cancel(api: Api, headers: dict[str, str], *, socket_caller: Caller | None = None) -> tuple[int, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/v1/runs/r1/cancel",
        "query_string": b"",
        "headers": [(k.encode(), v.encode("latin-1")) for k, v in headers.items()],
        "extensions": {"aobd.caller": socket_caller} if socket_caller is not None else {},
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"reason": "why"}', "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    run_async(api(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_the_owner_records_a_forwarded_admin_command_as_the_socket_caller_via_the_daemon() -> None:
    service = _Service(_config(SECRET))
    headers = {PEER_TOKEN: SECRET, FORWARDED_ADMIN: CLAIM, FORWARDED_BY: "d1"}
    assert cancel(Api(service), headers)[0] == 200
    assert service.cancelled_by == [Caller("acme", "admin", "admin:uid:1000 via d1", via="peer")]


@pytest.mark.parametrize("peer_token", ["", SECRET])
@pytest.mark.parametrize("secret", [None, OTHER])
def test_the_admin_header_without_the_secret_is_refused_whatever_token_comes_with_it(
    peer_token: str, secret: str | None
) -> None:
    """Refused (401), not ignored, both on an open daemon (where ignoring it would make the caller the admin of
    "default") and beside a valid ordinary token."""
    for tokens, authorization in (([], None), ([TokenConfig("user-token", "acme", "read")], "Bearer user-token")):
        service = _Service(_config(peer_token, tokens))
        headers = {FORWARDED_ADMIN: CLAIM, FORWARDED_BY: "d1"}
        if secret is not None:
            headers[PEER_TOKEN] = secret
        if authorization is not None:
            headers["authorization"] = authorization
        status, body = cancel(Api(service), headers)
        assert (status, body["error"]["code"]) == (401, "unauthorized"), body
        assert service.cancelled_by == []


def test_an_admin_socket_command_for_a_run_driven_elsewhere_is_forwarded_with_the_peer_token() -> None:
    api = Api(_Service(_config(SECRET), owner_url="http://d2:7070"))
    forwarder = api._forwarder = _Forwarder()
    assert cancel(api, {"x-aobd-workspace": "acme"}, socket_caller=SOCKET_CALLER) == (200, {"status": "cancelled"})
    [(url, headers)] = forwarder.sent
    assert url == "http://d2:7070" and headers[PEER_TOKEN] == SECRET and headers[FORWARDED_BY] == "d1"
    assert parse_qs(headers[FORWARDED_ADMIN]) == {"workspace": ["acme"], "caller": ["uid:1000"]}


def test_without_a_peer_token_the_admin_socket_gets_the_409_naming_owner_and_setting() -> None:
    api = Api(_Service(_config(""), owner_url="http://d2:7070"))
    forwarder = api._forwarder = _Forwarder()
    status, body = cancel(api, {}, socket_caller=SOCKET_CALLER)
    assert status == 409 and body["error"]["code"] == "misdirected"
    assert "cluster.peer_token" in body["error"]["message"]
    assert body["error"]["details"] == [{"owner": "d2", "owner_url": "http://d2:7070"}]
    assert forwarder.sent == []


def test_a_forwarded_admin_command_is_not_forwarded_again() -> None:
    api = Api(_Service(_config(SECRET), owner_url="http://d3:7070"))
    forwarder = api._forwarder = _Forwarder()
    status, body = cancel(api, {PEER_TOKEN: SECRET, FORWARDED_ADMIN: CLAIM, FORWARDED_BY: "d1"})
    assert status == 409 and body["error"]["code"] == "misdirected"
    assert forwarder.sent == []


# ------------------------------------------------------------------------------------------------ config


def test_the_peer_token_comes_from_file_or_environment_and_is_masked(tmp_path: Path) -> None:
    secret_file = tmp_path / "peer-token"
    secret_file.write_text(SECRET + "\n")
    path = tmp_path / "c.toml"
    path.write_text(f'[cluster]\npeer_token_file = "{secret_file}"\n')
    config = load_config(path, env={})
    assert config.cluster.peer_token == SECRET
    assert SECRET not in str(masked(config))
    assert load_config(None, env={"AOBD_PEER_TOKEN": OTHER}).cluster.peer_token == OTHER
    assert masked(Config())["cluster"]["peer_token"] == ""  # unset stays visibly unset


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('peer_token = "short"\n', "cluster.peer_token must be at least 32"),
        (f'peer_token = "{SECRET[:16]} {SECRET[:16]}"\n', "without spaces"),
        ('peer_token_file = "/nonexistent/peer-token"\n', "cluster.peer_token_file /nonexistent/peer-token cannot"),
        (f'peer_token = "{SECRET}"\npeer_token_file = "/x"\n', "not both"),
        ('peer_token_file = "/dev/null"\n', "cluster.peer_token_file /dev/null is empty"),
    ],
)
def test_a_bad_peer_token_is_refused_naming_the_key(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[cluster]\n" + text)
    with pytest.raises(ConfigError, match=says.replace(".", r"\.")):
        load_config(path, env={})
