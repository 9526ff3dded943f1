"""dockerd crashes while a `--restart always` container holds a vault-secrets volume, against a real dockerd
(hermetic, one per test, started here), real OpenBao and real tmpfs; the plugin runs without --docker-socket.

dockerd keeps a mount's ID (MountPoint.ID) in the container's config on disk and clears it only when the
volume is unmounted in order. After a crash (SIGKILL of dockerd alone, or of dockerd, containerd, the shims
and the containers together) the restarted dockerd sends no Unmount for the old mount and mounts the
restarted container's volume again with the same ID (Debian docker.io 20.10). Once that container is
removed, the plugin must hold nothing of the volume (no mount, no token) and `docker volume rm` must succeed.

The two variants also differ in when the second Mount comes. With dockerd alone killed, the container lives
on, and the restarted dockerd first stops it (SIGTERM, its 10 s stop timeout, SIGKILL): the second Mount
comes some 11 s after the first. With everything killed, it comes within a second or two of the first.

The plugin is reached through a recording socket (`RecordingSocket`) that forwards every call and notes each
verb, mount ID and the refcount the plugin's state holds for that ID after the call: the failure message
shows what dockerd sent.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socketserver
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from tests.conftest import SECRET, Bao, require, require_root
from tests.support.dockerd import Dockerd, _alive, _procs_mentioning
from tests.support.faults import PLUGINS_DIR, mount_ids_of, state_query, wait_for
from tests.support.plugin import PluginClient, PluginProcess

pytestmark = [pytest.mark.docker, pytest.mark.openbao]

RELEASE_SECONDS = 15  # after `docker rm -f`, the plugin must hold nothing of the volume within this


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[Dockerd]:
    """A dockerd of this test alone: the test crashes it."""
    require_root()
    require(Path("/bin/busybox").exists(), "busybox", "apt-get install busybox-static")
    from tests.support.images import build_busybox_image

    started = Dockerd.start(short_tmp / "dockerd")
    try:
        started.image = build_busybox_image(started)  # type: ignore[attr-defined]
        yield started
    finally:
        started.stop()


class RecordingSocket:
    """A legacy plugin socket for dockerd that forwards every call to the plugin's own socket and records, per
    call, (verb, mount ID, refcount of that ID in the plugin's state after the call, or None without a row)."""

    def __init__(self, path: Path, upstream: Path, state_dir: Path):
        self.path = path
        self.calls: list[tuple[str, str, int | None]] = []
        client, calls = PluginClient(upstream, timeout=150), self.calls

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                verb = self.path.lstrip("/")
                try:
                    status, reply = client.call(verb, body)
                except (OSError, http.client.HTTPException, ValueError) as e:
                    status, reply = 500, {"Err": f"recording socket: the plugin did not answer: {e}"}
                args = json.loads(body or b"{}")
                mount_id = args.get("ID", "") if isinstance(args, dict) else ""
                refcount = None
                if mount_id:
                    rows = state_query(
                        state_dir,
                        "SELECT refcount FROM mounts WHERE volume = ? AND mount_id = ?",
                        (args["Name"], mount_id),
                    )
                    refcount = rows[0][0] if rows else None
                calls.append((verb.removeprefix("VolumeDriver."), mount_id, refcount))
                payload = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.docker.plugins.v1+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002  (http.server's name)
                pass

        path.unlink(missing_ok=True)
        self._server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="recording-socket", daemon=True)
        self._thread.start()

    def mounts_and_unmounts(self) -> list[str]:
        """'Activate', 'Mount <ID> -> <refcount>' and 'Unmount <ID> -> <refcount>', in order (IDs shortened)."""
        return [
            f"{verb} {mount_id[:12]} -> {refcount}" if mount_id else verb.removeprefix("Plugin.")
            for verb, mount_id, refcount in self.calls
            if verb in ("Plugin.Activate", "Mount", "Unmount", "Remove")
        ]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
        self.path.unlink(missing_ok=True)


class Recorded:
    """The plugin process and the recording socket dockerd reaches it through (legacy plugin `name`)."""

    def __init__(self, name: str, process: PluginProcess, socket: RecordingSocket):
        self.name, self.process, self.socket = name, process, socket
        self.state_dir = process.state_dir

    def audit(self) -> list[str]:
        """The plugin's audit events of mounts ('mount <ID>', 'unmount <ID>', 'token.mint <ID>'), in order."""
        events = []
        for line in self.process.log().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("event") in ("mount", "unmount", "token.mint"):
                    events.append(f"{entry['event']} {str(entry.get('mount_id', ''))[:12]}")
        return events


@pytest.fixture
def recorded(bao: Bao, daemon: Dockerd, short_tmp: Path, unique_name: str) -> Iterator[Recorded]:
    """The plugin without --docker-socket (nothing tells it which containers still run), as legacy plugin
    `unique_name` of `daemon`. Afterwards: containers and volumes removed, leftover tokens revoked."""
    PLUGINS_DIR.mkdir(parents=True, exist_ok=True)
    process = PluginProcess(
        short_tmp / "p.sock",
        short_tmp / "state",
        bao.addr,
        role_id=bao.seed.role_id,
        wrapped_secret_id_file=bao.write_wrapped_secret_id(short_tmp / "wrapped"),
        log_path=short_tmp / "plugin.log",
    )
    socket = None
    try:
        process.wait_until_serving().wait_until_authenticated()
        socket = RecordingSocket(PLUGINS_DIR / f"{unique_name}.sock", process.socket_path, process.state_dir)
        yield Recorded(unique_name, process, socket)
    finally:
        ids = daemon.docker("ps", "-aq", check=False).stdout.split()
        if ids:
            daemon.docker("rm", "-f", *ids, check=False)
        for volume in daemon.docker(
            "volume", "ls", "-q", "--filter", f"driver={unique_name}", check=False
        ).stdout.split():
            daemon.docker("volume", "rm", "-f", volume, check=False)
        process.stop()
        if socket is not None:
            socket.close()
        for accessor in bao.accessors_with_meta(volume=unique_name):  # what a failed test left renewing
            with contextlib.suppress(Exception):
                bao.root.auth.token.revoke_accessor(accessor)


def crash_and_restart(daemon: Dockerd, *, everything: bool) -> None:
    """SIGKILL dockerd (its containerd dies with it), and with `everything` at the same moment the container
    shims and the containers' processes too, as when the whole daemon tree is killed; then start dockerd again
    on the same data and exec roots, in place (`daemon` stays the object to stop)."""
    assert daemon.run_dir == daemon.workdir, "the exec root must not move across the restart"
    pidfile = daemon.run_dir / "exec" / "containerd" / "containerd.pid"
    victims = [daemon.pid] + ([int(pidfile.read_text())] if pidfile.exists() else [])
    if everything:
        running = daemon.docker("ps", "-q", "--no-trunc").stdout.split()
        victims += [int(daemon.docker("inspect", "-f", "{{.State.Pid}}", c).stdout) for c in running]
        victims += _procs_mentioning(daemon.run_dir / "exec")  # containerd and the shims
    for pid in victims if everything else [daemon.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    daemon._proc.wait(30)
    wait_for(lambda: not any(map(_alive, victims)), 15, "the killed processes (and dockerd's containerd) to exit")
    # A zombie nobody has reaped yet still answers kill(pid, 0): dockerd would take it for a running
    # containerd and wait for it forever. It is dead; make dockerd start a new one.
    pidfile.unlink(missing_ok=True)
    restarted = Dockerd.start(daemon.workdir, timeout=60)
    daemon._proc, daemon.pid = restarted._proc, restarted.pid


def read_secret(daemon: Dockerd, container: str) -> str:
    return daemon.docker("exec", container, "cat", "/run/secrets/db_password").stdout


def mounts_of(state_dir: Path, volume: str) -> list[tuple[str, int]]:
    """(mount ID shortened, refcount) of every mount the plugin's state records for `volume`."""
    rows = state_query(state_dir, "SELECT mount_id, refcount FROM mounts WHERE volume = ?", (volume,))
    return [(mount_id[:12], refcount) for mount_id, refcount in rows]


@pytest.mark.parametrize(
    "everything", [False, True], ids=["dockerd-killed", "dockerd-containerd-shims-containers-killed"]
)
def test_after_a_dockerd_crash_a_restarted_container_leaves_nothing_behind_once_removed(
    daemon: Dockerd, recorded: Recorded, bao: Bao, unique_name: str, everything: bool
) -> None:
    """The restarted container reads its secret again, and once it is removed nothing of the volume is left:
    no mount in the plugin's state, no live token in Vault, and `docker volume rm` succeeds."""
    volume = unique_name
    opts = ("role=web", "secret.db_password=secret/data/web/db#password", "uid=1000")
    daemon.docker("volume", "create", "-d", recorded.name, *[a for o in opts for a in ("-o", o)], volume)
    container = daemon.docker(
        "run",
        "-d",
        "--restart",
        "always",
        "--network",
        "none",
        "--user",
        "1000",
        "-v",
        f"{volume}:/run/secrets",
        daemon.image,  # type: ignore[attr-defined]
        "sleep",
        "600",
    ).stdout.strip()
    assert read_secret(daemon, container) == SECRET
    [first_id] = mount_ids_of(daemon, [container]).values()
    started = daemon.docker("inspect", "-f", "{{.State.StartedAt}}", container).stdout

    crash_and_restart(daemon, everything=everything)
    daemon.wait_running(container)
    assert daemon.docker("inspect", "-f", "{{.State.StartedAt}}", container).stdout != started, "not restarted"
    assert read_secret(daemon, container) == SECRET
    [second_id] = mount_ids_of(daemon, [container]).values()
    while_running = mounts_of(recorded.state_dir, volume)

    daemon.docker("rm", "-f", container)
    deadline = time.monotonic() + RELEASE_SECONDS
    while True:
        mounts, tokens = mounts_of(recorded.state_dir, volume), bao.accessors_with_meta(volume=volume)
        if not (mounts or tokens) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    removal = daemon.docker("volume", "rm", volume, check=False)
    seen = (
        f"\nmount ID before the crash {first_id[:12]}, after it {second_id[:12]}"
        f"\nmounts while the restarted container ran (ID, refcount): {while_running}"
        f"\ncalls dockerd sent (verb ID -> refcount after the call): {recorded.socket.mounts_and_unmounts()}"
        f"\nplugin audit: {recorded.audit()}"
        f"\nlive tokens of the volume in Vault: {len(tokens)}"
        f"\ndocker volume rm: {removal.stderr.strip() or 'removed'}"
    )
    print(seen)
    assert mounts == [], f"{RELEASE_SECONDS}s after docker rm -f the plugin still holds (ID, refcount) {mounts}{seen}"
    assert tokens == [], f"{RELEASE_SECONDS}s after docker rm -f the volume's tokens are still live: {tokens}{seen}"
    assert removal.returncode == 0, f"docker volume rm {volume} failed{seen}"
