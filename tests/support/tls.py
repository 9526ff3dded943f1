"""A real OpenBao speaking TLS on loopback, with certificate material made by `cryptography`.

`Pki.create()` writes a throwaway CA, a server certificate for loopback, a client certificate
signed by the CA, and a second unrelated CA with its own client certificate (for "wrong CA"
tests). Private keys are written with mode 0600.

`TlsOpenBao` is ONE `bao server -dev` process with three listeners:

* `http_addr`: the dev listener, plain HTTP. `-dev-tls` would make it HTTPS, but always with a
  CA that bao generates itself (it overwrites files already in `-dev-tls-cert-dir`), so it can
  never present our PKI's certificate; it stays plain HTTP and is used for readiness checks only.
* `addr`: HTTPS with `pki.server_cert`, no client certificate asked for.
* `mtls_addr`: HTTPS with `pki.server_cert` which requires and verifies a client certificate
  signed by `pki.ca_pem` (`tls_require_and_verify_client_cert`).

The two TLS listeners come from an extra `-config=` file. Dev mode merges it into its own
configuration, so it keeps dev mode's in-memory storage, auto-unseal, chosen root token and KV v2
mounted at secret/ (`devenv.openbao.seed_demo` works as it does on `OpenBaoDevServer`).

How requests fails, as measured against this harness (OpenBao 2.7.2, Python 3.11, OpenSSL 3.0,
TLS 1.3, requests 2.34, urllib3 2.8). Every case raises `requests.exceptions.SSLError` (a subclass
of `requests.exceptions.ConnectionError`; hvac lets it through unwrapped). The `ssl` exception
underneath is `err.args[0].reason.args[0]` (MaxRetryError -> urllib3 SSLError -> ssl):

* a server certificate from a CA the client does not trust (a wrong CA bundle, or none given,
  which means certifi's bundle or REQUESTS_CA_BUNDLE): always ssl.SSLCertVerificationError,
  verify_code 20, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local
  issuer certificate".
* the server refuses the client (no client certificate on `mtls_addr`, or one from another CA):
  under TLS 1.3 the client has finished its handshake when the server checks, so whether the client
  reads the server's alert or only the closed connection is a race. The cause is either ssl.SSLError
  with reason TLSV13_ALERT_CERTIFICATE_REQUIRED ("[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13
  alert certificate required") or TLSV1_ALERT_UNKNOWN_CA ("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert
  unknown ca"), or ssl.SSLEOFError ("EOF occurred in violation of protocol"). A GET with no
  certificate showed the alert 450 times in 450. A POST, or a certificate from another CA, showed
  the EOF in anywhere from none to 93% of attempts, from one run to the next. Under TLS 1.2 the refusal comes during the handshake:
  "sslv3 alert handshake failure" with no certificate, "tlsv1 alert unknown ca" with a foreign one.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import hvac
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devenv.openbao import bao_binary, free_loopback_port

CertPair = tuple[str, str]  # (certificate, key) as requests' and hvac's `cert=` take it


# -- certificate material --


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    # Backdated a few minutes so that a server whose clock is slightly behind still accepts it.
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=2)
    )


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())  # P-256: much faster to make than RSA, and Go accepts it


def _make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return key, _validity(builder).sign(key, hashes.SHA256())


def _make_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    usage,
    sans: list[x509.GeneralName] | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        # Go checks the extended key usage: a server certificate offered as a client one is refused.
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, _validity(builder).sign(ca_key, hashes.SHA256())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o644)
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    # Created 0600 rather than chmod-ed afterwards, so the key is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # O_CREAT keeps the mode of a file that already existed
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


@dataclasses.dataclass(frozen=True)
class Pki:
    """PEM files in `directory`: a CA (`ca_pem`), a server certificate for `hosts` signed by it, a
    client certificate (extended key usage clientAuth) signed by it, and `other_ca_pem`, an
    unrelated CA with its own client certificate `other_client_cert` (both for "wrong CA" tests).
    Keys are unencrypted PKCS#8 with mode 0600. The CAs' private keys are never written to disk."""

    directory: Path
    ca_pem: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_pem: Path
    other_client_cert: Path
    other_client_key: Path

    @classmethod
    def create(cls, directory: Path, hosts: Iterable[str] = ("127.0.0.1", "localhost")) -> Pki:
        """Make fresh material in `directory` (created 0700 if needed; existing files are replaced).
        `hosts` become the server certificate's subject alternative names (IP addresses as iPAddress
        entries, other names as dNSName entries); the first one is also its common name."""
        hosts = list(hosts)
        if not hosts:
            raise ValueError("the server certificate needs at least one host")
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca_key, ca_cert = _make_ca("vault-secrets-plugin test CA")
        server_key, server_cert = _make_leaf(
            ca_key, ca_cert, hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, [_san(h) for h in hosts]
        )
        client_key, client_cert = _make_leaf(
            ca_key, ca_cert, "vault-secrets-plugin test client", ExtendedKeyUsageOID.CLIENT_AUTH
        )
        other_key, other_cert = _make_ca("unrelated test CA")
        other_client_key, other_client_cert = _make_leaf(
            other_key, other_cert, "vault-secrets-plugin test client", ExtendedKeyUsageOID.CLIENT_AUTH
        )
        return cls(
            directory=directory,
            ca_pem=_write_cert(directory / "ca.pem", ca_cert),
            server_cert=_write_cert(directory / "server.pem", server_cert),
            server_key=_write_key(directory / "server-key.pem", server_key),
            client_cert=_write_cert(directory / "client.pem", client_cert),
            client_key=_write_key(directory / "client-key.pem", client_key),
            other_ca_pem=_write_cert(directory / "other-ca.pem", other_cert),
            other_client_cert=_write_cert(directory / "other-client.pem", other_client_cert),
            other_client_key=_write_key(directory / "other-client-key.pem", other_client_key),
        )

    @property
    def client_pair(self) -> CertPair:
        """`cert=` for requests/hvac: the client certificate signed by `ca_pem`."""
        return str(self.client_cert), str(self.client_key)

    @property
    def other_client_pair(self) -> CertPair:
        """`cert=` for requests/hvac: a client certificate signed by `other_ca_pem`, which `mtls_addr` refuses."""
        return str(self.other_client_cert), str(self.other_client_key)


# -- the server --


def _distinct_free_ports(count: int, avoid: set[int]) -> list[int]:
    """`count` different free loopback ports, none in `avoid`. free_loopback_port() releases each
    port at once, so two calls could return the same one: ask until they differ."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_loopback_port()
        if port not in ports and port not in avoid:
            ports.append(port)
    return ports


def _hcl_string(value: object) -> str:
    return json.dumps(str(value))  # a JSON string is a valid HCL string (quotes and backslashes escaped)


class TlsOpenBao:
    """One `bao server -dev` process on 127.0.0.1 with a random root token and three listeners:
    `addr` (https://127.0.0.1:PORT, server certificate from `pki`), `mtls_addr` (a second HTTPS
    listener of the same server, requiring a client certificate signed by `pki.ca_pem`), and the
    plain-HTTP dev listener `http_addr` (for readiness checks). The constructor returns once all
    three answer sys/health with 200, and raises RuntimeError with the end of the server log if
    the server exits or does not get there in `timeout` seconds. `stop()` ends the server by PID;
    it is idempotent, and so is leaving a `with` block."""

    def __init__(self, workdir: Path, pki: Pki | None = None, *, timeout: float = 30):
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.pki = pki or Pki.create(workdir / "pki")
        self.root_token = secrets.token_hex(16)
        self.log_path = workdir / "openbao.log"
        self.http_port = free_loopback_port()
        # The dev listener's cluster port is always its port + 1; the TLS listeners get explicit ones.
        self.port, self.mtls_port, cluster_port, mtls_cluster_port = _distinct_free_ports(
            4, avoid={self.http_port, self.http_port + 1}
        )
        self.http_addr = f"http://127.0.0.1:{self.http_port}"
        self.addr = f"https://127.0.0.1:{self.port}"
        self.mtls_addr = f"https://127.0.0.1:{self.mtls_port}"
        self.config_path = workdir / "tls-listeners.hcl"
        self.config_path.write_text(self._listeners_config(cluster_port, mtls_cluster_port))

        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(workdir)  # the dev server must not touch the operator's token helper
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                [
                    bao_binary(),
                    "server",
                    "-dev",
                    "-dev-no-store-token",
                    f"-dev-root-token-id={self.root_token}",
                    f"-dev-listen-address=127.0.0.1:{self.http_port}",
                    f"-config={self.config_path}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _listeners_config(self, cluster_port: int, mtls_cluster_port: int) -> str:
        pki = self.pki
        return (
            'listener "tcp" {\n'
            f"  address = {_hcl_string(f'127.0.0.1:{self.port}')}\n"
            f"  cluster_address = {_hcl_string(f'127.0.0.1:{cluster_port}')}\n"
            f"  tls_cert_file = {_hcl_string(pki.server_cert)}\n"
            f"  tls_key_file = {_hcl_string(pki.server_key)}\n"
            "}\n"
            'listener "tcp" {\n'
            f"  address = {_hcl_string(f'127.0.0.1:{self.mtls_port}')}\n"
            f"  cluster_address = {_hcl_string(f'127.0.0.1:{mtls_cluster_port}')}\n"
            f"  tls_cert_file = {_hcl_string(pki.server_cert)}\n"
            f"  tls_key_file = {_hcl_string(pki.server_key)}\n"
            "  tls_require_and_verify_client_cert = true\n"
            f"  tls_client_ca_file = {_hcl_string(pki.ca_pem)}\n"
            "}\n"
        )

    @property
    def pid(self) -> int:
        return self._process.pid

    def _wait_ready(self, timeout: float) -> None:
        probes = [
            (self.http_addr, {}),
            (self.addr, {"verify": str(self.pki.ca_pem)}),
            (self.mtls_addr, {"verify": str(self.pki.ca_pem), "cert": self.pki.client_pair}),
        ]
        deadline = time.monotonic() + timeout
        last_error: object = None
        with requests.Session() as session:
            session.trust_env = False  # no proxy or CA bundle from the environment: loopback only
            while probes and time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise RuntimeError(f"OpenBao exited at start:\n{self.log_path.read_text()[-3000:]}")
                url, kwargs = probes[0]
                try:
                    response = session.get(f"{url}/v1/sys/health", timeout=1, **kwargs)
                    if response.status_code == 200:
                        probes.pop(0)
                        continue
                    last_error = f"{url}: HTTP {response.status_code}"
                except requests.ConnectionError as e:  # includes SSLError: a broken TLS setup shows up in the message
                    last_error = e
                time.sleep(0.1)
        if probes:
            raise RuntimeError(
                f"OpenBao did not become ready in {timeout}s (last: {last_error}):\n{self.log_path.read_text()[-3000:]}"
            )

    def client(
        self,
        addr: str | None = None,
        token: str | None = None,
        cert: CertPair | None = None,
        verify: str | Path | bool | None = None,
    ) -> hvac.Client:
        """An hvac client of `addr` (default `self.addr`) with `token` (default the root token),
        verifying the server with `verify` (default `pki.ca_pem`) and presenting `cert` (default:
        no client certificate, so `mtls_addr` refuses it; see `mtls_client`). hvac builds its own
        Session here: given one, it would take `verify` from the session and ignore ours."""
        verify = str(self.pki.ca_pem) if verify is None else verify
        return hvac.Client(
            url=addr or self.addr,
            token=token or self.root_token,
            verify=str(verify) if isinstance(verify, Path) else verify,
            cert=cert,
        )

    def mtls_client(self, token: str | None = None) -> hvac.Client:
        """An hvac client of `mtls_addr` presenting `pki`'s client certificate."""
        return self.client(self.mtls_addr, token=token, cert=self.pki.client_pair)

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> TlsOpenBao:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
