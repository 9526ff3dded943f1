"""A hermetic, throwaway rootful Podman (Debian `podman` 4.3) for end-to-end tests.

Everything Podman keeps lives under one short /tmp/vsp-* directory, removed by `stop()`: image and container
storage (`--root`), run state (`--runroot`), libpod's per-boot state (`--tmpdir`), runc's state (a wrapper
passes `--root`), the container locks (file locks there instead of the /dev/shm segment that every rootful
Podman on the host shares), the events log, the network configurations and temporary image files. Its
configuration is written here and given by CONTAINERS_CONF, CONTAINERS_STORAGE_CONF and
CONTAINERS_REGISTRIES_CONF, so nothing under /etc/containers is read; containers run with no network and
under a cgroup parent of their own. The single exception: `podman import` updates containers/image's
digest cache /var/lib/containers/cache/blob-info-cache-v1.boltdb, which Podman 4.3 cannot move.

No registry is needed: the test image is a static busybox imported from a rootfs tar.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

BUSYBOX = Path("/bin/busybox")
IMAGE = "localhost/vs-busybox:test"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def podman_binary() -> str:
    """Path of the podman CLI; RuntimeError (saying how to install it) if absent."""
    found = shutil.which("podman") or shutil.which("podman", path="/usr/bin:/usr/sbin:/usr/local/bin")
    if not found:
        raise RuntimeError("podman not found; run `apt-get install -y --no-install-recommends podman`")
    return found


def _runc_binary() -> str:
    found = shutil.which("runc") or shutil.which("runc", path="/usr/sbin:/usr/bin:/usr/local/sbin")
    if not found:
        raise RuntimeError("runc not found; run `apt-get install runc` (a dependency of Debian's podman)")
    return found


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


class Podman:
    """A hermetic rootful Podman, made by `Podman.start()` and ended by `stop()`.

    Attributes: `workdir` (all of its state), `image` (a busybox image with PATH=/bin), `env` (os.environ
    plus the configuration variables). Each `podman()` call is a new podman process that reads the
    containers.conf again, so `volume_plugin()` can name a new plugin socket for each test.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.image = IMAGE
        self.cgroup_parent = f"/{workdir.name}"
        self._plugins: dict[str, Path] = {}
        self._conf = workdir / "containers.conf"
        self.env: dict[str, str] = {
            **os.environ,
            "CONTAINERS_CONF": str(self._conf),
            "CONTAINERS_STORAGE_CONF": str(workdir / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(workdir / "registries.conf"),
            "TMPDIR": str(workdir / "tmp"),
        }
        self._global = [
            *("--root", str(workdir / "root"), "--runroot", str(workdir / "run"), "--tmpdir", str(workdir / "libpod")),
        ]

    @classmethod
    def start(cls) -> Podman:
        """Write the configuration, check that podman runs a container with it, and import the test image.

        RuntimeError if podman, runc or /bin/busybox is missing; AssertionError (with podman's output) if
        podman fails. On any failure what was made is removed again.
        """
        podman_binary()
        if not os.access(BUSYBOX, os.X_OK):
            raise RuntimeError(f"{BUSYBOX} not found; run `apt-get install busybox-static`")
        # Short: conmon's attach sockets live below the tmp dir, and Unix socket paths end at 108 bytes.
        self = cls(Path(tempfile.mkdtemp(prefix="vsp-", dir="/tmp")))
        try:
            for name in ("root", "run", "libpod", "tmp", "networks", "bin", "runc"):
                (self.workdir / name).mkdir()
            runc = self.workdir / "bin" / "runc"
            # Podman's cleanup process (run by conmon when a container ends) gets no --runtime-flag: the runtime
            # itself must carry runc's state directory, or `runc delete` looks in the host's /run/runc.
            runc.write_text(f'#!/bin/sh\nexec {_runc_binary()} --root "{self.workdir / "runc"}" "$@"\n')
            runc.chmod(0o755)
            (self.workdir / "storage.conf").write_text(
                "[storage]\n"
                'driver = "overlay"\n'
                f"graphroot = {_toml(str(self.workdir / 'root'))}\n"
                f"runroot = {_toml(str(self.workdir / 'run'))}\n"
            )
            (self.workdir / "registries.conf").write_text("unqualified-search-registries = []\n")
            self._write_conf()
            self._import_busybox()
            self.run("--rm", self.image, "true")
        except BaseException:
            self.stop()
            raise
        return self

    def _write_conf(self) -> None:
        plugins = "".join(f"{name} = {_toml(str(path))}\n" for name, path in self._plugins.items())
        text = (
            "[containers]\n"
            'netns = "none"\n'
            # Podman's default limits exceed the hard limits of these machines: runc would refuse to start.
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
            "[engine]\n"
            # Not crun, which refuses the hybrid cgroup layout of these machines; cgroupfs, as systemd may not run.
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f"events_logfile_path = {_toml(str(self.workdir / 'events.log'))}\n"
            'lock_type = "file"\n'
            f"tmp_dir = {_toml(str(self.workdir / 'libpod'))}\n"
            f"image_copy_tmp_dir = {_toml(str(self.workdir / 'tmp'))}\n"
            f"volume_path = {_toml(str(self.workdir / 'root' / 'volumes'))}\n"
            "[engine.runtimes]\n"
            f"runc = [{_toml(str(self.workdir / 'bin' / 'runc'))}]\n"
            "[engine.volume_plugins]\n"
            f"{plugins}"
            "[network]\n"
            f"network_config_dir = {_toml(str(self.workdir / 'networks'))}\n"
        )
        staged = self._conf.with_suffix(".new")
        staged.write_text(text)
        staged.replace(self._conf)  # a podman starting meanwhile reads the old file or the new, never half

    def _import_busybox(self) -> None:
        """Import IMAGE: /bin/busybox, one symlink per applet (not `busybox` itself: it would link to itself)."""
        applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
        root = self.workdir / "tmp" / "rootfs"
        (root / "bin").mkdir(parents=True)
        for d in ("tmp", "etc", "proc", "sys", "dev", "root", "run"):
            (root / d).mkdir()
        (root / "tmp").chmod(0o1777)
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        for applet in applets:
            if applet != "busybox" and "/" not in applet:
                (root / "bin" / applet).symlink_to("busybox")
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
        (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        tar = subprocess.Popen(
            ["tar", "-C", str(root), "--numeric-owner", "--owner=0", "--group=0", "-c", "."], stdout=subprocess.PIPE
        )
        assert tar.stdout is not None  # stdout=PIPE
        with tar.stdout:
            imported = self.podman(
                "import", "--change", "ENV PATH=/bin", "-", self.image, stdin=tar.stdout, check=False
            )
        if tar.wait() != 0 or imported.returncode != 0:
            raise AssertionError(f"podman import failed (tar rc={tar.returncode}):\n{imported.stderr}")
        shutil.rmtree(root)

    def podman(
        self, *args: str, check: bool = True, timeout: float = 120, stdin: int | IO[bytes] | None = subprocess.DEVNULL
    ) -> subprocess.CompletedProcess[str]:
        """Run `podman <hermetic global flags> *args`; text stdout/stderr are captured.

        check=True: a non-zero exit raises AssertionError showing the command, exit code and output.
        Exceeding `timeout` seconds raises subprocess.TimeoutExpired.
        """
        cmd = [podman_binary(), *self._global, *args]
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, stdin=stdin)
        if check and res.returncode != 0:
            raise AssertionError(
                f"`podman {' '.join(args)}` exited {res.returncode}\n--- stdout ---\n{res.stdout}\n"
                f"--- stderr ---\n{res.stderr}"
            )
        return res

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`podman run *args` with no network and under the session's cgroup parent (which `stop()` removes).
        Same errors as `podman()`."""
        return self.podman(
            "run", "--network", "none", "--cgroup-parent", self.cgroup_parent, *args, check=check, timeout=timeout
        )

    @contextlib.contextmanager
    def volume_plugin(self, name: str, socket: Path) -> Iterator[str]:
        """Name the volume plugin `name` at `socket` in the containers.conf while the block runs; yields `name`.

        On exit its containers and volumes are removed (while the plugin still answers), then the entry."""
        self._plugins[name] = socket
        self._write_conf()
        try:
            yield name
        finally:
            self.podman("rm", "--all", "--force", "--time", "0", check=False)
            volumes = self.podman("volume", "ls", "--quiet", "--filter", f"driver={name}", check=False).stdout.split()
            if volumes:
                self.podman("volume", "rm", "--force", *volumes, check=False)
            del self._plugins[name]
            self._write_conf()

    def stop(self) -> None:
        """Remove every container, end what is left of ours by PID, undo our mounts and cgroups, remove workdir.

        Idempotent and never raises for cleanup trouble: safe in pytest finalizers."""
        if not self.workdir.exists():
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError, AssertionError):
            self.podman("rm", "--all", "--force", "--time", "0", check=False, timeout=60)
        _kill(_processes_mentioning(self.workdir))
        for target in _mounts_under(self.workdir):
            if subprocess.run(["umount", target], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", target], capture_output=True)
        _remove_cgroups(self.cgroup_parent)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _processes_mentioning(path: Path) -> list[int]:
    """PIDs other than ours whose command line names `path`: conmon and containers a hard failure left."""
    needle, found = os.fsencode(str(path)), []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and int(entry.name) != os.getpid() and needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def _kill(pids: list[int], grace: float = 5) -> None:
    """SIGTERM `pids`, then SIGKILL whatever still runs after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
            time.sleep(0.1)


def _mounts_under(root: Path) -> list[str]:
    """Mount points below `root` per /proc/self/mountinfo, deepest first."""
    found = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].encode().decode("unicode_escape")
        if target.startswith(f"{root}/"):
            found.add(target)
    return sorted(found, key=lambda t: (t.count("/"), len(t)), reverse=True)


def _remove_cgroups(parent: str) -> None:
    """Remove the (empty) cgroup directories of `parent` in every hierarchy, deepest first."""
    for hierarchy in [CGROUP_ROOT, *(p for p in CGROUP_ROOT.iterdir() if p.is_dir())]:
        top = hierarchy / parent.lstrip("/")
        if not top.is_dir():
            continue
        for directory in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()
