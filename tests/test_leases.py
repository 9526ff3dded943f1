"""The renewal policy (pure) and the renewer's heap, driven by a clock the test moves."""

from __future__ import annotations

import threading

import pytest

from plugin.core.errors import TokenInvalidError, VaultError, VaultTransientError
from plugin.core.retry import backoff
from plugin.core.scheduler import Again, Scheduler, renewal_delay
from tests.support.fakes import FakeClock


@pytest.mark.parametrize(
    "ttl, jitter, expected",
    [(3600, 0.6, 2160), (3600, 0.7, 2520), (10, 0.6, 6), (0, 0.6, 0), (-5, 0.6, 0)],
)
def test_renewal_is_due_at_two_thirds_of_the_ttl_with_jitter(ttl, jitter, expected, monkeypatch):
    for _ in range(50):
        assert 0.6 * max(ttl, 0) <= renewal_delay(ttl) <= 0.7 * max(ttl, 0)
    monkeypatch.setattr("plugin.core.scheduler.random.uniform", lambda low, high: jitter)
    assert renewal_delay(ttl) == pytest.approx(expected)


@pytest.mark.parametrize(
    "remaining, attempt, expected",
    [(3000, 0, 1), (3000, 1, 2), (3000, 3, 8), (3000, 10, 30), (30, 5, 10), (2, 0, 1)],
)
def test_retry_backoff_doubles_caps_and_leaves_tries_before_expiry(remaining, attempt, expected, monkeypatch):
    monkeypatch.setattr("plugin.core.retry.random.random", lambda: 0.5)
    assert backoff(attempt, first=1, cap=30, remaining=remaining) == expected


class Lived:
    """Something with a TTL that a task renews: `down` makes it unreachable, `gone` refused for good."""

    def __init__(self, ttl=100):
        self.ttl, self.down, self.gone, self.refused, self.calls = ttl, False, False, False, 0

    def renew(self):
        self.calls += 1
        if self.down:
            raise VaultTransientError("unreachable")
        if self.gone:
            raise TokenInvalidError("Vault says the token is not valid")
        if self.refused:
            raise VaultError("Vault denied permission to renew a lease")
        return Again(renewal_delay(self.ttl), self.ttl)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture(autouse=True)
def no_jitter(monkeypatch):
    monkeypatch.setattr("plugin.core.scheduler.random.uniform", lambda low, high: low)
    monkeypatch.setattr("plugin.core.retry.random.random", lambda: 0.5)


def test_tasks_run_in_deadline_order_and_are_rescheduled(clock):
    scheduler, order = Scheduler(clock=clock), []
    for name, delay in (("b", 30), ("a", 12)):
        scheduler.schedule(name, lambda name=name: order.append(name) or Again(60), delay)
    assert scheduler.run_due() == pytest.approx(12)
    clock.advance(30)
    assert scheduler.run_due() == pytest.approx(60) and order == ["a", "b"]
    clock.advance(60)
    scheduler.run_due()
    assert order == ["a", "b", "a", "b"]


def test_a_task_returning_none_is_done_and_cancelled_tasks_never_run(clock):
    scheduler, runs = Scheduler(clock=clock), []
    scheduler.schedule("once", lambda: runs.append("once"), 1)
    scheduler.schedule("cancelled", lambda: runs.append("cancelled"), 1)
    scheduler.cancel("cancelled")
    clock.advance(5)
    assert scheduler.run_due() is None and runs == ["once"] and len(scheduler) == 0


def test_outage_is_retried_with_backoff_then_recovers(clock):
    scheduler, lived = Scheduler(clock=clock), Lived(ttl=100)
    scheduler.schedule("t", lived.renew, 60, lifetime=100)
    clock.advance(60)
    lived.down = True
    assert scheduler.run_due() == pytest.approx(1)
    clock.advance(1)
    assert scheduler.run_due() == pytest.approx(2)
    lived.down = False
    clock.advance(2)
    assert scheduler.run_due() == pytest.approx(60) and lived.calls == 3


def test_task_whose_lifetime_ends_during_an_outage_is_dropped(clock):
    scheduler, lived = Scheduler(clock=clock), Lived()
    lived.down = True
    scheduler.schedule("t", lived.renew, 0, lifetime=10)
    clock.advance(11)
    assert scheduler.run_due() is None and len(scheduler) == 0


def test_a_refusal_is_retried_while_what_the_task_keeps_alive_lives(clock):
    """A 403, a template that no longer renders, a full tmpfs: the old secret serves on, so keep trying."""
    scheduler, lived = Scheduler(clock=clock), Lived(ttl=100)
    lived.refused = True
    scheduler.schedule("t", lived.renew, 0, lifetime=10)
    assert scheduler.run_due() == pytest.approx(1)
    lived.refused = False
    clock.advance(1)
    assert scheduler.run_due() == pytest.approx(60) and lived.calls == 2
    lived.refused = True
    clock.advance(200)  # past its lifetime: given up
    assert scheduler.run_due() is None and len(scheduler) == 0


def test_task_whose_token_vault_says_is_gone_is_dropped(clock):
    scheduler, lived = Scheduler(clock=clock), Lived()
    lived.gone = True
    scheduler.schedule("t", lived.renew, 0)
    assert scheduler.run_due() is None and len(scheduler) == 0


def test_an_unexpected_error_drops_only_that_task(clock):
    scheduler, ran = Scheduler(clock=clock), []
    scheduler.schedule("bug", lambda: 1 / 0, 0)
    scheduler.schedule("ok", lambda: ran.append(1), 0)
    scheduler.run_due()
    assert ran == [1] and len(scheduler) == 0


def test_run_wakes_for_new_tasks_and_stops():
    scheduler, ran = Scheduler(), []
    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(stop,))
    thread.start()
    scheduler.schedule("now", lambda: ran.append(1), 0)  # the sleeping thread must wake for it
    for _ in range(200):
        if ran:
            break
        threading.Event().wait(0.01)
    stop.set()
    scheduler.wake()
    thread.join(5)
    assert ran == [1] and not thread.is_alive()


def test_heap_stays_bounded_under_churn(clock):
    scheduler = Scheduler(clock=clock)
    for i in range(1000):
        scheduler.schedule(i, lambda: Again(100), 100)
        scheduler.cancel(i)
    clock.advance(100)
    assert scheduler.run_due() is None and scheduler._heap == []
