"""Driver tests: the real store (SQLite in tmp_path) with small hand-written fakes of Vault and the mounter."""

from __future__ import annotations

import threading
import time

import pytest

from plugin.core.errors import (
    IdentityUnavailableError,
    InvalidOptionError,
    MountError,
    StateError,
    VaultError,
    VolumeInUseError,
    VolumeNotFoundError,
)
from plugin.core.records import IssuedToken, MountRecord
from plugin.core.scheduler import Scheduler
from tests.support.fakes import OPTIONS, driver_over_fakes


def test_create_is_idempotent_and_refuses_different_options(driver):
    driver.create("web", dict(OPTIONS))
    with pytest.raises(InvalidOptionError, match="already exists with other options"):
        driver.create("web", {**OPTIONS, "uid": "2000"})


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 200, "with space"])
def test_create_refuses_unsafe_volume_names(driver, name):
    with pytest.raises(InvalidOptionError, match="invalid volume name"):
        driver.create(name, OPTIONS)


def test_create_validates_options_without_vault(driver, vault):
    vault.unavailable = True
    driver.create("other", OPTIONS)
    with pytest.raises(InvalidOptionError, match="missing option role"):
        driver.create("broken", {"secret.a": "secret/data/a#b"})


def test_get_list_path_answer_from_state_while_vault_is_down(driver, vault):
    vault.unavailable = True
    assert driver.get("web").name == "web"
    assert [v.name for v in driver.list()] == ["web"]
    assert driver.path("web") == ""
    with pytest.raises(VolumeNotFoundError, match="docker volume create"):
        driver.get("missing")


def test_mount_renders_files_with_owner_and_mints_one_token_with_meta(driver, vault, mounter):
    path = driver.mount("web", "a1")
    assert path == str(mounter.view_path("web", "a1"))
    mounted = mounter.mounted[("web", "a1")]
    assert mounted["files"]["pw"] == b"hunter2"
    assert mounted["uid"] == 1000 and mounted["mode"] == 0o400
    assert vault.minted == [("web", {"volume": "web", "mount_id": "a1", "host": "host-a"})]
    # Two files from one path: one read.
    assert [p for _, p in vault.reads] == ["secret/data/web/db"]
    assert driver.get("web").active_mounts == 1
    assert driver.path("web") == path


def test_same_id_is_refcounted_and_only_last_unmount_revokes(driver, vault, mounter):
    first = driver.mount("web", "a1")
    assert driver.mount("web", "a1") == first
    assert len(vault.minted) == 1
    driver.unmount("web", "a1")
    assert ("web", "a1") in mounter.mounted and len(vault.live) == 1
    driver.unmount("web", "a1")
    assert mounter.mounted == {} and vault.live == {}


def test_each_mount_id_gets_its_own_tmpfs_and_token(driver, vault, mounter):
    assert driver.mount("web", "a1") != driver.mount("web", "b2")
    assert len(vault.live) == 2 and len(mounter.mounted) == 2
    driver.unmount("web", "a1")
    assert list(mounter.mounted) == [("web", "b2")] and len(vault.live) == 1


def test_unmount_of_unknown_id_succeeds(driver):
    driver.unmount("web", "never")
    driver.unmount("no-such-volume", "never")


def test_remove_refused_while_mounted_then_allowed(driver, store):
    driver.mount("web", "a1")
    with pytest.raises(VolumeInUseError, match="stop them"):
        driver.remove("web")
    driver.unmount("web", "a1")
    driver.remove("web")
    assert store.volume("web") is None
    driver.remove("web")  # unknown volume: idempotent


def test_mount_of_unknown_volume_is_refused_before_minting(driver, vault):
    with pytest.raises(VolumeNotFoundError):
        driver.mount("nope", "a1")
    assert vault.minted == []


def test_mount_fails_closed_when_a_secret_is_denied(driver, vault, mounter, store):
    driver.create("two", {**OPTIONS, "secret.other": "secret/data/other/x#y"})
    vault.secrets["secret/data/other/x"] = {"y": "z"}
    vault.denied_paths.add("secret/data/other/x")
    with pytest.raises(VaultError, match="secret/data/other/x"):
        driver.mount("two", "a1")
    assert vault.live == {}, "the child token must be revoked"
    assert mounter.mounted == {} and store.mounts() == []


def test_mount_fails_closed_when_a_field_is_missing_and_err_has_no_value(driver, vault, mounter, store):
    driver.create("typo", {"role": "web", "secret.pw": "secret/data/web/db#passwrd"})
    with pytest.raises(Exception) as caught:
        driver.mount("typo", "a1")
    assert "passwrd" in str(caught.value) and "hunter2" not in str(caught.value)
    assert vault.live == {} and mounter.mounted == {} and store.mounts() == []


def test_mount_fails_closed_when_tmpfs_cannot_be_made(driver, vault, mounter, store):
    mounter.fail = True
    with pytest.raises(MountError):
        driver.mount("web", "a1")
    assert vault.live == {} and store.mounts() == []


def test_mount_without_identity_says_why(driver, identity, vault):
    identity.problem = "the plugin is still authenticating to Vault"
    with pytest.raises(IdentityUnavailableError, match="still authenticating"):
        driver.mount("web", "a1")
    assert vault.minted == []


@pytest.mark.parametrize("mount_id", ["", "../../etc", "a/b", "x" * 200])
def test_mount_refuses_unsafe_mount_ids(driver, mount_id):
    with pytest.raises(InvalidOptionError):
        driver.mount("web", mount_id)


def test_revocation_owed_when_vault_is_down_is_retried(driver, vault, mounter, store):
    driver.mount("web", "a1")
    vault.unavailable = True
    driver.unmount("web", "a1")
    assert mounter.mounted == {} and store.mounts() == []
    assert [owed.key for owed in store.pending_revocations()] == ["acc-1"]
    assert driver.retry_pending_revocations() == 1
    vault.unavailable = False
    assert driver.retry_pending_revocations() == 0
    assert vault.live == {}


def test_state_survives_a_new_driver_which_can_unmount_and_revoke(driver, store, vault, identity, mounter, clock):
    path = driver.mount("web", "a1")
    scheduler = Scheduler(clock=clock)
    restarted = driver_over_fakes(store, vault, identity, mounter, scheduler)
    restarted.reconcile()  # the tmpfs is still there: nothing to clean, its token is renewed at once
    scheduler.run_due()
    assert vault.renewed == ["acc-1"]
    assert restarted.mount("web", "a1") == path  # docker cp re-mounts the same ID
    restarted.unmount("web", "a1")
    restarted.unmount("web", "a1")
    assert vault.live == {} and mounter.mounted == {} and len(scheduler) == 0


def test_reconcile_undoes_half_made_and_vanished_mounts(driver, store, vault, mounter):
    driver.mount("web", "gone")
    mounter.mounted.clear()  # the host rebooted: tmpfs vanished
    half = vault.mint_child("plugin-token", "web", 60, {}, "x")
    store.add_mount(MountRecord("web", "half", 0, "/x", half.token, half.accessor, 0.0))
    driver.reconcile()
    assert store.mounts() == [] and vault.live == {}


def test_concurrent_mounts_of_one_volume_are_all_isolated(driver, vault, mounter):
    errors = []

    def mount(i):
        try:
            driver.mount("web", f"id{i}")
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=mount, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(mounter.mounted) == 30 and len(vault.live) == 30
    for i in range(30):
        driver.unmount("web", f"id{i}")
    assert vault.live == {} and driver._locks == {}


def test_mounted_tokens_are_renewed_until_unmount(driver, vault, scheduler, clock):
    driver.create("norefresh", {**OPTIONS, "refresh": "0"})
    driver.mount("norefresh", "a1")
    assert scheduler.run_due() == pytest.approx(3600 * 0.6)
    clock.advance(3600 * 0.6)
    scheduler.run_due()
    assert vault.renewed == ["acc-1"]
    driver.unmount("norefresh", "a1")
    clock.advance(3600)
    assert scheduler.run_due() is None and vault.renewed == ["acc-1"] and len(scheduler) == 0


def test_a_mount_token_is_minted_provisional_then_extended_once_recorded(driver, vault, scheduler):
    driver.create("norefresh", {**OPTIONS, "refresh": "0"})
    driver.mount("norefresh", "a1")
    assert vault.asked_ttls == [30], "the Mount's 20 s budget + 10 s: a lost answer leaves a short-lived token"
    assert vault.extended == ["acc-1"] and vault.renewed == []
    assert scheduler.run_due() == pytest.approx(3600 * 0.6), "renewed on the extended TTL"


def test_a_short_ttl_is_minted_as_it_is(driver, vault):
    driver.create("short", {**OPTIONS, "ttl": "15s"})
    driver.mount("short", "a1")
    assert vault.asked_ttls == [15] and vault.extended == []


def test_renewals_follow_the_ttl_vault_granted_not_the_one_asked(driver, vault, scheduler, clock):
    vault.token_period = 8  # a periodic token role: every grant is its period, whatever is asked
    driver.create("norefresh", {**OPTIONS, "refresh": "0"})
    driver.mount("norefresh", "a1")
    for _ in range(5):
        assert scheduler.run_due() == pytest.approx(8 * 0.6)
        clock.advance(8 * 0.6)
    scheduler.run_due()
    assert vault.renewed == ["acc-1"] * 5 and "child-token-1" in vault.live


def test_a_role_whose_tokens_cannot_be_renewed_gets_its_token_minted_at_full_ttl(driver, vault):
    vault.renewable = False
    driver.mount("web", "a1")
    assert vault.asked_ttls == [30, 3600] and vault.extended == []
    assert list(vault.live) == ["child-token-2"], "the provisional token was revoked"


DB = {
    "role": "web",
    "secret.user": "database/creds/app#username",
    "secret.pass": "database/creds/app#password",
    "template.dsn": 'postgresql://{{ secret("database/creds/app").username }}@db',
    "refresh": "0",
    "rotate-grace": "30s",
}


def test_files_from_one_dynamic_source_share_one_lease_which_dies_with_the_mount(
    driver, vault, mounter, store, scheduler, clock
):
    vault.dynamic["database/creds/app"] = 600
    driver.create("db", DB)
    driver.mount("db", "a1")
    files = mounter.mounted[("db", "a1")]["files"]
    assert files["user"] == b"user-2" and files["pass"] == b"pw-2" and files["dsn"] == b"postgresql://user-2@db"
    assert [p for _, p in vault.reads] == ["database/creds/app"]
    assert list(store.leases("db", "a1").values()) == ["database/creds/app/lease-2"]
    driver.unmount("db", "a1")
    assert vault.leases == {} and store.leases("db", "a1") == {}
    assert ("confirm-lease", "database/creds/app/lease-2") in scheduler, "confirmed off the Unmount path"
    clock.advance(1)
    scheduler.run_due()
    assert len(scheduler) == 0


def test_lease_is_renewed_then_reissued_under_a_new_token_and_the_old_token_revoked_after_grace(
    driver, vault, mounter, scheduler, clock, notified, store
):
    """A mount's token may not revoke a lease (sys/leases/revoke), but may revoke itself: at the max TTL the
    mount gets a new token and its secrets under it, and the old token (with its lease) goes after the grace."""
    vault.dynamic["database/creds/app"] = 600
    vault.lease_renewal_ttl = 600
    driver.create("db", {**DB, "notify": "HUP"})
    driver.mount("db", "a1")
    clock.advance(600 * 0.6)
    scheduler.run_due()  # the token's renewal is later; the lease is renewed for its full duration
    assert vault.renewed == ["database/creds/app/lease-2"]
    vault.lease_renewal_ttl = 100  # Vault caps the lease: its max TTL is near, so it is re-issued at once
    clock.advance(600 * 0.6)
    scheduler.run_due()
    files = mounter.mounted[("db", "a1")]["files"]
    assert files["user"] == b"user-4" and files["dsn"] == b"postgresql://user-4@db"
    assert notified == [("db", "SIGHUP")]
    assert store.mount("db", "a1").accessor == "acc-3" and set(vault.live.values()) == {"acc-1", "acc-3"}
    assert set(vault.leases) == {"database/creds/app/lease-2", "database/creds/app/lease-4"}, (
        "old token and lease kept for the grace"
    )
    assert [o.key for o in store.pending_revocations()] == ["acc-1"], "owed durably during the grace"
    clock.advance(30)
    scheduler.run_due()
    assert set(vault.leases) == {"database/creds/app/lease-4"} and set(vault.live.values()) == {"acc-3"}
    assert store.pending_revocations() == []
    vault.lease_renewal_ttl = 600
    clock.advance(600 * 0.6)
    scheduler.run_due()
    assert vault.renewed[-1] == "database/creds/app/lease-4", "the new lease is renewed on its own clock"
    driver.unmount("db", "a1")
    assert vault.leases == {} and vault.live == {}


def test_refresh_rewrites_only_when_a_kv2_version_changes(driver, vault, mounter, scheduler, clock, notified):
    vault.versions["secret/data/web/db"] = 1
    driver.create("kv", {**OPTIONS, "refresh": "60s", "notify": "SIGUSR1"})
    driver.mount("kv", "a1")
    reads = len(vault.reads)
    clock.advance(60)
    scheduler.run_due()
    assert len(vault.reads) == reads and notified == [], "unchanged version: metadata only, no rewrite"
    vault.versions["secret/data/web/db"] = 2
    vault.secrets["secret/data/web/db"] = {"password": "rotated", "username": "web"}
    clock.advance(60)
    scheduler.run_due()
    assert mounter.mounted[("kv", "a1")]["files"]["pw"] == b"rotated"
    assert notified == [("kv", "SIGUSR1")]


def test_mounts_of_volumes_no_running_container_uses_are_released(driver, vault, mounter, store, monkeypatch):
    driver.create("other", OPTIONS)
    driver.mount("web", "a1")
    driver.mount("other", "b1")
    in_use = {"web": ["c1"], "other": []}
    assert driver.release_unused(lambda volume: in_use[volume]) == 0, "all mounts are too young to judge"
    later = __import__("time").time() + 120
    monkeypatch.setattr("plugin.core.driver.time.time", lambda: later)
    assert driver.release_unused(lambda volume: in_use[volume]) == 1
    assert list(mounter.mounted) == [("web", "a1")] and len(vault.live) == 1


def test_notify_is_refused_where_nothing_can_deliver_it(store, vault, identity, mounter, scheduler):
    driver = driver_over_fakes(store, vault, identity, mounter, scheduler)  # no notify: a PID namespace of its own
    with pytest.raises(InvalidOptionError, match="option notify=SIGHUP: .*does not see the host.s processes"):
        driver.create("quiet", {**OPTIONS, "notify": "HUP"})
    driver.create("quiet", OPTIONS)


def test_reconcile_settles_every_other_mount_when_one_cannot_be_settled(
    driver, store, vault, mounter, scheduler, clock
):
    for mount_id in ("a1", "b2", "c3"):
        driver.mount("web", mount_id)
    # b2's tmpfs is gone (a host reboot), and tearing it down meets a bug: the others must still resume.
    mounter.mounted.pop(("web", "b2"))
    original = mounter.unmount

    def broken(volume: str, mount_id: str) -> None:
        if mount_id == "b2":
            raise RuntimeError("a bug in one teardown")
        original(volume, mount_id)

    mounter.unmount = broken  # type: ignore[method-assign]
    restarted = driver_over_fakes(
        store, vault, identity=driver._identity, mounter=mounter, scheduler=Scheduler(clock=clock)
    )
    assert restarted.reconcile() == 1
    assert ("mount", "web", "a1", "token") in restarted._scheduler and (
        "mount",
        "web",
        "c3",
        "token",
    ) in restarted._scheduler


def test_remove_during_a_first_mount_is_refused_and_the_mount_completes(driver, vault, store, monkeypatch):
    """Remove and a first Mount share the volume's lock: a volume cannot vanish under a mount being made."""
    reading, release = threading.Event(), threading.Event()
    fetch = vault.fetch

    def slow_fetch(*args, **kwargs):
        reading.set()
        assert release.wait(5)
        return fetch(*args, **kwargs)

    monkeypatch.setattr(vault, "fetch", slow_fetch)
    mounted = threading.Thread(target=driver.mount, args=("web", "a1"))
    mounted.start()
    try:
        assert reading.wait(5)
        with pytest.raises(VolumeInUseError, match="being mounted by a container that is starting"):
            driver.remove("web")
    finally:
        release.set()
        mounted.join(5)
    assert store.volume("web") is not None and store.mount("web", "a1").refcount == 1
    assert len(vault.live) == 1


def test_a_volume_removed_while_its_mount_token_is_minted_leaves_no_token(driver, vault, store, monkeypatch):
    mint = vault.mint_child

    def mint_then_removed(*args, **kwargs):
        child = mint(*args, **kwargs)
        driver.remove("web")  # in another request, while the mint's answer travels
        return child

    monkeypatch.setattr(vault, "mint_child", mint_then_removed)
    with pytest.raises(VolumeNotFoundError):
        driver.mount("web", "a1")
    assert vault.live == {} and store.mount_ids("web") == []


def test_a_mount_that_cannot_be_recorded_revokes_its_token(driver, vault, store, monkeypatch):
    def full_disk(record):
        raise StateError("could not write the state database: database or disk is full")

    monkeypatch.setattr(store, "add_mount", full_disk)
    with pytest.raises(StateError, match="disk is full"):
        driver.mount("web", "a1")
    assert len(vault.minted) == 1 and vault.live == {}


def _damage_token_of(store, volume: str, mount_id: str) -> None:
    """Corrupt one sealed token in the database, as a bad sector or a half-restored backup would."""
    with store._lock:
        store._db.execute(
            "UPDATE mounts SET token = ? WHERE volume = ? AND mount_id = ?", (b"\0" * 40, volume, mount_id)
        )


def test_one_row_that_does_not_unseal_leaves_every_other_mount_served(driver, store, vault, mounter, clock):
    for mount_id in ("a1", "b2", "c3"):
        driver.mount("web", mount_id)
    _damage_token_of(store, "web", "b2")
    restarted = driver_over_fakes(
        store, vault, identity=driver._identity, mounter=mounter, scheduler=Scheduler(clock=clock)
    )
    assert restarted.reconcile() == 1
    assert ("mount", "web", "a1", "token") in restarted._scheduler
    assert ("mount", "web", "c3", "token") in restarted._scheduler
    assert ("mount", "web", "b2", "token") not in restarted._scheduler
    assert restarted.get("web").active_mounts == 3
    damaged = store.mount("web", "b2")
    assert damaged.unreadable and damaged.token == ""
    # Its Unmount still revokes its token: by accessor, with the identity's right to.
    restarted.unmount("web", "b2")
    assert damaged.accessor not in vault.live.values() and len(vault.live) == 2
    assert ("web", "b2") not in mounter.mounted and store.pending_revocations() == []


def test_a_remount_of_an_id_no_container_holds_drops_the_stale_references(driver, vault, mounter, store):
    """dockerd restarted after a crash mounts a restarted container with its old mount ID: the earlier
    references will never be unmounted, so the count starts again at one and the next Unmount ends it."""
    driver.mount("web", "a1")
    mounter.held = {("web", "a1"): [4242]}
    driver.mount("web", "a1")  # docker cp into the running container: a second reference
    assert store.mount("web", "a1").refcount == 2
    mounter.held = {}  # the container died with dockerd
    driver.mount("web", "a1")
    assert store.mount("web", "a1").refcount == 1
    driver.unmount("web", "a1")
    assert vault.live == {} and mounter.mounted == {}


def test_a_remount_counts_a_reference_when_holders_cannot_be_told(driver, store, mounter):
    """Where the host's processes are not visible (a PID namespace of its own)."""
    driver.mount("web", "a1")
    mounter.held = None
    driver.mount("web", "a1")
    assert store.mount("web", "a1").refcount == 2


def test_a_replacement_that_cannot_write_keeps_the_old_token_files_and_lease_and_is_retried(
    driver, vault, mounter, scheduler, clock, store, monkeypatch
):
    vault.dynamic["database/creds/app"] = 600
    driver.create("db", DB)
    driver.mount("db", "a1")
    old = store.mount("db", "a1")
    vault.lease_renewal_ttl = 100  # capped: re-issued at once
    rewrite = mounter.rewrite

    def full(*args, **kwargs):
        raise MountError("could not update the files of volume db: file user does not fit")

    monkeypatch.setattr(mounter, "rewrite", full)
    clock.advance(600 * 0.6)
    scheduler.run_due()
    assert store.mount("db", "a1").accessor == old.accessor, "the old token serves on"
    assert mounter.mounted[("db", "a1")]["files"]["user"] == b"user-2"
    assert set(vault.live.values()) == {old.accessor}, "the new token was revoked"
    assert store.leases("db", "a1") == {"database/creds/app": "database/creds/app/lease-2"}
    monkeypatch.setattr(mounter, "rewrite", rewrite)  # room again: the retry succeeds
    clock.advance(60)
    scheduler.run_due()
    assert store.mount("db", "a1").accessor != old.accessor
    assert mounter.mounted[("db", "a1")]["files"]["user"] != b"user-2"


def test_retiring_an_identity_keeps_it_while_a_mount_cannot_move(driver, vault, mounter, store):
    """Revoking the old identity would revoke the token of a mount still under it: it is kept, and named."""
    vault.live["old-identity"] = "old-accessor"
    for mount_id in ("a1", "b2"):
        driver.mount("web", mount_id)
    vault.denied_paths.add("secret/data/web/db")  # the new token cannot read: b2's move fails (a1's too)
    result = driver.retire_identity(IssuedToken("old-identity", "old-accessor", 3600, True))
    assert result["Moved"] == 0 and len(result["Failed"]) == 2 and result["PreviousRevoked"] is False
    assert "old-identity" in vault.live and {store.mount("web", m).accessor for m in ("a1", "b2")} == {"acc-1", "acc-2"}
    vault.denied_paths.clear()
    result = driver.retire_identity(IssuedToken("old-identity", "old-accessor", 3600, True))
    assert result == {"Moved": 2, "Failed": [], "PreviousRevoked": True}
    assert "old-identity" not in vault.live
    assert mounter.mounted[("web", "a1")]["files"]["pw"] == b"hunter2"


def test_mounts_no_container_holds_are_released_but_young_and_held_ones_stay(
    driver, vault, mounter, store, monkeypatch
):
    for mount_id in ("gone", "held", "young"):
        driver.mount("web", mount_id)
    old = time.time() - 60
    with store._lock:  # two of them mounted a minute ago
        store._db.execute("UPDATE mounts SET created_at = ? WHERE mount_id != 'young'", (old,))
    mounter.held = {("web", "held"): [4242]}
    assert driver.release_unheld(starting=30) == 1
    assert sorted(store.mount_ids("web")) == ["held", "young"]
    assert ("web", "gone") not in mounter.mounted and len(vault.live) == 2
    mounter.held = None  # cannot tell: nothing is released
    assert driver.release_unheld(starting=0) is None and len(store.mount_ids("web")) == 2
