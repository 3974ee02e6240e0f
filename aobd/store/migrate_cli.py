"""``aobd migrate --dsn DSN``: apply the pending Postgres schema migrations and say which.

Kept apart from ``aobd.store.postgres`` so that building the CLI parser imports nothing but argparse; psycopg
is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from aobd.errors import AobdError

#: Environment variable that stands in for ``--dsn``.
DSN_ENV = "AOBD_POSTGRES_DSN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``aobd migrate``, for a parser made by the caller (a subcommand of ``aobd``)."""
    parser.add_argument(
        "--dsn",
        default=None,
        help=f"libpq connection string or postgresql:// URL of the database (env {DSN_ENV})",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``aobd migrate`` with parsed ``args``; the exit status (0 applied or up to date, 1 failed, 2 usage)."""
    dsn = args.dsn or os.environ.get(DSN_ENV)
    if not dsn:
        print(f"aobd migrate: no database given: pass --dsn DSN or set {DSN_ENV}", file=sys.stderr)
        return 2
    try:
        from aobd.store.postgres import MIGRATIONS, SCHEMA_VERSION, describe_dsn, migrate

        applied = asyncio.run(migrate(dsn))
    except ImportError as exc:
        print(f"aobd migrate: {exc}", file=sys.stderr)
        return 1
    except AobdError as exc:
        print(f"aobd migrate: {exc.message}", file=sys.stderr)
        return 1
    where = describe_dsn(dsn)
    if not applied:
        print(f"{where}: schema is up to date (version {SCHEMA_VERSION})")
        return 0
    names = {number: name for number, name, _ in MIGRATIONS}
    for number in applied:
        print(f"{where}: applied migration {number} ({names[number]})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``aobd migrate [--dsn DSN]`` on its own: parse ``argv`` (without the command name) and run."""
    parser = argparse.ArgumentParser(prog="aobd migrate", description="apply pending Postgres schema migrations")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
