"""Keeping things alive on time: one thread, a heap of deadlines, keyed tasks, an injected clock.

A task runs at its deadline and says when it must run again (`Again`) or that it is done (None). The
renewal policy lives here: renew at about two thirds of a TTL, with jitter so that mounts made together
do not renew together. A task that fails (Vault unreachable, a refusal, files that cannot be written) is
retried with capped backoff for as long as what it keeps alive lives: the old secret serves meanwhile.
Only a task whose token Vault says is gone (`TokenInvalidError`) is dropped at once, with a warning.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Hashable
from typing import cast

from plugin.core.errors import PluginError, TokenInvalidError
from plugin.core.metrics import RENEWAL_FAILURES, RENEWALS
from plugin.core.ports import VaultPort
from plugin.core.retry import backoff

log = logging.getLogger(__name__)
audit = logging.getLogger("plugin.audit")

RENEW_AT = (0.6, 0.7)  # fraction of the TTL after which to renew
RETRY_FIRST, RETRY_CAP = 1.0, 30.0
IDLE_WAKEUP = 3600.0


def renewal_delay(ttl: float) -> float:
    """Seconds until a renewal is due for something that lives `ttl` seconds from now."""
    return max(ttl, 0) * random.uniform(*RENEW_AT)


@dataclasses.dataclass(frozen=True)
class Again:
    """Run the task again after `delay` seconds. `lifetime`: how long what it keeps alive lives from now
    (retries after a Vault outage stop then); None keeps the previous bound."""

    delay: float
    lifetime: float | None = None


Task = Callable[[], "Again | None"]


class Scheduler:
    """Runs keyed tasks at their deadlines. `schedule`/`cancel` are thread-safe; `run` is the one thread."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._heap: list[tuple[float, int, Hashable]] = []
        self._entries: dict[Hashable, _Entry] = {}
        self._seq = itertools.count()
        self._changed = threading.Condition()

    def schedule(self, key: Hashable, task: Task, delay: float, lifetime: float | None = None) -> None:
        """Run `task` after `delay` seconds, replacing any task under `key`."""
        now = self._clock()
        with self._changed:
            entry = _Entry(task, expires_at=None if lifetime is None else now + lifetime)
            self._entries[key] = entry
            self._push(key, entry, now + delay)
            self._changed.notify()

    def cancel(self, key: Hashable) -> None:
        with self._changed:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        with self._changed:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._changed:
            return key in self._entries

    def run(self, stop: threading.Event) -> None:
        """Run due tasks until `stop` is set (set it, then `wake()`)."""
        while not stop.is_set():
            wait = self.run_due()
            with self._changed:
                if not stop.is_set():
                    self._changed.wait(IDLE_WAKEUP if wait is None else max(wait, 0))

    def wake(self) -> None:
        with self._changed:
            self._changed.notify()

    def run_due(self) -> float | None:
        """Run every task whose deadline has passed. Returns seconds to the next deadline (None: no tasks)."""
        while True:
            with self._changed:
                due = self._pop_due()
                if due is None:
                    return (self._heap[0][0] - self._clock()) if self._heap else None
            self._run(*due)

    def _pop_due(self) -> tuple[Hashable, _Entry] | None:
        while self._heap and self._heap[0][0] <= self._clock():
            _, seq, key = heapq.heappop(self._heap)
            entry = self._entries.get(key)
            if entry is not None and entry.seq == seq:  # else: cancelled or rescheduled since
                return key, entry
        return None

    def _run(self, key: Hashable, entry: _Entry) -> None:
        try:
            again = entry.task()
        except TokenInvalidError as e:  # what it keeps alive is gone: nothing to retry
            if _renewal_kind(key):
                RENEWAL_FAILURES.labels(_renewal_kind(key)).inc()
            log.warning("dropping %s: %s", _describe(key), e)
            self._forget(key, entry)
            return
        except PluginError as e:
            self._retry(key, entry, e)
            return
        except Exception:  # a bug in one task must not stop every renewal
            log.exception("dropping %s after an unexpected error", _describe(key))
            self._forget(key, entry)
            return
        now = self._clock()
        if _renewal_kind(key):
            RENEWALS.labels(_renewal_kind(key)).inc()
        with self._changed:
            if self._entries.get(key) is not entry:
                return
            if again is None:
                del self._entries[key]
                return
            entry.failures = 0
            if again.lifetime is not None:
                entry.expires_at = now + again.lifetime
            self._push(key, entry, now + again.delay)

    def _retry(self, key: Hashable, entry: _Entry, error: PluginError) -> None:
        if _renewal_kind(key):
            RENEWAL_FAILURES.labels(_renewal_kind(key)).inc()
        now = self._clock()
        remaining = float("inf") if entry.expires_at is None else entry.expires_at - now
        if remaining <= 0:
            log.error("%s expired before Vault could be reached: %s", _describe(key), error)
            self._forget(key, entry)
            return
        with self._changed:
            if self._entries.get(key) is not entry:
                return
            delay = backoff(entry.failures, first=RETRY_FIRST, cap=RETRY_CAP, remaining=remaining)
            entry.failures += 1
            self._push(key, entry, now + delay)
        log.warning("%s failed, retrying in %.0fs: %s", _describe(key), delay, error)

    def _forget(self, key: Hashable, entry: _Entry) -> None:
        with self._changed:
            if self._entries.get(key) is entry:
                del self._entries[key]

    def _push(self, key: Hashable, entry: _Entry, deadline: float) -> None:
        entry.seq = next(self._seq)
        heapq.heappush(self._heap, (deadline, entry.seq, key))


class _Entry:
    __slots__ = ("task", "expires_at", "failures", "seq")

    def __init__(self, task: Task, expires_at: float | None):
        self.task, self.expires_at, self.failures, self.seq = task, expires_at, 0, -1


def _renewal_kind(key: Hashable) -> str | None:
    """ "token" or "lease" for the tasks that renew one; None for the others (refresh, confirmations)."""
    if isinstance(key, tuple) and key[:1] == ("volume",):
        return "token"
    if isinstance(key, tuple) and key[:1] == ("mount",) and len(key) > 3 and key[3] in ("token", "lease"):
        return cast(str, key[3])  # equal to "token" or "lease"
    return None


def _describe(key: Hashable) -> str:
    return " ".join(map(str, key)) if isinstance(key, tuple) else str(key)


def token_renewal(vault: VaultPort, token: str) -> Task:
    """A task renewing `token` at about two thirds of each new TTL."""

    def renew() -> Again:
        issued = vault.renew_self(token)
        audit.info(
            "token.renew %s",
            issued.accessor,
            extra={"event": "token.renew", "accessor": issued.accessor, "ttl": issued.ttl},
        )
        return Again(renewal_delay(issued.ttl), issued.ttl)

    return renew
