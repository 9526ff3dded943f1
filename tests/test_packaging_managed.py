"""End to end: the managed plugin, built by `make plugin` from a debootstrap base, in a hermetic dockerd.

One scenario, in the order an operator lives it: enable while Vault is unreachable (the socket must
come up anyway), point it at Vault, read a secret as uid 1000, restart the plugin, replace its rootfs
as an upgrade does, and remove everything. The steps share state, so they are one test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hvac
import pytest

from devenv.openbao import free_loopback_port
from tests.conftest import SECRET, require, require_root
from tests.support.notify import assert_one_sighup_after_a_kv_change
from tests.support.plugin_image import (
    ManagedPlugin,
    debian_base_image,
    make_targets,
    mounts_below,
    read_secret_as_1000,
)

pytestmark = [pytest.mark.docker, pytest.mark.openbao]

CONFIG = json.loads((Path(__file__).resolve().parents[1] / "config.json").read_text())
# dockerd dials the plugin's socket 0.5 s after starting it, then 3 s later three more times, and
# returns from enable at the first dial that connects: under 4 s means the socket was bound by 3.5 s.
ENABLE_SECONDS_MAX = 4


@pytest.fixture(scope="module")
def base_image(docker):  # noqa: F811
    require_root()
    require(shutil.which("debootstrap") is not None, "debootstrap", "apt-get install debootstrap")
    require(shutil.which("make") is not None, "make", "apt-get install make")
    return debian_base_image(docker)


@pytest.fixture
def managed(docker, unique_name, short_tmp):  # noqa: F811  (after short_tmp: removed before its dirs go)
    """A ManagedPlugin named `unique_name`; afterwards its volumes and the plugin itself are removed."""
    plugin = ManagedPlugin(docker, unique_name)
    try:
        yield plugin
    finally:
        if plugin.exists():
            for volume in plugin.volumes():
                docker.docker("volume", "rm", "-f", volume, check=False)
        plugin.remove()


def test_config_declares_what_docker_needs():
    entrypoint = CONFIG["entrypoint"]
    mount_root = entrypoint[entrypoint.index("--mount-root") + 1]
    assert CONFIG["interface"] == {"types": ["docker.volumedriver/1.0"], "socket": "vault-secrets.sock"}
    assert entrypoint[1] == "serve" and f"/run/docker/plugins/{CONFIG['interface']['socket']}" in entrypoint
    assert CONFIG["network"] == {"type": "host"}
    assert mount_root == CONFIG["propagatedMount"]  # every Mountpoint lies under the propagated mount
    # mount(2) for the tmpfs; the host's processes seen (pidhost) to know which container holds a mount,
    # and signalled (CAP_KILL) for notify=.
    assert CONFIG["linux"]["capabilities"] == ["CAP_SYS_ADMIN", "CAP_KILL"] and CONFIG["pidhost"] is True
    settable = {e["name"] for e in CONFIG["env"] if "value" in e.get("settable", [])}
    assert {
        "VAULT_ADDR",
        "VAULT_CACERT",
        "VAULT_NAMESPACE",
        "VAULT_SECRETS_ROLE_ID",
        "VAULT_SECRETS_APPROLE_MOUNT",
        "VAULT_SECRETS_LOG_LEVEL",
        "VAULT_SECRETS_WRAPPED_SECRET_ID_FILE",
    } <= settable
    mounts = {m["name"]: m for m in CONFIG["mounts"]}
    state_dir = entrypoint[entrypoint.index("--state-dir") + 1]
    assert mounts["state"]["destination"] == state_dir and mounts["state"]["settable"] == ["source"]
    assert mounts["bootstrap"]["settable"] == ["source"] and "ro" in mounts["bootstrap"]["options"]
    wrapped = next(e["value"] for e in CONFIG["env"] if e["name"] == "VAULT_SECRETS_WRAPPED_SECRET_ID_FILE")
    assert wrapped.startswith(mounts["bootstrap"]["destination"] + "/")


def test_managed_plugin_from_build_to_removal(docker, bao, base_image, managed, short_tmp):  # noqa: F811
    state, bootstrap, build = short_tmp / "state", short_tmp / "bootstrap", short_tmp / "build"
    state.mkdir(mode=0o700)
    bootstrap.mkdir()
    wrapping_token = bao.write_wrapped_secret_id(bootstrap / "wrapped-secret-id").read_text()
    volume = f"{managed.name}-secrets"
    settings = {
        "VAULT_SECRETS_ROLE_ID": bao.seed.role_id,
        "VAULT_SECRETS_LOG_LEVEL": "debug",
        "state.source": str(state),
        "bootstrap.source": str(bootstrap),
    }

    # Built, created, set and enabled by make while nothing listens at VAULT_ADDR: enable succeeds only
    # if the socket is bound without Vault.
    unreachable = f"http://127.0.0.1:{free_loopback_port()}"
    make_targets(
        docker,
        "plugin",
        PLUGIN_NAME=managed.name,
        BASE_IMAGE=base_image,
        PLUGIN_BUILD=str(build),
        PLUGIN_SETTINGS=" ".join(f"{k}={v}" for k, v in {**settings, "VAULT_ADDR": unreachable}.items()),
    )
    assert managed.inspect()["Enabled"] is True
    docker.docker(
        "volume",
        "create",
        "-d",
        managed.name,
        "-o",
        "role=web",
        "-o",
        "uid=1000",
        "-o",
        "secret.db_password=secret/data/web/db#password",
        volume,
    )
    refused = docker.docker(
        "run", "--rm", "--network", "none", "-v", f"{volume}:/s:ro", docker.image, "true", check=False
    )
    assert refused.returncode != 0 and f"Vault at {unreachable} is unreachable" in refused.stderr

    # The operator points it at Vault: the wrapped SecretID in the bootstrap mount is used once.
    managed.disable()
    managed.set(VAULT_ADDR=bao.addr)
    assert managed.enable() < ENABLE_SECONDS_MAX
    assert read_secret_as_1000(docker, volume) == ["1000", SECRET, "1000", "400"]
    assert not _wrapping_token_usable(bao, wrapping_token)

    # Mountpoints lie under the propagated mount, where dockerd (another mount namespace) sees them.
    container = docker.docker(
        "run",
        "-d",
        "--network",
        "none",
        "--user",
        "1000",
        "-v",
        f"{volume}:/run/secrets:ro",
        docker.image,
        "sleep",
        "60",
    ).stdout.strip()
    try:
        assert docker.docker("exec", container, "cat", "/run/secrets/db_password").stdout == SECRET
        assert [m for m in mounts_below(managed.propagated_mount) if m.endswith("/view")]
    finally:
        docker.docker("rm", "-f", container)
    assert mounts_below(managed.propagated_mount) == []

    # notify= reaches the container under the managed plugin too: it sees the host's processes (pidhost).
    assert_one_sighup_after_a_kv_change(docker, bao, managed.name)

    # Nothing secret in what `docker plugin inspect` shows to every Docker API user, nor in the plugin's log.
    inspect = json.dumps(managed.inspect())
    assert bao.addr in inspect
    for secret in (SECRET, wrapping_token, bao.server.root_token):
        assert secret not in inspect
        assert secret not in managed.log()

    # A restart keeps volumes and identity: the wrapping token is spent, so only the sealed identity
    # (in the host's state directory) can authenticate the plugin now.
    managed.disable()
    assert managed.enable() < ENABLE_SECONDS_MAX
    assert managed.volumes() == [volume]
    assert read_secret_as_1000(docker, volume) == ["1000", SECRET, "1000", "400"]
    assert {p.name for p in state.iterdir()} >= {"state.db", "seal.key"}
    assert (state.stat().st_mode & 0o777) == 0o700

    # dockerd restarted (SIGTERM, start) with a --restart always container: dockerd starts the plugin and
    # mounts the moment its socket answers, while it is still resuming its identity, and never retries.
    container = docker.docker(
        "run",
        "-d",
        "--restart",
        "always",
        "--network",
        "none",
        "--user",
        "1000",
        "-v",
        f"{volume}:/run/secrets:ro",
        docker.image,
        "sleep",
        "600",
    ).stdout.strip()
    docker.restart()
    docker.wait_running(container)
    assert docker.docker("exec", container, "cat", "/run/secrets/db_password").stdout == SECRET
    docker.docker("rm", "-f", container)

    # An upgrade replaces the rootfs and keeps the mounts' sources: remove the plugin, create it again
    # from the bundle, and the same host state directory carries the volume and the identity over.
    old_id = managed.plugin_id
    managed.remove()
    docker.docker("plugin", "create", managed.name, str(build / "bundle"))
    assert managed.plugin_id != old_id
    managed.set(**settings, VAULT_ADDR=bao.addr)
    assert managed.enable() < ENABLE_SECONDS_MAX
    assert read_secret_as_1000(docker, volume) == ["1000", SECRET, "1000", "400"]

    # Removal leaves no volume, tmpfs or token behind.
    docker.docker("volume", "rm", volume)
    assert bao.accessors_with_meta(volume=volume) == []
    assert mounts_below(managed.propagated_mount) == []
    managed.disable()
    docker.docker("plugin", "rm", managed.name)
    assert not managed.exists()
    assert volume not in docker.docker("volume", "ls", "-q").stdout.split()


def _wrapping_token_usable(bao, token: str) -> bool:
    try:
        bao.root.adapter.post("/v1/sys/wrapping/lookup", json={"token": token})
        return True
    except hvac.exceptions.VaultError:  # InvalidRequest: used, expired or unknown
        return False
