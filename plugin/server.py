"""Wiring and serving: builds the components from `Settings` and runs them under gunicorn.

gunicorn's arbiter binds the Unix socket before the worker starts, so dockerd can connect while the
worker is still authenticating to Vault. One worker with threads: the refcount locks and background
threads live in that worker, started after the fork (sockets, SQLite and threads do not survive one).
"""

from __future__ import annotations

import dataclasses
import logging
import logging.config
import os
import stat
import threading
from collections.abc import Callable

from gunicorn.app.base import BaseApplication

from plugin.app import create_app, create_control_app
from plugin.docker_api import DockerAPI
from plugin.driver import Driver
from plugin.errors import PluginError, StateError
from plugin.identity import Identity
from plugin.leases import Scheduler
from plugin.logs import logging_config
from plugin.metrics import IDENTITY_SECONDS_LEFT, MOUNTS_ACTIVE, serve_metrics
from plugin.mounts import TmpfsMounter
from plugin.operations import Operations
from plugin.seal import Sealer
from plugin.settings import Settings
from plugin.store import Store
from plugin.vault import Vault

log = logging.getLogger(__name__)

# gunicorn's arbiter halts with this status when a worker exits with it ("worker failed to boot").
WORKER_BOOT_ERROR = 3
MAINTENANCE_SECONDS = 30.0


@dataclasses.dataclass
class Service:
    driver: Driver
    identity: Identity
    scheduler: Scheduler
    store: Store
    vault: Vault
    stop: threading.Event
    docker: DockerAPI | None = None


def prepare_state_dir(settings: Settings) -> None:
    """Create the state directory 0700, or refuse one that others can read."""
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(settings.state_dir.stat().st_mode)
    if mode & 0o077:
        raise StateError(f"state directory {settings.state_dir} is accessible to others (mode {mode:o}): chmod 0700 it")


def check_seal_key(settings: Settings) -> None:
    """Refuse a state database whose seal key is missing, rather than making a new key that opens nothing."""
    if settings.database_path.exists() and not settings.key_path.exists():
        raise StateError(
            f"{settings.database_path} exists but its seal key {settings.key_path} is missing, so the sealed tokens "
            "in it cannot be opened: restore seal.key from the same backup, or move the state directory aside to start "
            "afresh (volumes must then be created again)"
        )


def build_service(settings: Settings) -> Service:
    """Construct every component; nothing here talks to Vault."""
    prepare_state_dir(settings)
    store = Store(settings.database_path, Sealer.load_or_create(settings.key_path))
    vault = Vault(settings.vault_addr, cacert=settings.vault_cacert, namespace=settings.vault_namespace, timeout=settings.vault_timeout)
    identity = Identity(
        vault,
        store,
        approle_mount=settings.approle_mount,
        role_id=settings.role_id,
        wrapped_secret_id_file=settings.wrapped_secret_id_file,
    )
    scheduler = Scheduler()
    docker = DockerAPI(settings.docker_socket) if settings.docker_socket else None
    driver = Driver(store, vault, identity, TmpfsMounter(settings.mount_root), scheduler, hostname=settings.hostname,
                    wrap_allowed_paths=settings.wrap_allowed_paths, notify=docker.signal if docker else None)
    MOUNTS_ACTIVE.set_function(store.count_active_mounts)
    IDENTITY_SECONDS_LEFT.set_function(identity.seconds_left)
    return Service(driver, identity, scheduler, store, vault, threading.Event(), docker)


def start_background(service: Service) -> None:
    """Start the identity, renewal and maintenance (reconcile, then retry owed revocations) threads."""
    threading.Thread(target=service.identity.run, args=(service.stop, _halt), name="identity", daemon=True).start()
    threading.Thread(target=service.scheduler.run, args=(service.stop,), name="scheduler", daemon=True).start()
    threading.Thread(target=_maintain, args=(service,), name="maintenance", daemon=True).start()


def _maintain(service: Service) -> None:
    """Reconcile once at start, then periodically: retry owed revocations and, with a docker socket,
    release mounts whose containers are gone."""
    try:
        service.driver.reconcile()
    except PluginError as e:
        log.error("reconciliation of stale mounts failed: %s", e)
    while True:
        if service.docker is not None:
            try:
                service.driver.release_unused(service.docker.running_containers_using)
            except PluginError as e:
                log.warning("checking for mounts of stopped containers failed: %s", e)
        if service.stop.wait(MAINTENANCE_SECONDS):
            return
        try:
            service.driver.retry_pending_revocations()
        except PluginError as e:
            log.warning("retrying owed revocations failed: %s", e)


def _halt(error: PluginError) -> None:
    """Stop the whole plugin (not just this worker): used for security events that must not be retried."""
    log.critical("stopping the plugin: %s", error)
    logging.shutdown()
    os._exit(WORKER_BOOT_ERROR)


class SocketDispatcher:
    """WSGI app choosing the application by the Unix socket a connection came in on: control calls are
    served on the control socket only, never on the socket dockerd (and so the Docker API) reaches."""

    def __init__(self, default: Callable, by_socket: dict[str, Callable]):
        self._default, self._by_socket = default, by_socket

    def __call__(self, environ: dict, start_response: Callable):
        connection = environ.get("gunicorn.socket")
        name = connection.getsockname() if connection is not None else None
        return self._by_socket.get(name, self._default)(environ, start_response)


class PluginServer(BaseApplication):
    """gunicorn running the plugin on a Unix socket with one threaded worker."""

    def __init__(self, settings: Settings, *, threads: int = 16, log_level: str = "info", log_format: str = "json"):
        self._settings = settings
        self._threads = threads
        self._logging = logging_config(log_level, log_format)
        super().__init__()

    def load_config(self) -> None:
        self._settings.socket.parent.mkdir(parents=True, exist_ok=True)
        for key, value in {
            "bind": [f"unix:{self._settings.socket}", f"unix:{self._settings.control_socket_path}"],
            "workers": 1,
            "worker_class": "gthread",
            "threads": self._threads,
            "umask": 0o177,  # socket mode 0600: root (dockerd) only
            "timeout": 150,  # above dockerd's 2 min Mount deadline: never kill a worker mid-Mount
            "graceful_timeout": 10,
            "logconfig_dict": self._logging,
            "proc_name": "vault-secrets-plugin",
            # gunicorn >= 25 opens a root control socket in $HOME by default; the plugin needs none.
            "control_socket_disable": True,
        }.items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> SocketDispatcher:
        # Runs in the worker, after the fork.
        service = build_service(self._settings)
        if self._settings.metrics_addr:
            host, port = serve_metrics(self._settings.metrics_addr)
            log.info("serving metrics on http://%s:%s/metrics", host, port)
        start_background(service)
        operations = Operations(service.vault, service.store, service.identity, vault_addr=self._settings.vault_addr)
        control = create_control_app(service.identity, service.driver, operations)
        return SocketDispatcher(create_app(service.driver), {str(self._settings.control_socket_path): control})


def serve(settings: Settings, *, log_level: str = "info", log_format: str = "json") -> None:
    logging.config.dictConfig(logging_config(log_level, log_format))
    os.umask(0o077)  # the database, its journal and anything else the plugin creates: root only
    prepare_state_dir(settings)
    check_seal_key(settings)
    PluginServer(settings, log_level=log_level, log_format=log_format).run()
