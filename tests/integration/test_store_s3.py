"""The S3 CAS against a real S3 HTTP endpoint: moto's server on a loopback port, started once for this module.

Every ``test_cas_*`` contract test of ``tests/unit/test_store_contract.py`` runs again here, over S3Cas without
and with its read cache (the ``cas_backend`` fixture below replaces the contract module's). The tests after them
cover what only S3 has: key layout, HEAD-before-upload, multipart, the read cache, and where the SDK calls run.
Requests are counted with a botocore event hook on the store's own client.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aobd.errors import ConfigError, IntegrityError, NotFound, StoreError
from aobd.store.protocols import Cas, cas_ref
from aobd.store.s3_cas import S3Cas
from tests.services import service_missing
from tests.unit import test_store_contract as contract

try:
    import boto3
    from moto.server import ThreadedMotoServer
except ImportError as exc:  # skipped here, failed in CI (AOBD_REQUIRE_SERVICES=1), by the endpoint fixture
    MISSING: str | None = f"{exc.name} is not installed: pip install 'aobd[cluster,dev]'"
else:
    MISSING = None

# No warning filters: with moto 5.2, boto3 1.44 and Python 3.11 nothing warns. If a release starts to, filter
# that one warning from that package here (e.g. "ignore::DeprecationWarning:botocore.*"), never all of them.
pytestmark = pytest.mark.integration

# Every contract test of the CAS, so a new one there runs over S3 without touching this file.
globals().update({name: test for name, test in vars(contract).items() if name.startswith("test_cas_")})

BUCKET = "aobd-test-cas"
# The server accepts any credentials; these keep the SDK from looking for real ones (files, instance metadata).
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    if MISSING is not None:
        service_missing("the moto S3 server", MISSING)
    with pytest.MonkeyPatch.context() as env:
        for name, value in AWS_ENV.items():
            env.setenv(name, value)
        env.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            url = f"http://{host}:{port}"
            admin = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
            admin.create_bucket(Bucket=BUCKET)
            admin.close()
            yield url
        finally:
            server.stop()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests sharing the bucket never see each other's blobs."""
    return f"t-{uuid.uuid4().hex[:12]}/cas/"


@pytest.fixture(params=["s3", "s3-cached"])
def cas_backend(
    request: pytest.FixtureRequest, endpoint: str, prefix: str, tmp_path: Path
) -> tuple[Callable[[], Cas], Callable[[Any, str], None]]:
    """S3Cas (without, then with a read cache) and a corruptor that overwrites the blob's object in the bucket."""
    cache_dir = tmp_path / "cache" if request.param == "s3-cached" else None

    def corrupt_object(cas: Any, ref: str) -> None:
        cas.client.put_object(Bucket=BUCKET, Key=cas.key_of(ref), Body=b"bit rot")

    return (lambda: S3Cas(BUCKET, prefix=prefix, endpoint_url=endpoint, cache_dir=cache_dir)), corrupt_object


class Requests:
    """S3 operations a client sent, with the thread each ran on (a botocore ``before-call`` hook)."""

    def __init__(self, client: Any, delay_s: float = 0.0) -> None:
        self.calls: list[tuple[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._delay_s = delay_s
        self._lock = threading.Lock()
        client.meta.events.register("before-call.s3", self._before)
        client.meta.events.register("after-call.s3", self._after)

    def _before(self, model: Any, **_: Any) -> None:
        with self._lock:
            self.calls.append((model.name, threading.current_thread().name))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self._delay_s:
            time.sleep(self._delay_s)  # holds the call open so concurrent ones overlap measurably

    def _after(self, **_: Any) -> None:
        with self._lock:
            self.in_flight -= 1

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def count(self, name: str) -> int:
        return self.names().count(name)

    def clear(self) -> None:
        self.calls.clear()


def run(make: Callable[[], S3Cas], body: Callable[[S3Cas], Any]) -> None:
    contract.run(make, body)


def test_s3_key_layout_and_existing_blobs_are_not_uploaded_again(endpoint: str, prefix: str) -> None:
    def make() -> S3Cas:
        return S3Cas(BUCKET, prefix=prefix, endpoint_url=endpoint)

    async def first(cas: S3Cas) -> None:
        ref = await cas.put(b"hello")
        digest = ref.removeprefix("sha256:")
        assert cas.key_of(ref) == f"{prefix}sha256/{digest[:2]}/{digest}"
        stored = cas.client.get_object(Bucket=BUCKET, Key=cas.key_of(ref))["Body"].read()
        assert stored == b"hello"
        calls = Requests(cas.client)
        assert await cas.put(b"hello") == ref  # known to this store: no request at all
        assert await cas.put_many([b"hello", b"hello"]) == [ref, ref]
        assert calls.names() == []

    async def second(cas: S3Cas) -> None:
        # A fresh store (another daemon, or this one restarted) finds the blob with a HEAD and sends nothing.
        calls = Requests(cas.client)
        assert await cas.put(b"hello") == cas_ref(b"hello")
        assert calls.names() == ["HeadObject"]
        calls.clear()
        refs = await cas.put_many([b"hello", b"new one", b"new one"])
        assert refs == [cas_ref(b"hello"), cas_ref(b"new one"), cas_ref(b"new one")]
        assert sorted(calls.names()) == ["HeadObject", "PutObject"]  # "hello" is known now; "new one" once
        assert (cas.metrics.uploads, cas.metrics.skipped_uploads) == (1, 3)

    run(make, first)
    run(make, second)


def test_s3_prefix_is_normalized(endpoint: str) -> None:
    async def nested(cas: S3Cas) -> None:
        assert cas.prefix == "team/blobs/"
        assert cas.key_of(cas_ref(b"")).startswith("team/blobs/sha256/e3/e3b0c442")

    async def bucket_root(cas: S3Cas) -> None:
        assert cas.key_of(cas_ref(b"")).startswith("sha256/e3/e3b0c442")

    run(lambda: S3Cas(BUCKET, prefix="/team/blobs", endpoint_url=endpoint), nested)
    run(lambda: S3Cas(BUCKET, prefix="", endpoint_url=endpoint), bucket_root)


def test_s3_blob_past_the_threshold_goes_up_in_parts(endpoint: str, prefix: str) -> None:
    big = os.urandom(20 * 1024 * 1024)

    async def body(cas: S3Cas) -> None:
        calls = Requests(cas.client)
        ref = await cas.put(big)
        assert ref == cas_ref(big)
        names = calls.names()
        assert names[0] == "HeadObject" and "PutObject" not in names
        assert names.count("CreateMultipartUpload") == 1 and names.count("CompleteMultipartUpload") == 1
        assert names.count("UploadPart") == 3  # 8 + 8 + 4 MiB
        assert cas.metrics.multipart_uploads == 1
        assert await cas.get(ref) == big
        assert calls.names()[-1] == "GetObject"
        assert all(thread != threading.main_thread().name for _, thread in calls.calls)  # never on the loop
        head = cas.client.head_object(Bucket=BUCKET, Key=cas.key_of(ref), PartNumber=1)
        assert head["PartsCount"] == 3

    run(lambda: S3Cas(BUCKET, prefix=prefix, endpoint_url=endpoint), body)


def test_s3_put_many_uploads_concurrently_within_the_bound(endpoint: str, prefix: str) -> None:
    blobs = [f"blob {i}".encode() for i in range(40)]

    async def body(cas: S3Cas) -> None:
        calls = Requests(cas.client, delay_s=0.02)
        assert await cas.put_many(blobs) == [cas_ref(blob) for blob in blobs]
        assert calls.count("PutObject") == 40 and calls.count("HeadObject") == 40
        assert 1 < calls.max_in_flight <= 8
        assert all(thread.startswith("aobd-s3") for _, thread in calls.calls)

    run(lambda: S3Cas(BUCKET, prefix=prefix, endpoint_url=endpoint, max_workers=8), body)


def test_s3_read_cache_serves_repeated_reads_without_s3(endpoint: str, prefix: str, tmp_path: Path) -> None:
    small, large = b"small blob", os.urandom(100_000)  # inline and threaded cache reads
    cache_dir = tmp_path / "cache"

    def make() -> S3Cas:
        return S3Cas(BUCKET, prefix=prefix, endpoint_url=endpoint, cache_dir=cache_dir)

    async def first(cas: S3Cas) -> None:
        refs = await cas.put_many([small, large])
        calls = Requests(cas.client)
        for _ in range(3):
            assert await cas.get(refs[0]) == small
            assert await cas.get(refs[1]) == large
        assert calls.count("GetObject") == 2
        assert (cas.metrics.fetches, cas.metrics.cache_hits) == (2, 4)

    async def restarted(cas: S3Cas) -> None:
        # The cache survives a restart: its index is rebuilt from the directory.
        calls = Requests(cas.client)
        assert await cas.get(cas_ref(large)) == large
        assert await cas.has(cas_ref(small))
        assert calls.names() == []

    run(make, first)
    run(make, restarted)


def test_s3_poisoned_cache_entry_is_dropped_and_fetched_again(endpoint: str, prefix: str, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    blob = b"precious output"

    async def body(cas: S3Cas) -> None:
        ref = await cas.put(blob)
        assert await cas.get(ref) == blob
        digest = ref.removeprefix("sha256:")
        cached = cache_dir / digest[:2] / digest
        assert cached.read_bytes() == blob
        cached.write_bytes(b"poisoned")
        calls = Requests(cas.client)
        assert await cas.get(ref) == blob  # S3 is the source of truth
        assert calls.names() == ["GetObject"]
        assert cas.metrics.cache_corrupt == 1
        assert cached.read_bytes() == blob  # refilled from the verified fetch

        # Both copies bad: the read fails, naming the blob.
        cached.write_bytes(b"poisoned")
        cas.client.put_object(Bucket=BUCKET, Key=cas.key_of(ref), Body=b"bit rot")
        with pytest.raises(IntegrityError, match=ref):
            await cas.get(ref)
        assert cas.metrics.cache_corrupt == 2
        assert not cached.exists()  # a bad copy is never cached

    run(lambda: S3Cas(BUCKET, prefix=prefix, endpoint_url=endpoint, cache_dir=cache_dir), body)


def test_s3_read_cache_evicts_least_recently_used_past_its_size(endpoint: str, prefix: str, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    a, b, c, d = (bytes([i]) * 1000 for i in range(4))

    def cached(blob: bytes) -> bool:
        digest = cas_ref(blob).removeprefix("sha256:")
        return (cache_dir / digest[:2] / digest).exists()

    async def body(cas: S3Cas) -> None:
        refs = await cas.put_many([a, b, c, d, os.urandom(5000)])
        for ref in refs[:3]:
            await cas.get(ref)
        await cas.get(refs[0])  # a is now the most recently used
        await cas.get(refs[3])  # 4000 bytes > 3500: the least recently used, b, goes
        assert [cached(blob) for blob in (a, b, c, d)] == [True, False, True, True]
        await cas.get(refs[4])  # larger than the whole cache: read, never cached
        assert len([p for p in cache_dir.rglob("*") if p.is_file()]) == 3

    run(lambda: S3Cas(BUCKET, prefix=prefix, endpoint_url=endpoint, cache_dir=cache_dir, cache_bytes=3500), body)


def test_s3_damaged_object_is_repaired_by_storing_the_blob_again(endpoint: str, prefix: str) -> None:
    async def body(cas: S3Cas) -> None:
        ref = await cas.put(b"node output")
        cas.client.put_object(Bucket=BUCKET, Key=cas.key_of(ref), Body=b"bit rot")
        with pytest.raises(IntegrityError):
            await cas.get(ref)
        calls = Requests(cas.client)
        assert await cas.put(b"node output") == ref  # a retried node stores its output again
        assert calls.names() == ["PutObject"]  # no HEAD: the object is known to be bad
        assert await cas.get(ref) == b"node output"
        assert await cas.put(b"node output") == ref
        assert calls.names() == ["PutObject", "GetObject"]  # repaired and known again

    run(lambda: S3Cas(BUCKET, prefix=prefix, endpoint_url=endpoint), body)


def test_s3_deleted_object_is_not_found(endpoint: str, prefix: str) -> None:
    async def body(cas: S3Cas) -> None:
        ref = await cas.put(b"short-lived")
        cas.client.delete_object(Bucket=BUCKET, Key=cas.key_of(ref))
        with pytest.raises(NotFound, match=ref):
            await cas.get(ref)
        assert not await cas.has(ref)  # the failed read made the store forget it

    run(lambda: S3Cas(BUCKET, prefix=prefix, endpoint_url=endpoint), body)


def test_s3_missing_bucket_is_a_store_error_that_says_so(endpoint: str) -> None:
    async def body(cas: S3Cas) -> None:
        with pytest.raises(StoreError, match="does not create buckets"):
            await cas.put(b"x")
        with pytest.raises(StoreError, match="no-such-bucket"):
            await cas.get(cas_ref(b"x"))

    run(lambda: S3Cas("no-such-bucket", endpoint_url=endpoint), body)


def test_s3_part_size_below_the_s3_minimum_is_refused(endpoint: str) -> None:
    with pytest.raises(ConfigError, match="at least 5 MiB"):
        S3Cas(BUCKET, endpoint_url=endpoint, part_size=1024 * 1024)


def test_s3_concurrent_gets_of_one_blob_share_one_fetch(endpoint: str, prefix: str, tmp_path: Path) -> None:
    blob, other = os.urandom(50_000), b"other blob"

    async def body(cas: S3Cas) -> None:
        ref, other_ref = await cas.put_many([blob, other])
        calls = Requests(cas.client, delay_s=0.05)
        readers = [asyncio.ensure_future(cas.get(ref)) for _ in range(20)]
        await asyncio.sleep(0.01)
        readers[0].cancel()  # one impatient reader does not cancel the fetch the others wait for
        results = await asyncio.gather(*readers[1:], cas.get(other_ref))
        assert results == [blob] * 19 + [other]
        assert calls.count("GetObject") == 2
        assert await cas.get(ref) == blob  # from the cache now
        assert calls.count("GetObject") == 2
        missing = cas_ref(b"never stored")
        failures = await asyncio.gather(*(cas.get(missing) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(failure, NotFound) for failure in failures)
        assert calls.count("GetObject") == 3

    run(lambda: S3Cas(BUCKET, prefix=prefix, endpoint_url=endpoint, cache_dir=tmp_path / "cache"), body)
