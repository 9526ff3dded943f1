"""How the holders of a mount are read from /proc, over a /proc-like tree: grouping by mount namespace
(by its link, or by its root mount where the link may not be read), the plugin's own mount points left
out, a container's first process chosen, and "cannot tell" rather than "nobody". The same code against
the real /proc, real namespaces and tmpfs: tests/test_mounts.py and tests/test_liveness.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from plugin.host import holders as holders_module
from plugin.host.holders import INIT_PID_NAMESPACE, holders

DEVICE = os.makedev(0, 77)
TAIL = "/web/m1"


def process(proc: Path, pid: int, *, ppid: int, started: int, namespace: str | None, mountinfo: str) -> None:
    """/proc/<pid> with its stat, mountinfo and ns/mnt link (None: a link that may not be read)."""
    (proc / str(pid) / "ns").mkdir(parents=True)
    (proc / str(pid) / "stat").write_text(f"{pid} (sh) S {ppid} " + " ".join(["0"] * 17) + f" {started} 0 0\n")
    (proc / str(pid) / "mountinfo").write_text(mountinfo)
    (proc / str(pid) / "ns" / "mnt").symlink_to(namespace or "unreadable")


HOST = (
    "21 1 8:1 / / rw - ext4 /dev/vda rw\n"
    f"80 21 0:77 / /run/vault-secrets{TAIL}/data ro - tmpfs tmpfs ro\n"
    f"81 21 0:77 / /run/vault-secrets{TAIL}/view ro - tmpfs tmpfs ro\n"
)
CONTAINER = "300 299 0:55 / / rw - overlay overlay rw\n301 300 0:77 / /run/secrets ro - tmpfs tmpfs ro\n"
OTHER_CONTAINER = "400 399 0:56 / / rw - overlay overlay rw\n"


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    (tmp_path / "self" / "ns").mkdir(parents=True)
    (tmp_path / "self" / "ns" / "pid").symlink_to(INIT_PID_NAMESPACE)
    process(tmp_path, 1, ppid=0, started=1, namespace="mnt:[1]", mountinfo=HOST)
    process(tmp_path, 500, ppid=1, started=5, namespace="mnt:[1]", mountinfo=HOST)  # the plugin itself
    return tmp_path


def test_the_first_process_of_each_namespace_that_binds_the_tmpfs_holds_it(proc):
    process(proc, 600, ppid=1, started=10, namespace="mnt:[2]", mountinfo=CONTAINER)  # the container's init
    process(proc, 601, ppid=600, started=11, namespace="mnt:[2]", mountinfo=CONTAINER)  # its child
    process(proc, 602, ppid=1, started=20, namespace="mnt:[2]", mountinfo=CONTAINER)  # a `docker exec`
    process(proc, 700, ppid=1, started=12, namespace="mnt:[3]", mountinfo=OTHER_CONTAINER)
    assert holders({DEVICE: TAIL}, proc) == {DEVICE: [600]}


def test_namespaces_whose_link_may_not_be_read_are_told_apart_by_their_root_mount(proc, monkeypatch):
    """The managed plugin has no CAP_SYS_PTRACE: another user's ns/mnt link is refused to it."""
    process(proc, 600, ppid=1, started=10, namespace=None, mountinfo=CONTAINER)
    process(proc, 601, ppid=600, started=11, namespace=None, mountinfo=CONTAINER)
    process(proc, 700, ppid=1, started=12, namespace=None, mountinfo=OTHER_CONTAINER)
    readlink = os.readlink

    def refused(path, *args, **kwargs):
        if str(path).endswith("/ns/mnt") and Path(path).parent.parent.name in ("600", "601", "700"):
            raise PermissionError(13, "Permission denied", str(path))
        return readlink(path, *args, **kwargs)

    monkeypatch.setattr(holders_module.os, "readlink", refused)
    assert holders({DEVICE: TAIL}, proc) == {DEVICE: [600]}, "one signal for the container, not one a process"


def test_nobody_holds_a_tmpfs_mounted_only_at_the_plugins_own_places(proc):
    process(proc, 700, ppid=1, started=12, namespace="mnt:[3]", mountinfo=OTHER_CONTAINER)
    # A namespace that sees the mount root by propagation (the host's, for the managed plugin) is no holder.
    process(proc, 800, ppid=1, started=13, namespace="mnt:[4]", mountinfo=HOST.replace("/run/", "/var/lib/x/"))
    assert holders({DEVICE: TAIL}, proc) == {DEVICE: []}


def test_cannot_tell_outside_the_hosts_pid_namespace_or_when_a_mount_table_is_refused(proc, monkeypatch):
    process(proc, 600, ppid=1, started=10, namespace="mnt:[2]", mountinfo=CONTAINER)
    real_read = Path.read_text

    def refused(path: Path, *args, **kwargs):
        if path.name == "mountinfo" and path.parent.name == "600":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refused)
    assert holders({DEVICE: TAIL}, proc) is None
    monkeypatch.undo()
    (proc / "self" / "ns" / "pid").unlink()
    (proc / "self" / "ns" / "pid").symlink_to("pid:[4026532999]")  # a PID namespace of its own
    assert holders({DEVICE: TAIL}, proc) is None
