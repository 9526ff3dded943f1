"""Dynamic secrets and their leases against real OpenBao, real PostgreSQL and the real plugin process:
database credentials that live exactly as long as the mount, PKI certificates, lease renewal, re-issue
at max TTL with the files swapped, and refresh of static secrets."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support.faults import state_query

pytestmark = pytest.mark.openbao

MOUNT_ID = "cd" * 32


def db_options(mount: str = "db", **extra: str) -> dict[str, str]:
    return {
        "role": "web",
        "secret.username": f"{mount}/creds/app#username",
        "secret.password": f"{mount}/creds/app#password",
        "template.dsn": f'postgresql://{{{{ secret("{mount}/creds/app").username }}}}@127.0.0.1/postgres',
        **extra,
    }


def read(view: str, name: str) -> str:
    return Path(view, name).read_text()


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_database_credential_lives_exactly_as_long_as_the_mount(start_plugin, bao, databases):
    plugin = start_plugin()
    plugin.client.ok("VolumeDriver.Create", {"Name": "db", "Opts": db_options()})
    view = plugin.client.ok("VolumeDriver.Mount", {"Name": "db", "ID": MOUNT_ID})["Mountpoint"]
    username, password = read(view, "username"), read(view, "password")
    assert read(view, "dsn") == f"postgresql://{username}@127.0.0.1/postgres", "one request, one credential"
    assert databases.pg.can_login(username, password)
    [lease] = bao.root.list("sys/leases/lookup/db/creds/app")["data"]["keys"]
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "db", "ID": MOUNT_ID})
    assert not databases.pg.role_exists(username)
    with pytest.raises(Exception):
        bao.root.sys.read_lease(f"db/creds/app/{lease}")
    wait_for(lambda: "lease.revoke" in plugin.log(), 5, "the plugin to confirm the lease is gone")


@pytest.fixture
def pki(bao):
    """A PKI mount (role `web` for *.internal) and token role `pki` whose tokens may issue from it."""
    if "pki/" not in bao.root.sys.list_mounted_secrets_engines()["data"]:
        bao.root.sys.enable_secrets_engine("pki", config={"max_lease_ttl": "48h"})
        bao.root.write_data("pki/root/generate/internal", data={"common_name": "vault-secrets test CA", "ttl": "48h"})
        bao.root.write_data(
            "pki/roles/web", data={"allowed_domains": "internal", "allow_subdomains": True, "max_ttl": "24h"}
        )
        bao.root.sys.create_or_update_policy("pki-web", 'path "pki/issue/web" { capabilities = ["update"] }\n')
        bao.root.write_data("auth/token/roles/pki", data={"allowed_policies": "pki-web"})
        bao.root.sys.create_or_update_policy(
            "vault-secrets-plugin",
            bao.root.sys.read_policy("vault-secrets-plugin")["data"]["rules"]
            + 'path "auth/token/create/pki" { capabilities = ["update"] }\n',
        )


@pytest.mark.usefixtures("pki")
def test_pki_certificate_and_key_from_one_issue_request(start_plugin, bao):
    plugin = start_plugin()
    source = "pki/issue/web?common_name=web.internal&ttl=1h"
    plugin.client.ok(
        "VolumeDriver.Create",
        {
            "Name": "tls",
            "Opts": {
                "role": "pki",
                "secret.tls.crt": source,
                "format.tls.crt": "pem",
                "secret.tls.key": f"{source}#private_key",
            },
        },
    )
    view = plugin.client.ok("VolumeDriver.Mount", {"Name": "tls", "ID": MOUNT_ID})["Mountpoint"]
    chain = x509.load_pem_x509_certificates(Path(view, "tls.crt").read_bytes())
    assert chain[0].subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "web.internal"
    assert chain[1].subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "vault-secrets test CA"
    key = serialization.load_pem_private_key(Path(view, "tls.key").read_bytes(), password=None)
    assert key.public_key().public_numbers() == chain[0].public_key().public_numbers(), (
        "key and certificate from one request"
    )
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "tls", "ID": MOUNT_ID})


def test_short_lease_is_renewed_then_reissued_at_max_ttl_with_files_swapped(start_plugin, bao, databases):
    plugin = start_plugin()
    plugin.client.ok(
        "VolumeDriver.Create",
        {"Name": "short", "Opts": db_options("dbshort", **{"rotate-grace": "2s", "refresh": "0"})},
    )
    view = plugin.client.ok("VolumeDriver.Mount", {"Name": "short", "ID": MOUNT_ID})["Mountpoint"]
    first = read(view, "username")
    [lease] = bao.root.list("sys/leases/lookup/dbshort/creds/app")["data"]["keys"]
    wait_for(
        lambda: bao.root.sys.read_lease(f"dbshort/creds/app/{lease}")["data"]["last_renewal"], 6, "a lease renewal"
    )
    second = wait_for(lambda: read(view, "username") != first and read(view, "username"), 15, "a re-issued credential")
    assert read(view, "dsn") == f"postgresql://{second}@127.0.0.1/postgres"
    assert databases.pg.can_login(second, read(view, "password"))
    wait_for(lambda: not databases.pg.role_exists(first), 8, "the old credential to be revoked after the grace")
    assert "token.replace" in plugin.log(), "a new token and its secrets replaced the old"
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "short", "ID": MOUNT_ID})
    assert not databases.pg.role_exists(second)
    no_revocation_owed(plugin)


def no_revocation_owed(plugin) -> None:
    """Wait until the revocations owed for after a grace are made: nothing this test issued outlives it."""
    wait_for(
        lambda: state_query(plugin.state_dir, "SELECT COUNT(*) FROM pending_revocations") == [(0,)],
        15,
        "the old tokens' revocations after their grace",
    )


def test_refresh_picks_up_a_new_kv_version(start_plugin, bao):
    bao.root.secrets.kv.v2.create_or_update_secret(path="web/rotating", secret={"password": "one"})
    plugin = start_plugin()
    plugin.client.ok(
        "VolumeDriver.Create",
        {"Name": "kv", "Opts": {"role": "web", "secret.pw": "secret/data/web/rotating#password", "refresh": "5s"}},
    )
    view = plugin.client.ok("VolumeDriver.Mount", {"Name": "kv", "ID": MOUNT_ID})["Mountpoint"]
    assert read(view, "pw") == "one"
    bao.root.secrets.kv.v2.create_or_update_secret(path="web/rotating", secret={"password": "two"})
    wait_for(lambda: read(view, "pw") == "two", 10, "the new version")
    assert not any(p.name.startswith(".") for p in Path(view).iterdir()), "no temp file left behind"
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "kv", "ID": MOUNT_ID})


def test_volume_removed_while_unmounted_leaves_no_lease(start_plugin, bao, databases):
    plugin = start_plugin()
    plugin.client.ok("VolumeDriver.Create", {"Name": "gone", "Opts": db_options()})
    plugin.client.ok("VolumeDriver.Mount", {"Name": "gone", "ID": MOUNT_ID})
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "gone", "ID": MOUNT_ID})
    plugin.client.ok("VolumeDriver.Remove", {"Name": "gone"})

    def no_leases_left() -> bool:  # Vault deletes a revoked token's leases a moment after the revocation
        keys = bao.root.list("sys/leases/lookup/db/creds/app")
        return keys is None or keys["data"]["keys"] == []

    wait_for(no_leases_left, 10, "the credential's lease to be gone")


def test_rotate_grace_revokes_the_old_database_role_well_before_its_max_ttl(start_plugin, bao, databases):
    """20 s leases, 30 s max TTL, rotate-grace=2s, and the docs' policies (no sys/leases/revoke anywhere): the
    first renewal is capped, a new token and credential take over, and the old role is gone a grace later."""
    plugin = start_plugin()
    plugin.client.ok("VolumeDriver.Create", {"Name": "grace", "Opts": db_options("dbgrace", **{"rotate-grace": "2s"})})
    mounted_at = time.monotonic()
    view = plugin.client.ok("VolumeDriver.Mount", {"Name": "grace", "ID": MOUNT_ID})["Mountpoint"]
    first, first_password = read(view, "username"), read(view, "password")
    second = wait_for(lambda: read(view, "username") != first and read(view, "username"), 25, "a re-issue")
    reissued_at = time.monotonic()
    assert databases.pg.can_login(second, read(view, "password"))
    assert databases.pg.can_login(first, first_password), "the old credential serves during the grace"
    wait_for(lambda: not databases.pg.role_exists(first), 10, "the old role to be revoked after the grace")
    gone_at = time.monotonic()
    assert gone_at - reissued_at < 2 + 5, "revoked a grace after the re-issue"
    assert gone_at - mounted_at < 30 - 5, "well before the old credential's max TTL"
    log = plugin.log()
    assert "token.replace" in log and "Vault denied" not in log
    assert "could not revoke" not in log, "no revocation failed (and none was taken for done)"
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "grace", "ID": MOUNT_ID})
    wait_for(lambda: not databases.pg.role_exists(second), 10, "the new role to go with the mount")
    no_revocation_owed(plugin)


def _issued_certificates(bao) -> int:
    listed = bao.root.list("pki/certs")
    return len(listed["data"]["keys"]) if listed else 0


@pytest.mark.usefixtures("pki")
def test_a_certificate_is_issued_once_whatever_refresh_says(start_plugin, bao):
    plugin = start_plugin()
    source = "pki/issue/web?common_name=once.internal&ttl=1h"
    plugin.client.ok(
        "VolumeDriver.Create",
        {"Name": "once", "Opts": {"role": "pki", "secret.tls.crt": source, "format.tls.crt": "pem", "refresh": "5s"}},
    )
    before = _issued_certificates(bao)
    view = plugin.client.ok("VolumeDriver.Mount", {"Name": "once", "ID": MOUNT_ID})["Mountpoint"]
    served = Path(view, "tls.crt").read_bytes()
    time.sleep(12)  # two refreshes (the shortest refresh= is 5s)
    assert _issued_certificates(bao) - before == 1, "a 1h certificate is not re-issued by refresh"
    assert Path(view, "tls.crt").read_bytes() == served
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "once", "ID": MOUNT_ID})


@pytest.mark.usefixtures("pki")
def test_a_short_certificate_is_replaced_before_it_expires_even_without_refresh(start_plugin, bao):
    plugin = start_plugin()
    source = "pki/issue/web?common_name=short.internal&ttl=12s"
    plugin.client.ok(
        "VolumeDriver.Create",
        {
            "Name": "short-tls",
            "Opts": {"role": "pki", "secret.tls.crt": source, "format.tls.crt": "pem", "refresh": "0"},
        },
    )
    view = plugin.client.ok("VolumeDriver.Mount", {"Name": "short-tls", "ID": MOUNT_ID})["Mountpoint"]

    def leaf() -> x509.Certificate:
        return x509.load_pem_x509_certificates(Path(view, "tls.crt").read_bytes())[0]

    first = leaf()
    second = wait_for(lambda: leaf().serial_number != first.serial_number and leaf(), 12, "a new certificate")
    replaced_at = time.time()
    assert replaced_at < first.not_valid_after_utc.timestamp(), "replaced before the old one expired"
    assert second.not_valid_after_utc.timestamp() > replaced_at + 5, "by a valid new one"
    assert "(retried)" not in plugin.log()
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "short-tls", "ID": MOUNT_ID})


@pytest.mark.parametrize("breakage", ["template error", "full tmpfs"])
def test_a_rewrite_that_fails_keeps_the_old_files_and_succeeds_once_the_cause_is_gone(start_plugin, bao, breakage):
    kv = bao.root.secrets.kv.v2
    path = f"web/breaks-{breakage.replace(' ', '-')}"
    kv.create_or_update_secret(path=path, secret={"name": "one", "blob": "small"})
    plugin = start_plugin()
    source = f"secret/data/{path}"
    options = {
        "role": "web",
        "template.greeting": f'hello {{{{ secret("{source}").name }}}}',
        "secret.blob": f"{source}#blob",
        "refresh": "5s",
        "size": "16k",
    }
    plugin.client.ok("VolumeDriver.Create", {"Name": "breaks", "Opts": options})
    view = plugin.client.ok("VolumeDriver.Mount", {"Name": "breaks", "ID": MOUNT_ID})["Mountpoint"]
    assert (read(view, "greeting"), read(view, "blob")) == ("hello one", "small")
    if breakage == "template error":
        kv.create_or_update_secret(path=path, secret={"blob": "changed"})  # the template's field is gone
        failure = "name"
    else:
        kv.create_or_update_secret(path=path, secret={"name": "two", "blob": "x" * 40_000})  # 40 kB in 16 kB
        failure = "does not fit"
    wait_for(lambda: failure in plugin.log() and "retrying" in plugin.log(), 15, "the rewrite to fail")
    assert (read(view, "greeting"), read(view, "blob")) == ("hello one", "small"), "the old files serve on"
    assert sorted(p.name for p in Path(view).iterdir()) == ["blob", "greeting"], "no temp file left"
    kv.create_or_update_secret(path=path, secret={"name": "three", "blob": "fixed"})
    wait_for(lambda: read(view, "greeting") == "hello three", 40, "the rewrite to succeed once fixed")
    assert read(view, "blob") == "fixed"
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "breaks", "ID": MOUNT_ID})


def test_a_volume_whose_mounts_share_its_token_revokes_their_database_roles_when_they_end(start_plugin, bao, databases):
    """A wrapped token that cannot mint children is shared by the volume's mounts, so it is not revoked at
    Unmount: each lease is, with its right on sys/leases/revoke (or the Mount says which right is missing)."""
    bao.root.sys.create_or_update_policy("lease-revoker", 'path "sys/leases/revoke" { capabilities = ["update"] }\n')
    plugin = start_plugin()

    def create(name: str, *policies: str) -> None:
        wrapping = bao.root.auth.token.create(policies=list(policies), ttl="1h", wrap_ttl="5m")["wrap_info"]["token"]
        opts = {k: v for k, v in db_options().items() if k != "role"}
        plugin.client.ok("VolumeDriver.Create", {"Name": name, "Opts": {"wrapped-token": wrapping, **opts}})

    create("shared", "web", "lease-revoker")
    view = plugin.client.ok("VolumeDriver.Mount", {"Name": "shared", "ID": MOUNT_ID})["Mountpoint"]
    username = read(view, "username")
    assert databases.pg.can_login(username, read(view, "password"))
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "shared", "ID": MOUNT_ID})
    wait_for(lambda: not databases.pg.role_exists(username), 10, "the mount's database role to be revoked")

    create("no-revoke", "web")
    status, reply = plugin.client.call("VolumeDriver.Mount", {"Name": "no-revoke", "ID": MOUNT_ID})
    assert "sys/leases/revoke" in reply["Err"] and "auth/token/create" in reply["Err"]
