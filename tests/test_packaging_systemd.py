"""The host service: packaging/vault-secrets-plugin.service checked by systemd's own verifier, and its
ExecStart run for real, under the unit's capability bounding set and no_new_privs, as a legacy plugin of
the hermetic dockerd. systemd itself does not run here: what it would add (seccomp filters) is left to
`systemd-analyze verify`; what it must not add (a mount namespace) is checked on the unit's text.
"""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PLUGINS_DIR, SECRET, require
from tests.support.notify import assert_one_sighup_after_a_kv_change
from tests.support.plugin import PluginClient, plugin_command
from tests.support.plugin_image import mounts_below, read_secret_as_1000

pytestmark = [pytest.mark.docker, pytest.mark.openbao]

UNIT = Path(__file__).resolve().parents[1] / "packaging" / "vault-secrets-plugin.service"
INSTALLED_COMMAND = "/opt/vault-secrets/bin/vault-secrets-plugin"  # where docs/install.md puts the venv

# Options that make systemd build a mount namespace for the unit (exec_needs_mount_namespace() in
# src/core/execute.c). Mounts made in one never propagate back to the host, so dockerd would not see them.
NAMESPACE_OPTIONS = {
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "ProtectSystem",
    "ProtectHome",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "ReadWritePaths",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "ExecPaths",
    "NoExecPaths",
    "BindPaths",
    "BindReadOnlyPaths",
    "TemporaryFileSystem",
    "RootDirectory",
    "RootImage",
    "MountImages",
    "ExtensionImages",
    "ExtensionDirectories",
    "PrivateIPC",
    "IPCNamespacePath",
    "LogNamespace",
    "PrivateNetwork",
    "NetworkNamespacePath",
}
FALSE = {"no", "false", "0", "off", ""}
CAPABILITY_BITS = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SYS_ADMIN": 21,
}


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values, in file order (systemd allows a key more than once); `\\` continues a line."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


SERVICE = read_unit(UNIT)["Service"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze", "apt-get install systemd")
    # verify insists that ExecStart exists: point it at this venv's command, under the unit's own name.
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(INSTALLED_COMMAND, plugin_command()))
    res = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], check=False, capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys and bad values, only warning: any output is a finding.
    assert (res.returncode, res.stdout + res.stderr) == (0, "")


def test_unit_is_hardened_but_keeps_the_host_mount_namespace():
    assert read_unit(UNIT)["Unit"]["Before"] == ["docker.service"]
    configured = {key for key, values in SERVICE.items() if values[-1].lower() not in FALSE}
    assert configured & NAMESPACE_OPTIONS == set()
    assert SERVICE.get("MountFlags", ["shared"])[-1] == "shared"
    assert "RuntimeDirectory" not in SERVICE  # would delete /run/docker/plugins, and every socket in it, at stop
    assert SERVICE["NoNewPrivileges"] == ["yes"]
    assert sorted(bounding_set()) == ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SYS_ADMIN"]


@pytest.fixture
def host_layout(short_tmp, bao):
    """The unit's /etc/vault-secrets, /var/lib/vault-secrets and /run/vault-secrets (the mounts), as an operator
    and systemd prepare them, in a temp dir."""
    etc, state, run = short_tmp / "etc", short_tmp / "state", short_tmp / "run"
    etc.mkdir(mode=0o700)
    state.mkdir(mode=int(SERVICE["StateDirectoryMode"][-1], 8))  # what StateDirectory= makes
    (etc / "role-id").write_text(bao.seed.role_id + "\n")
    bao.write_wrapped_secret_id(etc / "wrapped-secret-id")
    (etc / "plugin.env").write_text(f"VAULT_ADDR={bao.addr}\n")
    return {"/etc/vault-secrets": etc, "/var/lib/vault-secrets": state, "/run/vault-secrets": run}


def bounding_set() -> list[str]:
    return SERVICE["CapabilityBoundingSet"][-1].split()


def service_command(name: str, paths: dict[str, Path]) -> list[str]:
    """ExecStart with the installed paths swapped for this test's, wrapped in setpriv with the unit's limits."""
    (exec_start,) = SERVICE["ExecStart"]
    assert not set("$%") & set(exec_start) and exec_start[0] not in "-@:+!", (
        "ExecStart uses syntax this test cannot emulate"
    )
    argv = shlex.split(exec_start)
    assert argv[0] == INSTALLED_COMMAND
    replace = {
        INSTALLED_COMMAND: plugin_command(),
        "/run/docker/plugins/vault-secrets.sock": str(PLUGINS_DIR / f"{name}.sock"),
        **{old: str(new) for old, new in paths.items()},
    }
    for old, new in replace.items():
        argv = [arg.replace(old, new) if arg.startswith(old) else arg for arg in argv]
    caps = ",".join("+" + cap.removeprefix("CAP_").lower() for cap in bounding_set())
    return ["setpriv", "--no-new-privs", "--inh-caps", "-all", "--bounding-set", f"-all,{caps}", "--", *argv]


def service_environment(paths: dict[str, Path]) -> dict[str, str]:
    """A clean environment, as systemd gives a service, plus the unit's EnvironmentFile."""
    (env_file,) = SERVICE["EnvironmentFile"]
    for old, new in paths.items():
        env_file = env_file.replace(old, str(new))
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    for line in Path(env_file).read_text().splitlines():
        key, _, value = line.partition("=")
        env[key.strip()] = value.strip()
    return env


def effective_capabilities(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)


def test_exec_start_serves_dockerd_with_the_units_hardening(docker, bao, host_layout, unique_name, short_tmp):  # noqa: F811
    require(shutil.which("setpriv") is not None, "setpriv", "apt-get install util-linux")
    PLUGINS_DIR.mkdir(parents=True, exist_ok=True)
    socket = PLUGINS_DIR / f"{unique_name}.sock"
    umask = int(SERVICE["UMask"][-1], 8)
    with open(short_tmp / "service.log", "wb") as log:
        service = subprocess.Popen(
            service_command(unique_name, host_layout),
            env=service_environment(host_layout),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            umask=umask,
        )
    volume = unique_name
    try:
        _wait_for_socket(service, socket, short_tmp / "service.log")
        # The plugin runs with exactly the unit's bounding set, and it is enough for what follows.
        assert effective_capabilities(service.pid) == sum(1 << CAPABILITY_BITS[c] for c in bounding_set())
        docker.docker(
            "volume",
            "create",
            "-d",
            unique_name,
            "-o",
            "role=web",
            "-o",
            "uid=1000",
            "-o",
            "secret.db_password=secret/data/web/db#password",
            volume,
        )
        assert read_secret_as_1000(docker, volume) == ["1000", SECRET, "1000", "400"]
        # notify= under the unit's capabilities: a container of another user is signalled (CAP_KILL).
        assert_one_sighup_after_a_kv_change(docker, bao, unique_name)
        docker.docker("volume", "rm", volume)
        assert bao.accessors_with_meta(volume=volume) == []
        assert mounts_below(host_layout["/run/vault-secrets"]) == []
        assert not any(host_layout["/var/lib/vault-secrets"].rglob("view")), "no mount in the state directory"
    finally:
        docker.docker("volume", "rm", "-f", volume, check=False)
        service.send_signal(signal.SIGTERM)  # what systemd sends the main process (KillMode=mixed)
        try:
            status = service.wait(30)
        except subprocess.TimeoutExpired:
            service.kill()
            status = service.wait()
        socket.unlink(missing_ok=True)
    assert status == 0
    assert {p.name for p in host_layout["/var/lib/vault-secrets"].iterdir()} >= {"state.db", "seal.key"}


def _wait_for_socket(service: subprocess.Popen, socket: Path, log: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise AssertionError(f"the service exited with {service.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if PluginClient(socket, timeout=5).call("Plugin.Activate")[0] == 200:
                return
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"no socket at {socket} after {timeout}s:\n{log.read_text()[-3000:]}")
