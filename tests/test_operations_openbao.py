"""Operator commands (status, doctor, revoke), metrics and structured logs, against the real plugin
process and a real OpenBao."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from devenv.openbao import free_loopback_port
from tests.support.plugin import held_tokens, plugin_command

pytestmark = pytest.mark.openbao

MOUNT_ID = "ef" * 32
SECRET = "correct-horse-battery-staple"
GOOD = {"role": "web", "secret.db_password": "secret/data/web/db#password", "refresh": "0"}


def cli(plugin, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [plugin_command(), *args, "--state-dir", str(plugin.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        input=input,
    )


def test_status_shows_volumes_mounts_ttls_identity_and_vault_without_secrets(start_plugin, bao, databases):
    plugin = start_plugin()
    plugin.client.ok("VolumeDriver.Create", {"Name": "web", "Opts": GOOD})
    plugin.client.ok(
        "VolumeDriver.Create", {"Name": "db", "Opts": {"role": "web", "secret.u": "db/creds/app#username"}}
    )
    plugin.client.ok("VolumeDriver.Mount", {"Name": "db", "ID": MOUNT_ID})
    reply = cli(plugin, "status", "--json")
    assert reply.returncode == 0, reply.stderr
    status = json.loads(reply.stdout)
    assert status["vault"]["reachable"] and status["vault"]["sealed"] is False
    assert status["identity"]["ttl"] > 3600
    volumes = {v["name"]: v for v in status["volumes"]}
    assert volumes["web"]["mounts"] == [] and volumes["web"]["options"] == GOOD
    [mount] = volumes["db"]["mounts"]
    assert mount["mount_id"] == MOUNT_ID and mount["refcount"] == 1 and 3500 < mount["token_ttl"] <= 3600
    [lease] = mount["leases"]
    assert lease["source"] == "db/creds/app" and 3500 < lease["ttl"] <= 3600
    text = cli(plugin, "status").stdout
    assert "db" in text and MOUNT_ID[:12] in text and "db/creds/app (ttl" in text and "unsealed" in text
    tokens = held_tokens(plugin.state_dir)
    assert not any(t in reply.stdout or t in text for t in tokens)
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "db", "ID": MOUNT_ID})


def test_doctor_passes_a_good_volume_and_explains_each_failure(start_plugin, bao):
    plugin = start_plugin()
    plugin.client.ok("VolumeDriver.Create", {"Name": "good", "Opts": GOOD})
    plugin.client.ok("VolumeDriver.Create", {"Name": "bad", "Opts": {**GOOD, "secret.x": "secret/data/other/x#y"}})
    plugin.client.ok("VolumeDriver.Create", {"Name": "norole", "Opts": {**GOOD, "role": "missing-role"}})
    passing = cli(plugin, "doctor", "good")
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert "PASS  vault:" in passing.stdout and "PASS  identity:" in passing.stdout
    assert "PASS  volume good: secret/data/web/db: read allowed" in passing.stdout
    failing = cli(plugin, "doctor")
    assert failing.returncode == 1
    assert "FAIL  volume bad: secret/data/other/x: read denied" in failing.stdout
    assert (
        'fix: add path "secret/data/other/x" { capabilities = ["read"] } to a policy of token role web'
        in failing.stdout
    )
    assert "FAIL  volume norole: token: cannot mint a token from token role missing-role" in failing.stdout
    assert bao.accessors_with_meta(purpose="doctor") == [], "doctor's tokens are revoked"


def test_doctor_reports_an_unreachable_vault(start_plugin):
    plugin = start_plugin(vault_addr="http://127.0.0.1:9", wait_for="serving")
    failing = cli(plugin, "doctor")
    assert failing.returncode == 1 and "FAIL  vault:" in failing.stdout and "fix: check VAULT_ADDR" in failing.stdout


def test_break_glass_revokes_tokens_wipes_files_and_is_audited(start_plugin, bao):
    plugin = start_plugin()
    for name in ("a", "b"):
        plugin.client.ok("VolumeDriver.Create", {"Name": name, "Opts": GOOD})
    views = {
        name: plugin.client.ok("VolumeDriver.Mount", {"Name": name, "ID": MOUNT_ID})["Mountpoint"]
        for name in ("a", "b")
    }
    accessors = {name: bao.accessors_with_meta(volume=name)[0] for name in ("a", "b")}
    refused = cli(plugin, "revoke", "--volume", "a", input="n\n")
    assert refused.returncode != 0 and bao.token_valid(accessors["a"]), "asks before breaking glass"
    done = cli(plugin, "revoke", "--volume", "a", "--yes")
    assert done.returncode == 0 and "revoked the tokens of 1 mount(s)" in done.stdout
    assert not bao.token_valid(accessors["a"]) and list(Path(views["a"]).iterdir()) == []
    assert bao.token_valid(accessors["b"]) and Path(views["b"], "db_password").read_text() == SECRET
    assert cli(plugin, "revoke", "--all", "--yes").returncode == 0
    assert not bao.token_valid(accessors["b"]) and list(Path(views["b"]).iterdir()) == []
    events = [json.loads(line) for line in plugin.log().splitlines() if '"breakglass.revoke"' in line]
    assert [e["volume"] for e in events] == ["a", "*"]
    for name in ("a", "b"):  # the containers stop later: their Unmounts still clean up
        plugin.client.ok("VolumeDriver.Unmount", {"Name": name, "ID": MOUNT_ID})


def test_break_glass_on_a_wrapped_volume_refuses_later_mounts(start_plugin, bao):
    bao.root.sys.create_or_update_policy("minter", 'path "auth/token/create" { capabilities = ["update"] }\n')
    plugin = start_plugin()
    wrapping = bao.root.auth.token.create(policies=["web", "minter"], ttl="1h", wrap_ttl="5m")["wrap_info"]["token"]
    plugin.client.ok(
        "VolumeDriver.Create",
        {"Name": "w", "Opts": {"wrapped-token": wrapping, "secret.p": "secret/data/web/db#password"}},
    )
    assert cli(plugin, "revoke", "--volume", "w", "--yes").returncode == 0
    status, reply = plugin.client.call("VolumeDriver.Mount", {"Name": "w", "ID": MOUNT_ID})
    assert status == 500 and "revoked by break-glass" in reply["Err"]


def test_metrics_count_mounts_vault_requests_renewals_and_identity(start_plugin, bao, short_tmp):
    port = free_loopback_port()
    plugin = start_plugin(extra=["--metrics-addr", f"127.0.0.1:{port}"])
    plugin.client.ok("VolumeDriver.Create", {"Name": "m", "Opts": {**GOOD, "ttl": "6s"}})
    plugin.client.ok("VolumeDriver.Create", {"Name": "bad", "Opts": {**GOOD, "secret.x": "secret/data/other/x#y"}})
    plugin.client.ok("VolumeDriver.Mount", {"Name": "m", "ID": MOUNT_ID})
    assert plugin.client.call("VolumeDriver.Mount", {"Name": "bad", "ID": MOUNT_ID})[0] == 500
    time.sleep(4.5)  # past 0.7 of the 6 s token TTL: one renewal
    metrics = _scrape(port)
    assert metrics["vault_secrets_mounts_active"] == 1
    assert metrics["vault_secrets_mount_duration_seconds_count"] == 2
    assert metrics["vault_secrets_mount_failures_total"] == 1
    assert metrics['vault_secrets_vault_request_duration_seconds_count{operation="mint"}'] == 2
    assert metrics['vault_secrets_vault_request_errors_total{kind="refused",operation="read"}'] == 1
    assert metrics['vault_secrets_renewals_total{kind="token"}'] >= 1
    assert 0 < metrics["vault_secrets_identity_expiry_seconds"] <= 86400
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "m", "ID": MOUNT_ID})
    assert _scrape(port)["vault_secrets_mounts_active"] == 0


def test_logs_are_json_lines_with_stable_audit_events(start_plugin):
    plugin = start_plugin()
    plugin.client.ok("VolumeDriver.Create", {"Name": "l", "Opts": GOOD})
    plugin.client.ok("VolumeDriver.Mount", {"Name": "l", "ID": MOUNT_ID})
    plugin.client.ok("VolumeDriver.Unmount", {"Name": "l", "ID": MOUNT_ID})
    plugin.client.ok("VolumeDriver.Remove", {"Name": "l"})
    records = [json.loads(line) for line in plugin.log().splitlines()]  # every line, gunicorn's included
    events = [r for r in records if r.get("event")]
    assert [e["event"] for e in events] == [
        "volume.create",
        "token.mint",
        "mount",
        "token.revoke",
        "unmount",
        "volume.remove",
    ]
    assert all(e["volume"] == "l" for e in events if e["event"] != "token.revoke")
    mint = next(e for e in events if e["event"] == "token.mint")
    assert mint["mount_id"] == MOUNT_ID and mint["accessor"]


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
