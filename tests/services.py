"""Real services for integration tests: Postgres and Redis run on these machines; tests make their own
databases and clean up. A missing service fails the test under AOBD_REQUIRE_SERVICES=1 (CI) and skips it,
saying which service and why, elsewhere."""

from __future__ import annotations

import os
import socket
from typing import NoReturn

import pytest

POSTGRES_HOST = os.environ.get("AOBD_TEST_POSTGRES_HOST", "127.0.0.1")
POSTGRES_PORT = int(os.environ.get("AOBD_TEST_POSTGRES_PORT", "5432"))
REDIS_URL = os.environ.get("AOBD_TEST_REDIS", "redis://127.0.0.1:6379/0")


def service_missing(service: str, why: str) -> NoReturn:
    message = f"{service} is not available: {why}"
    if os.environ.get("AOBD_REQUIRE_SERVICES") == "1":
        pytest.fail(message + " (AOBD_REQUIRE_SERVICES=1: CI must provide it)", pytrace=False)
    pytest.skip(message)


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def postgres_admin_dsn() -> str:
    """DSN of the machine's Postgres (trust auth, user postgres), or skip/fail naming it."""
    if not port_open(POSTGRES_HOST, POSTGRES_PORT):
        service_missing("Postgres", f"nothing listens on {POSTGRES_HOST}:{POSTGRES_PORT}")
    return f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/postgres"


def redis_url() -> str:
    host_port = REDIS_URL.split("//", 1)[1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not port_open(host, int(port)):
        service_missing("Redis", f"nothing listens on {host_port}")
    return REDIS_URL
