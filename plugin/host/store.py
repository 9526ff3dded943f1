"""Persistent state: volumes, active mounts, the plugin identity (and a SecretID awaiting its login),
consumed wrapping tokens. SQLite.

The only module that touches the database. Tokens go in and come out in clear, but are written
sealed (`Sealer`), each bound to the row it belongs to. One connection shared by the worker's threads,
serialised by a lock: every operation is a few rows, so contention is negligible.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from plugin.core.errors import StateError
from plugin.core.ports import IdentityStore, StorePort
from plugin.core.records import (
    IdentityRecord,
    MountRecord,
    OwedRevocation,
    VolumeCredential,
    VolumeRecord,
)
from plugin.host.seal import Sealer

SCHEMA_VERSION = 3
_SCHEMA = """
CREATE TABLE volumes (
    name TEXT PRIMARY KEY,
    options TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE volume_credentials (
    volume TEXT PRIMARY KEY REFERENCES volumes (name) ON DELETE CASCADE,
    token BLOB NOT NULL,
    accessor TEXT NOT NULL,
    can_mint INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE mounts (
    volume TEXT NOT NULL,
    mount_id TEXT NOT NULL,
    refcount INTEGER NOT NULL,
    mountpoint TEXT NOT NULL,
    token BLOB NOT NULL,
    accessor TEXT NOT NULL,
    owns_token INTEGER NOT NULL,
    container_token_accessor TEXT,
    revoked INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    PRIMARY KEY (volume, mount_id)
);
CREATE TABLE leases (
    volume TEXT NOT NULL,
    mount_id TEXT NOT NULL,
    source TEXT NOT NULL,
    lease_id TEXT NOT NULL,
    PRIMARY KEY (volume, mount_id, source)
);
CREATE TABLE identity (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    token BLOB NOT NULL,
    accessor TEXT NOT NULL,
    obtained_at REAL NOT NULL
);
CREATE TABLE consumed_wrapping_tokens (
    digest TEXT PRIMARY KEY,
    consumed_at REAL NOT NULL
);
CREATE TABLE pending_revocations (
    accessor TEXT PRIMARY KEY,
    token BLOB NOT NULL,
    by_accessor INTEGER NOT NULL,
    since REAL NOT NULL
);
"""
# An AppRole SecretID unwrapped but not yet exchanged for a token: the wrapping token is spent, so losing
# this (a failed login, a crash) would need an operator to deliver a new one.
_PENDING_SECRET_ID = """
CREATE TABLE pending_secret_id (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    secret_id BLOB NOT NULL,
    source TEXT NOT NULL,
    since REAL NOT NULL
);
"""
# An owed revocation is of a token (revoke-self), of a token by accessor, or of a lease (sys/leases/revoke),
# and may be due only later: an old credential lives on for rotate-grace after its replacement.
# (`by_accessor` is kept for the plugin versions before, which read it.)
_OWED_KINDS = """
ALTER TABLE pending_revocations ADD COLUMN kind TEXT NOT NULL DEFAULT 'token';
UPDATE pending_revocations SET kind = 'accessor' WHERE by_accessor = 1;
ALTER TABLE pending_revocations ADD COLUMN not_before REAL NOT NULL DEFAULT 0;
"""
# MIGRATIONS[v] takes a database at schema version v to v + 1 (version 0 is a new, empty file). A schema
# change appends its step here and raises SCHEMA_VERSION: existing state is carried forward, never recreated.
MIGRATIONS: tuple[str, ...] = (_SCHEMA, _PENDING_SECRET_ID, _OWED_KINDS)


class Store(StorePort, IdentityStore):
    """Transactional access to the state database. Raises `StateError` when the database is unusable.

    Most commits survive a crash of the process but not a power cut (WAL, synchronous=NORMAL): the mounts
    a power cut loses are gone with their tmpfs too, and their tokens die by TTL. These are fsynced,
    because losing them breaks a promise: a volume's unwrapped credential (its wrapping token is spent),
    the SecretID awaiting its login and the identity it gives, the mark that a wrapping token was used by
    this plugin (without it, the next start would take its own use for interception), an owed revocation,
    and a credential revoked by break-glass."""

    def __init__(self, path: Path, sealer: Sealer):
        self._sealer = sealer
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            # Damage past the first page would otherwise show only later, as failing Get and List calls
            # (and dockerd forgets a volume whose Get fails): refuse it here, before anything is served.
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems)[:300])
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a process crash; after a power loss the tmpfs mounts are gone
            # too and the tokens die by TTL, so an fsync per commit would buy nothing for them. The few
            # writes that must survive a power cut are fsynced one by one (`_transaction(durable=True)`).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate(path)
        except StateError:
            self._db.close()
            raise
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise StateError(
                f"state database {path} is damaged ({e}); restore it from backup or move it aside "
                "(volumes would then have to be created again)"
            ) from e

    def _migrate(self, path: Path) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StateError(
                f"state database {path} has schema version {version}, newer than this plugin's "
                f"{SCHEMA_VERSION}: run the newer plugin version, or restore a backup"
            )
        with self._lock:
            for step in range(version, SCHEMA_VERSION):
                try:
                    # executescript commits any open transaction first, so each step carries its own, and
                    # a step that fails is undone whole.
                    self._db.executescript(
                        f"BEGIN IMMEDIATE; {MIGRATIONS[step]} PRAGMA user_version={step + 1}; COMMIT;"
                    )
                except sqlite3.Error as e:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise StateError(
                        f"could not migrate state database {path} from schema version {step} to {step + 1} ({e}); "
                        f"it was left at version {step} with its data: restore a backup or run the plugin version that wrote it"
                    ) from e

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- volumes --------------------------------------------------------------------------------

    def add_volume(self, name: str, options: dict[str, str], credential: VolumeCredential | None = None) -> None:
        with self._transaction(durable=True):
            self._db.execute(
                "INSERT INTO volumes (name, options, created_at) VALUES (?, ?, ?)",
                (name, json.dumps(options, sort_keys=True), time.time()),
            )
            if credential is not None:
                self._db.execute(
                    "INSERT INTO volume_credentials (volume, token, accessor, can_mint) VALUES (?, ?, ?, ?)",
                    (
                        name,
                        self._sealer.seal(credential.token, f"volume:{name}"),
                        credential.accessor,
                        credential.can_mint,
                    ),
                )

    def volume_credential(self, name: str) -> VolumeCredential | None:
        with self._lock:
            row = self._db.execute(
                "SELECT token, accessor, can_mint, revoked FROM volume_credentials WHERE volume = ?", (name,)
            ).fetchone()
        return (
            VolumeCredential(self._sealer.unseal(row[0], f"volume:{name}"), row[1], bool(row[2]), bool(row[3]))
            if row
            else None
        )

    def volume_credentials(self) -> dict[str, VolumeCredential]:
        with self._lock:
            rows = self._db.execute(
                "SELECT volume, token, accessor, can_mint, revoked FROM volume_credentials"
            ).fetchall()
        return {
            v: VolumeCredential(self._sealer.unseal(t, f"volume:{v}"), a, bool(c), bool(r)) for v, t, a, c, r in rows
        }

    def mark_credential_revoked(self, name: str) -> None:
        with self._transaction(durable=True):
            self._db.execute("UPDATE volume_credentials SET revoked = 1 WHERE volume = ?", (name,))

    def volume(self, name: str) -> VolumeRecord | None:
        with self._lock:
            row = self._db.execute("SELECT name, options, created_at FROM volumes WHERE name = ?", (name,)).fetchone()
        return _volume(row) if row else None

    def volumes(self) -> list[VolumeRecord]:
        with self._lock:
            rows = self._db.execute("SELECT name, options, created_at FROM volumes ORDER BY name").fetchall()
        return [_volume(r) for r in rows]

    def remove_volume(self, name: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM volume_credentials WHERE volume = ?", (name,))
            self._db.execute("DELETE FROM volumes WHERE name = ?", (name,))

    # -- mounts ---------------------------------------------------------------------------------

    def add_mount(self, record: MountRecord) -> None:
        sealed = self._sealer.seal(record.token, _mount_context(record.volume, record.mount_id))
        with self._transaction():
            self._db.execute(
                "INSERT INTO mounts (volume, mount_id, refcount, mountpoint, token, accessor, owns_token,"
                " container_token_accessor, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.volume,
                    record.mount_id,
                    record.refcount,
                    record.mountpoint,
                    sealed,
                    record.accessor,
                    record.owns_token,
                    record.container_token_accessor,
                    record.created_at,
                ),
            )

    def set_refcount(self, volume: str, mount_id: str, refcount: int) -> None:
        with self._transaction():
            self._db.execute(
                "UPDATE mounts SET refcount = ? WHERE volume = ? AND mount_id = ?", (refcount, volume, mount_id)
            )

    def set_container_token_accessor(self, volume: str, mount_id: str, accessor: str) -> None:
        with self._transaction():
            self._db.execute(
                "UPDATE mounts SET container_token_accessor = ? WHERE volume = ? AND mount_id = ?",
                (accessor, volume, mount_id),
            )

    def replace_mount_token(self, record: MountRecord, leases: dict[str, str]) -> None:
        """A running mount's new token (and container token) and leases, in one step: they replace the old."""
        sealed = self._sealer.seal(record.token, _mount_context(record.volume, record.mount_id))
        where = (record.volume, record.mount_id)
        with self._transaction():
            self._db.execute(
                "UPDATE mounts SET token = ?, accessor = ?, container_token_accessor = ? WHERE volume = ? AND mount_id = ?",
                (sealed, record.accessor, record.container_token_accessor, *where),
            )
            self._db.execute("DELETE FROM leases WHERE volume = ? AND mount_id = ?", where)
            self._db.executemany(
                "INSERT INTO leases (volume, mount_id, source, lease_id) VALUES (?, ?, ?, ?)",
                [(*where, source, lease_id) for source, lease_id in leases.items()],
            )

    def active_mountpoints(self, volume: str) -> list[str]:
        """Where the volume's active mounts are, oldest first (no token is unsealed for this)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT mountpoint FROM mounts WHERE volume = ? AND refcount > 0 ORDER BY created_at", (volume,)
            ).fetchall()
        return [row[0] for row in rows]

    def mount_ids(self, volume: str) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT mount_id FROM mounts WHERE volume = ? ORDER BY created_at", (volume,))
            return [row[0] for row in rows.fetchall()]

    def count_active_mounts(self) -> int:
        with self._lock:
            count: int = self._db.execute("SELECT COUNT(*) FROM mounts WHERE refcount > 0").fetchone()[0]
            return count

    def mount(self, volume: str, mount_id: str) -> MountRecord | None:
        rows = self._mount_rows("WHERE volume = ? AND mount_id = ?", (volume, mount_id))
        return rows[0] if rows else None

    def mounts(self, volume: str | None = None) -> list[MountRecord]:
        if volume is None:
            return self._mount_rows("", ())
        return self._mount_rows("WHERE volume = ?", (volume,))

    def remove_mount(self, volume: str, mount_id: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM leases WHERE volume = ? AND mount_id = ?", (volume, mount_id))
            self._db.execute("DELETE FROM mounts WHERE volume = ? AND mount_id = ?", (volume, mount_id))

    def set_lease(self, volume: str, mount_id: str, source: str, lease_id: str) -> None:
        """Record the current lease of `source` for a mount (lease IDs are names, not credentials)."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO leases (volume, mount_id, source, lease_id) VALUES (?, ?, ?, ?)",
                (volume, mount_id, source, lease_id),
            )

    def leases(self, volume: str, mount_id: str) -> dict[str, str]:
        """source -> current lease ID, for one mount."""
        with self._lock:
            rows = self._db.execute(
                "SELECT source, lease_id FROM leases WHERE volume = ? AND mount_id = ?", (volume, mount_id)
            ).fetchall()
        return dict(rows)

    def _mount_rows(self, where: str, args: tuple[str, ...]) -> list[MountRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT volume, mount_id, refcount, mountpoint, token, accessor, created_at, owns_token,"
                " container_token_accessor, revoked FROM mounts " + where + " ORDER BY created_at",
                args,
            ).fetchall()
        records = []
        for v, m, rc, mp, tok, acc, ts, own, cta, rev in rows:
            try:
                token, unreadable = self._sealer.unseal(tok, _mount_context(v, m)), False
            except StateError:  # one damaged row must not hide every other mount: the caller decides
                token, unreadable = "", True
            records.append(MountRecord(v, m, rc, mp, token, acc, ts, bool(own), cta, bool(rev), unreadable))
        return records

    def mark_mount_revoked(self, volume: str, mount_id: str) -> None:
        with self._transaction():
            self._db.execute("UPDATE mounts SET revoked = 1 WHERE volume = ? AND mount_id = ?", (volume, mount_id))

    # -- plugin identity ------------------------------------------------------------------------

    def save_identity(self, record: IdentityRecord) -> None:
        sealed = self._sealer.seal(record.token, "identity")
        with self._transaction(durable=True):
            self._db.execute(
                "INSERT OR REPLACE INTO identity (id, token, accessor, obtained_at) VALUES (1, ?, ?, ?)",
                (sealed, record.accessor, record.obtained_at),
            )

    def identity(self) -> IdentityRecord | None:
        with self._lock:
            row = self._db.execute("SELECT token, accessor, obtained_at FROM identity WHERE id = 1").fetchone()
        if not row:
            return None
        return IdentityRecord(self._sealer.unseal(row[0], "identity"), row[1], row[2])

    def forget_identity(self) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM identity")

    def save_pending_secret_id(self, secret_id: str, source: str) -> None:
        """Keep (sealed) a SecretID unwrapped from `source` until a login with it succeeds."""
        sealed = self._sealer.seal(secret_id, "pending-secret-id")
        with self._transaction(durable=True):
            self._db.execute(
                "INSERT OR REPLACE INTO pending_secret_id (id, secret_id, source, since) VALUES (1, ?, ?, ?)",
                (sealed, source, time.time()),
            )

    def pending_secret_id(self) -> tuple[str, str] | None:
        """(SecretID, where it was unwrapped from), if one awaits its login."""
        with self._lock:
            row = self._db.execute("SELECT secret_id, source FROM pending_secret_id WHERE id = 1").fetchone()
        return (self._sealer.unseal(row[0], "pending-secret-id"), row[1]) if row else None

    def forget_pending_secret_id(self) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM pending_secret_id")

    def save_identity_from_secret_id(self, record: IdentityRecord) -> None:
        """The login with the pending SecretID succeeded: keep its token and drop the SecretID, in one step."""
        sealed = self._sealer.seal(record.token, "identity")
        with self._transaction(durable=True):
            self._db.execute(
                "INSERT OR REPLACE INTO identity (id, token, accessor, obtained_at) VALUES (1, ?, ?, ?)",
                (sealed, record.accessor, record.obtained_at),
            )
            self._db.execute("DELETE FROM pending_secret_id")

    def mark_wrapping_token_consumed(self, digest: str) -> None:
        """Remember (by SHA-256 digest) a wrapping token this plugin used, so its reuse is recognised."""
        with self._transaction(durable=True):
            self._db.execute(
                "INSERT OR IGNORE INTO consumed_wrapping_tokens (digest, consumed_at) VALUES (?, ?)",
                (digest, time.time()),
            )

    def wrapping_token_consumed_at(self, digest: str) -> float | None:
        with self._lock:
            row = self._db.execute(
                "SELECT consumed_at FROM consumed_wrapping_tokens WHERE digest = ?", (digest,)
            ).fetchone()
        return row[0] if row else None

    def forget_wrapping_token(self, digest: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM consumed_wrapping_tokens WHERE digest = ?", (digest,))

    # -- revocations that could not reach Vault -------------------------------------------------

    def add_pending_revocation(self, owed: OwedRevocation) -> None:
        """Owe Vault a revocation (see `OwedRevocation`); one already owed under the same key is replaced."""
        sealed = self._sealer.seal(owed.token, f"revoke:{owed.key}")
        with self._transaction(durable=True):
            self._db.execute(
                "INSERT OR REPLACE INTO pending_revocations (accessor, token, by_accessor, since, kind, not_before)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (owed.key, sealed, owed.kind == "accessor", time.time(), owed.kind, owed.not_before),
            )

    def pending_revocations(self) -> list[OwedRevocation]:
        """The revocations still owed to Vault, oldest first (due or not: see `not_before`)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT accessor, token, kind, not_before FROM pending_revocations ORDER BY since"
            ).fetchall()
        return [OwedRevocation(key, self._sealer.unseal(tok, f"revoke:{key}"), kind, nb) for key, tok, kind, nb in rows]

    def remove_pending_revocation(self, key: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM pending_revocations WHERE accessor = ?", (key,))

    @contextlib.contextmanager
    def _transaction(self, *, durable: bool = False) -> Iterator[None]:
        """One transaction. `durable`: its commit is fsynced (synchronous=FULL), for the writes whose loss
        in a power cut would break a promise; see the class docstring."""
        with self._lock:
            if durable:
                self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")


def _volume(row: tuple[Any, ...]) -> VolumeRecord:
    return VolumeRecord(row[0], json.loads(row[1]), row[2])


def _mount_context(volume: str, mount_id: str) -> str:
    return f"mount:{volume}:{mount_id}"
