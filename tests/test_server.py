"""`vault-secrets-plugin serve` as a real process (gunicorn on a Unix socket) with real tmpfs mounts
and a real OpenBao, spoken to as dockerd does. Needs root for mount(2)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.plugin import held_tokens, plugin_command

pytestmark = pytest.mark.openbao

MOUNT_ID = "3f" * 32
SECRET = "correct-horse-battery-staple"
OPTIONS = {
    "role": "web",
    "secret.db_password": "secret/data/web/db#password",
    "secret.db.env": "secret/data/web/db",
    "format.db.env": "env",
    "secret.legacy": "kv1/web/legacy#token",
    "uid": "1000",
    "gid": "1000",
    "mode": "0440",
}


def mountinfo(path: str) -> dict[str, str] | None:
    """The mount options (per-mount and superblock) of the mount at `path`, or None."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == path:
            return {"mount": fields[5], "super": fields[-1]}
    return None


def test_socket_is_root_only_and_state_is_private(start_plugin, short_tmp):
    start_plugin()
    assert stat.S_IMODE((short_tmp / "p.sock").stat().st_mode) == 0o600
    assert stat.S_IMODE((short_tmp / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((short_tmp / "state" / "seal.key").stat().st_mode) == 0o600
    assert not any(stat.S_IMODE(p.stat().st_mode) & 0o077 for p in (short_tmp / "state").glob("state.db*"))


def test_mount_makes_a_hardened_read_only_tmpfs_and_unmount_revokes(start_plugin, bao):
    plugin = start_plugin()
    plugin.client.ok("VolumeDriver.Create", {"Name": "web", "Opts": OPTIONS})
    view = plugin.client.ok("VolumeDriver.Mount", {"Name": "web", "ID": MOUNT_ID})["Mountpoint"]
    files = {p.name: p for p in Path(view).iterdir()}
    assert sorted(files) == ["db.env", "db_password", "legacy"]
    assert files["db_password"].read_text() == SECRET
    assert "password='correct-horse-battery-staple'" in files["db.env"].read_text()
    for path in files.values():
        info = path.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (1000, 1000, 0o440)
    assert stat.S_IMODE(Path(view).stat().st_mode) == 0o550
    options = mountinfo(view)
    assert options is not None and {"ro", "nosuid", "nodev", "noexec"} <= set(options["mount"].split(","))
    data = mountinfo(str(Path(view).parent / "data"))
    assert data is not None and {"nosuid", "nodev", "noexec"} <= set(data["mount"].split(","))
    assert "size=1024k" in data["super"]
    with pytest.raises(OSError) as caught:  # even root cannot write through the view
        (Path(view) / "new").write_text("x")
    assert caught.value.errno == errno.EROFS
    [accessor] = bao.accessors_with_meta(volume="web", mount_id=MOUNT_ID)
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "web", "ID": MOUNT_ID})
    assert mountinfo(view) is None and not Path(view).parent.exists()
    assert not bao.token_valid(accessor)
    plugin.client.ok("VolumeDriver.Remove", {"Name": "web"})


def test_mount_fails_closed_on_a_denied_secret(start_plugin, bao, short_tmp):
    plugin = start_plugin()
    opts = {**OPTIONS, "secret.other": "secret/data/other/x#y"}
    plugin.client.ok("VolumeDriver.Create", {"Name": "denied", "Opts": opts})
    status, reply = plugin.client.call("VolumeDriver.Mount", {"Name": "denied", "ID": MOUNT_ID})
    assert status == 500 and "denied permission to read secret/data/other/x" in reply["Err"]
    assert not (short_tmp / "state-mounts" / "denied").exists()
    assert mountinfo(str(short_tmp / "state-mounts" / "denied" / MOUNT_ID / "view")) is None
    assert bao.accessors_with_meta(volume="denied") == []


def test_refused_options_reach_the_user_as_err(start_plugin):
    plugin = start_plugin()
    status, reply = plugin.client.call("VolumeDriver.Create", {"Name": "t", "Opts": {"token": "s.abc", "role": "web"}})
    assert status == 500 and "docker volume inspect" in reply["Err"]


def test_restart_keeps_volumes_and_mounts_and_can_revoke_them(start_plugin, bao, short_tmp):
    plugin = start_plugin()
    plugin.client.ok("VolumeDriver.Create", {"Name": "web", "Opts": OPTIONS})
    view = plugin.client.ok("VolumeDriver.Mount", {"Name": "web", "ID": MOUNT_ID})["Mountpoint"]
    [accessor] = bao.accessors_with_meta(volume="web", mount_id=MOUNT_ID)
    assert plugin.stop() == 0
    assert Path(view, "db_password").read_text() == SECRET, "a running container keeps its secrets"
    # The wrapped SecretID file was consumed by the first start: the sealed identity is resumed.
    restarted = start_plugin()
    assert "resumed the sealed plugin identity" in restarted.log()
    assert "wrap.tamper" not in restarted.log()
    assert restarted.client.ok("VolumeDriver.Get", {"Name": "web"})["Volume"]["Status"] == {"activeMounts": 1}
    restarted.client.ok("VolumeDriver.Unmount", {"Name": "web", "ID": MOUNT_ID})
    assert mountinfo(view) is None and not bao.token_valid(accessor)


def test_serves_state_while_vault_is_unreachable(start_plugin, short_tmp):
    plugin = start_plugin(vault_addr="http://127.0.0.1:9", wait_for="serving", extra=["--mount-timeout", "2"])
    plugin.client.ok("VolumeDriver.Create", {"Name": "web", "Opts": OPTIONS})
    assert [v["Name"] for v in plugin.client.ok("VolumeDriver.List")["Volumes"]] == ["web"]
    started = time.monotonic()
    status, reply = plugin.client.call("VolumeDriver.Mount", {"Name": "web", "ID": MOUNT_ID})
    assert status == 500 and "no Vault identity" in reply["Err"] and "is unreachable" in reply["Err"]
    assert 1.5 < time.monotonic() - started < 5, "the Mount waited its budget for an identity that may still come"
    assert not (short_tmp / "state-mounts" / "web").exists()


def test_tampered_wrapping_token_stops_the_plugin_with_a_security_event(start_plugin, bao, short_tmp):
    wrapped = bao.write_wrapped_secret_id(short_tmp / "wrapped")
    bao.root.sys.unwrap(wrapped.read_text())
    plugin = start_plugin(wrapped, wait_for=None)
    assert plugin.process.wait(20) != 0
    log = plugin.log()
    assert "wrap.tamper" in log and "possible interception" in log
    assert wrapped.read_text() not in log


def test_no_token_or_secret_leaks_into_logs_state_or_process(start_plugin, bao, short_tmp):
    plugin = start_plugin()
    plugin.client.ok("VolumeDriver.Create", {"Name": "web", "Opts": OPTIONS})
    plugin.client.ok("VolumeDriver.Mount", {"Name": "web", "ID": MOUNT_ID})
    state = short_tmp / "state"
    tokens = held_tokens(state)
    needles = [t.encode() for t in tokens] + [SECRET.encode(), b"legacy-kv1-value"]
    pids = [plugin.pid] + [int(p) for p in Path(f"/proc/{plugin.pid}/task/{plugin.pid}/children").read_text().split()]
    haystacks = {
        "plugin log": plugin.log_path.read_bytes(),
        **{f"state file {p.name}": p.read_bytes() for p in state.iterdir() if p.is_file()},
        **{
            f"/proc/{pid}/{part}": Path(f"/proc/{pid}/{part}").read_bytes()
            for pid in pids
            for part in ("cmdline", "environ")
        },
    }
    for where, content in haystacks.items():
        for needle in needles:
            assert needle not in content, f"a token or secret value leaked into {where}"
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "web", "ID": MOUNT_ID})
    assert os.listdir(plugin.mount_root) == []
    assert not (state / "mounts").exists(), "no mount in the state directory"


def test_short_ttl_child_token_is_renewed_while_mounted(start_plugin, bao):
    plugin = start_plugin()
    plugin.client.ok("VolumeDriver.Create", {"Name": "short", "Opts": {**OPTIONS, "ttl": "6s"}})
    plugin.client.ok("VolumeDriver.Mount", {"Name": "short", "ID": MOUNT_ID})
    [accessor] = bao.accessors_with_meta(volume="short", mount_id=MOUNT_ID)
    time.sleep(9)  # past the original TTL: only renewals keep it alive
    data = bao.root.auth.token.lookup_accessor(accessor)["data"]
    assert data["last_renewal_time"] and data["ttl"] > 0
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "short", "ID": MOUNT_ID})
    assert not bao.token_valid(accessor)


def test_state_copied_without_its_seal_key_is_refused_and_reveals_nothing(start_plugin, bao, short_tmp):
    plugin = start_plugin()
    plugin.client.ok("VolumeDriver.Create", {"Name": "web", "Opts": OPTIONS})
    identity_token = held_tokens(short_tmp / "state")[0]
    plugin.stop()
    copy = short_tmp / "copied"
    copy.mkdir(mode=0o700)
    for path in (short_tmp / "state").glob("state.db*"):
        copy.joinpath(path.name).write_bytes(path.read_bytes())
    assert not any(identity_token.encode() in p.read_bytes() for p in copy.iterdir())
    refused = subprocess.run(
        [
            plugin_command(),
            "serve",
            "--state-dir",
            str(copy),
            "--socket",
            str(short_tmp / "c.sock"),
            "--vault-addr",
            bao.addr,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode != 0 and "seal key" in refused.stderr and "is missing" in refused.stderr
    assert not (copy / "seal.key").exists()


def test_a_secret_larger_than_size_names_the_file_and_the_limit(start_plugin, bao, short_tmp):
    bao.root.secrets.kv.v2.create_or_update_secret(path="web/big", secret={"blob": "x" * 100_000})
    plugin = start_plugin()
    plugin.client.ok(
        "VolumeDriver.Create",
        {"Name": "big", "Opts": {"role": "web", "secret.blob": "secret/data/web/big#blob", "size": "64k"}},
    )
    status, reply = plugin.client.call("VolumeDriver.Mount", {"Name": "big", "ID": MOUNT_ID})
    assert status == 500
    assert "file blob (100000 bytes) does not fit" in reply["Err"] and "more than size=64k" in reply["Err"]
    assert "raise size=" in reply["Err"] and "None" not in reply["Err"]
    assert not (short_tmp / "state-mounts" / "big").exists() or not any((short_tmp / "state-mounts" / "big").iterdir())


def test_a_second_plugin_on_the_same_state_directory_is_refused_before_it_binds(start_plugin, bao, short_tmp):
    first = start_plugin()
    second = subprocess.run(
        [
            plugin_command(),
            "serve",
            "--socket",
            str(short_tmp / "second.sock"),
            "--state-dir",
            str(short_tmp / "state"),
            "--vault-addr",
            bao.addr,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("VAULT_")},
    )
    assert second.returncode != 0
    assert f"another vault-secrets plugin (PID {first.pid}) is serving state directory" in second.stderr
    assert not (short_tmp / "second.sock").exists()
    assert first.client.ok("Plugin.Activate")["Implements"] == ["VolumeDriver"], "the first one serves on"


def test_a_rewrite_that_finds_the_tmpfs_full_keeps_the_old_file_and_leaves_no_temp_file(start_plugin, bao):
    bao.root.secrets.kv.v2.create_or_update_secret(path="web/growing", secret={"blob": "small"})
    plugin = start_plugin()
    options = {"role": "web", "secret.blob": "secret/data/web/growing#blob", "size": "64k", "refresh": "5s"}
    plugin.client.ok("VolumeDriver.Create", {"Name": "grow", "Opts": options})
    view = Path(plugin.client.ok("VolumeDriver.Mount", {"Name": "grow", "ID": MOUNT_ID})["Mountpoint"])
    bao.root.secrets.kv.v2.create_or_update_secret(path="web/growing", secret={"blob": "x" * 100_000})
    deadline = time.monotonic() + 15
    while "does not fit" not in plugin.log():
        assert time.monotonic() < deadline, "the refresh did not meet the full tmpfs"
        time.sleep(0.2)
    assert sorted(p.name for p in view.iterdir()) == ["blob"], "no part-written temp file in the container's view"
    assert (view / "blob").read_text() == "small"
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "grow", "ID": MOUNT_ID})


def test_mounts_inside_the_state_directory_are_refused(short_tmp):
    result = subprocess.run(
        [
            plugin_command(),
            "serve",
            "--socket",
            str(short_tmp / "x.sock"),
            "--state-dir",
            str(short_tmp / "state"),
            "--mount-root",
            str(short_tmp / "state" / "mounts"),
            "--vault-addr",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0 and "is inside --state-dir" in result.stderr and "/run/vault-secrets" in result.stderr
    assert not (short_tmp / "x.sock").exists()


def test_sigterm_stops_in_order_keeping_the_mounts(start_plugin, bao, short_tmp):
    """SIGTERM (what systemd sends): the loops end, the database is closed and checkpointed, the socket goes,
    and mounted containers keep their files, which a restarted plugin resumes."""
    plugin = start_plugin()
    plugin.client.ok("VolumeDriver.Create", {"Name": "web", "Opts": OPTIONS})
    view = plugin.client.ok("VolumeDriver.Mount", {"Name": "web", "ID": MOUNT_ID})["Mountpoint"]
    assert plugin.stop() == 0
    log = plugin.log()
    assert "stopped in order: background loops ended, state database closed" in log
    assert not (short_tmp / "p.sock").exists()
    assert not (short_tmp / "state" / "state.db-wal").exists(), "closed: the write-ahead log was checkpointed"
    assert Path(view, "db_password").read_text() == SECRET, "the container's files stay"
    again = start_plugin()  # resumes the mount; its Unmount revokes the token
    again.client.ok("VolumeDriver.Unmount", {"Name": "web", "ID": MOUNT_ID})
    assert mountinfo(view) is None
