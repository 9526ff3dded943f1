"""A hermetic, throwaway Docker daemon for integration tests.

All daemon state (data root, exec root, pidfile, socket, log) lives under one
work directory; the daemon has no bridge network and installs no iptables rules.
It is ended by its PID only and never touches any other dockerd on the host.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# The longest unix socket dockerd creates is containerd's
# <exec-root>/containerd/containerd-debug.sock; containerd rejects paths > 104 bytes.
_LONGEST_SOCK, _SOCK_MAX = "exec/containerd/containerd-debug.sock", 100


def _find(name: str, *fallbacks: str) -> str:
    for path in (shutil.which(name), *fallbacks):
        if path and os.access(path, os.X_OK):
            return path
    raise RuntimeError(f"{name} not found; run `apt-get install docker.io`")


def docker_cli() -> str:
    """Path of the docker CLI (PATH, then /usr/local/bin, /usr/bin); RuntimeError if absent."""
    return _find("docker", "/usr/local/bin/docker", "/usr/bin/docker")


def _alive(pid: int) -> bool:
    try:  # a zombie counts as dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill(pids: list[int], sig: int = signal.SIGKILL, grace: float = 0) -> None:
    """Send `sig` to `pids`; with grace > 0 wait up to that long, then SIGKILL survivors."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while grace and any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if grace:
        _kill([p for p in pids if _alive(p)])


def _procs_mentioning(path: Path) -> list[int]:
    """Live PIDs other than ours whose command line contains `path` (containerd, shims)."""
    needle, pids = os.fsencode(str(path)), []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int(d.name) != os.getpid() and needle in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            pass
    return [p for p in pids if _alive(p)]


def _container_cgroups(data_root: Path) -> list[Path]:
    """cgroup dirs (v1/v2, cgroupfs/systemd driver) of the containers under `data_root`."""
    ids = [d.name for d in (data_root / "containers").glob("*") if re.fullmatch(r"[0-9a-f]{64}", d.name)]
    pats = ("docker/{}", "*/docker/{}", "system.slice/docker-{}.scope", "*/system.slice/docker-{}.scope")
    return [c for i in ids for pat in pats for c in Path("/sys/fs/cgroup").glob(pat.format(i))]


def _mounts_under(*roots: Path) -> list[str]:
    """Mount points at or below any of `roots` per /proc/self/mountinfo, deepest first."""
    found = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if any(target == str(r) or target.startswith(f"{r}/") for r in roots):
            found.add(target)
    return sorted(found, key=lambda t: (t.count("/"), len(t)), reverse=True)


def _ping(sock: Path) -> bool:
    """True if the daemon on unix socket `sock` answers GET /_ping with 200."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(str(sock))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return s.recv(64).split(b" ", 2)[1:2] == [b"200"]
    except OSError:
        return False


class Dockerd:
    """A hermetic dockerd, made by `Dockerd.start()` and ended by `stop()`.

    Attributes: `workdir` (data root, pidfile, dockerd.log), `run_dir` (socket and
    exec root: workdir itself, or a short /tmp/vsd-* dir when workdir is too long
    for unix socket paths), `host` ("unix://<run_dir>/docker.sock"), `env` (copy of
    os.environ plus DOCKER_HOST=host), `pid` (the daemon's PID), `log_path`.
    """

    def __init__(self, workdir: Path, run_dir: Path, proc: subprocess.Popen) -> None:
        self.workdir, self.run_dir, self._proc, self._stopped = workdir, run_dir, proc, False
        self.pid: int = proc.pid
        self.log_path: Path = workdir / "dockerd.log"
        self.host: str = f"unix://{run_dir / 'docker.sock'}"
        self.env: dict[str, str] = {**os.environ, "DOCKER_HOST": self.host}

    @classmethod
    def start(cls, workdir: Path, timeout: float = 30) -> Dockerd:
        """Start dockerd with its state under `workdir`; return once it answers GET /_ping.

        If dockerd exits or does not answer within `timeout` seconds it is stopped and
        cleaned up, then RuntimeError is raised with the tail of its log. RuntimeError
        (mentioning `apt-get install docker.io`) if dockerd is not installed.
        """
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        run_dir = workdir
        if len(os.fsencode(str(workdir / _LONGEST_SOCK))) > _SOCK_MAX:
            run_dir = Path(tempfile.mkdtemp(prefix="vsd-", dir="/tmp"))
        cmd = [
            _find("dockerd", "/usr/sbin/dockerd"),
            "--data-root",
            f"{workdir}/data",
            "--exec-root",
            f"{run_dir}/exec",
            "--pidfile",
            f"{workdir}/pid",
            "--host",
            f"unix://{run_dir}/docker.sock",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
        ]
        with open(workdir / "dockerd.log", "ab") as log:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self = cls(workdir, run_dir, proc)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if _ping(run_dir / "docker.sock"):
                return self
            time.sleep(0.1)
        err = (
            f"dockerd exited with code {proc.returncode}"
            if proc.poll() is not None
            else f"dockerd did not answer on {self.host} within {timeout}s"
        )
        self.stop()
        raise RuntimeError(f"{err}\n--- tail of {self.log_path} ---\n{self.log_tail()}")

    def restart(self, timeout: float = 60) -> None:
        """Stop dockerd as a service manager does (SIGTERM: it stops its containers, their volumes get
        Unmount) and start it again on the same roots, in place: at start it restores `--restart always`
        containers as soon as their volume plugins answer."""
        self.stop_daemon()
        self.start_daemon(timeout)

    def stop_daemon(self) -> None:
        """SIGTERM dockerd as a service manager does (it stops its containers first) and wait for its end."""
        assert self.run_dir == self.workdir, "the exec root must not move across the restart"
        _kill([self.pid], signal.SIGTERM, grace=30)
        self._proc.wait()

    def start_daemon(self, timeout: float = 60) -> None:
        """Start dockerd again on the same roots after `stop_daemon`, in place, and wait until it answers."""
        restarted = Dockerd.start(self.workdir, timeout)
        self._proc, self.pid = restarted._proc, restarted.pid

    def wait_running(self, container: str, timeout: float = 60) -> None:
        """Wait until `container` runs (after a restart, say); AssertionError with dockerd's log after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip() != "true":
            assert time.monotonic() < deadline, f"{container} is not running after {timeout:g}s:\n{self.log_tail()}"
            time.sleep(0.5)

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of the daemon log ('' if unreadable)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def docker(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `docker *args` against this daemon; text stdout/stderr are captured.

        stdin is `input` if given, else /dev/null. check=True: a non-zero exit raises
        AssertionError showing command, exit code, stdout and stderr. Exceeding
        `timeout` seconds raises subprocess.TimeoutExpired.
        """
        cmd = [docker_cli(), *args]
        res = subprocess.run(
            cmd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"`{' '.join(cmd)}` exited {res.returncode}\n--- stdout ---\n{res.stdout}\n--- stderr ---\n{res.stderr}"
            )
        return res

    def stop(self) -> None:
        """Remove all containers, end the daemon by PID, clean up what it left.

        `docker rm -f` of all containers; SIGTERM, 20 s grace, SIGKILL. Then kills
        processes in our containers' cgroups and any containerd/shim naming our exec
        root (only left over if the daemon died hard), removes those cgroups, and
        unmounts everything under workdir/run_dir (deepest first, `umount -l` as
        fallback) so shutil.rmtree(workdir) works; removes a separate run_dir.
        Idempotent and never raises for cleanup trouble: safe in pytest finalizers.
        """
        if self._stopped:
            return
        self._stopped = True
        if self._proc.poll() is None:
            try:
                ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, check=False, timeout=60)
            except (subprocess.SubprocessError, OSError):
                pass
            _kill([self.pid], signal.SIGTERM, grace=20)
            self._proc.wait()
        cgroups = _container_cgroups(self.workdir / "data")
        for cg in cgroups:
            try:
                _kill([int(p) for p in (cg / "cgroup.procs").read_text().split()], grace=5)
            except OSError:
                pass
        _kill(_procs_mentioning(self.run_dir / "exec"), signal.SIGTERM, grace=5)
        for cg in cgroups:
            try:
                cg.rmdir()
            except OSError:
                pass
        for target in _mounts_under(self.workdir, self.run_dir):
            if subprocess.run(["umount", target], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", target], capture_output=True)
        if self.run_dir != self.workdir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
