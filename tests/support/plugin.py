"""Talking to the plugin as dockerd does, and running it as a real process.

`PluginClient` posts to the Unix socket with no Content-Type and the Accept header dockerd sends;
`PluginProcess` runs `vault-secrets-plugin serve` and ends it by PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from plugin.edge.unixhttp import UnixHTTPConnection

ACCEPT = "application/vnd.docker.plugins.v1.2+json"


class PluginClient:
    """A dockerd-like client of the plugin socket."""

    def __init__(self, path: Path, timeout: float = 30):
        self.path, self.timeout = path, timeout

    def call(self, verb: str, body: dict[str, Any] | bytes | None = None) -> tuple[int, dict[str, Any]]:
        """POST /`verb`; `None` sends an empty body, as dockerd does for List and Capabilities."""
        raw = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
        connection = UnixHTTPConnection(self.path, self.timeout, host="plugin.moby.localhost")
        try:
            connection.request("POST", f"/{verb}", body=raw, headers={"Accept": ACCEPT})
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def ok(self, verb: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Call and require success (empty Err)."""
        status, reply = self.call(verb, body)
        assert status == 200 and not reply.get("Err"), f"{verb} failed: {status} {reply}"
        return reply


def plugin_command() -> str:
    return str(Path(sys.executable).parent / "vault-secrets-plugin")


class PluginProcess:
    """`vault-secrets-plugin serve` as a child process; its log goes to `log_path`."""

    def __init__(
        self,
        socket_path: Path,
        state_dir: Path,
        vault_addr: str,
        *,
        role_id: str | None = None,
        wrapped_secret_id_file: Path | None = None,
        extra: list[str] | None = None,
        log_path: Path | None = None,
    ):
        self.socket_path, self.state_dir = socket_path, state_dir
        self.log_path = log_path or state_dir.parent / f"{socket_path.stem}.log"
        # Beside the state, never inside it (serve refuses that): the state directory holds no secret.
        self.mount_root = state_dir.with_name(f"{state_dir.name}-mounts")
        args = [
            plugin_command(),
            "serve",
            "--socket",
            str(socket_path),
            "--state-dir",
            str(state_dir),
            "--vault-addr",
            vault_addr,
            "--log-level",
            "debug",
            *([] if "--mount-root" in (extra or []) else ["--mount-root", str(self.mount_root)]),
            # Tests that play dockerd mount with no container to hold the tmpfs: never released as unheld,
            # but where a test says otherwise.
            *([] if "--release-unheld-after" in (extra or []) else ["--release-unheld-after", "0"]),
            *(extra or []),
        ]
        if role_id:
            args += ["--role-id", role_id]
        if wrapped_secret_id_file:
            args += ["--wrapped-secret-id-file", str(wrapped_secret_id_file)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VAULT_")}
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        self.client = PluginClient(socket_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_serving(self, timeout: float = 15) -> PluginProcess:
        """Wait until the socket answers Plugin.Activate."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"plugin exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if self.client.call("Plugin.Activate")[0] == 200:
                    return self
            except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError):
                # Reset: a connection that reached the listener of a plugin killed a moment ago (seen after
                # SIGKILL, before the new process binds); dockerd retries such calls too.
                pass
            time.sleep(0.05)
        raise RuntimeError(f"plugin socket not serving after {timeout}s:\n{self.log()[-3000:]}")

    def wait_until_authenticated(self, timeout: float = 15) -> PluginProcess:
        """Wait until the log says the plugin identity is established."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "plugin identity" in self.log() and ("obtained the" in self.log() or "resumed the" in self.log()):
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"plugin exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"plugin did not authenticate in {timeout}s:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """End the plugin (gunicorn master, which ends its worker) by PID; returns its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def open_state(state_dir: Path):
    """The plugin's state store, opened with its own seal key, to see what it holds (tests only)."""
    from plugin.host.seal import Sealer
    from plugin.host.store import Store

    return Store(state_dir / "state.db", Sealer.load_or_create(state_dir / "seal.key"))


def held_tokens(state_dir: Path) -> list[str]:
    """Every token the plugin keeps: its identity, then each mount's token."""
    store = open_state(state_dir)
    try:
        identity = store.identity()
        return ([identity.token] if identity else []) + [m.token for m in store.mounts()]
    finally:
        store.close()
