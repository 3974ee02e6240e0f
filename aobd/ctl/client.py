"""The HTTP client of ``aobctl``: stdlib ``http.client`` over the admin unix socket or over HTTP(S).

One keep-alive connection serves a command's requests; event streams get a connection of their own.
:class:`EventFollower` follows a run's events over SSE and survives dropped connections and ``lagged``
messages by reconnecting with ``Last-Event-ID``, so the caller sees every event exactly once, in order.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from urllib.parse import quote, urlencode, urlsplit

from aobd import __version__

TYPE_CHECKING = False  # ``typing`` costs ~2 ms at start; mypy treats any TYPE_CHECKING as the real one
if TYPE_CHECKING:
    from typing import Any

TERMINAL_EVENTS = frozenset({"RunCompleted", "RunFailed", "RunCancelled"})
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
_EVENT_STATUS = {"RunCompleted": "completed", "RunFailed": "failed", "RunCancelled": "cancelled"}

#: An open event stream with nothing on it for this long is treated as dropped (then resumed): it guards against
#: half-open TCP connections without cutting short runs that wait hours for an approval.
STREAM_IDLE_TIMEOUT_S = 90.0


class CtlError(Exception):
    """An error ``aobctl`` reports in one line; ``exit_code`` is the process exit status it leads to."""

    exit_code = 1
    code = "aobctl_error"

    def __init__(self, message: str, *, code: str | None = None, details: list[Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details or []

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class DaemonUnavailable(CtlError):
    """Nothing answers at the socket or URL (not running, refused, unknown host, connection lost): exit 2."""

    exit_code = 2
    code = "daemon_unavailable"


class UsageError(CtlError):
    """The command line asks for something impossible (a malformed --url): exit 2, like argparse."""

    exit_code = 2
    code = "usage"


class ApiError(CtlError):
    """The daemon answered with an error status; ``code`` and ``message`` are the server's."""

    def __init__(self, status: int, code: str, message: str, details: list[Any] | None = None) -> None:
        super().__init__(message, code=code, details=details)
        self.status = status

    def __str__(self) -> str:
        return f"{self.code}: {self.message} (HTTP {self.status})"

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "status": self.status}


class Target:
    """Where the daemon is: a unix socket path, or a base URL (with an optional Bearer token)."""

    __slots__ = ("netloc", "path_prefix", "scheme", "socket_path", "token", "url")

    def __init__(self, *, socket_path: str | None = None, url: str | None = None, token: str | None = None) -> None:
        if (socket_path is None) == (url is None):
            raise ValueError("a Target is either a socket path or a URL")
        self.socket_path = socket_path
        self.url = url
        self.token = token or None
        self.scheme = "unix"
        self.netloc = "localhost"
        self.path_prefix = ""
        if url is not None:
            parts = urlsplit(url if "://" in url else "http://" + url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise UsageError(f"--url {url!r} is not an http:// or https:// URL")
            self.scheme = parts.scheme
            self.netloc = parts.netloc
            self.path_prefix = parts.path.rstrip("/")

    def describe(self) -> str:
        return f"unix socket {self.socket_path}" if self.socket_path is not None else f"{self.scheme}://{self.netloc}"

    def hint(self) -> str:
        if self.socket_path is not None:
            return "start it with `aobd serve` (or point --socket / AOBD_ADMIN_SOCKET at its socket)"
        return "start it with `aobd serve` on that host (or check --url / AOBCTL_URL)"


def resolve_target(
    *, socket_path: str | None, url: str | None, token: str | None, environ: Mapping[str, str]
) -> Target:
    """Flags beat the environment; a URL (flag or ``AOBCTL_URL``) beats the socket unless ``--socket`` is given."""
    token = token or environ.get("AOBCTL_TOKEN") or None
    if url:
        return Target(url=url, token=token)
    if socket_path:
        return Target(socket_path=socket_path, token=token)
    if environ.get("AOBCTL_URL"):
        return Target(url=environ["AOBCTL_URL"], token=token)
    if environ.get("AOBD_ADMIN_SOCKET"):
        return Target(socket_path=environ["AOBD_ADMIN_SOCKET"], token=token)
    data_dir = environ.get("AOBD_DATA_DIR") or "./.aobd"
    return Target(socket_path=data_dir.rstrip("/") + "/aobd.sock", token=token)


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over ``AF_UNIX``; the daemon trusts the caller after checking its peer credentials."""

    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such socket"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError | http.client.IncompleteRead):
        return "connection closed by the daemon"
    return str(exc) or type(exc).__name__


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _decode_error(status: int, reason: str, raw: bytes) -> ApiError:
    try:
        body = json.loads(raw)
        error = body["error"]
        code, message = str(error.get("code", f"http_{status}")), str(error.get("message", ""))
        return ApiError(status, code, message, error.get("details") or [])
    except (ValueError, TypeError, KeyError, AttributeError):
        text = raw.decode("utf-8", "replace").strip().splitlines()
        return ApiError(status, f"http_{status}", text[0][:200] if text else reason)


class Client:
    """Requests to one daemon; use as a context manager so the connections are closed."""

    def __init__(self, target: Target, *, timeout: float = 30.0) -> None:
        self.target = target
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def connection(self, timeout: float | None = None) -> http.client.HTTPConnection:
        """A new, not yet connected, connection to the target."""
        t = self.target
        timeout = self.timeout if timeout is None else timeout
        if t.socket_path is not None:
            return UnixHTTPConnection(t.socket_path, timeout)
        if t.scheme == "https":
            import ssl

            return http.client.HTTPSConnection(t.netloc, timeout=timeout, context=ssl.create_default_context())
        return http.client.HTTPConnection(t.netloc, timeout=timeout)

    def url(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        params = {k: v for k, v in (query or {}).items() if v is not None}
        return self.target.path_prefix + path + (("?" + urlencode(params)) if params else "")

    def headers(self, accept: str = "application/json") -> dict[str, str]:
        headers = {"Accept": accept, "User-Agent": f"aobctl/{__version__}"}
        if self.target.token:
            headers["Authorization"] = f"Bearer {self.target.token}"
        return headers

    def unavailable(self, exc: BaseException) -> DaemonUnavailable:
        return DaemonUnavailable(f"cannot reach aobd at {self.target.describe()}: {_reason(exc)}; {self.target.hint()}")

    def request(self, method: str, path: str, body: Any = None, *, query: Mapping[str, Any] | None = None) -> Any:
        """Send one request and return the decoded JSON body.

        Raises:
            DaemonUnavailable: the daemon cannot be reached, or it dropped the connection.
            ApiError: the daemon answered 4xx/5xx (its ``error`` body), or a 2xx body that is not JSON.
        """
        data = None if body is None else encode_json(body)
        headers = self.headers()
        if data is not None:
            headers["Content-Type"] = "application/json"
        target = self.url(path, query)
        for attempt in range(2):
            reused = self._conn is not None
            conn = self._conn or self.connection()
            self._conn = None
            try:
                conn.request(method, target, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                # A kept-alive connection the server closed meanwhile fails on first use: one fresh retry, for
                # reads only, since a POST may have reached the daemon before the connection broke.
                retryable = isinstance(exc, ConnectionError | http.client.RemoteDisconnected)
                if reused and attempt == 0 and method == "GET" and retryable:
                    continue
                raise self.unavailable(exc) from None
            if resp.will_close:
                conn.close()
            else:
                self._conn = conn
            if resp.status >= 400:
                raise _decode_error(resp.status, resp.reason, raw)
            if not raw:
                return None
            try:
                return json.loads(raw)
            except ValueError:
                raise ApiError(resp.status, "bad_response", f"{method} {path} answered with non-JSON") from None
        raise AssertionError("unreachable")

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, {} if body is None else body)


def segment(value: str) -> str:
    """One path segment (run id, patch id, ticket, workflow name), percent-encoded."""
    return quote(value, safe="")


class EventFollower:
    """Iterates a run's events live over SSE, each exactly once and in order, until the run ends.

    Reconnects with ``Last-Event-ID`` when the connection drops, goes idle or the server says ``lagged``. When a
    stream ends without a terminal event and the run turns out to be over (a node filter that leaves the run
    events out, a daemon that finished the run while we were away), the rest comes from the JSON event list.

    Attributes:
        status: The run's final status once iteration ended (``completed``, ``failed`` or ``cancelled``).
        reconnects: How many times the stream was reopened.
    """

    def __init__(
        self,
        client: Client,
        run_id: str,
        *,
        node: str | None = None,
        max_failures: int = 10,
        on_reconnect: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.node = node
        self.max_failures = max_failures
        self.on_reconnect = on_reconnect
        self.status: str | None = None
        self.reconnects = 0
        self.last_seq = 0
        self._path = f"/v1/runs/{segment(run_id)}/events"

    def _keep(self, event: Mapping[str, Any]) -> bool:
        seq = event.get("seq")
        if isinstance(seq, int):
            if seq <= self.last_seq:
                return False  # replayed by the server after a resume: already seen
            self.last_seq = seq
        return True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from aobd.api.sse import SseParser

        parser = SseParser()
        failures = 0  # consecutive connections that failed: give up after max_failures
        quiet = 0  # consecutive connections that brought nothing new: back off
        while True:
            conn = self.client.connection()
            seen = self.last_seq
            try:
                why = yield from self._connection(conn, parser)
                if why == "done":
                    return
                failures = 0
            except (OSError, http.client.HTTPException) as exc:
                why = _reason(exc)
                failures += 1
                if failures > self.max_failures:
                    raise self.client.unavailable(exc) from None
            finally:
                conn.close()
                parser.end_of_stream()
            quiet = 0 if self.last_seq > seen else quiet + 1
            if why != "lagged":
                try:
                    summary = self.client.get(f"/v1/runs/{segment(self.run_id)}")
                except DaemonUnavailable:
                    failures += 1
                    if failures > self.max_failures:
                        raise
                    summary = None
                if summary is not None and summary.get("status") in TERMINAL_STATUSES:
                    yield from self._rest()
                    self.status = summary["status"]
                    return
                base_ms = parser.retry if parser.retry is not None else 100
                time.sleep(min(base_ms / 1000 * 2 ** max(quiet - 1, 0), 5.0))
            self.reconnects += 1
            if self.on_reconnect is not None:
                self.on_reconnect(why)

    def _connection(self, conn: http.client.HTTPConnection, parser: Any) -> Generator[dict[str, Any], None, str]:
        """Events of one connection; returns ``done`` after the terminal event, else why the connection ended."""
        from aobd.api.sse import is_event_stream

        headers = self.client.headers(accept="text/event-stream")
        headers["Cache-Control"] = "no-cache"
        if parser.last_event_id:
            headers["Last-Event-ID"] = parser.last_event_id
        conn.request("GET", self.client.url(self._path, {"node": self.node}), headers=headers)
        resp = conn.getresponse()
        if resp.status >= 400:
            raise _decode_error(resp.status, resp.reason, resp.read())
        if conn.sock is not None:
            conn.sock.settimeout(STREAM_IDLE_TIMEOUT_S)
        if not is_event_stream(resp.getheader("Content-Type")):
            # A server (or proxy) that ignored Accept sent the list so far: take it, then carry on as after an EOF.
            events = json.loads(resp.read() or b"[]")
            return (yield from self._deliver(events if isinstance(events, list) else []))
        while chunk := resp.read1(65536):
            for message in parser.feed_bytes(chunk):
                if message.event == "lagged":
                    return "lagged"
                try:
                    event = json.loads(message.data)
                except ValueError:
                    continue
                if (yield from self._deliver([event])) == "done":
                    return "done"
        return "stream ended"

    def _deliver(self, events: list[Any]) -> Generator[dict[str, Any], None, str]:
        for event in events:
            if not isinstance(event, dict) or not self._keep(event):
                continue
            yield event
            if event.get("type") in TERMINAL_EVENTS:
                self.status = _EVENT_STATUS[event["type"]]
                return "done"
        return "stream ended"

    def _rest(self) -> Iterator[dict[str, Any]]:
        """The events after the last one seen, from the JSON list (the run is over, so the list is complete)."""
        for event in self.client.get(self._path, node=self.node) or []:
            if self.node is not None and event.get("node_id") not in (None, self.node):
                continue
            if self._keep(event):
                yield event
