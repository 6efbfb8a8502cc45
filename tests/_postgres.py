"""Real PostgreSQL for tests: the server of scripts/postgres-services, a new database per test.

The URL is METER_TEST_POSTGRES_URL, else the file scripts/postgres-services writes
(``$METER_POSTGRES_DIR/url``, by default ``/tmp/meter-postgres-<uid>/url``). Without a
reachable server the test skips, and under CI=true it fails (conftest.require_service).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from conftest import require_service

__all__ = ["fresh_database", "ledger_location", "server_url", "with_database"]


def server_url() -> str | None:
    url = os.environ.get("METER_TEST_POSTGRES_URL")
    if url:
        return url
    folder = Path(os.environ.get("METER_POSTGRES_DIR", f"/tmp/meter-postgres-{os.getuid()}"))
    try:
        return (folder / "url").read_text().strip() or None
    except OSError:
        return None


def _reachable(url: str | None) -> bool:
    if url is None:
        return False
    try:
        with psycopg.connect(url, connect_timeout=5) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


@contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new, empty database on the test server; dropped afterwards."""
    url = server_url()
    require_service(
        _reachable(url), "PostgreSQL (scripts/postgres-services start, or METER_TEST_POSTGRES_URL)"
    )
    assert url is not None
    name = f"meter_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(url, name)
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where a new, empty accounts ledger lives: a SQLite file, or a fresh PostgreSQL
    database (import this fixture into a test module to run its tests on both)."""
    if request.param == "sqlite":
        yield str(tmp_path / "provider" / "accounts.db")
        return
    with fresh_database() as url:
        yield url


def with_database(url: str, dbname: str) -> str:
    """``url`` (postgresql://...) naming another database on the same server."""
    return urlsplit(url)._replace(path=f"/{dbname}").geturl()
