"""The PostgreSQL harness and the database secrets engine, end to end against real components:
dynamic credentials from OpenBao log in to a throwaway PostgreSQL, and revoking the lease drops the role."""

from __future__ import annotations

import time

import pytest

from devenv.database import configure_database_engine
from tests.conftest import require_postgres
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.openbao


@pytest.fixture
def pg(request, tmp_path) -> PostgresServer:
    require_postgres()
    server = PostgresServer.start(tmp_path)
    request.addfinalizer(server.stop)
    return server


@pytest.fixture
def database_engine(request, bao, pg):
    configure_database_engine(bao.root, pg.host, pg.port, pg.superuser, pg.password, mount="database", role="app")

    def disable() -> None:  # revokes any lease a failed test left, while PostgreSQL is still up
        bao.root.sys.disable_secrets_engine("database")

    request.addfinalizer(disable)  # runs before pg.stop (finalizers run last-in, first-out)
    return "database"


def test_dynamic_credentials_log_in_and_die_with_their_lease(bao, pg, database_engine):
    creds = bao.root.read(f"{database_engine}/creds/app")
    username, password = creds["data"]["username"], creds["data"]["password"]
    assert creds["lease_id"] and creds["lease_duration"] > 0
    assert pg.role_exists(username)
    assert pg.can_login(username, password)
    assert not pg.can_login(username, password + "-wrong")

    bao.root.sys.revoke_lease(creds["lease_id"])

    deadline = time.monotonic() + 10  # revocation is synchronous; allow slack all the same
    while pg.role_exists(username) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pg.role_exists(username)
    assert not pg.can_login(username, password)
