"""The running plugin, assembled: every component built from `Settings`, its background threads, and the
WSGI application gunicorn serves. Imported only in the gunicorn worker, after the fork, so the master
process stays small (it needs gunicorn alone).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from plugin.core.driver import Driver
from plugin.core.errors import PluginError
from plugin.core.metrics import BACKGROUND_ERRORS, IDENTITY_SECONDS_LEFT, MOUNTS_ACTIVE, serve_metrics
from plugin.core.scheduler import Scheduler
from plugin.core.upkeep import Notify
from plugin.edge.app import create_app, create_control_app
from plugin.edge.docker_api import DockerAPI
from plugin.edge.server import at_worker_exit
from plugin.host.holders import sees_every_process, signal_each
from plugin.host.mounts import TmpfsMounter
from plugin.host.seal import Sealer
from plugin.host.store import Store
from plugin.ops.operations import Operations
from plugin.settings import Settings
from plugin.vault.client import Vault
from plugin.vault.credentials import CredentialUnwrapper
from plugin.vault.identity import Identity

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

# gunicorn's arbiter halts with this status when a worker exits with it ("worker failed to boot").
WORKER_BOOT_ERROR = 3
MAINTENANCE_SECONDS = 10.0  # a turn: release mounts no container holds, retry owed revocations


@dataclasses.dataclass
class Service:
    driver: Driver
    identity: Identity
    scheduler: Scheduler
    store: Store
    vault: Vault
    stop: threading.Event
    docker: DockerAPI | None = None
    release_unheld_after: float = 30.0
    threads: list[threading.Thread] = dataclasses.field(default_factory=list)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop in order, in the worker as it exits (gunicorn stopped accepting and finished the requests in
        flight): end the background loops, then close the database (its WAL checkpointed)."""
        self.stop.set()
        self.scheduler.wake()
        for thread in self.threads:
            thread.join(timeout)
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:  # a Vault request in flight: the database stays open for it, the process ends anyway
            log.warning("stopping with %s still running", ", ".join(alive))
            return
        self.store.close()
        log.info("stopped in order: background loops ended, state database closed")


def build_service(settings: Settings) -> Service:
    """Construct every component; nothing here talks to Vault."""
    store = Store(settings.database_path, Sealer.load_or_create(settings.key_path))
    vault = Vault(
        settings.vault_addr,
        cacert=settings.vault_cacert,
        client_cert=settings.vault_client_cert,
        client_key=settings.vault_client_key,
        namespace=settings.vault_namespace,
        timeout=settings.vault_timeout,
    )
    identity = Identity(
        vault,
        store,
        approle_mount=settings.approle_mount,
        role_id=settings.role_id,
        wrapped_secret_id_file=settings.wrapped_secret_id_file,
    )
    scheduler = Scheduler()
    docker = DockerAPI(settings.docker_socket) if settings.docker_socket else None
    mounter = TmpfsMounter(settings.mount_root)
    driver = Driver(
        store,
        vault,
        identity,
        mounter,
        scheduler,
        hostname=settings.hostname,
        credentials=CredentialUnwrapper(vault),
        wrap_allowed_paths=settings.wrap_allowed_paths,
        notify=_notifier(mounter),
        mount_timeout=settings.mount_timeout,
    )
    MOUNTS_ACTIVE.set_function(store.count_active_mounts)
    IDENTITY_SECONDS_LEFT.set_function(identity.seconds_left)
    return Service(driver, identity, scheduler, store, vault, threading.Event(), docker, settings.release_unheld_after)


def _notifier(mounter: TmpfsMounter) -> Notify | None:
    """`notify=` signals the containers holding the mount whose files changed; only where every process is
    seen (not from a PID namespace of its own)."""
    if not sees_every_process():
        return None

    def notify(volume: str, mount_id: str, signal: str) -> None:
        signal_each(mounter.holders(volume, mount_id) or [], signal)

    return notify


def start_background(service: Service) -> None:
    """Start the identity, renewal and maintenance (reconcile, then retry owed revocations) threads."""
    service.threads = [
        threading.Thread(target=service.identity.run, args=(service.stop, _halt), name="identity", daemon=True),
        threading.Thread(target=service.scheduler.run, args=(service.stop,), name="scheduler", daemon=True),
        threading.Thread(target=_maintain, args=(service,), name="maintenance", daemon=True),
    ]
    for thread in service.threads:
        thread.start()


def _maintain(service: Service) -> None:
    """Reconcile once at start, then periodically: release mounts whose containers are gone (known from the
    kernel's mount tables where every process is seen, unless --release-unheld-after 0; else from dockerd,
    with --docker-socket), and retry owed revocations."""
    _survive("reconcile", service.driver.reconcile)
    while True:
        if sees_every_process() and service.release_unheld_after:
            after = service.release_unheld_after
            _survive("release", lambda: service.driver.release_unheld(after))
        elif service.docker is not None:
            docker = service.docker
            _survive("release", lambda: service.driver.release_unused(docker.running_containers_using))
        if service.stop.wait(MAINTENANCE_SECONDS):
            return
        _survive("revocations", service.driver.retry_pending_revocations)


def _survive(loop: str, work: Callable[[], object]) -> None:
    """One turn of a background loop: an error is logged and counted, and the loop goes on (an unexpected
    one with its traceback: it is a bug)."""
    try:
        work()
    except PluginError as e:
        log.warning("background %s failed: %s", loop, e)
    except Exception:  # noqa: BLE001  (the loop must outlive a bug in one turn)
        BACKGROUND_ERRORS.labels(loop).inc()
        log.exception("background %s failed unexpectedly", loop)


def _halt(error: PluginError) -> None:
    """Stop the whole plugin (not just this worker): used for security events that must not be retried."""
    log.critical("stopping the plugin: %s", error)
    logging.shutdown()
    os._exit(WORKER_BOOT_ERROR)


class SocketDispatcher:
    """WSGI app choosing the application by the Unix socket a connection came in on: control calls are
    served on the control socket only, never on the socket dockerd (and so the Docker API) reaches."""

    def __init__(self, default: WSGIApplication, by_socket: dict[str, WSGIApplication]):
        self._default, self._by_socket = default, by_socket

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        connection = environ.get("gunicorn.socket")
        name = connection.getsockname() if connection is not None else None
        app = self._default if name is None else self._by_socket.get(name, self._default)
        return app(environ, start_response)


def build_application(settings: Settings) -> SocketDispatcher:
    """Everything the worker serves: the plugin protocol on dockerd's socket, operator calls on the control socket."""
    service = build_service(settings)
    if settings.metrics_addr:
        host, port = serve_metrics(settings.metrics_addr)
        log.info("serving metrics on http://%s:%s/metrics", host, port)
    start_background(service)
    at_worker_exit(service.shutdown)
    operations = Operations(service.vault, service.store, service.identity, vault_addr=settings.vault_addr)
    control = create_control_app(service.identity, service.driver, operations)
    return SocketDispatcher(create_app(service.driver), {str(settings.control_socket_path): control})
