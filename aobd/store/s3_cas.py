"""The scale-out CAS: one S3 object per blob under ``<prefix>sha256/ab/<hex>``, with a verified disk read cache.

Why boto3 and not obstore: the S3 CAS must take credentials from the standard AWS chain (environment, shared
``~/.aws/config`` and ``credentials`` files with profiles, SSO, ``credential_process``, web identity, ECS and
EC2 instance metadata). boto3 implements all of it; obstore's native provider covers environment variables and
instance metadata but needs boto3 itself as a credential provider for profiles, SSO and ``credential_process``,
so choosing obstore would mean two SDKs in the extra. boto3 also brings s3transfer, AWS's own multipart upload
(part sizing, checksums that match each botocore release, abort on failure), botocore's retry modes and event
hooks (how the tests count requests), and the best-supported target of moto, the S3 server the tests run
against. What it costs: boto3 blocks, so every SDK call runs in this store's thread pool, about 35 µs of hop
against the 5-50 ms of an S3 request, which obstore's native async would have saved.

Contract (the same as :class:`~aobd.store.local_cas.LocalCas`):

* ``put`` returns only after S3 acknowledged the object; a blob known to exist (stored or seen by this store) or
  found by a HEAD is not uploaded again. Single-request uploads carry the blob's SHA-256, which S3 checks before
  storing; blobs above ``multipart_threshold`` go up in ``part_size`` parts, several at once.
* Every ``get`` hashes what it returns: a blob whose bytes do not hash to its ref (tampered or damaged in the
  bucket) raises :class:`~aobd.errors.IntegrityError`, a missing one :class:`~aobd.errors.NotFound`. The next
  ``put`` of a blob found damaged overwrites its object without a HEAD, so storing it again repairs the bucket.
  Concurrent reads of one blob share one fetch.
* The read cache (``cache_dir``) keeps fetched blobs on local disk up to ``cache_bytes``, least recently used out
  first. A cache hit is verified like an S3 read; a cached file that fails verification is deleted, logged and
  counted (``metrics.cache_corrupt``) and the blob is fetched from S3 again, because S3 is the source of truth
  and a damaged local disk must not fail a run whose data is intact. If S3's copy is bad too, ``get`` raises
  IntegrityError. Give each daemon process its own ``cache_dir``: processes sharing one do not see each other's
  entries in their size accounting (nothing breaks, but the directory can grow to a budget per process).

Credentials are never passed to or stored by this module, only resolved by botocore, and never logged.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import hashlib
import io
import itertools
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog

from aobd.errors import ConfigError, IntegrityError, NotFound, StoreError
from aobd.store.local_cas import INLINE_HASH_MAX, INLINE_READ_MAX
from aobd.store.memory import parse_ref
from aobd.store.protocols import cas_ref

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

#: Blobs above this size go up as multipart uploads (S3's own minimum part size is 5 MiB).
DEFAULT_MULTIPART_THRESHOLD: Final = 8 * 1024 * 1024
DEFAULT_PART_SIZE: Final = 8 * 1024 * 1024
DEFAULT_CACHE_BYTES: Final = 1024 * 1024 * 1024
INSTALL_HINT: Final = "pip install 'aobd[cluster]'"
_PART_CONCURRENCY: Final = 4
# Error codes S3 (and compatible servers) answer for an absent key; HEAD has no body, so only the status.
_MISSING_CODES: Final = frozenset({"404", "NoSuchKey", "NotFound"})
# Temp files of a crashed writer older than this are swept when a cache opens; younger ones may be in flight.
_STALE_TMP_S: Final = 3600.0
_O_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)
_tmp_counter = itertools.count()

log = structlog.get_logger("aobd.store.s3")


@dataclass
class S3CasMetrics:
    """What an :class:`S3Cas` did since it opened (counters; read them, don't write them)."""

    #: Objects uploaded (each ``put`` that found the blob neither known nor in the bucket).
    uploads: int = 0
    #: Of ``uploads``, those sent as multipart uploads.
    multipart_uploads: int = 0
    #: Puts that sent nothing: the blob was known to exist or a HEAD found it.
    skipped_uploads: int = 0
    #: Blobs read from S3 (cache misses and reads without a cache).
    fetches: int = 0
    cache_hits: int = 0
    #: Cached files that failed verification (deleted and fetched again).
    cache_corrupt: int = 0


class _Counters:
    """Increments :class:`S3CasMetrics` from the loop and the I/O threads without losing any."""

    def __init__(self, metrics: S3CasMetrics) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self.metrics, name, getattr(self.metrics, name) + n)


class S3Cas:
    """:class:`~aobd.store.protocols.Cas` in an S3 bucket (or any S3-compatible server).

    Args:
        bucket: the bucket; it must exist (aobd never creates buckets).
        prefix: the key prefix of every blob (``cas/`` puts blob ``sha256:abcd..`` at ``cas/sha256/ab/abcd..``).
        endpoint_url: an S3-compatible server (MinIO, Ceph, moto); its keys are addressed path-style.
        region: the bucket's region; ``None`` takes it from the AWS configuration chain.
        cache_dir: where the local read cache lives; ``None`` reads every blob from S3.
        cache_bytes: the most the read cache holds; blobs larger than this are never cached.
        multipart_threshold: blobs larger than this are uploaded in parts.
        part_size: the size of each part of a multipart upload.
        max_workers: SDK calls in flight at once (``put_many`` uploads that many blobs concurrently).
        known_limit: most refs remembered as present; the memory is dropped, not evicted, when it fills.
        client: an S3 client to use instead of one built from ``endpoint_url`` and ``region`` (boto3 clients
            are thread-safe); the caller keeps it and closes it.

    Raises:
        ConfigError: boto3 is not installed.
        StoreError: ``cache_dir`` cannot be created.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "cas/",
        endpoint_url: str | None = None,
        region: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        part_size: int = DEFAULT_PART_SIZE,
        max_workers: int = 16,
        known_limit: int = 1 << 20,
        client: S3Client | None = None,
    ) -> None:
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError as exc:
            raise ConfigError(f"the S3 CAS needs boto3, which is not installed: {INSTALL_HINT}") from exc
        if part_size < 5 * 1024 * 1024:
            raise ConfigError(f"S3 CAS part_size is {part_size} bytes; S3 needs parts of at least 5 MiB")
        self.bucket = bucket
        prefix = prefix.lstrip("/")
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.endpoint_url = endpoint_url
        #: Counters of what this store did (uploads, fetches, cache hits...).
        self.metrics = S3CasMetrics()
        self._metrics = _Counters(self.metrics)
        self._multipart_threshold = multipart_threshold
        # s3transfer runs the parts of one blob on threads of its own, _PART_CONCURRENCY at a time, so at most
        # max_workers * _PART_CONCURRENCY requests are in flight: the connection pool is sized to that, or
        # urllib3 would open and throw away connections past it.
        self._transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=part_size, max_concurrency=_PART_CONCURRENCY
        )
        self._owns_client = client is None
        if client is None:
            config = Config(
                max_pool_connections=max_workers * _PART_CONCURRENCY,
                retries={"mode": "standard", "max_attempts": 5},
                connect_timeout=10,
                read_timeout=60,
                user_agent_extra="aobd",
                s3={"addressing_style": "path"} if endpoint_url else {},
            )
            # A session of its own: boto3's default session is a global shared with whatever else imports boto3.
            session = boto3.session.Session(region_name=region)
            client = session.client("s3", endpoint_url=endpoint_url, config=config)
        #: The S3 client; register botocore event hooks on ``client.meta.events`` to observe requests.
        self.client: S3Client = client
        self._cache = _ReadCache(Path(cache_dir), cache_bytes, self._metrics) if cache_dir is not None else None
        self._known: set[str] = set()
        self._known_limit = known_limit
        self._fetching: dict[str, asyncio.Future[bytes]] = {}
        # Refs whose object failed verification: the next put of the blob overwrites the object instead of
        # trusting a HEAD, so storing the output again (a retried node) repairs the bucket.
        self._damaged: set[str] = set()
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="aobd-s3")

    def __repr__(self) -> str:
        where = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Cas({self.bucket!r}, prefix={self.prefix!r}{where})"

    async def __aenter__(self) -> S3Cas:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def key_of(self, ref: str) -> str:
        """The object key of blob ``ref``.

        Raises:
            NotFound: ``ref`` is not a CAS ref.
        """
        return self._key(parse_ref(ref))

    def _key(self, digest: str) -> str:
        return f"{self.prefix}sha256/{digest[:2]}/{digest}"

    # -- writing ---------------------------------------------------------------------------------------------

    async def put(self, data: bytes) -> str:
        self._check_open()
        ref = await self._ref_of(data)
        if ref in self._known:
            self._metrics.add("skipped_uploads")
            return ref
        await asyncio.get_running_loop().run_in_executor(self._pool, self._put_sync, ref, data)
        self._remember(ref)
        return ref

    async def put_many(self, blobs: Sequence[bytes]) -> list[str]:
        """Store ``blobs``, up to ``max_workers`` uploads at once; each distinct blob is checked and sent once."""
        self._check_open()
        refs = [await self._ref_of(data) for data in blobs]
        todo = [(ref, data) for ref, data in dict(zip(refs, blobs)).items() if ref not in self._known]
        self._metrics.add("skipped_uploads", len(refs) - len(todo))
        if not todo:
            return refs
        loop = asyncio.get_running_loop()

        async def one(ref: str, data: bytes) -> None:
            # The pool's size is the bound on uploads in flight; queued jobs wait for a free thread.
            await loop.run_in_executor(self._pool, self._put_sync, ref, data)
            self._remember(ref)

        await asyncio.gather(*(one(ref, data) for ref, data in todo))
        return refs

    def _put_sync(self, ref: str, data: bytes) -> None:
        key = self.key_of(ref)
        if ref not in self._damaged and self._head_sync(ref, key):
            self._metrics.add("skipped_uploads")
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            if len(data) > self._multipart_threshold:
                # s3transfer splits, uploads parts concurrently, and aborts the upload if a part fails, so no
                # orphaned parts are left billing in the bucket.
                self.client.upload_fileobj(io.BytesIO(data), self.bucket, key, Config=self._transfer_config)
                self._metrics.add("multipart_uploads")
            else:
                # S3 recomputes this checksum and refuses the object if the bytes it received differ.
                checksum = base64.b64encode(bytes.fromhex(ref[7:])).decode("ascii")
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ChecksumSHA256=checksum)
        except (BotoCoreError, ClientError) as exc:
            raise StoreError(f"cannot store blob {ref} at s3://{self.bucket}/{key}: {_describe(exc)}") from exc
        self._damaged.discard(ref)
        self._metrics.add("uploads")

    async def _ref_of(self, data: bytes) -> str:
        if len(data) <= INLINE_HASH_MAX:
            return cas_ref(data)
        return await asyncio.get_running_loop().run_in_executor(self._pool, cas_ref, data)

    def _remember(self, ref: str) -> None:
        if len(self._known) >= self._known_limit:
            self._known.clear()
        self._known.add(ref)

    # -- reading ---------------------------------------------------------------------------------------------

    async def get(self, ref: str) -> bytes:
        self._check_open()
        digest = parse_ref(ref)
        loop = asyncio.get_running_loop()
        cache = self._cache
        if cache is not None:
            size = cache.size_of(digest)
            if size is not None:
                # Small hits are read and verified inline: cheaper than the thread hop (see local_cas).
                if size <= INLINE_READ_MAX:
                    data = cache.read(digest)
                else:
                    data = await loop.run_in_executor(self._pool, cache.read, digest)
                if data is not None:
                    return data
        # Readers of a blob being fetched wait for that fetch (a map node's branches reading one input).
        fetch = self._fetching.get(ref)
        if fetch is None:
            fetch = self._fetching[ref] = loop.run_in_executor(self._pool, self._fetch_sync, ref, digest)
            fetch.add_done_callback(functools.partial(self._fetched, ref))
        # Shielded: a reader cancelled while waiting must not cancel the fetch the others wait for.
        return await asyncio.shield(fetch)

    def _fetched(self, ref: str, fetch: asyncio.Future[bytes]) -> None:
        self._fetching.pop(ref, None)
        if not fetch.cancelled():
            fetch.exception()  # retrieved, so a fetch whose readers were all cancelled logs no "never retrieved"

    def _fetch_sync(self, ref: str, digest: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        key = self._key(digest)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            with contextlib.closing(response["Body"]) as body:
                data = body.read()
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                self._known.discard(ref)
                raise NotFound(f"blob {ref} is not in the CAS (no object s3://{self.bucket}/{key})") from None
            raise StoreError(f"cannot read blob {ref} from s3://{self.bucket}/{key}: {_describe(exc)}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"cannot read blob {ref} from s3://{self.bucket}/{key}: {_describe(exc)}") from exc
        self._metrics.add("fetches")
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            self._known.discard(ref)
            self._damaged.add(ref)
            raise IntegrityError(
                f"blob {ref} is corrupt: s3://{self.bucket}/{key} holds {len(data)} bytes that hash to sha256:{actual}",
                details=[{"ref": ref, "bucket": self.bucket, "key": key, "actual": "sha256:" + actual}],
            )
        self._remember(ref)
        if self._cache is not None:
            self._cache.store(digest, data)
        return data

    async def has(self, ref: str) -> bool:
        self._check_open()
        if ref in self._known:
            return True
        try:
            digest = parse_ref(ref)
        except NotFound:
            return False
        if self._cache is not None and self._cache.size_of(digest) is not None:
            return True
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._head_sync, ref, self.key_of(ref))

    def _head_sync(self, ref: str, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                return False
            raise StoreError(f"cannot look up blob {ref} at s3://{self.bucket}/{key}: {_describe(exc)}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"cannot look up blob {ref} at s3://{self.bucket}/{key}: {_describe(exc)}") from exc
        self._remember(ref)
        return True

    async def close(self) -> None:
        """Wait for requests in flight, stop the threads and close the client's connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        if self._owns_client:
            self.client.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"CAS s3://{self.bucket}/{self.prefix} is closed")


class _ReadCache:
    """Verified blobs on local disk, ``root/ab/<hex>``, least recently used evicted past ``max_bytes``.

    Files are written to a temp name and renamed, never fsynced: a torn or lost file after a crash is just a
    miss or a failed verification, both of which fall back to S3. The index (digest -> size, in LRU order) is
    rebuilt from the directory on open, oldest modification first.
    """

    def __init__(self, root: Path, max_bytes: int, metrics: _Counters) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._metrics = metrics
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._total = 0
        try:
            root.mkdir(parents=True, exist_ok=True)
            self._load()
        except OSError as exc:
            raise StoreError(f"cannot open the S3 CAS read cache at {root}: {exc}") from exc

    def _load(self) -> None:
        found: list[tuple[float, str, int]] = []
        stale_before = time.time() - _STALE_TMP_S
        for sub in self.root.iterdir():
            if len(sub.name) != 2 or not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                try:
                    st = entry.stat()
                except FileNotFoundError:  # evicted or renamed by another process just now
                    continue
                if entry.name.startswith(".tmp-"):
                    if st.st_mtime < stale_before:
                        _unlink_quietly(entry.path)
                elif len(entry.name) == 64 and entry.name.startswith(sub.name):
                    found.append((st.st_mtime, entry.name, st.st_size))
        for _, digest, size in sorted(found):
            self._entries[digest] = size
            self._total += size
        self._evict()

    def path_of(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def size_of(self, digest: str) -> int | None:
        return self._entries.get(digest)

    def read(self, digest: str) -> bytes | None:
        """The verified cached blob, or ``None`` (not cached, gone, or failed verification and dropped)."""
        path = self.path_of(digest)
        try:
            with open(path, "rb", buffering=0) as f:
                data = f.read()
        except FileNotFoundError:  # evicted by another process sharing the directory
            self._forget(digest)
            return None
        except OSError as exc:
            log.warning("s3_cas_cache_unreadable", path=str(path), error=str(exc))
            self._forget(digest)
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            self._metrics.add("cache_corrupt")
            log.warning("s3_cas_cache_corrupt", ref="sha256:" + digest, path=str(path), size=len(data))
            self._forget(digest)
            _unlink_quietly(path)
            return None
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)
        self._metrics.add("cache_hits")
        return data

    def store(self, digest: str, data: bytes) -> None:
        """Cache a verified blob; best effort (a full or read-only disk only costs future hits)."""
        if len(data) > self.max_bytes:
            return
        path = self.path_of(digest)
        tmp = path.parent / f".tmp-{digest[:16]}-{os.getpid()}-{next(_tmp_counter)}"
        try:
            path.parent.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            _unlink_quietly(tmp)
            log.warning("s3_cas_cache_write_failed", path=str(path), error=str(exc))
            return
        with self._lock:
            self._total += len(data) - self._entries.get(digest, 0)
            self._entries[digest] = len(data)
            self._entries.move_to_end(digest)
            evicted = self._evict_locked()
        for old in evicted:
            _unlink_quietly(self.path_of(old))

    def _forget(self, digest: str) -> None:
        with self._lock:
            self._total -= self._entries.pop(digest, 0)

    def _evict(self) -> None:
        with self._lock:
            evicted = self._evict_locked()
        for old in evicted:
            _unlink_quietly(self.path_of(old))

    def _evict_locked(self) -> list[str]:
        evicted = []
        while self._total > self.max_bytes and self._entries:
            digest, size = self._entries.popitem(last=False)
            self._total -= size
            evicted.append(digest)
        return evicted


def _error_code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _describe(exc: Exception) -> str:
    # botocore's messages name the operation and the service's error code, never credentials.
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return f"{exc} (set AWS credentials in the environment, ~/.aws, or an instance role)"
    if isinstance(exc, ClientError) and _error_code(exc) == "NoSuchBucket":
        return f"{exc} (aobd does not create buckets: create it first)"
    return str(exc)


def _unlink_quietly(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
