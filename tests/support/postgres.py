"""A throwaway PostgreSQL cluster on loopback for integration tests (Debian package `postgresql`).

The cluster is created with the server binaries directly (initdb/pg_ctl under
/usr/lib/postgresql/*/bin), never with pg_ctlcluster, so it is independent of any system
cluster (Debian's `main` on port 5432): its own data directory, its own port on 127.0.0.1,
its own unix socket directory. PostgreSQL refuses to run as root, so under root the cluster
belongs to the unprivileged `postgres` system user (otherwise to the current user). The cluster
lives in a short dedicated /tmp/vs-pg-XXXX directory (mode 0755 under root: pytest's tmp dirs
are 0700, so the server user could not traverse them); the server log goes to `workdir`.
Passwords travel in a --pwfile and in PGPASSWORD only, never on a command line. `stop()` ends
the server by its PID and removes the cluster directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from devenv.openbao import free_loopback_port

SYSTEM_USER = "postgres"
_LOGIN_REFUSED = (
    "password authentication failed",
    "is not permitted to log in",
    "permission denied for database",
    "does not exist",
)


class PsqlError(RuntimeError):
    """psql exited non-zero; `stderr` holds its message."""

    def __init__(self, message: str, stderr: str):
        super().__init__(message)
        self.stderr = stderr


def pg_bindir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl; RuntimeError if none."""
    candidates = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        version = Path(d).parent.name
        if all(os.access(Path(d) / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "psql", "pg_isready")):
            candidates.append((tuple(int(p) for p in re.findall(r"\d+", version)), Path(d)))
    if not candidates:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    return max(candidates)[1]


def _alive(pid: int) -> bool:
    try:  # a zombie counts as dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C", PGCONNECT_TIMEOUT="5", PGSSLMODE="disable", PGPASSFILE=os.devnull)
    env.update(extra)
    return env


class PostgresServer:
    """A running throwaway cluster. Build it with `PostgresServer.start(workdir)`."""

    superuser = "postgres"

    def __init__(self, bindir: Path, clusterdir: Path, workdir: Path):
        self.bindir = bindir
        self.clusterdir = clusterdir  # holds data/ and sock/; removed by stop()
        self.datadir = clusterdir / "data"
        self.socketdir = clusterdir / "sock"
        self.log_path = workdir / "postgres.log"
        self.host = "127.0.0.1"
        self.port = free_loopback_port()
        self.password = secrets.token_hex(16)
        self.pid: int | None = None
        self._stopped = False
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SYSTEM_USER)  # KeyError: the postgresql package creates this user
            self._uid, self._gid, self._home = entry.pw_uid, entry.pw_gid, entry.pw_dir
        else:
            self._uid, self._gid, self._home = os.getuid(), os.getgid(), str(workdir)

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.superuser}:{self.password}@{self.host}:{self.port}/postgres?sslmode=disable"

    # -- lifecycle --

    @classmethod
    def start(cls, workdir: Path, timeout: float = 60) -> PostgresServer:
        bindir = pg_bindir()
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        # A short dedicated dir, not `workdir`: pytest's tmp dirs are 0700 (the server user cannot
        # traverse them) and long (the socket path must stay under 108 bytes).
        clusterdir = Path(tempfile.mkdtemp(prefix="vs-pg-", dir="/tmp"))
        clusterdir.chmod(0o755 if os.geteuid() == 0 else 0o700)
        server = cls(bindir, clusterdir, workdir)
        try:
            server._init_cluster()
            server._start_server(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def _as_owner(self) -> dict:
        """subprocess keyword arguments that run a server tool as the cluster's owner."""
        kwargs: dict = {"cwd": str(self.clusterdir), "env": _clean_env(HOME=self._home, USER=SYSTEM_USER)}
        if os.geteuid() == 0:
            kwargs.update(user=self._uid, group=self._gid, extra_groups=[])
        return kwargs

    def _owned_dir(self, path: Path) -> None:
        path.mkdir(mode=0o700)
        if os.geteuid() == 0:
            os.chown(path, self._uid, self._gid)

    def _init_cluster(self) -> None:
        self._owned_dir(self.datadir)
        self._owned_dir(self.socketdir)
        pwfile = self.clusterdir / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (self.password + "\n").encode())
            if os.geteuid() == 0:
                os.fchown(fd, self._uid, self._gid)
        finally:
            os.close(fd)
        try:
            result = subprocess.run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.datadir),
                    "-U",
                    self.superuser,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                **self._as_owner(),
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": _quote_literal(str(self.socketdir)),
            "password_encryption": "'scram-sha-256'",
            "fsync": "off",  # a throwaway cluster: speed over durability
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "50",
            "shared_buffers": "16MB",
            "logging_collector": "off",
        }
        with open(self.datadir / "postgresql.conf", "a") as conf:  # keeps the owner's file ownership
            conf.write("\n# vault-secrets test cluster\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        # Host connections on loopback only, always with a password (initdb already wrote
        # scram-sha-256 lines; make the file say exactly that and nothing more).
        (self.datadir / "pg_hba.conf").write_text(
            "local all all scram-sha-256\nhost  all all 127.0.0.1/32 scram-sha-256\n"
        )

    def _start_server(self, timeout: float) -> None:
        # Without -l the server's output goes to pg_ctl's stdout: a file we opened, so the log can
        # live in `workdir` even though the server user cannot traverse it.
        with open(self.log_path, "ab") as log:
            result = subprocess.run(
                [str(self.bindir / "pg_ctl"), "start", "-D", str(self.datadir), "-w", "-t", str(int(timeout))],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                timeout=timeout + 10,
                **self._as_owner(),
            )
        self.pid = self._read_pid()
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed ({result.returncode}):\n{self._log_tail()}")
        deadline = time.monotonic() + timeout
        while True:
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port), "-t", "2"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env=_clean_env(),
            )
            if ready.returncode == 0:
                try:
                    if self.psql("select 1").strip() == "1":
                        return
                except PsqlError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not become ready in {timeout}s:\n{self._log_tail()}")
            time.sleep(0.1)

    def _read_pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return self.pid

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """pg_ctl stop -m fast; SIGQUIT then SIGKILL by PID if that fails; remove the cluster dir. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        pid = self._read_pid()
        if self.datadir.exists() and pid is not None and _alive(pid):
            try:
                subprocess.run(
                    [str(self.bindir / "pg_ctl"), "stop", "-D", str(self.datadir), "-m", "fast", "-w", "-t", "20"],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=30,
                    **self._as_owner(),
                )
            except subprocess.TimeoutExpired:
                pass
        if pid is not None:
            for sig, grace in ((signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
                if not _alive(pid):
                    break
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + grace
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
        shutil.rmtree(self.clusterdir, ignore_errors=True)

    # -- queries --

    def psql(self, sql: str, user: str | None = None, password: str | None = None, db: str = "postgres") -> str:
        """Run `sql` (fed on stdin) over TCP as `user` (default: the superuser); return stdout, unaligned
        and tuples only. Raises PsqlError with psql's stderr on failure."""
        user = user or self.superuser
        if password is None:
            password = self.password if user == self.superuser else ""
        result = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-w",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                user,
                "-d",
                db,
            ],
            input=sql,
            capture_output=True,
            text=True,
            timeout=60,
            env=_clean_env(PGPASSWORD=password),
        )
        if result.returncode != 0:
            raise PsqlError(f"psql as {user!r} failed ({result.returncode}): {result.stderr.strip()}", result.stderr)
        return result.stdout

    def role_exists(self, name: str) -> bool:
        return self.psql(f"select count(*) from pg_roles where rolname = {_quote_literal(name)}").strip() == "1"

    def can_login(self, user: str, password: str) -> bool:
        """True if `user` can open a session with `password`; False if PostgreSQL refuses the login.
        Any other failure (server down, ...) raises PsqlError."""
        try:
            return self.psql("select 1", user=user, password=password).strip() == "1"
        except PsqlError as e:
            if any(reason in e.stderr for reason in _LOGIN_REFUSED):
                return False
            raise
