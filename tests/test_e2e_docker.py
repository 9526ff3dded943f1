"""End to end: a real dockerd (hermetic, started here) uses the plugin as a legacy plugin socket, a real
OpenBao holds the secrets, and containers run as a non-root user."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.conftest import SECRET, live_tmpfs_below
from tests.support.notify import COUNTING_HUPS
from tests.support.plugin import held_tokens, open_state, plugin_command

pytestmark = [pytest.mark.docker, pytest.mark.openbao]


def create_volume(docker, plugin, name, *options):
    opts = [
        a
        for o in ("role=web", "secret.db_password=secret/data/web/db#password", "uid=1000", *options)
        for a in ("-o", o)
    ]
    docker.docker("volume", "create", "-d", plugin.name, *opts, name)


def run(docker, *args, check=True):
    return docker.docker("run", "--rm", "--network", "none", *args, check=check)


def test_non_root_container_reads_its_secret_and_cannot_write(docker, plugin, bao, unique_name):
    create_volume(docker, plugin, unique_name)
    out = run(
        docker,
        "--user",
        "1000",
        "-v",
        f"{unique_name}:/run/secrets:ro",
        docker.image,
        "sh",
        "-c",
        "id -u; cat /run/secrets/db_password; echo; stat -c '%u %a' /run/secrets/db_password",
    )
    assert out.stdout.split() == ["1000", SECRET, "1000", "400"]
    # Without :ro and even as root inside the container, the volume stays read-only.
    for user in ("1000", "0"):
        denied = run(
            docker,
            "--user",
            user,
            "-v",
            f"{unique_name}:/run/secrets",
            docker.image,
            "sh",
            "-c",
            "echo x > /run/secrets/db_password",
            check=False,
        )
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    other_user = run(
        docker, "--user", "2000", "-v", f"{unique_name}:/s", docker.image, "cat", "/s/db_password", check=False
    )
    assert other_user.returncode != 0 and "Permission denied" in other_user.stderr
    assert live_tmpfs_below(plugin.mount_root) == []
    assert bao.accessors_with_meta(volume=unique_name) == []


def test_two_containers_get_separate_tmpfs_and_tokens_revoked_at_exit(docker, plugin, bao, unique_name):
    create_volume(docker, plugin, unique_name)
    containers = [
        docker.docker(
            "run",
            "-d",
            "--network",
            "none",
            "--user",
            "1000",
            "-v",
            f"{unique_name}:/run/secrets:ro",
            docker.image,
            "sleep",
            "60",
        ).stdout.strip()
        for _ in range(2)
    ]
    try:
        for container in containers:
            assert docker.docker("exec", container, "cat", "/run/secrets/db_password").stdout == SECRET
        views = [m for m in live_tmpfs_below(plugin.mount_root) if m.endswith("/view")]
        assert len(views) == 2 and views[0] != views[1]
        accessors = bao.accessors_with_meta(volume=unique_name)
        assert len(accessors) == 2
        inspect = json.loads(docker.docker("volume", "inspect", unique_name).stdout)[0]
        assert inspect["Status"] == {"activeMounts": 2}
        assert SECRET not in json.dumps(inspect)
        removal = docker.docker("volume", "rm", unique_name, check=False)
        assert removal.returncode != 0
    finally:
        docker.docker("rm", "-f", *containers)
    assert live_tmpfs_below(plugin.mount_root) == []
    assert not any(bao.token_valid(a) for a in accessors)
    docker.docker("volume", "rm", unique_name)
    assert unique_name not in docker.docker("volume", "ls", "-q").stdout.split()


def test_mount_failure_reaches_docker_run_as_a_clear_error(docker, plugin, bao, unique_name):
    create_volume(docker, plugin, unique_name, "secret.other=secret/data/other/x#y")
    failed = run(docker, "--user", "1000", "-v", f"{unique_name}:/s:ro", docker.image, "true", check=False)
    assert failed.returncode != 0
    assert "denied permission to read secret/data/other/x" in failed.stderr
    assert live_tmpfs_below(plugin.mount_root) == []
    assert bao.accessors_with_meta(volume=unique_name) == []


def test_bad_options_are_refused_at_create(docker, plugin, unique_name):
    refused = docker.docker(
        "volume", "create", "-d", plugin.name, "-o", "role=web", "-o", "secret.../x=a/b", unique_name, check=False
    )
    assert refused.returncode != 0 and "one path component" in refused.stderr


def test_wrapped_token_volume_and_tamper_through_the_docker_cli(docker, plugin, bao, unique_name):
    bao.root.sys.create_or_update_policy("minter", 'path "auth/token/create" { capabilities = ["update"] }\n')
    wrapping = bao.root.auth.token.create(policies=["web", "minter"], ttl="1h", wrap_ttl="5m")["wrap_info"]["token"]
    docker.docker(
        "volume",
        "create",
        "-d",
        plugin.name,
        "-o",
        f"wrapped-token={wrapping}",
        "-o",
        "uid=1000",
        "-o",
        "secret.db_password=secret/data/web/db#password",
        unique_name,
    )
    out = run(
        docker,
        "--user",
        "1000",
        "-v",
        f"{unique_name}:/run/secrets:ro",
        docker.image,
        "cat",
        "/run/secrets/db_password",
    )
    assert out.stdout == SECRET
    stolen = bao.root.auth.token.create(policies=["web"], ttl="1h", wrap_ttl="5m")["wrap_info"]["token"]
    bao.root.sys.unwrap(stolen)
    refused = docker.docker(
        "volume",
        "create",
        "-d",
        plugin.name,
        "-o",
        f"wrapped-token={stolen}",
        "-o",
        "secret.x=secret/data/web/db#password",
        f"{unique_name}-t",
        check=False,
    )
    assert refused.returncode != 0 and "possible interception" in refused.stderr
    assert "wrap.tamper" in plugin.log()


def test_token_file_reaches_the_container_and_no_token_is_left_in_state(docker, plugin, bao, unique_name):
    create_volume(docker, plugin, unique_name, "token-file=vault-token")
    out = run(
        docker,
        "--user",
        "1000",
        "-v",
        f"{unique_name}:/run/secrets:ro",
        docker.image,
        "cat",
        "/run/secrets/vault-token",
    )
    wrapping = out.stdout
    assert bao.wrapping_lookup(wrapping)["creation_path"] == "auth/token/create/web"
    # The container has exited: the token inside the wrapping was revoked with its mount.
    inner = bao.server.client(wrapping).sys.unwrap()["auth"]
    assert not bao.token_valid(inner["accessor"])
    identity = held_tokens(plugin.state_dir)[0]
    state_bytes = b"".join(p.read_bytes() for p in plugin.state_dir.rglob("*") if p.is_file())
    for token in (identity, wrapping, inner["client_token"]):
        assert token.encode() not in state_bytes


def test_a_restart_always_container_is_running_again_with_its_secrets_after_dockerd_restarts(
    docker, plugin, bao, unique_name
):
    """dockerd restores `--restart always` containers right after it finds their plugins, and gives up on a
    container whose Mount fails then: the Mount must succeed the first time."""
    create_volume(docker, plugin, unique_name)
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
        f"{unique_name}:/run/secrets:ro",
        docker.image,
        "sleep",
        "600",
    ).stdout.strip()
    try:
        assert docker.docker("exec", container, "cat", "/run/secrets/db_password").stdout == SECRET
        docker.restart()
        docker.wait_running(container)
        assert docker.docker("exec", container, "cat", "/run/secrets/db_password").stdout == SECRET
    finally:
        docker.docker("rm", "-f", container, check=False)
    assert bao.accessors_with_meta(volume=unique_name) == []


def test_notify_signals_only_the_container_whose_files_changed(docker, plugin, bao, unique_name):
    """Two containers on one volume have a mount each: a rewrite of one mount signals its container only."""
    kv = bao.root.secrets.kv.v2
    kv.create_or_update_secret(path=f"web/{unique_name}", secret={"password": "one"})
    docker.docker(
        "volume",
        "create",
        "-d",
        plugin.name,
        *("-o", "role=web", "-o", f"secret.pw=secret/data/web/{unique_name}#password", "-o", "uid=1000"),
        *("-o", "refresh=10s", "-o", "notify=SIGHUP"),
        unique_name,
    )

    def start() -> str:
        return docker.docker(
            "run", "-d", "--network", "none", "--user", "1000", "-v", f"{unique_name}:/run/secrets",
            docker.image, "sh", "-c", COUNTING_HUPS,
        ).stdout.strip()  # fmt: skip

    def hups(container: str) -> int:
        return docker.docker("exec", container, "cat", "/tmp/hups").stdout.count("hup")

    def read(container: str) -> str:
        return docker.docker("exec", container, "cat", "/run/secrets/pw").stdout

    first = start()
    kv.create_or_update_secret(path=f"web/{unique_name}", secret={"password": "two"})
    second = start()  # mounted after the change: its files are already current
    try:
        assert read(first) == "one" and read(second) == "two"
        deadline = time.monotonic() + 20
        while read(first) != "two" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert read(first) == "two"
        time.sleep(12)  # past the second mount's own refresh, which finds nothing changed
        assert (hups(first), hups(second)) == (1, 0)
    finally:
        docker.docker("rm", "-f", first, second, check=False)


def test_bootstrap_moves_running_containers_to_the_new_identity_then_revokes_the_old(
    docker, plugin, bao, databases, unique_name, short_tmp
):
    """A compromised identity is replaced by bootstrap: the 3 running containers keep working, each with a
    new token from the new identity and new database credentials, and the old identity is revoked."""
    create_volume(docker, plugin, unique_name, "secret.user=db/creds/app#username", "secret.pw=db/creds/app#password")
    containers = [
        docker.docker(
            "run", "-d", "--network", "none", "--user", "1000", "-v", f"{unique_name}:/run/secrets",
            docker.image, "sleep", "600",
        ).stdout.strip()
        for _ in range(3)
    ]  # fmt: skip

    try:
        before = {c: docker.docker("exec", c, "cat", "/run/secrets/user").stdout for c in containers}
        state = open_state(short_tmp / "state")
        try:
            old = state.identity().accessor
        finally:
            state.close()
        old_tokens = bao.accessors_with_meta(volume=unique_name)
        assert len(old_tokens) == 3
        wrapped = bao.write_wrapped_secret_id(short_tmp / "rotated")
        done = subprocess.run(
            [plugin_command(), "bootstrap", "--wrapped-secret-id-file", str(wrapped), "--state-dir", str(short_tmp / "state")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "3 running mount(s) moved" in done.stdout and "previous identity is revoked" in done.stdout
        assert not bao.token_valid(old), "the old identity is revoked"
        assert not any(bao.token_valid(a) for a in old_tokens), "and with it the old mount tokens"
        for container in containers:
            user = docker.docker("exec", container, "cat", "/run/secrets/user").stdout
            password = docker.docker("exec", container, "cat", "/run/secrets/pw").stdout
            assert user != before[container] and databases.pg.can_login(user, password)
            assert not databases.pg.role_exists(before[container]), "the old credentials went with the old identity"
        new_tokens = bao.accessors_with_meta(volume=unique_name)
        assert len(new_tokens) == 3 and not set(new_tokens) & set(old_tokens)
        state = open_state(short_tmp / "state")
        try:
            new = state.identity().accessor
        finally:
            state.close()
        bao.root.auth.token.revoke_accessor(new)  # the new tokens descend from the new identity: they go with it
        assert not any(bao.token_valid(a) for a in new_tokens), "the mounts' tokens are children of the new identity"
    finally:
        docker.docker("rm", "-f", *containers, check=False)
