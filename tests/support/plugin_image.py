"""Helpers for the packaging tests: building the managed plugin through the make targets a user runs,
driving it, and reading a volume's secret from a container.

`make_targets` runs `make` against a hermetic dockerd (DOCKER_HOST); `ManagedPlugin` wraps the
`docker plugin` verbs for one plugin and knows where dockerd keeps its propagated mount and log lines.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .dockerd import Dockerd

REPO = Path(__file__).resolve().parents[2]
# dockerd 20.10 keeps managed plugins' sockets in /run/docker/plugins/<plugin id>/, whatever its --exec-root.
PLUGIN_SOCKET_DIRS = Path("/run/docker/plugins")
DEBIAN_BASE_IMAGE = "vault-secrets-base:bookworm"


def make_targets(dockerd: Dockerd, *targets: str, timeout: float = 600, **variables: str) -> float:
    """Run `make TARGETS VAR=value...` in the repository against `dockerd`; return the seconds it took.

    PY is this test's interpreter, so make uses the venv the tests run in. Raises AssertionError with
    the tail of make's output if it fails, RuntimeError if make is not installed.
    """
    make = shutil.which("make")
    if make is None:
        raise RuntimeError("make not found; run `apt-get install make`")
    variables = {"PY": sys.executable, **variables}
    cmd = [make, "-C", str(REPO), "--no-print-directory", *targets, *(f"{k}={v}" for k, v in variables.items())]
    started = time.monotonic()
    res = subprocess.run(
        cmd, check=False, env=dockerd.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    if res.returncode != 0:
        output = (res.stdout + res.stderr)[-6000:]
        raise AssertionError(f"`{' '.join(cmd)}` exited {res.returncode}\n{output}")
    return time.monotonic() - started


def debian_base_image(dockerd: Dockerd) -> str:
    """`make plugin-base` into `dockerd` (cached under /var/cache/vault-secrets); returns the image name."""
    make_targets(dockerd, "plugin-base", DEBIAN_BASE_IMAGE=DEBIAN_BASE_IMAGE)
    return DEBIAN_BASE_IMAGE


class ManagedPlugin:
    """One managed plugin named `name` in `dockerd`. Methods raise AssertionError when docker fails."""

    def __init__(self, dockerd: Dockerd, name: str):
        self.dockerd, self.name = dockerd, name
        # Volumes record the driver by its full reference: `docker volume ls --filter driver=NAME` finds
        # nothing for a managed plugin, `driver=NAME:latest` does.
        self.ref = name if ":" in name else f"{name}:latest"
        self._ids: set[str] = set()

    def volumes(self) -> list[str]:
        """Names of the volumes dockerd lists for this plugin."""
        return self.dockerd.docker("volume", "ls", "-q", "--filter", f"driver={self.ref}").stdout.split()

    def inspect(self) -> dict[str, Any]:
        return json.loads(self.dockerd.docker("plugin", "inspect", self.name).stdout)[0]

    def exists(self) -> bool:
        return self.dockerd.docker("plugin", "inspect", self.name, check=False).returncode == 0

    def set(self, **settings: str) -> None:
        """`docker plugin set NAME KEY=VALUE...`: an env name or `<mount>.source` per key (use `**{...}`)."""
        self.dockerd.docker("plugin", "set", self.name, *(f"{key}={value}" for key, value in settings.items()))

    def enable(self, timeout: int = 30) -> float:
        """`docker plugin enable`; returns the seconds it took (dockerd waits for the socket)."""
        started = time.monotonic()
        self.dockerd.docker("plugin", "enable", "--timeout", str(timeout), self.name)
        return time.monotonic() - started

    def disable(self) -> None:
        # -f: dockerd counts every volume of the driver as a use, so a plugin with volumes is always "in use".
        self.dockerd.docker("plugin", "disable", "-f", self.name)

    def remove(self) -> None:
        """Disable and remove the plugin if it exists; never raises (for finalizers).

        Also removes the socket directories of every plugin id this object has seen: after a failed
        enable, dockerd leaves that directory (with its stdio FIFOs) behind in the shared /run/docker/plugins.
        """
        if self.exists():
            self._ids.add(self.plugin_id)
        self.dockerd.docker("plugin", "rm", "-f", self.name, check=False)
        for plugin_id in self._ids:
            shutil.rmtree(PLUGIN_SOCKET_DIRS / plugin_id, ignore_errors=True)

    @property
    def plugin_id(self) -> str:
        plugin_id = self.inspect()["Id"]
        self._ids.add(plugin_id)
        return plugin_id

    @property
    def propagated_mount(self) -> Path:
        """The host side of config.json's propagatedMount, where dockerd finds the Mountpoints."""
        return self.dockerd.workdir / "data" / "plugins" / self.plugin_id / "propagated-mount"

    def log(self, plugin_id: str | None = None) -> str:
        """What the plugin printed: dockerd logs a managed plugin's output with a `plugin=<id>` field."""
        marker = f"plugin={plugin_id or self.plugin_id}"
        lines = self.dockerd.log_path.read_text(errors="replace").splitlines()
        return "\n".join(line for line in lines if marker in line)


def read_secret_as_1000(dockerd: Dockerd, volume: str, timeout: float = 20) -> list[str]:
    """In a container running as uid 1000 with `volume` at /run/secrets: [uid, db_password, its owner, its mode].

    Retries only while the plugin says it has no Vault identity yet (it authenticates after binding its
    socket); any other failure, or still none after `timeout` seconds, raises AssertionError.
    """
    script = "id -u; cat /run/secrets/db_password; echo; stat -c '%u %a' /run/secrets/db_password"
    deadline = time.monotonic() + timeout
    while True:
        res = dockerd.docker(
            "run",
            "--rm",
            "--network",
            "none",
            "--user",
            "1000",
            "-v",
            f"{volume}:/run/secrets:ro",
            dockerd.image,
            "sh",
            "-c",
            script,
            check=False,
        )
        if res.returncode == 0:
            return res.stdout.split()
        if "no Vault identity" not in res.stderr or time.monotonic() > deadline:
            raise AssertionError(f"reading {volume} as uid 1000 failed: {res.stderr}")
        time.sleep(0.5)


def mounts_below(root: Path) -> list[str]:
    """Mount points strictly below `root`, as this process's mount namespace sees them."""
    return [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(f"{root}/")
    ]
