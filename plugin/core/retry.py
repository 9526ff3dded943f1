"""When to try again: the one backoff policy, and the budget a caller can wait.

A budget is set by whoever answers to a deadline (the driver, for a Mount dockerd gives up on after a
while) and read by the Vault adapter, which retries transient errors only while the budget lasts and
shortens each request's timeout so the whole fits in it. Without a budget a request is tried once: the
caller (the renewal scheduler, the identity loop) retries on its own clock. The budget is a context
variable, so it follows a request into the threads that serve it (`run_in_context`).
"""

from __future__ import annotations

import contextlib
import contextvars
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

BACKOFF_MIN = 0.25  # seconds before the first retry inside a budget (an election is over in a few seconds)
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


def backoff(attempt: int, *, first: float = 1.0, cap: float = 30.0, remaining: float = float("inf")) -> float:
    """Seconds to wait after failed attempt number `attempt` (0-based): doubling from `first` up to `cap`,
    with +-20 % jitter so that callers failing together do not retry together, and never more than a third
    of what is `remaining` (so a few tries still fit before something expires)."""
    delay: float = min(first * 2**attempt, cap, max(remaining, 0) / 3)  # 2**int is Any to mypy (int or float)
    return max(delay, min(first, max(remaining, 0))) * (0.8 + 0.4 * random.random())


@contextlib.contextmanager
def budget(seconds: float) -> Iterator[None]:
    """Within the block, callers below may spend at most `seconds` (or less, if an outer budget ends sooner)."""
    deadline = time.monotonic() + seconds
    outer = _deadline.get()
    token = _deadline.set(deadline if outer is None else min(outer, deadline))
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining() -> float | None:
    """Seconds left in the current budget (never negative), or None when no budget is set."""
    deadline = _deadline.get()
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def run_in_context(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` bound to the caller's context (its budget), for running in a pool thread."""
    context = contextvars.copy_context()
    return lambda *args, **kwargs: context.run(fn, *args, **kwargs)
