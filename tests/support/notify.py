"""notify= end to end: a container of another user than the plugin's, signalled once after a KV change."""

from __future__ import annotations

import time
from typing import Any

from tests.support.dockerd import Dockerd

# busybox sh runs a trap between two short sleeps; each HUP adds a line.
COUNTING_HUPS = "trap 'echo hup >> /tmp/hups' HUP; touch /tmp/hups; while true; do sleep 0.2; done"


def assert_one_sighup_after_a_kv_change(docker: Dockerd, bao: Any, driver: str) -> None:
    """A volume of `driver` with notify=SIGHUP and refresh=5s over a fresh KV secret, a uid-1000 container on
    it, the secret changed: the container reads the new value and got exactly one SIGHUP. Cleans up after."""
    path, volume = f"web/{driver}-notify", f"{driver}-notify"
    bao.root.secrets.kv.v2.create_or_update_secret(path=path, secret={"password": "one"})
    docker.docker(
        "volume", "create", "-d", driver, "-o", "role=web", "-o", "uid=1000", "-o", "refresh=5s",
        "-o", "notify=SIGHUP", "-o", f"secret.pw=secret/data/{path}#password", volume,
    )  # fmt: skip
    container = docker.docker(
        "run", "-d", "--network", "none", "--user", "1000", "-v", f"{volume}:/run/secrets", docker.image,
        "sh", "-c", COUNTING_HUPS,
    ).stdout.strip()  # fmt: skip
    try:
        bao.root.secrets.kv.v2.create_or_update_secret(path=path, secret={"password": "two"})
        deadline = time.monotonic() + 20
        while docker.docker("exec", container, "cat", "/run/secrets/pw").stdout != "two":
            assert time.monotonic() < deadline, "the new version did not arrive"
            time.sleep(0.5)
        time.sleep(1)
        assert docker.docker("exec", container, "cat", "/tmp/hups").stdout.count("hup") == 1
    finally:
        docker.docker("rm", "-f", container)
    docker.docker("volume", "rm", volume)
