"""Single-use wrapped tokens against real OpenBao and the real plugin process: per-volume wrapped
credentials, tamper alarms, plain tokens refused, token-file, and bootstrap without restart."""

from __future__ import annotations

import subprocess
from pathlib import Path

import hvac.exceptions
import pytest

from tests.support.faults import kill_hard
from tests.support.plugin import open_state, plugin_command

pytestmark = pytest.mark.openbao

MOUNT_ID = "ab" * 32
SECRET = "correct-horse-battery-staple"
FILES = {"secret.db_password": "secret/data/web/db#password"}
MINTER_POLICY = 'path "auth/token/create" { capabilities = ["update"] }\n'


@pytest.fixture(scope="module", autouse=True)
def minter_policy(bao):
    bao.root.sys.create_or_update_policy("minter", MINTER_POLICY)


def wrapped_token(bao, *policies: str) -> str:
    """What an operator hands over: a wrapping token around a token with `policies`."""
    created = bao.root.auth.token.create(policies=list(policies), ttl="1h", wrap_ttl="5m")
    return created["wrap_info"]["token"]


def test_wrapped_token_that_cannot_mint_is_shared_by_mounts_and_revoked_at_remove(start_plugin, bao, short_tmp):
    plugin = start_plugin()
    wrapping = wrapped_token(bao, "web")
    plugin.client.ok("VolumeDriver.Create", {"Name": "w", "Opts": {"wrapped-token": wrapping, **FILES}})
    with pytest.raises(hvac.exceptions.InvalidRequest):
        bao.root.sys.unwrap(wrapping)  # consumed exactly once, by the plugin
    view = plugin.client.ok("VolumeDriver.Mount", {"Name": "w", "ID": MOUNT_ID})["Mountpoint"]
    assert Path(view, "db_password").read_text() == SECRET
    # dockerd may call Create again with the same (spent) options: no tamper alarm.
    plugin.client.ok("VolumeDriver.Create", {"Name": "w", "Opts": {"wrapped-token": wrapping, **FILES}})
    assert "wrap.tamper" not in plugin.log()
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "w", "ID": MOUNT_ID})
    stored = (short_tmp / "state" / "state.db").read_bytes() + (short_tmp / "state" / "state.db-wal").read_bytes()
    assert wrapping.encode() not in stored
    credential = _only_volume_credential_accessor(plugin)
    assert bao.token_valid(credential), "the shared volume token outlives its mounts"
    plugin.client.ok("VolumeDriver.Remove", {"Name": "w"})
    assert not bao.token_valid(credential)


def test_wrapped_token_that_can_mint_gives_each_mount_a_child(start_plugin, bao):
    plugin = start_plugin()
    plugin.client.ok(
        "VolumeDriver.Create", {"Name": "m", "Opts": {"wrapped-token": wrapped_token(bao, "web", "minter"), **FILES}}
    )
    view = plugin.client.ok("VolumeDriver.Mount", {"Name": "m", "ID": MOUNT_ID})["Mountpoint"]
    assert Path(view, "db_password").read_text() == SECRET
    [child] = bao.accessors_with_meta(volume="m", mount_id=MOUNT_ID)
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "m", "ID": MOUNT_ID})
    assert not bao.token_valid(child)
    plugin.client.ok("VolumeDriver.Remove", {"Name": "m"})


def test_wrapped_approle_secret_id_needs_role_id_before_it_is_spent(start_plugin, bao):
    plugin = start_plugin()
    bao.root.auth.approle.create_or_update_approle("app-web", token_policies=["web", "minter"], token_ttl="1h")
    role_id = bao.root.auth.approle.read_role_id("app-web")["data"]["role_id"]
    wrapping = bao.root.write_data("auth/approle/role/app-web/secret-id", wrap_ttl="5m")["wrap_info"]["token"]
    status, reply = plugin.client.call(
        "VolumeDriver.Create", {"Name": "a", "Opts": {"wrapped-token": wrapping, **FILES}}
    )
    assert status == 500 and "also give role-id=" in reply["Err"]
    assert bao.wrapping_lookup(wrapping)["creation_path"] == "auth/approle/role/app-web/secret-id", "not spent"
    plugin.client.ok(
        "VolumeDriver.Create", {"Name": "a", "Opts": {"wrapped-token": wrapping, "role-id": role_id, **FILES}}
    )
    view = plugin.client.ok("VolumeDriver.Mount", {"Name": "a", "ID": MOUNT_ID})["Mountpoint"]
    assert Path(view, "db_password").read_text() == SECRET
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "a", "ID": MOUNT_ID})
    plugin.client.ok("VolumeDriver.Remove", {"Name": "a"})


def test_wrapping_token_unwrapped_by_someone_else_is_refused_at_create_as_tamper(start_plugin, bao):
    plugin = start_plugin()
    wrapping = wrapped_token(bao, "web")
    bao.root.sys.unwrap(wrapping)  # intercepted
    status, reply = plugin.client.call(
        "VolumeDriver.Create", {"Name": "t", "Opts": {"wrapped-token": wrapping, **FILES}}
    )
    assert status == 500 and "already unwrapped (possible interception)" in reply["Err"]
    assert "wrap.tamper" in plugin.log() and wrapping not in plugin.log()
    assert plugin.client.call("VolumeDriver.Get", {"Name": "t"})[0] == 500
    assert plugin.process.poll() is None, "a refused volume token is not a reason to stop serving"


def test_wrapping_token_from_sys_wrapping_wrap_is_refused(start_plugin, bao):
    plugin = start_plugin()
    chosen = bao.root.write_data("sys/wrapping/wrap", data={"token": "anything"}, wrap_ttl="5m")["wrap_info"]["token"]
    status, reply = plugin.client.call("VolumeDriver.Create", {"Name": "s", "Opts": {"wrapped-token": chosen, **FILES}})
    assert status == 500 and "'sys/wrapping/wrap', which is not an allowed creation path" in reply["Err"]
    assert "wrap.tamper" in plugin.log()


def test_plain_token_as_option_is_refused_with_advice(start_plugin, bao):
    plugin = start_plugin()
    plain = bao.root.auth.token.create(policies=["web"], ttl="5m")["auth"]["client_token"]
    status, reply = plugin.client.call("VolumeDriver.Create", {"Name": "p", "Opts": {"wrapped-token": plain, **FILES}})
    assert status == 500 and "plain Vault token" in reply["Err"] and "revoke that token now" in reply["Err"]
    assert plain not in reply["Err"] and plain not in plugin.log()


def test_token_file_gives_the_container_a_token_that_unwraps_once(start_plugin, bao):
    plugin = start_plugin()
    plugin.client.ok(
        "VolumeDriver.Create", {"Name": "tf", "Opts": {"role": "web", "token-file": "vault-token", **FILES}}
    )
    view = Path(plugin.client.ok("VolumeDriver.Mount", {"Name": "tf", "ID": MOUNT_ID})["Mountpoint"])
    wrapping = (view / "vault-token").read_text()
    info = bao.wrapping_lookup(wrapping)
    assert info["creation_path"] == "auth/token/create/web" and info["creation_ttl"] == 300
    inner = bao.server.client(wrapping).sys.unwrap()["auth"]  # what the application does
    with pytest.raises(hvac.exceptions.InvalidRequest):
        bao.server.client(wrapping).sys.unwrap()
    container = bao.server.client(inner["client_token"])
    assert (
        container.secrets.kv.v2.read_secret_version(path="web/db", raise_on_deleted_version=True)["data"]["data"][
            "password"
        ]
        == SECRET
    )
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "tf", "ID": MOUNT_ID})
    assert not bao.token_valid(inner["accessor"])


def test_token_file_never_unwrapped_is_still_revoked_at_unmount(start_plugin, bao):
    plugin = start_plugin()
    plugin.client.ok("VolumeDriver.Create", {"Name": "tf2", "Opts": {"role": "web", "token-file": "vault-token"}})
    plugin.client.ok("VolumeDriver.Mount", {"Name": "tf2", "ID": MOUNT_ID})
    [inner] = bao.accessors_with_meta(volume="tf2", purpose="token-file")
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "tf2", "ID": MOUNT_ID})
    assert not bao.token_valid(inner) and bao.accessors_with_meta(volume="tf2") == []


def test_bootstrap_gives_a_running_plugin_its_identity_without_restart(start_plugin, bao, short_tmp):
    plugin = start_plugin(short_tmp / "missing-file", wait_for="serving")
    plugin.client.ok("VolumeDriver.Create", {"Name": "b", "Opts": {"role": "web", **FILES}})
    status, reply = plugin.client.call("VolumeDriver.Mount", {"Name": "b", "ID": MOUNT_ID})
    assert status == 500 and "no Vault identity" in reply["Err"] and "missing-file" in reply["Err"]
    wrapped = bao.write_wrapped_secret_id(short_tmp / "new-wrapped")
    done = bootstrap(short_tmp, wrapped)
    assert done.returncode == 0 and "plugin identity established" in done.stdout, done.stderr
    # The same token again: recognised as this plugin's own use, not as tampering.
    again = bootstrap(short_tmp, wrapped)
    assert again.returncode != 0 and "already used by this plugin" in again.stderr
    view = plugin.client.ok("VolumeDriver.Mount", {"Name": "b", "ID": MOUNT_ID})["Mountpoint"]
    assert Path(view, "db_password").read_text() == SECRET
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "b", "ID": MOUNT_ID})


def test_bootstrap_with_an_intercepted_token_fails_but_plugin_keeps_serving(start_plugin, bao, short_tmp):
    plugin = start_plugin()
    wrapped = bao.write_wrapped_secret_id(short_tmp / "stolen")
    bao.root.sys.unwrap(wrapped.read_text())
    refused = bootstrap(short_tmp, wrapped)
    assert refused.returncode != 0 and "possible interception" in refused.stderr
    assert "wrap.tamper" in plugin.log()
    plugin.client.ok("VolumeDriver.Create", {"Name": "still", "Opts": {"role": "web", **FILES}})
    plugin.client.ok("VolumeDriver.Mount", {"Name": "still", "ID": MOUNT_ID})
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "still", "ID": MOUNT_ID})


@pytest.mark.parametrize("end", ["SIGTERM", "SIGKILL at once"])
def test_restart_keeps_wrapped_volume_credentials(start_plugin, bao, end):
    """The wrapping token is spent once Create answers: its credential must survive a crash right after."""
    plugin = start_plugin()
    plugin.client.ok(
        "VolumeDriver.Create", {"Name": "r", "Opts": {"wrapped-token": wrapped_token(bao, "web", "minter"), **FILES}}
    )
    if end == "SIGTERM":
        plugin.stop()
    else:
        kill_hard(plugin)
    restarted = start_plugin()
    view = restarted.client.ok("VolumeDriver.Mount", {"Name": "r", "ID": MOUNT_ID})["Mountpoint"]
    assert Path(view, "db_password").read_text() == SECRET
    restarted.client.ok("VolumeDriver.Unmount", {"Name": "r", "ID": MOUNT_ID})
    restarted.client.ok("VolumeDriver.Remove", {"Name": "r"})


def bootstrap(short_tmp: Path, wrapped: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            plugin_command(),
            "bootstrap",
            "--wrapped-secret-id-file",
            str(wrapped),
            "--state-dir",
            str(short_tmp / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _only_volume_credential_accessor(plugin) -> str:
    store = open_state(plugin.state_dir)
    try:
        [credential] = store.volume_credentials().values()
        return credential.accessor
    finally:
        store.close()
