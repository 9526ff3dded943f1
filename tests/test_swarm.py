"""Swarm on the hermetic dockerd: a one-node manager on loopback, the plugin as its legacy plugin.

A Swarm node advertises only the volume drivers its dockerd has activated, and dockerd activates a legacy
plugin on first use only: a stack deployed right after the plugin starts stays Pending ("missing plugin")
until something activates it. packaging/docker.service.d/vault-secrets.conf does, after every start of
dockerd; these tests run its command as systemd would, then follow the tokens and tmpfs of each task
through scale and `docker stack rm`. docs/swarm.md is the operator's side of the same story.
"""

from __future__ import annotations

import json
import secrets
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devenv.openbao import free_loopback_port
from tests.conftest import SECRET, live_tmpfs_below, require
from tests.support.dockerd import Dockerd

pytestmark = [pytest.mark.docker, pytest.mark.openbao, pytest.mark.heavy]

DROP_IN = Path(__file__).resolve().parents[1] / "packaging" / "docker.service.d" / "vault-secrets.conf"
NODE_UPDATE_SECONDS = 20  # swarmkit's agent sends the node's description (its plugins) this often
READ = "id -u; cat /run/secrets/db_password; echo; stat -c '%u %a' /run/secrets/db_password"
STACK = """\
version: "3.8"
services:
  app:
    image: {image}
    command: ["sleep", "3600"]
    user: "1000"
    # sleep ignores SIGTERM as PID 1: without this, each task would stop (and its token go) only after 10 s.
    stop_grace_period: 1s
    deploy:
      replicas: 2
    # The test's choice, for a hermetic Swarm (no overlay network); the plugin does not care.
    networks: [hostnet]
    volumes:
      - type: volume
        source: secrets
        target: /run/secrets
        volume:
          nocopy: true
networks:
  hostnet:
    external: true
    name: host
volumes:
  secrets:
    driver: {driver}
    driver_opts:
      role: web
      secret.db_password: "secret/data/web/db#password"
      uid: "1000"
"""


@pytest.fixture(scope="module")
def swarm(docker: Dockerd) -> Iterator[Dockerd]:
    """The module's dockerd as a one-node Swarm manager, listening on a free loopback port only.

    No network leaves a trace on the host: Swarm's ingress network (a VXLAN socket on every address, and a
    sandbox on a host bridge, docker_gwbridge, that dockerd leaves behind when it stops) is removed at once,
    the bridge with it; it is made first under a device name of its own, so that no other bridge is adopted.
    Tasks use the host's network, or none. Swarm's gossip port (7946) is fixed: one Swarm per host at a time.
    """
    device = f"vsgw{secrets.token_hex(4)}"
    docker.docker(
        "network",
        "create",
        "--driver",
        "bridge",
        "--opt",
        f"com.docker.network.bridge.name={device}",
        "--opt",
        "com.docker.network.bridge.enable_icc=false",
        "--opt",
        "com.docker.network.bridge.enable_ip_masquerade=false",
        "docker_gwbridge",
    )
    address = f"127.0.0.1:{free_loopback_port()}"
    try:
        docker.docker("swarm", "init", "--listen-addr", address, "--advertise-addr", address)
        docker.docker("network", "rm", "ingress", input="y\n")  # the CLI asks for confirmation
        # The ingress sandbox lets go of the bridge a moment after its network is gone.
        wait_for(
            lambda: docker.docker("network", "rm", "docker_gwbridge", check=False).returncode == 0,
            15,
            "docker_gwbridge removed",
        )
        yield docker
    finally:
        docker.docker("swarm", "leave", "--force", check=False)
        docker.docker("network", "rm", "docker_gwbridge", check=False)  # when the setup stopped half-way
        assert not Path(f"/sys/class/net/{device}").exists(), f"host bridge {device} left behind"


def wait_for(condition: Callable[[], bool], timeout: float, what: str, detail: Callable[[], str] = lambda: "") -> float:
    """Poll `condition` every 0.25 s until it holds; return the seconds that took. AssertionError naming `what`,
    with `detail()`, if it still does not hold after `timeout` seconds."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not {what} after {timeout:g} s: {detail()}")
        time.sleep(0.25)
    return time.monotonic() - started


def activation_command(driver: str) -> list[str]:
    """The drop-in's ExecStartPost as systemd runs it (continuation lines joined, `$$` unescaped), for a plugin
    named `driver`; asserts that its failure is ignored ("-"), as a plugin that is down must not fail dockerd."""
    joined = DROP_IN.read_text().replace("\\\n", " ")
    (line,) = [line for line in joined.splitlines() if line.startswith("ExecStartPost=")]
    command = line.removeprefix("ExecStartPost=")
    assert command.startswith("-"), "a failed activation must not fail docker.service"
    return [arg.replace("vault-secrets", driver) for arg in shlex.split(command[1:].replace("$$", "$"))]


def activate(docker: Dockerd, driver: str) -> None:
    """Run the drop-in's command against `docker`, as systemd does after dockerd's start; it must succeed."""
    res = subprocess.run(
        activation_command(driver), env=docker.env, capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, f"the drop-in's activation failed: {res.stderr}"


def activated_drivers(docker: Dockerd) -> list[str]:
    """The volume drivers dockerd has activated (`docker info`; asking activates nothing)."""
    return json.loads(docker.docker("info", "--format", "{{json .Plugins.Volume}}").stdout)


def node_lists_volume_driver(docker: Dockerd, driver: str) -> bool:
    """Whether the Swarm node's description, which the managers schedule by, lists volume driver `driver`."""
    plugins = json.loads(
        docker.docker("node", "inspect", "self", "--format", "{{json .Description.Engine.Plugins}}").stdout
    )
    return {"Type": "Volume", "Name": driver} in plugins


def tasks(docker: Dockerd, service: str) -> list[str]:
    """'<state> <error>' of each task of `service` meant to run (`docker service ps`, which activates nothing)."""
    res = docker.docker(
        "service",
        "ps",
        service,
        "--no-trunc",
        "--filter",
        "desired-state=running",
        "--format",
        "{{.CurrentState}}\t{{.Error}}",
    )
    return [
        " ".join([state.split()[0], error]).strip()
        for state, _, error in (line.partition("\t") for line in res.stdout.splitlines())
    ]


def running(docker: Dockerd, service: str, replicas: int) -> Callable[[], bool]:
    """A condition: exactly `replicas` tasks of `service` are meant to run, and all of them do."""

    def condition() -> bool:
        states = tasks(docker, service)
        return len(states) == replicas and all(state.startswith("Running") for state in states)

    return condition


def containers(docker: Dockerd, service: str, *, all_states: bool = False) -> list[str]:
    """IDs of the containers of `service`'s tasks on this node: running ones, or with `all_states` any."""
    label = f"label=com.docker.swarm.service.name={service}"
    return docker.docker("ps", "-q", *(["-a"] if all_states else []), "--filter", label).stdout.split()


def read_secret(docker: Dockerd, container: str) -> list[str]:
    """[uid, db_password, its owner, its mode] as the task's container sees its volume."""
    return docker.docker("exec", container, "sh", "-c", READ).stdout.split()


def views(mount_root: Path) -> list[str]:
    """The plugin's live per-mount views (one tmpfs per task) below `mount_root`."""
    return [m for m in live_tmpfs_below(mount_root) if m.endswith("/view")]


def test_the_drop_in_is_a_valid_docker_service_drop_in(tmp_path):
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze", "apt-get install systemd")
    unit = tmp_path / "docker.service"
    unit.write_text("[Unit]\nDescription=dockerd stand-in\n\n[Service]\nType=notify\nExecStart=/bin/true\n")
    (tmp_path / "docker.service.d").mkdir()
    shutil.copy(DROP_IN, tmp_path / "docker.service.d" / DROP_IN.name)
    res = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on unknown keys and bad values, only warning: any output is a finding.
    assert (res.returncode, res.stdout + res.stderr) == (0, "")


def test_stack_deployed_right_after_the_plugin_starts_gives_each_task_its_own_tmpfs_and_token(
    swarm, plugin, bao, unique_name, short_tmp
):
    stack, driver = unique_name, plugin.name
    service, volume = f"{stack}_app", f"{stack}_secrets"  # Swarm prefixes the stack's names
    compose = short_tmp / "stack.yml"
    compose.write_text(STACK.format(image=swarm.image, driver=driver))
    swarm.docker("stack", "deploy", "--resolve-image", "never", "--compose-file", str(compose), stack)
    try:
        # Nothing has used the plugin through this dockerd yet: the managers do not know the node has it.
        wait_for(
            lambda: (
                len(tasks(swarm, service)) == 2 and all("missing plugin on 1 node" in t for t in tasks(swarm, service))
            ),
            15,
            "both tasks Pending for the missing plugin",
            lambda: str(tasks(swarm, service)),
        )
        assert not node_lists_volume_driver(swarm, driver)

        # What systemd runs after dockerd's start; the tasks already Pending are then scheduled by themselves.
        activate(swarm, driver)
        assert driver in activated_drivers(swarm)
        wait_for(lambda: node_lists_volume_driver(swarm, driver), NODE_UPDATE_SECONDS + 10, "the node lists the driver")
        wait_for(running(swarm, service, 2), 30, "both tasks running", lambda: str(tasks(swarm, service)))

        # Each task: one container, one Mount ID, its own tmpfs and its own token.
        for container in containers(swarm, service):
            assert read_secret(swarm, container) == ["1000", SECRET, "1000", "400"]
        assert len(views(plugin.mount_root)) == 2
        assert len(bao.accessors_with_meta(volume=volume)) == 2

        # Scaling down stops one task: its container's Unmount revokes its token and unmounts its tmpfs.
        swarm.docker("service", "scale", "--detach", f"{service}=1")
        wait_for(lambda: len(bao.accessors_with_meta(volume=volume)) == 1, 30, "one token left after scale to 1")
        wait_for(lambda: len(views(plugin.mount_root)) == 1, 10, "one tmpfs left after scale to 1")
        wait_for(running(swarm, service, 1), 30, "one task running", lambda: str(tasks(swarm, service)))
        (survivor,) = containers(swarm, service)
        assert read_secret(swarm, survivor)[1] == SECRET

        swarm.docker("stack", "rm", stack)
        wait_for(lambda: bao.accessors_with_meta(volume=volume) == [], 30, "no token left after stack rm")
        wait_for(lambda: live_tmpfs_below(plugin.mount_root) == [], 10, "no tmpfs left after stack rm")
        wait_for(lambda: containers(swarm, service, all_states=True) == [], 30, "the task containers removed")
    finally:
        swarm.docker("stack", "rm", stack, check=False)
    # `stack rm` keeps the node's volume (a name and options, no secret): `docker volume rm` on each node.
    listed = swarm.docker("volume", "ls", "-q", "--filter", f"driver={driver}").stdout.split()
    assert listed == [volume]
    swarm.docker("volume", "rm", volume)
    assert swarm.docker("volume", "ls", "-q", "--filter", f"driver={driver}").stdout.split() == []


def test_service_create_with_volume_options_in_its_mount(swarm, plugin, bao, unique_name):
    driver, service, volume = plugin.name, unique_name, f"{unique_name}-secrets"
    activate(swarm, driver)  # the plugin started after dockerd, as on first install: once, by hand
    mount = ",".join(
        [
            "type=volume",
            f"source={volume}",
            "target=/run/secrets",
            f"volume-driver={driver}",
            "volume-opt=role=web",
            "volume-opt=secret.db_password=secret/data/web/db#password",
            "volume-opt=uid=1000",
            "volume-nocopy",
        ]
    )
    swarm.docker(
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        service,
        "--user",
        "1000",
        "--stop-grace-period",
        "1s",
        "--mount",
        mount,
        swarm.image,
        "sleep",
        "3600",
    )
    try:
        wait_for(
            running(swarm, service, 1), NODE_UPDATE_SECONDS + 30, "the task running", lambda: str(tasks(swarm, service))
        )
        (container,) = containers(swarm, service)
        assert read_secret(swarm, container) == ["1000", SECRET, "1000", "400"]
        assert len(bao.accessors_with_meta(volume=volume)) == 1
        swarm.docker("service", "rm", service)
        wait_for(lambda: bao.accessors_with_meta(volume=volume) == [], 30, "no token left after service rm")
        wait_for(lambda: live_tmpfs_below(plugin.mount_root) == [], 10, "no tmpfs left after service rm")
        wait_for(lambda: containers(swarm, service, all_states=True) == [], 30, "the task container removed")
    finally:
        swarm.docker("service", "rm", service, check=False)
    swarm.docker("volume", "rm", volume)


def test_dockerd_forgets_the_activation_at_each_start_and_the_drop_in_makes_it_again(swarm, plugin):
    # Last in the module: it restarts the module's dockerd.
    driver = plugin.name
    activate(swarm, driver)
    assert driver in activated_drivers(swarm)
    swarm.restart()  # as at boot, or `systemctl restart docker`: the plugin keeps running
    # Only a volume of the driver in dockerd's own records would make it ask the plugin at start: none here.
    assert driver not in activated_drivers(swarm)
    activate(swarm, driver)
    assert driver in activated_drivers(swarm)
