"""A container that stops while the plugin is down gets no Unmount: the plugin, back, learns from the kernel
that no container holds its mount and releases it, without --docker-socket. Real dockerd (hermetic, started
here), real OpenBao, real tmpfs."""

from __future__ import annotations

import time

import pytest

from tests.conftest import PLUGINS_DIR, SECRET
from tests.support.faults import kill_hard
from tests.support.plugin import PluginProcess

pytestmark = [pytest.mark.docker, pytest.mark.openbao, pytest.mark.heavy]

# dockerd retries a call to an unreachable plugin for 30 s, then gives the Unmount up.
DOCKERD_GIVES_UP = 35


def start(bao, short_tmp, name: str, wrapped) -> PluginProcess:
    process = PluginProcess(
        PLUGINS_DIR / f"{name}.sock",
        short_tmp / "state",
        bao.addr,
        role_id=bao.seed.role_id,
        wrapped_secret_id_file=wrapped,
        log_path=short_tmp / "plugin.log",
        extra=["--release-unheld-after", "5"],  # no --docker-socket
    )
    return process.wait_until_serving().wait_until_authenticated()


def test_a_container_stopped_while_the_plugin_was_down_is_released_and_a_running_one_keeps_its_mount(
    docker, bao, short_tmp, unique_name
):
    PLUGINS_DIR.mkdir(parents=True, exist_ok=True)
    wrapped = bao.write_wrapped_secret_id(short_tmp / "wrapped")
    plugin = start(bao, short_tmp, unique_name, wrapped)
    stopped, running = f"{unique_name}-stopped", f"{unique_name}-running"
    containers: list[str] = []
    try:
        for volume in (stopped, running):
            docker.docker(
                "volume", "create", "-d", unique_name, "-o", "role=web", "-o",
                "secret.db_password=secret/data/web/db#password", "-o", "uid=1000", volume,
            )  # fmt: skip
            containers.append(
                docker.docker(
                    "run", "-d", "--network", "none", "--user", "1000", "-v", f"{volume}:/run/secrets",
                    docker.image, "sleep", "600",
                ).stdout.strip()
            )  # fmt: skip
        [stopped_token] = bao.accessors_with_meta(volume=stopped)
        [running_token] = bao.accessors_with_meta(volume=running)

        kill_hard(plugin)
        docker.docker("kill", containers[0])
        time.sleep(DOCKERD_GIVES_UP)  # its Unmount is lost for good
        assert bao.token_valid(stopped_token), "nothing revoked it while the plugin was down"
        plugin = start(bao, short_tmp, unique_name, wrapped)
        began = time.monotonic()
        while bao.token_valid(stopped_token) and time.monotonic() - began < 30:
            time.sleep(0.5)
        assert not bao.token_valid(stopped_token), "released: its token revoked"
        assert time.monotonic() - began < 5 + 10 + 5, "within its age, a maintenance turn and a margin"
        docker.docker("rm", containers[0])
        docker.docker("volume", "rm", stopped)  # no longer "mounted by 1 container(s)"
        assert bao.token_valid(running_token)
        assert docker.docker("exec", containers[1], "cat", "/run/secrets/db_password").stdout == SECRET
    finally:
        docker.docker("rm", "-f", *containers, check=False)
        for volume in (stopped, running):
            docker.docker("volume", "rm", "-f", volume, check=False)
        plugin.stop()
        (PLUGINS_DIR / f"{unique_name}.sock").unlink(missing_ok=True)
