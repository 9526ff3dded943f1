"""store.Store: the SQLite state, with tokens sealed at rest. Real SQLite files under tmp_path."""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from plugin.core.errors import StateError
from plugin.core.records import (
    IdentityRecord,
    MountRecord,
    OwedRevocation,
    VolumeCredential,
    VolumeRecord,
)
from plugin.host.seal import Sealer
from plugin.host.store import SCHEMA_VERSION, Store

OPTIONS = {"role": "web", "secret.db_password": "secret/data/web/db#password"}


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def sealer() -> Sealer:
    return Sealer(os.urandom(32))


@pytest.fixture
def store(db_path, sealer) -> Iterator[Store]:
    store = Store(db_path, sealer)
    yield store
    store.close()


def mount_record(
    volume: str = "web", mount_id: str = "c1", refcount: int = 1, created_at: float = 1000.0
) -> MountRecord:
    return MountRecord(
        volume=volume,
        mount_id=mount_id,
        refcount=refcount,
        mountpoint=f"/run/vs/{volume}/{mount_id}",
        token=f"hvs.token-of-{volume}-{mount_id}",
        accessor=f"accessor-of-{volume}-{mount_id}",
        created_at=created_at,
    )


# -- volumes ------------------------------------------------------------------------------------


def test_volume_add_and_get(store):
    before = time.time()
    store.add_volume("web", OPTIONS)

    record = store.volume("web")

    assert (record.name, record.options) == ("web", OPTIONS)
    assert before <= record.created_at <= time.time()


def test_unknown_volume_is_none(store):
    assert store.volume("nope") is None


def test_volumes_are_listed_by_name(store):
    for name in ["b", "c", "a"]:
        store.add_volume(name, {"role": name})

    assert [(v.name, v.options) for v in store.volumes()] == [
        ("a", {"role": "a"}),
        ("b", {"role": "b"}),
        ("c", {"role": "c"}),
    ]


def test_volume_remove(store):
    store.add_volume("web", OPTIONS)
    store.add_volume("db", OPTIONS)

    store.remove_volume("web")

    assert store.volume("web") is None
    assert [v.name for v in store.volumes()] == ["db"]


def test_state_persists_across_a_new_store(db_path, sealer):
    first = Store(db_path, sealer)
    first.add_volume("web", OPTIONS)
    first.add_mount(mount_record())
    first.save_identity(IdentityRecord("hvs.identity", "acc-identity", 5.0))
    volume = first.volume("web")
    assert isinstance(volume, VolumeRecord)
    first.close()

    second = Store(db_path, sealer)
    try:
        assert second.volumes() == [volume]
        assert second.mounts() == [mount_record()]
        assert second.identity() == IdentityRecord("hvs.identity", "acc-identity", 5.0)
    finally:
        second.close()


# -- mounts -------------------------------------------------------------------------------------


def test_mount_add_and_get(store):
    store.add_mount(mount_record())

    assert store.mount("web", "c1") == mount_record()
    assert store.mount("web", "c1").token == "hvs.token-of-web-c1"


@pytest.mark.parametrize(("volume", "mount_id"), [("web", "c2"), ("db", "c1"), ("", "")])
def test_unknown_mount_is_none(store, volume, mount_id):
    store.add_mount(mount_record())

    assert store.mount(volume, mount_id) is None


def test_set_refcount(store):
    store.add_mount(mount_record(refcount=0))
    store.add_mount(mount_record(mount_id="c2", refcount=0))

    store.set_refcount("web", "c1", 3)

    assert store.mount("web", "c1").refcount == 3
    assert store.mount("web", "c2").refcount == 0


def test_mounts_filter_by_volume_in_creation_order(store):
    store.add_mount(mount_record("web", "late", created_at=3.0))
    store.add_mount(mount_record("db", "only", created_at=2.0))
    store.add_mount(mount_record("web", "early", created_at=1.0))

    assert [m.mount_id for m in store.mounts("web")] == ["early", "late"]
    assert [m.mount_id for m in store.mounts("db")] == ["only"]
    assert store.mounts("other") == []
    assert [(m.volume, m.mount_id) for m in store.mounts()] == [("web", "early"), ("db", "only"), ("web", "late")]


def test_mount_remove(store):
    store.add_mount(mount_record(mount_id="c1"))
    store.add_mount(mount_record(mount_id="c2"))

    store.remove_mount("web", "c1")

    assert store.mount("web", "c1") is None
    assert [m.mount_id for m in store.mounts()] == ["c2"]


def test_mount_token_is_not_in_repr():
    assert "hvs.token-of-web-c1" not in repr(mount_record())


def test_concurrent_add_mount_from_20_threads(store):
    barrier = threading.Barrier(20)

    def add(i: int) -> None:
        barrier.wait()
        store.add_mount(mount_record(mount_id=f"c{i:02}", created_at=float(i)))

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = [pool.submit(add, i) for i in range(20)]
    for result in results:
        result.result()

    assert store.mounts() == [mount_record(mount_id=f"c{i:02}", created_at=float(i)) for i in range(20)]


# -- identity -----------------------------------------------------------------------------------


def test_identity_save_load_forget(store):
    assert store.identity() is None

    store.save_identity(IdentityRecord("hvs.first", "acc-1", 1.0))
    store.save_identity(IdentityRecord("hvs.second", "acc-2", 2.0))
    assert store.identity() == IdentityRecord("hvs.second", "acc-2", 2.0)

    store.forget_identity()
    assert store.identity() is None


def test_identity_token_is_not_in_repr():
    assert "hvs.secret-identity" not in repr(IdentityRecord("hvs.secret-identity", "acc", 1.0))


# -- consumed wrapping tokens -------------------------------------------------------------------


def test_wrapping_token_mark_and_forget(store):
    digest, other = "a" * 64, "b" * 64
    before = time.time()

    store.mark_wrapping_token_consumed(digest)

    assert before <= store.wrapping_token_consumed_at(digest) <= time.time()
    assert store.wrapping_token_consumed_at(other) is None
    store.forget_wrapping_token(digest)
    assert store.wrapping_token_consumed_at(digest) is None


def test_wrapping_token_second_mark_keeps_first_time(db_path, store):
    digest = "c" * 64
    store.mark_wrapping_token_consumed(digest)
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE consumed_wrapping_tokens SET consumed_at = 1.0")
    db.close()

    store.mark_wrapping_token_consumed(digest)

    assert store.wrapping_token_consumed_at(digest) == 1.0


# -- pending revocations ------------------------------------------------------------------------


def test_pending_revocations(store):
    assert store.pending_revocations() == []

    store.add_pending_revocation(OwedRevocation("acc-1", "hvs.one"))
    store.add_pending_revocation(OwedRevocation("acc-2", "hvs.parent", "accessor"))
    store.add_pending_revocation(OwedRevocation("lease/1", "hvs.shared", "lease", not_before=5.0))
    store.add_pending_revocation(OwedRevocation("acc-1", "hvs.one-again"))
    assert sorted(store.pending_revocations(), key=lambda o: o.key) == [
        OwedRevocation("acc-1", "hvs.one-again"),
        OwedRevocation("acc-2", "hvs.parent", "accessor"),
        OwedRevocation("lease/1", "hvs.shared", "lease", 5.0),
    ]
    assert [o.token for o in store.pending_revocations()] == ["hvs.parent", "hvs.shared", "hvs.one-again"]

    store.remove_pending_revocation("acc-1")
    assert [o.key for o in store.pending_revocations()] == ["acc-2", "lease/1"]


def test_volume_credentials_are_sealed_and_removed_with_their_volume(store, tmp_path):
    credential = VolumeCredential("hvs.volume-credential-token", "acc-vol", can_mint=True)
    store.add_volume("wrapped", {"wrapped-token": "sha256:ab"}, credential)
    store.add_volume("plain", {"role": "web"})
    assert store.volume_credential("wrapped") == credential
    assert store.volume_credential("plain") is None
    assert store.volume_credentials() == {"wrapped": credential}
    assert b"hvs.volume-credential-token" not in b"".join(p.read_bytes() for p in tmp_path.glob("state.db*"))
    store.remove_volume("wrapped")
    assert store.volume_credential("wrapped") is None


# -- tokens at rest -----------------------------------------------------------------------------


def database_bytes(db_path: Path) -> bytes:
    files = [db_path, db_path.with_name(db_path.name + "-wal")]
    return b"".join(f.read_bytes() for f in files if f.exists())


def write_every_kind_of_token(store: Store) -> None:
    store.add_mount(MountRecord("web", "c1", 1, "/run/vs/web/c1", "hvs.MOUNT-TOKEN-CLEAR", "ACCESSOR-MOUNT", 1.0))
    store.save_identity(IdentityRecord("hvs.IDENTITY-TOKEN-CLEAR", "ACCESSOR-IDENTITY", 1.0))
    store.add_pending_revocation(OwedRevocation("ACCESSOR-REVOKE", "hvs.REVOKE-TOKEN-CLEAR"))


TOKENS = [b"MOUNT-TOKEN-CLEAR", b"IDENTITY-TOKEN-CLEAR", b"REVOKE-TOKEN-CLEAR"]
ACCESSORS = [b"ACCESSOR-MOUNT", b"ACCESSOR-IDENTITY", b"ACCESSOR-REVOKE"]


def test_tokens_are_not_in_clear_in_the_open_database(db_path, store):
    write_every_kind_of_token(store)

    written = database_bytes(db_path)

    assert db_path.with_name("state.db-wal").exists()
    assert all(accessor in written for accessor in ACCESSORS)
    assert not [token for token in TOKENS if token in written]


def test_tokens_are_not_in_clear_in_the_closed_database(db_path, sealer):
    store = Store(db_path, sealer)
    write_every_kind_of_token(store)
    store.close()

    written = database_bytes(db_path)

    assert all(accessor in written for accessor in ACCESSORS)
    assert not [token for token in TOKENS if token in written]


@pytest.mark.parametrize("read", [Store.identity, Store.pending_revocations])
def test_other_seal_key_fails_reading_a_token(db_path, sealer, read):
    writer = Store(db_path, sealer)
    write_every_kind_of_token(writer)
    writer.close()

    reader = Store(db_path, Sealer(os.urandom(32)))
    try:
        with pytest.raises(StateError, match="seal"):
            read(reader)
    finally:
        reader.close()


def test_a_mount_row_that_does_not_unseal_is_listed_without_its_token(db_path, sealer):
    """One damaged row must not break every listing (reconcile, status): it comes back marked unreadable."""
    writer = Store(db_path, sealer)
    write_every_kind_of_token(writer)
    writer.close()

    reader = Store(db_path, Sealer(os.urandom(32)))
    try:
        records = reader.mounts()
        assert records and all(r.unreadable and r.token == "" for r in records)
        assert [r.accessor for r in records] == ["ACCESSOR-MOUNT"]
    finally:
        reader.close()


def test_sealed_token_copied_to_another_row_does_not_open(db_path, store):
    store.add_mount(mount_record(mount_id="c1"))
    store.add_mount(mount_record(mount_id="c2"))
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE mounts SET token = (SELECT token FROM mounts WHERE mount_id = 'c1') WHERE mount_id = 'c2'")
    db.close()

    copied = store.mount("web", "c2")
    assert copied.unreadable and copied.token == ""
    assert store.mount("web", "c1").token == mount_record(mount_id="c1").token


# -- unusable databases -------------------------------------------------------------------------


def test_newer_schema_version_is_refused(db_path, sealer):
    Store(db_path, sealer).close()
    with sqlite3.connect(db_path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()

    with pytest.raises(StateError, match=f"schema version {SCHEMA_VERSION + 1}"):
        Store(db_path, sealer)


@pytest.mark.parametrize(
    "content",
    [random.Random(20240501).randbytes(16384), b"not a database\n" * 1000, b"SQLite format 3\x00" + b"\xff" * 4080],
    ids=["random-bytes", "text", "damaged-header"],
)
def test_garbage_file_is_refused_with_state_error(db_path, sealer, content):
    db_path.write_bytes(content)

    with pytest.raises(StateError, match="damaged"):
        Store(db_path, sealer)


def test_the_writes_a_power_cut_must_not_lose_are_fsynced_and_the_others_are_not(store):
    """A spent wrapping token's credential, the mark of our own use of a wrapping token and an owed
    revocation are committed with synchronous=FULL; a mount's refcount is not (its tmpfs dies with power)."""
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)

    def synchronous_at_commit(write) -> str:
        statements.clear()
        write()
        commit = statements.index("COMMIT")
        pragmas = [s for s in statements[:commit] if s.startswith("PRAGMA synchronous")]
        return pragmas[-1] if pragmas else "NORMAL (unchanged)"

    credential = VolumeCredential("tok", "acc", can_mint=True)
    assert (
        synchronous_at_commit(lambda: store.add_volume("v", {"role": "web"}, credential)) == "PRAGMA synchronous=FULL"
    )
    assert synchronous_at_commit(lambda: store.mark_wrapping_token_consumed("d" * 64)) == "PRAGMA synchronous=FULL"
    owed = OwedRevocation("acc", "tok")
    assert synchronous_at_commit(lambda: store.add_pending_revocation(owed)) == "PRAGMA synchronous=FULL"
    store.add_mount(MountRecord("v", "m1", 0, "/x", "t", "a", 0.0))
    assert synchronous_at_commit(lambda: store.set_refcount("v", "m1", 1)) == "NORMAL (unchanged)"
    statements.clear()
    store.set_refcount("v", "m1", 2)
    assert "PRAGMA synchronous=FULL" not in statements
    assert store._db.execute("PRAGMA synchronous").fetchone() == (1,), "back to NORMAL after a durable commit"
