"""The shared services of a cluster, for tests and benchmarks: a fresh Postgres database, moto's S3 server
with a bucket, Redis, and (optionally) a Kafka-protocol broker. Everything is torn down on exit."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from tests.integration.daemon import free_port
from tests.services import postgres_admin_dsn, redis_url, service_missing

BUCKET = "aobd-cas"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}


@contextmanager
def shared_services(*, kafka: bool, broker_storage: str = "s3") -> Iterator[dict[str, Any]]:
    try:
        import boto3
        import psycopg
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        service_missing("the cluster extras (psycopg, boto3, moto)", str(exc))
    with ExitStack() as stack:
        admin = postgres_admin_dsn()
        database = f"aobd_cluster_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')

        def drop() -> None:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

        stack.callback(drop)
        port = free_port()
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        moto.start()
        stack.callback(moto.stop)
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
        )
        s3.create_bucket(Bucket=BUCKET)
        services: dict[str, Any] = {
            "dsn": admin.rsplit("/", 1)[0] + f"/{database}",
            "endpoint": endpoint,
            "redis": redis_url(),
            "broker": None,
        }
        if kafka:
            from tests.kafka_broker import start_broker

            broker = start_broker(storage=broker_storage)
            stack.callback(broker.close)
            services["broker"] = broker
        yield services


def cluster_config(
    services: dict[str, Any], path: Path, *, daemon_id: str = "", kafka_prefix: str = "", execution: str = "bus"
) -> Path:
    """A daemon config on these services; with ``daemon_id``, cluster mode on the broker, node attempts executed
    as ``execution`` says ("bus": by any daemon's runner, "local": by the run's owner)."""
    text = (
        "[storage]\n"
        f'event_log = "postgres"\ncas = "s3"\nmigrate_on_start = true\npostgres_dsn = "{services["dsn"]}"\n'
        f'[s3]\nbucket = "{BUCKET}"\nendpoint_url = "{services["endpoint"]}"\nregion = "us-east-1"\n'
        f'[redis]\nurl = "{services["redis"]}"\n'
        "[limits]\nrun_starts_per_s = 0\n"
        '[security]\nhandler_modules = ["perf.w6_handlers"]\n'
    )
    if daemon_id:
        broker = services["broker"]
        prefix = kafka_prefix or "aobd"
        topics = {
            "results_topic": "results",
            "events_topic": "events",
            "jobs_high_topic": "jobs.high",
            "jobs_medium_topic": "jobs.medium",
            "jobs_low_topic": "jobs.low",
            "agent_jobs_topic": "agent.jobs",
            "agent_results_topic": "agent.results",
        }
        consumer = "\n".join(f'"{k}" = {json.dumps(v)}' for k, v in broker.consumer_settings.items())
        text += (
            f'[cluster]\nenabled = true\ndaemon_id = "{daemon_id}"\nexecution = "{execution}"\n'
            f'[kafka]\nbootstrap = "{broker.bootstrap}"\npartitions = 6\ngroup_id = "{prefix}"\n'
            + "".join(f'{key} = "{prefix}.{name}"\n' for key, name in topics.items())
            + f"[kafka.consumer]\n{consumer}\n"
        )
    path.write_text(text)
    return path
