"""The renewal policy (pure) and the renewer's heap, driven by a clock the test moves."""

from __future__ import annotations

import threading

import pytest

from plugin.errors import VaultError, VaultUnavailableError
from plugin.leases import Renewer, renewal_delay, retry_delay
from plugin.vault import IssuedToken
from tests.support.fakes import FakeClock


@pytest.mark.parametrize(
    "ttl, jitter, expected",
    [(3600, 0.6, 2160), (3600, 0.7, 2520), (10, 0.6, 6), (0, 0.6, 0), (-5, 0.6, 0)],
)
def test_renewal_is_due_at_two_thirds_of_the_ttl_with_jitter(ttl, jitter, expected):
    assert renewal_delay(ttl, lambda low, high: jitter) == pytest.approx(expected)
    assert 0.6 * max(ttl, 0) <= renewal_delay(ttl) <= 0.7 * max(ttl, 0)


@pytest.mark.parametrize(
    "remaining, attempt, expected",
    [(3000, 0, 1), (3000, 1, 2), (3000, 3, 8), (3000, 10, 30), (30, 5, 10), (2, 0, 1)],
)
def test_retry_backoff_doubles_caps_and_leaves_tries_before_expiry(remaining, attempt, expected):
    assert retry_delay(remaining, attempt) == expected


class Vault:
    """Renews tokens for `ttl` seconds unless told to be down or to have forgotten a token."""

    def __init__(self, ttl=100):
        self.ttl, self.down, self.forgotten, self.calls = ttl, False, set(), []

    def renew(self, token):
        self.calls.append(token)
        if self.down:
            raise VaultUnavailableError("unreachable")
        if token in self.forgotten:
            raise VaultError("permission denied")
        return IssuedToken(token, f"acc-{token}", self.ttl, True)


@pytest.fixture
def clock():
    return FakeClock()


def make(vault, clock):
    return Renewer(vault.renew, clock=clock, jitter=lambda low, high: low)


def test_items_are_renewed_in_deadline_order_and_rescheduled(clock):
    vault = Vault(ttl=100)
    renewer = make(vault, clock)
    renewer.track("b", "tb", 50)
    renewer.track("a", "ta", 20)
    assert renewer.renew_due() == pytest.approx(12)
    clock.advance(30)
    assert renewer.renew_due() == pytest.approx(60) and vault.calls == ["ta", "tb"]
    clock.advance(60)  # both renewed at t+30 for 100 s: due again at t+90
    renewer.renew_due()
    assert vault.calls == ["ta", "tb", "ta", "tb"]


def test_forgotten_items_are_never_renewed(clock):
    vault = Vault()
    renewer = make(vault, clock)
    renewer.track("a", "ta", 10)
    renewer.forget("a")
    clock.advance(100)
    assert renewer.renew_due() is None and vault.calls == [] and len(renewer) == 0


def test_outage_is_retried_with_backoff_then_recovers(clock):
    vault = Vault()
    renewer = make(vault, clock)
    renewer.track("a", "ta", 100)
    clock.advance(60)
    vault.down = True
    assert renewer.renew_due() == pytest.approx(1)
    clock.advance(1)
    assert renewer.renew_due() == pytest.approx(2)
    vault.down = False
    clock.advance(2)
    assert renewer.renew_due() == pytest.approx(60) and len(vault.calls) == 3


def test_item_that_expires_during_an_outage_is_dropped(clock):
    vault = Vault()
    renewer = make(vault, clock)
    renewer.track("a", "ta", 10)
    vault.down = True
    clock.advance(11)
    assert renewer.renew_due() is None and len(renewer) == 0


def test_token_vault_no_longer_knows_is_dropped(clock):
    vault = Vault()
    vault.forgotten.add("ta")
    renewer = make(vault, clock)
    renewer.track("a", "ta", 0)
    assert renewer.renew_due() is None and len(renewer) == 0


def test_run_wakes_for_new_items_and_stops():
    vault = Vault(ttl=3600)
    renewer = Renewer(vault.renew)
    stop = threading.Event()
    thread = threading.Thread(target=renewer.run, args=(stop,))
    thread.start()
    renewer.track("a", "ta", 0)  # due now: the sleeping thread must wake for it
    for _ in range(200):
        if vault.calls:
            break
        threading.Event().wait(0.01)
    stop.set()
    renewer.wake()
    thread.join(5)
    assert vault.calls == ["ta"] and not thread.is_alive()


def test_heap_stays_bounded_under_churn(clock):
    vault = Vault()
    renewer = make(vault, clock)
    for i in range(1000):
        renewer.track(i, f"t{i}", 100)
        renewer.forget(i)
    clock.advance(100)
    assert renewer.renew_due() is None and renewer._heap == []
