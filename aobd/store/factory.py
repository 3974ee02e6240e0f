"""Open the stores the configuration names: the embedded defaults, or Postgres and S3 for scale-out.

Backends that need a network connection are opened here, once, at start, so a daemon that cannot reach its
database fails at start with the key to fix, not at its first request.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aobd.config import Config
from aobd.errors import ConfigError
from aobd.store.meta import MetaStore
from aobd.store.protocols import Cas, EventLog


@dataclass(slots=True)
class Stores:
    log: EventLog
    cas: Cas
    meta: MetaStore

    async def close(self) -> None:
        await self.meta.close()
        await self.cas.close()
        await self.log.close()


async def open_stores(config: Config) -> Stores:
    data = config.data_path
    data.mkdir(parents=True, exist_ok=True)
    storage = config.storage
    log: EventLog
    meta: MetaStore
    cas: Cas
    if storage.event_log == "postgres":
        if not storage.postgres_dsn:
            raise ConfigError("storage.event_log is 'postgres' but storage.postgres_dsn (AOBD_POSTGRES_DSN) is empty")
        from aobd.store.postgres import PostgresEventLog, PostgresMetaStore, migrate

        if storage.migrate_on_start:
            await migrate(storage.postgres_dsn)
        # In a cluster the events leave through the transactional outbox (relayed to Kafka).
        log = await PostgresEventLog.connect(storage.postgres_dsn, outbox=config.cluster.enabled)
        meta = await PostgresMetaStore.connect(storage.postgres_dsn)
    else:
        from aobd.store.meta import SqliteMetaStore
        from aobd.store.sqlite_log import SqliteEventLog

        log = SqliteEventLog(data / "events.db")
        meta = SqliteMetaStore(data / "meta.db")
    if storage.cas == "s3":
        if not config.s3.bucket:
            raise ConfigError("storage.cas is 's3' but s3.bucket is empty")
        from aobd.store.s3_cas import S3Cas

        cas = S3Cas(
            config.s3.bucket,
            prefix=config.s3.prefix,
            endpoint_url=config.s3.endpoint_url or None,
            region=config.s3.region or None,
            cache_dir=config.s3.cache_dir or Path(data) / "s3-cache",
            cache_bytes=config.s3.cache_bytes,
        )
    else:
        from aobd.store.local_cas import LocalCas

        cas = LocalCas(data / "cas")
    return Stores(log, cas, meta)
