"""The tmpfs mounter on real tmpfs (root): a rewrite racing an Unmount never writes below the tmpfs, on
the disk beneath, and never leaves a part-written file."""

from __future__ import annotations

import os
import subprocess
import threading
import time

from plugin.core.errors import MountError
from plugin.host.mounts import TmpfsMounter
from tests.conftest import require_root


def test_a_rewrite_racing_an_unmount_never_writes_below_the_tmpfs(short_tmp):
    require_root()
    root = short_tmp / "mounts"
    mounter = TmpfsMounter(root)
    refused = 0
    for i in range(40):
        mount_id = f"m{i:02d}"
        mounter.mount("v", mount_id, {"a": b"one"}, uid=0, gid=0, mode=0o400, size=1 << 20)
        stop = threading.Event()

        def rewrite(mount_id: str = mount_id) -> None:
            nonlocal refused
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    mounter.rewrite("v", mount_id, {"a": b"x" * (n % 4096)}, uid=0, gid=0, mode=0o400)
                except MountError:
                    refused += 1  # the tmpfs is gone: nothing was written

        writer = threading.Thread(target=rewrite)
        writer.start()
        time.sleep(0.001 * (i % 7))
        try:
            mounter.unmount("v", mount_id)  # raises if anything was left below the tmpfs (ENOTEMPTY)
        finally:
            stop.set()
            writer.join()
        assert not (root / "v" / mount_id).exists(), f"{mount_id}: something was written below the tmpfs"
    assert not (root / "v").exists() or os.listdir(root / "v") == []
    assert refused > 0, "the race was met: rewrites came after the tmpfs was gone"


def test_holders_are_the_namespaces_that_bind_the_tmpfs_not_the_plugins_own_mount_points(short_tmp):
    """A process in a mount namespace of its own that binds the view (as a container does) holds the mount;
    the plugin's namespace, where only data/ and view/ are mounted, does not. Real tmpfs, real namespaces."""
    require_root()
    mounter = TmpfsMounter(short_tmp / "mounts")
    view = mounter.mount("v", "held", {"a": b"one"}, uid=0, gid=0, mode=0o400, size=1 << 20)
    mounter.mount("v", "idle", {"a": b"one"}, uid=0, gid=0, mode=0o400, size=1 << 20)
    target = short_tmp / "target"
    target.mkdir()
    # A "container": a new mount namespace (private propagation) binding the view at its own target.
    container = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount --bind {view} {target} && echo ready && exec sleep 30"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert container.stdout is not None and container.stdout.readline() == "ready\n"
        assert mounter.holders("v", "held") == [container.pid]
        assert mounter.holders("v", "idle") == []
    finally:
        container.kill()
        container.communicate()
    assert mounter.holders("v", "held") == []
    mounter.unmount("v", "held")
    mounter.unmount("v", "idle")
    assert mounter.holders("v", "held") == []  # not mounted any more


def test_a_read_write_bind_of_the_view_still_cannot_write_chmod_or_execute(short_tmp):
    """What Podman does with the returned path: a bind in the container's namespace, remounted read-write
    and without noexec. The container's user owns the tmpfs root, but the tmpfs itself is read-only."""
    require_root()
    mounter = TmpfsMounter(short_tmp / "mounts")
    view = mounter.mount("v", "rw", {"pw": b"secret"}, uid=1000, gid=1000, mode=0o400, size=1 << 20)
    short_tmp.chmod(0o711)  # the container's user must reach its target
    target = short_tmp / "target"
    target.mkdir()
    as_container = (
        f"mount --bind {view} {target} && mount -o remount,bind,rw,exec {target} && "
        f"exec setpriv --reuid 1000 --regid 1000 --clear-groups sh -c '"
        f"cat {target}/pw; echo; chmod u+w {target} 2>&1; echo x > {target}/new 2>&1; "
        f"chmod u+x {target}/pw 2>&1; cp /bin/true {target}/run 2>&1; echo done'"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", as_container],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    out = result.stdout
    assert out.startswith("secret\n") and out.rstrip().endswith("done"), (out, result.stderr)
    assert (out + result.stderr).count("Read-only file system") == 4, (out, result.stderr)  # the shell's own: stderr
    assert sorted(os.listdir(view)) == ["pw"]
    # The plugin itself still swaps files (the tmpfs is writable for it while it does).
    assert mounter.rewrite("v", "rw", {"pw": b"new"}, uid=1000, gid=1000, mode=0o400) == ["pw"]
    assert (view / "pw").read_bytes() == b"new"
    mounter.unmount("v", "rw")
