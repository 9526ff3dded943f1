"""Renewal of what the plugin holds for running containers: one thread, a heap of deadlines.

Each tracked item (today a mount's child token) is renewed at about two thirds of its TTL, with
jitter so that mounts made together do not renew together. A failed renewal is retried with backoff
while the item is still alive; an item Vault no longer knows is dropped. The clock is injected, so
the policy is tested without waiting.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Hashable

from plugin.errors import PluginError, VaultUnavailableError
from plugin.vault import IssuedToken

log = logging.getLogger(__name__)
audit = logging.getLogger("plugin.audit")

RENEW_AT = (0.6, 0.7)  # fraction of the TTL after which to renew
RETRY_MIN, RETRY_MAX = 1.0, 30.0
IDLE_WAKEUP = 3600.0


def renewal_delay(ttl: float, jitter: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds until a renewal is due for something that lives `ttl` seconds from now."""
    return max(ttl, 0) * jitter(*RENEW_AT)


def retry_delay(remaining: float, attempt: int) -> float:
    """Backoff after a failed renewal: doubling from 1 s, at most 30 s, and a few tries before expiry."""
    return max(min(RETRY_MIN * 2**attempt, RETRY_MAX, remaining / 3), RETRY_MIN)


class Renewer:
    """Keeps tracked tokens alive. `track`/`forget` are thread-safe; `run` is the one renewing thread."""

    def __init__(self, renew: Callable[[str], IssuedToken], *, clock: Callable[[], float] = time.monotonic,
                 jitter: Callable[[float, float], float] = random.uniform):
        self._renew, self._clock, self._jitter = renew, clock, jitter
        self._heap: list[tuple[float, int, Hashable]] = []
        self._items: dict[Hashable, _Item] = {}
        self._seq = itertools.count()
        self._changed = threading.Condition()

    def track(self, key: Hashable, token: str, ttl: float) -> None:
        """Renew `token` from now on; `ttl` is its remaining lifetime (0 renews at once)."""
        now = self._clock()
        with self._changed:
            self._items[key] = _Item(token, expires_at=now + ttl)
            self._schedule(key, now + renewal_delay(ttl, self._jitter))
            self._changed.notify()

    def forget(self, key: Hashable) -> None:
        with self._changed:
            self._items.pop(key, None)

    def __len__(self) -> int:
        with self._changed:
            return len(self._items)

    def run(self, stop: threading.Event) -> None:
        """Renew due items until `stop` is set (set it, then `wake()`)."""
        while not stop.is_set():
            wait = self.renew_due()
            with self._changed:
                if not stop.is_set():
                    self._changed.wait(IDLE_WAKEUP if wait is None else wait)

    def wake(self) -> None:
        """Make `run` look at its stop event and deadlines now."""
        with self._changed:
            self._changed.notify()

    def renew_due(self) -> float | None:
        """Renew every item whose deadline has passed. Returns seconds to the next deadline (None: nothing tracked)."""
        while True:
            with self._changed:
                key = self._pop_due()
                if key is None:
                    return (self._heap[0][0] - self._clock()) if self._heap else None
                item = self._items[key]
            self._renew_one(key, item)

    def _pop_due(self) -> Hashable | None:
        while self._heap and self._heap[0][0] <= self._clock():
            _, seq, key = heapq.heappop(self._heap)
            item = self._items.get(key)
            if item is not None and item.seq == seq:  # else: forgotten or rescheduled since
                return key
        return None

    def _renew_one(self, key: Hashable, item: _Item) -> None:
        try:
            issued = self._renew(item.token)
        except VaultUnavailableError as e:
            self._retry(key, item, e)
            return
        except PluginError as e:
            log.warning("dropping renewal of %s: Vault no longer accepts its token (%s)", key, e)
            self.forget(key)
            return
        now = self._clock()
        with self._changed:
            if self._items.get(key) is item:
                item.expires_at, item.failures = now + issued.ttl, 0
                self._schedule(key, now + renewal_delay(issued.ttl, self._jitter))
        audit.info("token.renew %s", issued.accessor, extra={"event": "token.renew", "accessor": issued.accessor, "ttl": issued.ttl})

    def _retry(self, key: Hashable, item: _Item, error: PluginError) -> None:
        now = self._clock()
        remaining = item.expires_at - now
        if remaining <= 0:
            log.error("token of %s expired before Vault could be reached to renew it: %s", key, error)
            self.forget(key)
            return
        with self._changed:
            if self._items.get(key) is not item:
                return
            delay = retry_delay(remaining, item.failures)
            item.failures += 1
            self._schedule(key, now + delay)
        log.warning("renewal of %s failed (retrying in %.0fs, %.0fs left): %s", key, delay, remaining, error)

    def _schedule(self, key: Hashable, deadline: float) -> None:
        seq = next(self._seq)
        self._items[key].seq = seq
        heapq.heappush(self._heap, (deadline, seq, key))


class _Item:
    __slots__ = ("token", "expires_at", "failures", "seq")

    def __init__(self, token: str, expires_at: float):
        self.token, self.expires_at, self.failures, self.seq = token, expires_at, 0, -1
