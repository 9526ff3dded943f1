"""Fault injection and inspection for the reliability suite.

Faults: kill the plugin with SIGKILL (master and worker, as an OOM kill or `kill -9` of the service
would), crash dockerd (SIGKILL, then start it again on the same state), freeze OpenBao (SIGSTOP: requests
hang until the client's timeout, as in a partition or an overloaded server, and the server keeps its
state, which a dev server would lose on a restart). Every process is one this suite started, ended by PID.

Inspection: what Vault still holds (live tokens by metadata, leases), what the kernel still has mounted
under a root, and what the plugin's state database records (read-only, beside the running plugin).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import hvac

from tests.support.dockerd import Dockerd, _alive
from tests.support.plugin import PluginProcess

PLUGINS_DIR = Path("/run/docker/plugins")


# -- the plugin ---------------------------------------------------------------------------------


class PluginLauncher:
    """Starts `vault-secrets-plugin serve` as often as a test needs, always on the same socket, state
    directory and (appended) log, as a service manager restarting it would."""

    def __init__(
        self,
        socket_path: Path,
        state_dir: Path,
        vault_addr: str,
        *,
        role_id: str,
        wrapped_secret_id_file: Path,
        log_path: Path,
        extra: list[str] | None = None,
    ):
        self.socket_path, self.state_dir, self.vault_addr = socket_path, state_dir, vault_addr
        self.role_id, self.wrapped_secret_id_file, self.log_path = role_id, wrapped_secret_id_file, log_path
        self.extra = list(extra or [])
        self.started: list[PluginProcess] = []

    @property
    def name(self) -> str:
        """The plugin's name for dockerd (`docker volume create -d NAME`): the socket's stem."""
        return self.socket_path.stem

    @property
    def mount_root(self) -> Path:
        return self.state_dir.with_name(f"{self.state_dir.name}-mounts")  # as PluginProcess makes it

    @property
    def current(self) -> PluginProcess:
        return self.started[-1]

    def start(self, *, authenticated: bool = True) -> PluginProcess:
        process = PluginProcess(
            self.socket_path,
            self.state_dir,
            self.vault_addr,
            role_id=self.role_id,
            wrapped_secret_id_file=self.wrapped_secret_id_file,
            log_path=self.log_path,
            extra=self.extra,
        )
        self.started.append(process)
        process.wait_until_serving(timeout=30)
        if authenticated:
            wait_for(lambda: _authenticated_since(self.log_path, process.pid), 30, "the plugin to authenticate")
        return process

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.started:
            process.stop()


def _authenticated_since(log_path: Path, pid: int) -> bool:
    # The appended log holds every start: look only at what followed this master's "Listening at".
    text = log_path.read_text(errors="replace")
    start = text.rfind(f"({pid})")
    return start >= 0 and (
        "obtained the plugin identity" in text[start:] or "resumed the sealed plugin identity" in text[start:]
    )


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (gunicorn master, worker), parents first."""
    tree, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        tree.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                queue += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
    return tree


def kill_hard(process: PluginProcess, timeout: float = 10) -> list[int]:
    """SIGKILL the plugin's master and worker at once (no Unmount, no shutdown hook, no checkpoint), wait
    until none is left, and return their PIDs."""
    pids = process_tree(process.pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.process.wait(timeout)
    wait_for(lambda: not any(map(_alive, pids)), timeout, "the killed plugin processes to be gone")
    process.stop()  # closes its log handle; the process is already reaped
    return pids


# -- dockerd ------------------------------------------------------------------------------------


def crash_and_restart_dockerd(daemon: Dockerd) -> Dockerd:
    """SIGKILL dockerd (its containerd dies with it; container shims live on), then start a new dockerd on
    the same data and exec roots. Without live-restore it kills the containers it finds running and sends
    their volumes no Unmount. Returns the new daemon; the old object must not be stopped again."""
    assert daemon.run_dir == daemon.workdir, "the exec root must not move across the restart"
    pidfile = daemon.run_dir / "exec" / "containerd" / "containerd.pid"
    containerd = int(pidfile.read_text()) if pidfile.exists() else None
    os.kill(daemon.pid, signal.SIGKILL)
    daemon._proc.wait(30)
    daemon._stopped = True
    if containerd is not None:
        wait_for(lambda: not _alive(containerd), 15, "dockerd's containerd to exit")
        # A zombie nobody has reaped yet still answers kill(pid, 0): dockerd would take it for a running
        # containerd and wait for it forever. It is dead; make dockerd start a new one.
        pidfile.unlink(missing_ok=True)
    try:
        restarted = Dockerd.start(daemon.workdir, timeout=60)
    except BaseException:
        daemon._stopped = False  # so that the caller's stop() still ends the containers and mounts left behind
        raise
    restarted.image = getattr(daemon, "image", None)
    return restarted


def mount_ids_of(docker: Dockerd, containers: list[str]) -> dict[str, str]:
    """container -> the mount ID dockerd sent the plugin for its volume. `docker inspect` shows no Source for
    a plugin's volume, so this reads dockerd's own record of the container (root reads the data root)."""
    found = {}
    for container in containers:
        config = json.loads((docker.workdir / "data" / "containers" / container / "config.v2.json").read_text())
        [mount] = [m for m in config["MountPoints"].values() if m.get("Driver")]
        found[container] = mount["ID"]
    return found


# -- OpenBao ------------------------------------------------------------------------------------


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[float]:
    """SIGSTOP `pid` for the duration of the block (yielding the monotonic time it stopped); SIGCONT always."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield time.monotonic()
    finally:
        os.kill(pid, signal.SIGCONT)


class VaultView:
    """What a Vault server holds, seen with its root token. One pass over the token store per question."""

    def __init__(self, root: hvac.Client):
        self.root = root

    def live_tokens(self, **meta: str) -> dict[str, dict]:
        """accessor -> lookup data of every live token whose metadata contains `meta`."""
        found = {}
        for accessor in self.root.list("auth/token/accessors")["data"]["keys"]:
            try:
                data = self.root.auth.token.lookup_accessor(accessor)["data"]
            except hvac.exceptions.VaultError:  # revoked or expired between the list and the lookup
                continue
            if all((data.get("meta") or {}).get(k) == v for k, v in meta.items()):
                found[accessor] = data
        return found

    def tokens_of_volumes(self, volumes: set[str]) -> dict[str, dict]:
        """accessor -> lookup data of live tokens minted for any of `volumes` (by their `volume` metadata)."""
        return {a: d for a, d in self.live_tokens().items() if (d.get("meta") or {}).get("volume") in volumes}

    def token_valid(self, accessor: str) -> bool:
        try:
            self.root.auth.token.lookup_accessor(accessor)
            return True
        except hvac.exceptions.VaultError:
            return False

    def lease_ttl(self, lease_id: str) -> int | None:
        """Seconds left on a lease, or None once Vault no longer has it."""
        try:
            return int(self.root.sys.read_lease(lease_id)["data"]["ttl"])
        except hvac.exceptions.VaultError:
            return None


# -- the kernel and the state database ----------------------------------------------------------


def mounts_below(root: Path) -> dict[str, dict[str, str]]:
    """Mount points strictly below `root` -> {"fstype", "options" (per mount), "super" (superblock)}."""
    found = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        target = fields[4]
        if target.startswith(f"{root}/"):
            separator = fields.index("-")
            found[target] = {"fstype": fields[separator + 1], "options": fields[5], "super": fields[separator + 3]}
    return found


def state_query(state_dir: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """Run a read-only query on the plugin's state database (safe beside the running plugin: WAL mode)."""
    db = sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def sealed_state(state_dir: Path):
    """The plugin's `Store`, opened with its seal key: for a test to learn the tokens it must not find elsewhere."""
    from plugin.host.seal import Sealer
    from plugin.host.store import Store

    return Store(state_dir / "state.db", Sealer.load_or_create(state_dir / "seal.key"))


# -- waiting ------------------------------------------------------------------------------------


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """Poll `condition` until it returns something true (which is returned); AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
