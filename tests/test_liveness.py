"""Mounts known alive or dead from the kernel's mount tables, without asking dockerd: the real plugin
process, real OpenBao, real tmpfs, and "containers" that are processes in mount namespaces of their own
binding a mount's view at their own target, as every runtime does."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SECRET

pytestmark = pytest.mark.openbao

OPTIONS = {"role": "web", "secret.db_password": "secret/data/web/db#password"}


class Container:
    """A process in a mount namespace of its own that binds `view` at a target of its own, like a container."""

    def __init__(self, view: str, target: Path):
        target.mkdir()
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"mount --bind {view} {target} && echo ready && exec sleep 120"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None and self.process.stdout.readline() == "ready\n"

    def end(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_a_mount_whose_container_ended_without_unmount_is_released_and_a_held_one_stays(start_plugin, bao, short_tmp):
    plugin = start_plugin(extra=["--release-unheld-after", "2"])
    plugin.client.ok("VolumeDriver.Create", {"Name": "live", "Opts": OPTIONS})
    views = {
        mount_id: plugin.client.ok("VolumeDriver.Mount", {"Name": "live", "ID": mount_id})["Mountpoint"]
        for mount_id in ("a1" * 32, "b2" * 32)
    }
    ending, running = (
        Container(views["a1" * 32], short_tmp / "ending"),
        Container(views["b2" * 32], short_tmp / "running"),
    )
    try:
        [ending_token] = bao.accessors_with_meta(volume="live", mount_id="a1" * 32)
        [running_token] = bao.accessors_with_meta(volume="live", mount_id="b2" * 32)
        ending.end()  # no Unmount comes: the plugin learns it from the kernel
        started = time.monotonic()
        wait_for(lambda: not bao.token_valid(ending_token), 30, "the released mount's token to be revoked")
        released_after = time.monotonic() - started
        assert not Path(views["a1" * 32]).exists(), "its tmpfs is gone"
        assert released_after < 2 + 10 + 5, "within the age, a maintenance turn and a margin"
        assert "no container holds its tmpfs" in plugin.log()
        assert bao.token_valid(running_token) and Path(views["b2" * 32], "db_password").read_text() == SECRET

        # A container still running across a plugin restart keeps its mount.
        plugin.stop()
        restarted = start_plugin(extra=["--release-unheld-after", "2"])
        time.sleep(12)  # past a maintenance turn of the new process
        assert bao.token_valid(running_token) and Path(views["b2" * 32], "db_password").read_text() == SECRET
        restarted.client.ok("VolumeDriver.Unmount", {"Name": "live", "ID": "b2" * 32})
        restarted.client.ok("VolumeDriver.Remove", {"Name": "live"})
    finally:
        ending.end()
        running.end()
