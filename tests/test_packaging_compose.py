"""End to end: examples/compose/ run by Debian's docker-compose (1.29) against the hermetic dockerd, with
the plugin as a legacy plugin under a unique name (the compose file reads it from VAULT_SECRETS_DRIVER)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SECRET, live_tmpfs_below, require

pytestmark = [pytest.mark.docker, pytest.mark.openbao]

COMPOSE_FILE = Path(__file__).resolve().parents[1] / "examples" / "compose" / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose_cli() -> str:
    found = shutil.which("docker-compose")
    require(found is not None, "docker-compose", "apt-get install docker-compose")
    return found


def test_compose_service_reads_its_secret_and_down_leaves_nothing(docker, plugin, bao, compose_cli, unique_name):  # noqa: F811
    env = {**docker.env, "VAULT_SECRETS_DRIVER": plugin.name, "APP_IMAGE": docker.image}
    volume = f"{unique_name}_secrets"  # compose names volumes <project>_<name>

    def compose(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [compose_cli, "--ansi", "never", "-f", str(COMPOSE_FILE), "-p", unique_name, *args],
            env=env,
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )

    try:
        up = compose("up", "--exit-code-from", "app")
        assert up.returncode == 0, up.stdout + up.stderr
        printed = [line.split("|", 1)[1].strip() for line in up.stdout.splitlines() if "|" in line]
        digest = hashlib.sha256(SECRET.encode()).hexdigest()
        assert printed == ["1000", "1000 400", f"{digest}  /run/secrets/db_password"]
        assert SECRET not in up.stdout + up.stderr

        container = docker.docker(
            "ps", "-aq", "--filter", f"label=com.docker.compose.project={unique_name}"
        ).stdout.split()
        config = json.loads(docker.docker("inspect", *container).stdout)[0]
        assert config["Config"]["User"] == "1000:1000" and config["HostConfig"]["ReadonlyRootfs"] is True
        created = json.loads(docker.docker("volume", "inspect", volume).stdout)[0]
        assert created["Driver"] == plugin.name and created["Options"]["role"] == "web"
    finally:
        down = compose("down", "-v")
    assert down.returncode == 0, down.stdout + down.stderr
    assert volume not in docker.docker("volume", "ls", "-q").stdout.split()
    assert live_tmpfs_below(plugin.mount_root) == []
    assert bao.accessors_with_meta(volume=volume) == []
