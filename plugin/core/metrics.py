"""Prometheus metrics, served on an opt-in listener (`--metrics-addr`, loopback unless told otherwise).

Labels are fixed, small sets (operation names, task kinds): never a path, a volume option or a token.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from plugin.core.errors import InvalidOptionError

MOUNTS_ACTIVE = Gauge("vault_secrets_mounts_active", "Container mounts currently served.")
MOUNT_SECONDS = Histogram(
    "vault_secrets_mount_duration_seconds",
    "Time to answer a Mount that made a new tmpfs (successful or not).",
    buckets=(0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
MOUNT_OVERHEAD = Histogram(
    "vault_secrets_mount_overhead_seconds",
    "The plugin's own time in a Mount that made a new tmpfs: its duration less the time it waited on Vault.",
    buckets=(0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1),
)
MOUNT_FAILURES = Counter("vault_secrets_mount_failures_total", "Mounts refused (every one leaves nothing behind).")
VAULT_SECONDS = Histogram(
    "vault_secrets_vault_request_duration_seconds",
    "Vault request latency.",
    ["operation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
VAULT_ERRORS = Counter("vault_secrets_vault_request_errors_total", "Vault requests that failed.", ["operation", "kind"])
VAULT_RETRIES = Counter(
    "vault_secrets_vault_request_retries_total",
    "Vault requests sent again after a transient error, within the caller's budget.",
    ["operation"],
)
BACKGROUND_ERRORS = Counter(
    "vault_secrets_background_errors_total",
    "Unexpected errors in a background loop or in settling one record; the loop goes on.",
    ["loop"],
)
RENEWALS = Counter("vault_secrets_renewals_total", "Successful renewals.", ["kind"])
RENEWAL_FAILURES = Counter(
    "vault_secrets_renewal_failures_total", "Failed renewal attempts (retried while alive).", ["kind"]
)
IDENTITY_SECONDS_LEFT = Gauge(
    "vault_secrets_identity_expiry_seconds", "Seconds until the plugin's own Vault token expires (0: no identity)."
)


def parse_address(address: str) -> tuple[str, int]:
    """`[host]:port` or a bare port (which binds 127.0.0.1). Raises `InvalidOptionError`."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidOptionError(f"--metrics-addr {address!r}: expected [host]:port, e.g. 127.0.0.1:9464")
    return host, int(port)


def serve_metrics(address: str) -> tuple[str, int]:
    """Start the metrics listener; returns where it listens."""
    host, port = parse_address(address)
    start_http_server(port, addr=host)
    return host, port


T = TypeVar("T")


@dataclasses.dataclass
class Waited:
    """Seconds a request spent waiting on Vault (answers, and backoff between retries)."""

    seconds: float = 0.0


_waited: contextvars.ContextVar[Waited | None] = contextvars.ContextVar("waited", default=None)


@contextlib.contextmanager
def waiting_on_vault() -> Iterator[Waited]:
    """Within the block, the Vault adapter adds the time its calls take to the `Waited` it yields."""
    waited = Waited()
    token = _waited.set(waited)
    try:
        yield waited
    finally:
        _waited.reset(token)


def waited_on_vault(seconds: float) -> None:
    """A Vault call (or a wait for several made at once) took `seconds` of the current request."""
    waited = _waited.get()
    if waited is not None:
        waited.seconds += seconds


def uncounted(fn: Callable[[], T]) -> Callable[[], T]:
    """`fn` not adding to the waiting time: for calls made at once, whose caller counts its own wait."""

    def run() -> T:
        token = _waited.set(None)
        try:
            return fn()
        finally:
            _waited.reset(token)

    return run
