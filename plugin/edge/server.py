"""Serving: gunicorn on the plugin's Unix sockets, and the checks made before it starts.

This module runs in gunicorn's master process and imports nothing heavy: the components are built in
the worker, after the fork, by the `build` the composition root passes (plugin/service.py). gunicorn's arbiter binds the sockets before the worker
starts, so dockerd can connect while the worker is still authenticating to Vault. One worker with
threads: the refcount locks and background threads live in that worker.
"""

from __future__ import annotations

import fcntl
import logging.config
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING

from gunicorn.app.base import BaseApplication

from plugin.core.errors import PluginError, StateError
from plugin.ops.logs import logging_config
from plugin.settings import Settings

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

log = logging.getLogger(__name__)

_AT_WORKER_EXIT: list[Callable[[], None]] = []


def at_worker_exit(stop: Callable[[], None]) -> None:
    """Have `stop()` run in the worker as it exits (after gunicorn stopped accepting and finished the
    requests in flight, on SIGTERM): registered by the composition root, which built what must stop."""
    _AT_WORKER_EXIT.append(stop)


def _worker_exit(server: object, worker: object) -> None:
    for stop in _AT_WORKER_EXIT:
        try:
            stop()
        except Exception:  # noqa: BLE001  (the worker is exiting anyway: say so, and go on)
            log.exception("stopping in order failed")


def prepare_state_dir(settings: Settings) -> None:
    """Create the state directory 0700, or refuse one that others can read."""
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(settings.state_dir.stat().st_mode)
    if mode & 0o077:
        raise StateError(f"state directory {settings.state_dir} is accessible to others (mode {mode:o}): chmod 0700 it")


def lock_state_dir(settings: Settings) -> int:
    """Take the state directory for this process (an exclusive `flock` on its `lock` file, which names the
    holder's PID), before any socket is bound: two plugins on one state would share one database and
    steal each other's socket. Returns the descriptor, which must stay open (the worker inherits it).

    Raises `StateError` naming the PID that holds it."""
    path = settings.state_dir / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateError(
            f"another vault-secrets plugin (PID {holder}) is serving state directory {settings.state_dir}: stop it "
            "first, or give this one its own --state-dir (and --socket)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    os.set_inheritable(fd, True)  # the worker holds it too: the state stays taken while either runs
    return fd


def check_seal_key(settings: Settings) -> None:
    """Refuse a database without its seal key, and a seal key without its database: either way the other
    half was lost, and starting afresh would silently forget every volume."""
    if settings.database_path.exists() and not settings.key_path.exists():
        raise StateError(
            f"{settings.database_path} exists but its seal key {settings.key_path} is missing, so the sealed tokens "
            "in it cannot be opened: restore seal.key from the same backup, or move the state directory aside to start "
            "afresh (volumes must then be created again)"
        )
    if settings.key_path.exists() and (
        not settings.database_path.exists() or settings.database_path.stat().st_size == 0
    ):
        raise StateError(
            f"the state database {settings.database_path} is missing or empty but its seal key {settings.key_path} "
            "exists: restore the database from backup, or move the state directory aside to start afresh (volumes "
            "must then be created again)"
        )


def check_state(settings: Settings) -> None:
    """Open the state database once before serving: a damaged or newer one stops the start with its message
    (not a worker that fails to boot after the socket is bound), and migrations run before any call.

    Done in a short-lived child process, so the master never imports SQLite and cryptography: every
    page it holds would otherwise be copied into the worker by CPython's reference counting.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report a refusal through the pipe, exit without running any cleanup
        os.close(read_end)
        status = 0
        try:
            from plugin.host.seal import Sealer
            from plugin.host.store import Store

            Store(settings.database_path, Sealer.load_or_create(settings.key_path)).close()
        except PluginError as e:
            os.write(write_end, str(e).encode()[:65536])
            status = 1
        except BaseException as e:  # noqa: BLE001  (any other failure still must not run the parent's code)
            os.write(write_end, f"cannot open the state database {settings.database_path}: {e}".encode()[:65536])
            status = 1
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise StateError(message or f"the state database {settings.database_path} could not be opened")


class PluginServer(BaseApplication):
    """gunicorn running the plugin on a Unix socket with one threaded worker."""

    def __init__(
        self,
        settings: Settings,
        build: Callable[[Settings], WSGIApplication],
        *,
        threads: int = 16,
        log_level: str = "info",
        log_format: str = "json",
    ):
        self._settings, self._build = settings, build
        self._threads = threads
        self._logging = logging_config(log_level, log_format)
        super().__init__()

    def load_config(self) -> None:
        self._settings.socket.parent.mkdir(parents=True, exist_ok=True)
        for key, value in {
            "bind": [f"unix:{self._settings.socket}", f"unix:{self._settings.control_socket_path}"],
            "worker_exit": _worker_exit,
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

    # ignore: types-gunicorn types the app with a MutableMapping environ and a start_response without PEP 3333's
    # exc_info and write(), so no PEP 3333 (typeshed) WSGI application matches it; gunicorn calls it per PEP 3333.
    def load(self) -> WSGIApplication:  # type: ignore[override]
        return self._build(self._settings)  # in the worker, after the fork


def serve(
    settings: Settings,
    build: Callable[[Settings], WSGIApplication],
    *,
    log_level: str = "info",
    log_format: str = "json",
) -> None:
    """Check the state directory, then serve the WSGI application `build(settings)` makes in the worker
    (the composition root: it must import the heavy parts itself, so that the master stays lean)."""
    logging.config.dictConfig(logging_config(log_level, log_format))
    os.umask(0o077)  # the database, its journal and anything else the plugin creates: root only
    prepare_state_dir(settings)
    lock_state_dir(settings)  # held (never closed) until the process ends
    check_seal_key(settings)
    check_state(settings)
    PluginServer(settings, build, log_level=log_level, log_format=log_format).run()
