"""End to end with Podman: a real rootful Podman (hermetic, started here) uses the real plugin process as a
volume plugin named in its containers.conf, a real OpenBao holds the secrets, containers run as a non-root user."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import SECRET, live_tmpfs_below, require, require_root
from tests.support.plugin import PluginProcess
from tests.support.podman import BUSYBOX, Podman

pytestmark = [pytest.mark.openbao, pytest.mark.podman]

OPTIONS = ("role=web", "secret.db_password=secret/data/web/db#password", "uid=1000")


@dataclass(frozen=True)
class PodmanPlugin:
    """The plugin process and the name Podman knows it by."""

    name: str
    process: PluginProcess


@pytest.fixture(scope="session")
def podman() -> Iterator[Podman]:
    require_root()
    require(shutil.which("podman") is not None, "podman", "apt-get install -y --no-install-recommends podman")
    require(shutil.which("runc") is not None, "runc", "apt-get install runc")
    require(BUSYBOX.exists(), "busybox", "apt-get install busybox-static")
    session = Podman.start()
    try:
        yield session
    finally:
        session.stop()


@pytest.fixture
def plugin(podman, start_plugin, unique_name) -> Iterator[PodmanPlugin]:
    """The plugin (real process, real OpenBao) named in Podman's containers.conf for this test only."""
    # Real containers hold its mounts: the production setting for releasing those no container holds.
    process = start_plugin(extra=["--release-unheld-after", "30"])
    with podman.volume_plugin(f"vault-secrets-{unique_name}", process.socket_path) as name:
        yield PodmanPlugin(name, process)


def create_volume(podman: Podman, plugin: PodmanPlugin, name: str, *options: str) -> None:
    opts = [a for o in options for a in ("-o", o)]
    podman.podman("volume", "create", "--driver", plugin.name, *opts, name)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(0.2)


def requests_seen(plugin: PodmanPlugin) -> str:
    """The volume protocol requests the plugin logged (at debug level) and the mounts it made, for messages."""
    seen = []
    for line in plugin.process.log().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record["message"].startswith("POST /VolumeDriver.") or record.get("event") in ("mount", "unmount"):
                seen.append(record["message"])
    return "\n".join(seen[-40:])


def test_a_container_reads_its_secret_cannot_write_and_its_token_goes_when_it_ends(podman, plugin, bao, unique_name):
    create_volume(podman, plugin, unique_name, *OPTIONS)
    volume = f"{unique_name}:/run/secrets"
    out = podman.run(
        "--rm", "--user", "1000", "-v", volume, podman.image,
        "sh", "-c", "id -u; cat /run/secrets/db_password; echo; stat -c '%u %a' /run/secrets/db_password",
    )  # fmt: skip
    assert out.stdout.split() == ["1000", SECRET, "1000", "400"]
    # Podman binds the path read-write and without noexec, and the container's user owns the tmpfs root: only
    # the read-only tmpfs itself refuses these.
    for attempt in ("chmod u+w /run/secrets", "echo x > /run/secrets/new", "cp /bin/busybox /run/secrets/sh"):
        refused = podman.run("--rm", "--user", "1000", "-v", volume, podman.image, "sh", "-c", attempt, check=False)
        assert refused.returncode != 0 and "Read-only file system" in refused.stderr, (attempt, refused.stderr)
    wait_for(lambda: bao.accessors_with_meta(volume=unique_name) == [], 10, "the containers' tokens to be revoked")
    assert live_tmpfs_below(plugin.process.mount_root) == []


def test_two_containers_at_once_share_the_one_mount_podman_makes_of_a_volume(podman, plugin, bao, unique_name):
    """Podman 4.3 mounts a plugin volume once, with the same ID for every container, and counts its containers
    itself: unlike dockerd, two containers share one tmpfs and one token, which goes when the last one ends
    (docs/podman.md). Should Podman mount per container, this fails and the docs must change."""
    create_volume(podman, plugin, unique_name, *OPTIONS)
    containers = [
        podman.run(
            "-d", "--user", "1000", "-v", f"{unique_name}:/run/secrets", podman.image, "sleep", "60"
        ).stdout.strip()
        for _ in range(2)
    ]  # fmt: skip
    try:
        for container in containers:
            assert podman.podman("exec", container, "cat", "/run/secrets/db_password").stdout == SECRET
        views = [m for m in live_tmpfs_below(plugin.process.mount_root) if m.endswith("/view")]
        accessors = bao.accessors_with_meta(volume=unique_name)
        assert len(views) == 1 and len(accessors) == 1, (
            f"{len(views)} tmpfs view(s) {views} and {len(accessors)} token(s) for two containers: Podman mounts "
            f"per container now? Requests the plugin logged:\n{requests_seen(plugin)}"
        )
        podman.podman("rm", "--force", "--time", "0", containers[0])
        assert bao.accessors_with_meta(volume=unique_name) == accessors, "the other container still holds it"
        assert podman.podman("exec", containers[1], "cat", "/run/secrets/db_password").stdout == SECRET
    finally:
        podman.podman("rm", "--force", "--ignore", "--time", "0", *containers)
    wait_for(lambda: bao.accessors_with_meta(volume=unique_name) == [], 10, "the token to be revoked")
    assert live_tmpfs_below(plugin.process.mount_root) == []


def test_notify_signals_the_container_once_its_files_changed(podman, plugin, bao, unique_name):
    kv = bao.root.secrets.kv.v2
    kv.create_or_update_secret(path=f"web/{unique_name}", secret={"password": "one"})
    create_volume(
        podman, plugin, unique_name,
        "role=web", f"secret.pw=secret/data/web/{unique_name}#password", "uid=1000", "refresh=5s", "notify=SIGHUP",
    )  # fmt: skip
    # busybox sh runs a trap between two short sleeps; each HUP adds a line.
    counting = "trap 'echo hup >> /tmp/hups' HUP; touch /tmp/hups; while true; do sleep 0.2; done"
    container = podman.run(
        "-d", "--user", "1000", "-v", f"{unique_name}:/run/secrets", podman.image, "sh", "-c", counting
    ).stdout.strip()

    def read(path: str) -> str:
        return podman.podman("exec", container, "cat", path).stdout

    try:
        assert read("/run/secrets/pw") == "one"
        kv.create_or_update_secret(path=f"web/{unique_name}", secret={"password": "two"})
        wait_for(lambda: read("/run/secrets/pw") == "two", 20, "the refreshed file")
        time.sleep(7)  # past the next refresh, which finds nothing changed and signals nobody
        assert read("/tmp/hups").count("hup") == 1, f"SIGHUPs received: {read('/tmp/hups')!r}"
    finally:
        podman.podman("rm", "--force", "--time", "0", container)


@pytest.mark.heavy
def test_a_mount_whose_container_died_without_cleanup_is_released_and_mounts_again_once_podman_removed_it(
    podman, plugin, bao, unique_name
):
    """conmon runs Podman's cleanup (and so the Unmount) when a container ends: with conmon and the container
    killed, no Unmount comes. The plugin learns from the kernel that no container holds the tmpfs."""
    create_volume(podman, plugin, unique_name, *OPTIONS)
    container = podman.run(
        "-d", "--user", "1000", "-v", f"{unique_name}:/run/secrets", podman.image, "sleep", "600"
    ).stdout.strip()
    [token] = bao.accessors_with_meta(volume=unique_name)
    for pid in podman.podman("inspect", "--format", "{{.State.ConmonPid}} {{.State.Pid}}", container).stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    started = time.monotonic()
    # --release-unheld-after 30, then up to one maintenance turn (10 s), and a margin.
    wait_for(lambda: not bao.token_valid(token), 30 + 10 + 10, "the released mount's token to be revoked")
    assert time.monotonic() - started >= 25, "released only once the mount is older than --release-unheld-after"
    assert live_tmpfs_below(plugin.process.mount_root) == []
    assert "no container holds its tmpfs" in plugin.process.log()
    # Podman still counts the dead container's mount, and binds the removed path until the container is removed.
    podman.podman("rm", "--force", "--time", "0", container)
    out = podman.run(
        "--rm", "--user", "1000", "-v", f"{unique_name}:/run/secrets", podman.image, "cat", "/run/secrets/db_password"
    )
    assert out.stdout == SECRET
    wait_for(lambda: bao.accessors_with_meta(volume=unique_name) == [], 10, "the new mount's token to be revoked")
