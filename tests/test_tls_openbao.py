"""The plugin against OpenBao over TLS with a private CA, and with mutual TLS: the CA and the client
certificate are honoured by every request (authentication, Mount, `status`, `doctor`), and a plugin
without the CA, or with another one, says TLS is what failed and how to fix it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devenv.openbao import seed_demo, wrapped_secret_id
from tests.conftest import require_root
from tests.support.plugin import PluginProcess, plugin_command
from tests.support.tls import TlsOpenBao

pytestmark = pytest.mark.openbao

SECRET = "correct-horse-battery-staple"
OPTIONS = {"role": "web", "secret.pw": "secret/data/web/db#password"}


@pytest.fixture(scope="module")
def tls_bao(tmp_path_factory) -> Iterator[tuple[TlsOpenBao, str]]:
    server = TlsOpenBao(tmp_path_factory.mktemp("tls-openbao"))
    try:
        yield server, seed_demo(server.client()).role_id
    finally:
        server.stop()


@pytest.fixture
def start(tls_bao, short_tmp):
    """Start the plugin on `addr` with `flags`; `authenticated=False` returns once it serves."""
    require_root()
    server, role_id = tls_bao
    started: list[PluginProcess] = []

    def start_plugin(addr: str, *flags: str, authenticated: bool = True) -> PluginProcess:
        wrapped = short_tmp / f"wrapped{len(started)}"
        wrapped.write_text(wrapped_secret_id(server.client()))
        process = PluginProcess(
            short_tmp / f"p{len(started)}.sock",
            short_tmp / f"state{len(started)}",
            addr,
            role_id=role_id,
            wrapped_secret_id_file=wrapped,
            log_path=short_tmp / f"plugin{len(started)}.log",
            extra=["--mount-timeout", "3", *flags],
        )
        started.append(process)
        process.wait_until_serving()
        return process.wait_until_authenticated() if authenticated else process

    yield start_plugin
    for process in started:
        process.stop()


def mount_and_read(process: PluginProcess, name: str) -> str:
    process.client.ok("VolumeDriver.Create", {"Name": name, "Opts": OPTIONS})
    view = process.client.ok("VolumeDriver.Mount", {"Name": name, "ID": "71"})["Mountpoint"]
    try:
        return Path(view, "pw").read_text()
    finally:
        process.client.ok("VolumeDriver.Unmount", {"Name": name, "ID": "71"})


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([plugin_command(), *args], capture_output=True, text=True, timeout=60)


def test_a_plugin_given_the_private_ca_authenticates_mounts_and_doctor_passes(tls_bao, start):
    server, _ = tls_bao
    process = start(server.addr, "--vault-cacert", str(server.pki.ca_pem))
    assert mount_and_read(process, "tls") == SECRET
    doctor = cli("doctor", "--state-dir", str(process.state_dir))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "PASS  vault:" in doctor.stdout and "PASS  identity:" in doctor.stdout


@pytest.mark.parametrize("ca", ["none", "other"])
def test_a_plugin_without_the_ca_says_tls_failed_and_how_to_fix_it(tls_bao, start, ca):
    server, _ = tls_bao
    flags = ("--vault-cacert", str(server.pki.other_ca_pem)) if ca == "other" else ()
    process = start(server.addr, *flags, authenticated=False)
    process.client.ok("VolumeDriver.Create", {"Name": "untrusted", "Opts": OPTIONS})
    status, reply = process.client.call("VolumeDriver.Mount", {"Name": "untrusted", "ID": "72"})
    assert status == 500 and "TLS to Vault at" in reply["Err"] and "could not be verified" in reply["Err"]
    assert "--vault-cacert" in reply["Err"]
    assert (str(server.pki.other_ca_pem) if ca == "other" else "no --vault-cacert given") in reply["Err"]
    doctor = cli("doctor", "--state-dir", str(process.state_dir))
    assert doctor.returncode == 1 and "FAIL  vault: TLS to Vault at" in doctor.stdout
    assert "TLS to Vault at" in cli("status", "--state-dir", str(process.state_dir)).stdout
    assert process.process.poll() is None, "a TLS problem is no reason to stop serving"


def test_mutual_tls_with_a_client_certificate(tls_bao, start):
    server, _ = tls_bao
    pki = server.pki
    process = start(
        server.mtls_addr,
        "--vault-cacert",
        str(pki.ca_pem),
        "--vault-client-cert",
        str(pki.client_cert),
        "--vault-client-key",
        str(pki.client_key),
    )
    assert mount_and_read(process, "mtls") == SECRET


@pytest.mark.parametrize("client", ["none", "other"])
def test_mutual_tls_refused_names_the_client_certificate(tls_bao, start, client):
    server, _ = tls_bao
    pki = server.pki
    flags = (
        ("--vault-client-cert", str(pki.other_client_cert), "--vault-client-key", str(pki.other_client_key))
        if client == "other"
        else ()
    )
    process = start(server.mtls_addr, "--vault-cacert", str(pki.ca_pem), *flags, authenticated=False)
    process.client.ok("VolumeDriver.Create", {"Name": "refused", "Opts": OPTIONS})
    status, reply = process.client.call("VolumeDriver.Mount", {"Name": "refused", "ID": "73"})
    assert status == 500 and "TLS" in reply["Err"]
    # Under TLS 1.3 the refusal reaches the client as an alert or as a cut connection: either way the
    # message points at the client certificate.
    assert ("--vault-client-cert" in reply["Err"]) if client == "none" else (str(pki.other_client_cert) in reply["Err"])


def test_tls_settings_that_would_be_ignored_are_refused_at_start(tls_bao, short_tmp):
    server, _ = tls_bao
    base = ["serve", "--socket", str(short_tmp / "x.sock"), "--state-dir", str(short_tmp / "x")]
    half = cli(*base, "--vault-addr", server.addr, "--vault-client-cert", str(server.pki.client_cert))
    assert half.returncode != 0 and "give --vault-client-cert and --vault-client-key together" in half.stderr
    plain = cli(*base, "--vault-addr", "http://127.0.0.1:8200", "--vault-cacert", str(server.pki.ca_pem))
    assert plain.returncode != 0 and "need an https:// --vault-addr" in plain.stderr
    skip = subprocess.run(
        [plugin_command(), *base, "--vault-addr", server.addr],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "VAULT_SKIP_VERIFY": "1"},
    )
    assert skip.returncode != 0 and "never turns off TLS verification" in skip.stderr
    assert not (short_tmp / "x.sock").exists()
