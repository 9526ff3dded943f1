"""Reliability: a damaged, newer or older state database. The plugin must refuse to start with a message
that says what is wrong and what to do, and leave the database as it was, rather than start afresh and
forget volumes (dockerd drops its record of a volume whose Get fails). Schema changes carry a migration.

`serve` runs as a real process here; nothing needs Vault (the database is opened before Vault is asked).
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

import plugin.host.store
from plugin.core.errors import StateError
from plugin.core.records import IdentityRecord, MountRecord
from plugin.host.seal import Sealer
from plugin.host.store import SCHEMA_VERSION, Store
from tests.support.plugin import plugin_command

PAGE = 4096
VOLUMES = 120  # enough rows for the volumes table to span several pages


def populated_state(state: Path) -> Path:
    """A state directory as a plugin leaves it: volumes, a mount with its sealed token, an identity."""
    state.mkdir(mode=0o700)
    store = Store(state / "state.db", Sealer.load_or_create(state / "seal.key"))
    for i in range(VOLUMES):
        store.add_volume(
            f"vol{i:03}", {"role": "web", "secret.db_password": "secret/data/web/db#password", "uid": f"{1000 + i}"}
        )
    store.add_mount(MountRecord("vol000", "c1", 1, "/m/vol000/c1/view", "s.mount-token", "acc-mount", 1.0))
    store.save_identity(IdentityRecord("s.identity-token", "acc-identity", 1.0))
    store.close()  # the last connection checkpoints the WAL into state.db
    assert not (state / "state.db-wal").exists()
    return state / "state.db"


def serve(state: Path, tmp: Path, within: float = 15) -> tuple[subprocess.CompletedProcess, float]:
    """Run `serve` on `state`; a plugin still running after `within` seconds (it did not refuse) is ended by
    PID and reported with return code None."""
    started = time.monotonic()
    process = subprocess.Popen(
        [
            plugin_command(),
            "serve",
            "--state-dir",
            str(state),
            "--socket",
            str(tmp / "p.sock"),
            "--vault-addr",
            "http://127.0.0.1:9",
            "--log-format",
            "text",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        stdout, stderr = process.communicate(timeout=within)
        returncode = process.returncode
    except subprocess.TimeoutExpired:
        process.terminate()
        stdout, stderr = process.communicate(timeout=30)
        returncode = None
    return subprocess.CompletedProcess(process.args, returncode, stdout, stderr), time.monotonic() - started


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def damage_a_middle_page(data: bytes) -> bytes:
    # A page of the volumes table, past the header page: SQLite opens the file and reads its version
    # without noticing; only a read of that page (a List, a Get) would fail.
    return data[: 2 * PAGE] + random.Random(7).randbytes(PAGE) + data[3 * PAGE :]


DAMAGE = {
    "garbage-in-a-middle-page": damage_a_middle_page,
    "truncated-to-half": lambda data: data[: len(data) // 2],
    "header-overwritten": lambda data: random.Random(8).randbytes(100) + data[100:],
    "zeroed-past-the-header": lambda data: data[:PAGE] + bytes(len(data) - PAGE),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_database_stops_the_start_with_a_clear_message_and_is_left_as_it_was(tmp_path, damage):
    database = populated_state(tmp_path / "state")
    database.write_bytes(damage(database.read_bytes()))
    before = digest(database)

    result, seconds = serve(tmp_path / "state", tmp_path)

    assert result.returncode not in (0, None)
    assert "state database" in result.stderr and "is damaged" in result.stderr
    assert "restore it from backup or move it aside" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "p.sock").exists(), "dockerd must not find a socket of a plugin that cannot serve"
    assert digest(database) == before, "a refused start must not touch the database"
    assert seconds < 10


def test_a_newer_schema_stops_the_start_and_is_left_as_it_was(tmp_path):
    database = populated_state(tmp_path / "state")
    with sqlite3.connect(database) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = digest(database)

    result, _ = serve(tmp_path / "state", tmp_path)

    assert result.returncode not in (0, None)
    assert f"has schema version {SCHEMA_VERSION + 1}, newer than this plugin's {SCHEMA_VERSION}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "p.sock").exists()
    assert digest(database) == before


def test_an_emptied_database_beside_its_seal_key_is_refused(tmp_path):
    database = populated_state(tmp_path / "state")
    database.write_bytes(b"")

    result, _ = serve(tmp_path / "state", tmp_path, within=5)

    assert result.returncode not in (0, None) and "state database" in result.stderr


# -- migrations ---------------------------------------------------------------------------------


def test_every_schema_version_has_its_migration_step():
    assert len(plugin.host.store.MIGRATIONS) == SCHEMA_VERSION


def test_an_older_database_is_migrated_with_every_volume_mount_and_token_kept(tmp_path, monkeypatch):
    database = populated_state(tmp_path / "state")
    sealer = Sealer.load_or_create(tmp_path / "state" / "seal.key")
    # A synthetic next version: one step that adds a column with a default, as a real change would.
    monkeypatch.setattr(
        plugin.host.store,
        "MIGRATIONS",
        (*plugin.host.store.MIGRATIONS, "ALTER TABLE volumes ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';"),
    )
    monkeypatch.setattr(plugin.host.store, "SCHEMA_VERSION", SCHEMA_VERSION + 1)

    store = Store(database, sealer)
    try:
        assert len(store.volumes()) == VOLUMES
        assert store.volume("vol007").options["uid"] == "1007"
        assert store.mount("vol000", "c1").token == "s.mount-token"
        assert store.identity().token == "s.identity-token"
    finally:
        store.close()
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION + 1,)
        assert db.execute("SELECT COUNT(*) FROM volumes WHERE labels = '{}'").fetchone() == (VOLUMES,)
    db.close()


def test_a_failing_migration_step_is_undone_whole_and_refused_clearly(tmp_path, monkeypatch):
    database = populated_state(tmp_path / "state")
    sealer = Sealer.load_or_create(tmp_path / "state" / "seal.key")
    # The step's first statement succeeds, its second fails: the first must be rolled back too.
    broken = "ALTER TABLE volumes ADD COLUMN labels TEXT; DELETE FROM volumes; INSERT INTO no_such_table VALUES (1);"
    monkeypatch.setattr(plugin.host.store, "MIGRATIONS", (*plugin.host.store.MIGRATIONS, broken))
    monkeypatch.setattr(plugin.host.store, "SCHEMA_VERSION", SCHEMA_VERSION + 1)

    with pytest.raises(
        StateError,
        match=f"could not migrate state database .* from schema version {SCHEMA_VERSION} "
        f"to {SCHEMA_VERSION + 1} .*left at version {SCHEMA_VERSION} with its data",
    ):
        Store(database, sealer)

    monkeypatch.undo()
    store = Store(database, sealer)  # the plugin version that wrote it still opens it, whole
    try:
        assert len(store.volumes()) == VOLUMES
        assert store.identity().token == "s.identity-token"
    finally:
        store.close()
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert "labels" not in [row[1] for row in db.execute("PRAGMA table_info(volumes)")]
    db.close()


def test_a_new_database_is_built_by_the_migration_steps_from_version_zero(tmp_path):
    store = Store(tmp_path / "state.db", Sealer(os.urandom(32)))
    store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert {"volumes", "mounts", "leases", "identity", "pending_revocations"} <= tables
