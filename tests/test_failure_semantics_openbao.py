"""How the real plugin process meets the failures production Vault produces, through the fault proxy in
front of real OpenBao: transient answers on renewals and on the wrapped SecretID, a Mount during an
outage of a few seconds, final answers, a Mount that arrives before the identity, periodic token roles.

The plugin here logs in with its own AppRole (`vs-failure`), whose periodic token (20 s) is renewed
during the tests, and may mint from token roles `web` and `periodic` (token_period 8 s).
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devenv.openbao import free_loopback_port
from tests.conftest import require_root
from tests.support.faultproxy import FaultProxy
from tests.support.faults import VaultView, state_query, wait_for
from tests.support.plugin import PluginProcess, plugin_command

pytestmark = pytest.mark.openbao

APPROLE = "vs-failure"
IDENTITY_PERIOD = 20
SECRET = "correct-horse-battery-staple"
OPTIONS = {"role": "web", "secret.pw": "secret/data/web/db#password"}
RENEW = "/v1/auth/token/renew-self"


@pytest.fixture(scope="module")
def approle(bao) -> str:
    """The plugin's AppRole for this module; returns its RoleID."""
    bao.root.sys.create_or_update_policy(
        APPROLE,
        'path "auth/token/create/web" { capabilities = ["update"] }\n'
        'path "auth/token/create/periodic" { capabilities = ["update"] }\n',
    )
    bao.root.write_data(
        "auth/token/roles/periodic", data={"allowed_policies": "web", "renewable": True, "token_period": "8s"}
    )
    bao.root.auth.approle.create_or_update_approle(
        APPROLE, token_policies=[APPROLE], token_period=f"{IDENTITY_PERIOD}s", secret_id_num_uses=1, secret_id_ttl="1h"
    )
    return bao.root.auth.approle.read_role_id(APPROLE)["data"]["role_id"]


@pytest.fixture
def proxy(bao) -> Iterator[FaultProxy]:
    with FaultProxy(bao.addr) as p:
        yield p


class Plugin:
    """Starts the plugin process against the proxy (again on the same state, for restarts)."""

    def __init__(self, bao, proxy: FaultProxy, role_id: str, workdir: Path):
        self.bao, self.proxy, self.role_id, self.workdir = bao, proxy, role_id, workdir
        self.state_dir, self.wrapped = workdir / "state", workdir / "wrapped"
        self.processes: list[PluginProcess] = []

    def write_wrapped_secret_id(self) -> str:
        token = self.bao.root.write_data(f"auth/approle/role/{APPROLE}/secret-id", wrap_ttl="10m")["wrap_info"]["token"]
        self.wrapped.write_text(token)
        self.wrapped.chmod(0o600)
        return token

    def start(self, *, authenticated: bool = True, extra: tuple[str, ...] = ()) -> PluginProcess:
        if not self.wrapped.exists():
            self.write_wrapped_secret_id()
        process = PluginProcess(
            self.workdir / "p.sock",
            self.state_dir,
            self.proxy.addr,
            role_id=self.role_id,
            wrapped_secret_id_file=self.wrapped,
            log_path=self.workdir / f"plugin{len(self.processes)}.log",
            extra=["--vault-timeout", "2", *extra],
        )
        self.processes.append(process)
        process.wait_until_serving()
        return process.wait_until_authenticated(timeout=30) if authenticated else process

    def identity_accessor(self) -> str:
        [(accessor,)] = state_query(self.state_dir, "SELECT accessor FROM identity")
        return accessor

    def mount_accessor(self, mount_id: str) -> str:
        [(accessor,)] = state_query(self.state_dir, "SELECT accessor FROM mounts WHERE mount_id = ?", (mount_id,))
        return accessor

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


@pytest.fixture
def plugin(bao, proxy, approle, short_tmp) -> Iterator[Plugin]:
    require_root()
    made = Plugin(bao, proxy, approle, short_tmp)
    yield made
    made.stop()


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    started = time.monotonic()
    return fn(), time.monotonic() - started


def test_transient_errors_on_renew_self_keep_the_identity_and_every_mount_token(plugin, proxy, bao):
    process = plugin.start()
    identity = plugin.identity_accessor()
    process.client.ok("VolumeDriver.Create", {"Name": "renewed", "Opts": {**OPTIONS, "ttl": "20s"}})
    process.client.ok("VolumeDriver.Mount", {"Name": "renewed", "ID": "aa01"})
    mount_token = plugin.mount_accessor("aa01")
    proxy.fail(RENEW, 500, times=2)
    proxy.fail(RENEW, 429, times=2)
    # Both tokens fall due at 60-70 % of their 20 s: four failures, then renewals that go through.
    wait_for(lambda: [s.action for s in proxy.seen(RENEW)].count("forwarded") >= 2, 40, "renewals after the failures")
    assert [s.action for s in proxy.seen(RENEW)][:4] == ["failed 500", "failed 500", "failed 429", "failed 429"]
    time.sleep(IDENTITY_PERIOD / 2)  # long enough for a token whose renewal was dropped to have expired
    view = VaultView(bao.root)
    assert plugin.identity_accessor() == identity and view.token_valid(identity), "the identity was kept"
    assert view.token_valid(mount_token), "the mount token was kept alive"
    log = process.log()
    assert "authenticating again" not in log and "dropping" not in log and "wrap.tamper" not in log
    view_path = process.client.ok("VolumeDriver.Mount", {"Name": "renewed", "ID": "aa02"})["Mountpoint"]
    assert Path(view_path, "pw").read_text() == SECRET
    for mount_id in ("aa01", "aa02"):
        process.client.ok("VolumeDriver.Unmount", {"Name": "renewed", "ID": mount_id})
    assert not view.token_valid(mount_token)


def test_transient_errors_on_the_wrapped_secret_id_are_retried_and_no_tamper_event(plugin, proxy):
    proxy.fail("/v1/sys/wrapping/lookup", 500, times=1)
    proxy.fail("/v1/sys/wrapping/unwrap", 503, times=1)
    proxy.fail("/v1/auth/approle/login", 429, times=1)  # after the unwrap: the SecretID is kept for the next try
    process = plugin.start()
    assert [s.action for s in proxy.seen("/v1/sys/wrapping/unwrap")] == ["failed 503", "forwarded"]
    assert [s.action for s in proxy.seen("/v1/auth/approle/login")] == ["failed 429", "forwarded"]
    assert "wrap.tamper" not in process.log() and process.process.poll() is None
    assert state_query(plugin.state_dir, "SELECT COUNT(*) FROM pending_secret_id") == [(0,)]
    process.client.ok("VolumeDriver.Create", {"Name": "w", "Opts": OPTIONS})
    assert (
        Path(process.client.ok("VolumeDriver.Mount", {"Name": "w", "ID": "bb01"})["Mountpoint"], "pw").read_text()
        == SECRET
    )
    process.client.ok("VolumeDriver.Unmount", {"Name": "w", "ID": "bb01"})


def test_a_secret_id_kept_sealed_survives_a_restart_before_its_login(plugin, proxy):
    proxy.fail("/v1/auth/approle/login", 503, for_seconds=600)
    first = plugin.start(authenticated=False)
    wait_for(
        lambda: state_query(plugin.state_dir, "SELECT COUNT(*) FROM pending_secret_id") == [(1,)],
        20,
        "the unwrapped SecretID to be kept",
    )
    first.stop()
    proxy.clear()
    second = plugin.start()  # the wrapping token is spent: only the sealed SecretID can log in
    assert "from --wrapped-secret-id-file" in second.log() and "wrap.tamper" not in second.log()
    assert [s.action for s in proxy.seen("/v1/sys/wrapping/unwrap")] == ["forwarded"]


def test_an_unwrap_whose_answer_was_lost_is_no_tamper_and_bootstrap_recovers(plugin, proxy):
    proxy.withhold("/v1/sys/wrapping/unwrap", 4, times=1)
    process = plugin.start(authenticated=False)
    wait_for(lambda: "or its answer was lost" in process.log(), 30, "the plugin to see the token spent")
    assert "wrap.tamper" not in process.log() and process.process.poll() is None
    process.client.ok("VolumeDriver.Create", {"Name": "lost", "Opts": OPTIONS})
    (status, reply), seconds = timed(lambda: process.client.call("VolumeDriver.Mount", {"Name": "lost", "ID": "cc01"}))
    assert status == 500 and "deliver a new one" in reply["Err"]
    assert seconds < 2, "a Mount does not wait for an identity only an operator can bring"
    token = plugin.write_wrapped_secret_id()
    result = _run_cli("bootstrap", "--wrapped-secret-id-file", "-", "--state-dir", str(plugin.state_dir), stdin=token)
    assert result.returncode == 0, result.stderr
    assert (
        Path(process.client.ok("VolumeDriver.Mount", {"Name": "lost", "ID": "cc02"})["Mountpoint"], "pw").read_text()
        == SECRET
    )
    process.client.ok("VolumeDriver.Unmount", {"Name": "lost", "ID": "cc02"})


def test_a_mount_during_three_seconds_of_503_succeeds(plugin, proxy):
    process = plugin.start()
    process.client.ok("VolumeDriver.Create", {"Name": "sealed", "Opts": OPTIONS})
    proxy.fail("/v1/*", 503, for_seconds=3)
    reply, seconds = timed(lambda: process.client.ok("VolumeDriver.Mount", {"Name": "sealed", "ID": "dd01"}))
    assert Path(reply["Mountpoint"], "pw").read_text() == SECRET
    assert 2.5 < seconds < 10, f"the Mount took {seconds:.1f}s"
    assert "failed 503" in {s.action for s in proxy.seen("/v1/auth/token/create/web")}
    process.client.ok("VolumeDriver.Unmount", {"Name": "sealed", "ID": "dd01"})
    print(f"\nMount across 3 s of 503: {seconds:.1f}s")


def test_a_final_error_fails_the_mount_at_once_and_leaves_nothing(plugin, proxy, bao):
    process = plugin.start()
    process.client.ok("VolumeDriver.Create", {"Name": "denied", "Opts": OPTIONS})
    proxy.fail("/v1/secret/data/web/db", 403, times=5)
    (status, reply), seconds = timed(
        lambda: process.client.call("VolumeDriver.Mount", {"Name": "denied", "ID": "ee01"})
    )
    assert status == 500 and "denied permission to read secret/data/web/db" in reply["Err"]
    assert seconds < 2
    assert [s.action for s in proxy.seen("/v1/secret/data/web/db")] == ["failed 403"], "a final answer is not retried"
    assert state_query(plugin.state_dir, "SELECT COUNT(*) FROM mounts") == [(0,)]
    assert VaultView(bao.root).live_tokens(mount_id="ee01") == {}


def test_the_first_mount_right_after_activate_waits_for_the_identity(plugin, proxy):
    """dockerd mounts the moment a plugin answers (at boot, for --restart always containers); it does not retry."""
    proxy.delay(
        "/v1/auth/approle/login", 1.5, times=1
    )  # under --vault-timeout: a lost login answer spends the SecretID
    process = plugin.start(authenticated=False)
    process.client.ok("VolumeDriver.Create", {"Name": "boot", "Opts": OPTIONS})
    reply, seconds = timed(lambda: process.client.ok("VolumeDriver.Mount", {"Name": "boot", "ID": "ff01"}))
    assert Path(reply["Mountpoint"], "pw").read_text() == SECRET
    assert seconds > 1, "the Mount came before the identity"
    process.client.ok("VolumeDriver.Unmount", {"Name": "boot", "ID": "ff01"})
    process.stop()
    # After a restart the sealed identity is looked up before it is used again.
    proxy.delay("/v1/auth/token/lookup-self", 1.5, times=1)
    again = plugin.start(authenticated=False)
    reply, seconds = timed(lambda: again.client.ok("VolumeDriver.Mount", {"Name": "boot", "ID": "ff02"}))
    assert Path(reply["Mountpoint"], "pw").read_text() == SECRET
    assert seconds > 1, "the Mount came before the identity was resumed"
    again.client.ok("VolumeDriver.Unmount", {"Name": "boot", "ID": "ff02"})


def test_a_periodic_token_role_keeps_the_mounted_token_alive(plugin, bao):
    """The role's token_period (8 s) overrides the volume's ttl (1 h): renewals follow what Vault granted."""
    process = plugin.start()
    process.client.ok("VolumeDriver.Create", {"Name": "periodic", "Opts": {**OPTIONS, "role": "periodic"}})
    view_path = process.client.ok("VolumeDriver.Mount", {"Name": "periodic", "ID": "ab01"})["Mountpoint"]
    accessor = plugin.mount_accessor("ab01")
    view = VaultView(bao.root)
    assert bao.root.auth.token.lookup_accessor(accessor)["data"]["creation_ttl"] == 8, "the period, not the ttl asked"
    time.sleep(20)
    data = bao.root.auth.token.lookup_accessor(accessor)["data"]
    assert 0 < data["ttl"] <= 8 and data.get("last_renewal_time"), "renewed within its period"
    assert Path(view_path, "pw").read_text() == SECRET
    process.client.ok("VolumeDriver.Unmount", {"Name": "periodic", "ID": "ab01"})
    assert not view.token_valid(accessor)


def _run_cli(*args: str, stdin: str = ""):
    import subprocess

    return subprocess.run([plugin_command(), *args], input=stdin, capture_output=True, text=True, timeout=60)


def test_a_garbled_answer_fails_the_mount_with_an_err_and_no_traceback(plugin, proxy):
    process = plugin.start()
    process.client.ok("VolumeDriver.Create", {"Name": "garbled", "Opts": OPTIONS})
    proxy.answer("/v1/secret/data/web/db", b"<html>captive portal</html>", content_type="text/html", times=5)
    status, reply = process.client.call("VolumeDriver.Mount", {"Name": "garbled", "ID": "ac01"})
    assert (
        status == 500
        and "answered something that is not Vault's JSON (could not read secret/data/web/db)" in reply["Err"]
    )
    assert "Traceback" not in process.log()
    assert state_query(plugin.state_dir, "SELECT COUNT(*) FROM mounts") == [(0,)]
    status, reply = process.client.call(
        "VolumeDriver.Create", {"Name": "leaky", "Opts": {"role": "web", "secret.me": "auth/token/lookup-self#id"}}
    )
    assert status == 500 and "answers with a Vault token" in reply["Err"] and "token-file=" in reply["Err"]


def test_a_trickling_vault_fails_the_mount_within_its_budget(plugin, proxy, bao):
    process = plugin.start(extra=("--mount-timeout", "4"))
    process.client.ok("VolumeDriver.Create", {"Name": "slow", "Opts": OPTIONS})
    proxy.answer(
        "/v1/secret/data/web/db",
        b'{"data": {"data": {"password": "' + b"x" * 500 + b'"}}}',
        trickle=0.3,
        for_seconds=60,
    )
    (status, reply), seconds = timed(lambda: process.client.call("VolumeDriver.Mount", {"Name": "slow", "ID": "ad01"}))
    assert status == 500 and "could not read secret/data/web/db within" in reply["Err"]
    assert seconds < 7, f"the Mount took {seconds:.1f}s against a 4 s budget"
    assert state_query(plugin.state_dir, "SELECT COUNT(*) FROM mounts") == [(0,)]
    assert VaultView(bao.root).live_tokens(mount_id="ad01") == {}


def test_a_mounts_overhead_excludes_its_wait_on_vault(plugin, proxy):
    """vault_secrets_mount_overhead_seconds: a Mount whose secrets come 0.5 s late still shows only the
    plugin's own few milliseconds (reads made at once count as one wait)."""
    port = free_loopback_port()
    process = plugin.start(extra=("--metrics-addr", f"127.0.0.1:{port}"))
    process.client.ok("VolumeDriver.Create", {"Name": "slow", "Opts": OPTIONS})
    proxy.delay("/v1/secret/data/web/db", 0.5, times=1)
    _, seconds = timed(lambda: process.client.ok("VolumeDriver.Mount", {"Name": "slow", "ID": "ab01"}))
    assert seconds >= 0.5
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    [total] = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("vault_secrets_mount_overhead_seconds_sum")
    ]
    [count] = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("vault_secrets_mount_overhead_seconds_count")
    ]
    assert count == 1 and 0 < total < 0.1, f"overhead {total:.3f}s of a {seconds:.3f}s Mount"
    process.client.ok("VolumeDriver.Unmount", {"Name": "slow", "ID": "ab01"})
