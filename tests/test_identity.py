"""The plugin identity's semantics over the real store and the fake Vault: a Mount waits for an identity
that may come (within its budget), not for one only an operator can bring; transient errors never drop
the token, Vault's word that it is invalid does."""

from __future__ import annotations

import threading
import time

import pytest

from plugin.core import retry
from plugin.core.errors import IdentityUnavailableError
from plugin.core.records import IdentityRecord, IssuedToken
from plugin.vault.identity import Identity


@pytest.fixture
def sealed(store, vault):
    """A plugin identity sealed in the store and live in the fake Vault."""
    vault.live["plugin-token"] = "plugin-accessor"
    store.save_identity(IdentityRecord("plugin-token", "plugin-accessor", time.time()))


def make(vault, store, wrapped=None) -> Identity:
    return Identity(vault, store, approle_mount="approle", role_id="role", wrapped_secret_id_file=wrapped)


def run_in_background(identity: Identity, sleeps: list[float]) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        stop.wait(min(seconds, 0.05))

    thread = threading.Thread(target=identity.run, args=(stop, pytest.fail), kwargs={"sleep": sleep}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not sleeps and time.monotonic() < deadline:  # the first attempt has ended
        time.sleep(0.01)
    return stop, thread


def test_token_waits_within_the_budget_while_vault_recovers(vault, store, sealed):
    identity, sleeps = make(vault, store), []
    vault.unavailable = True
    stop, thread = run_in_background(identity, sleeps)
    try:
        with pytest.raises(IdentityUnavailableError, match="is unreachable; retry in a few seconds"):
            identity.token()  # no budget: no wait
        threading.Timer(0.3, lambda: setattr(vault, "unavailable", False)).start()
        started = time.monotonic()
        with retry.budget(5):
            assert identity.token() == "plugin-token"
        assert 0.2 < time.monotonic() - started < 2
    finally:
        stop.set()
        thread.join(5)


def test_token_fails_at_once_when_only_an_operator_can_help(vault, store):
    identity, sleeps = make(vault, store), []  # no sealed identity, no wrapped SecretID file
    stop, thread = run_in_background(identity, sleeps)
    try:
        started = time.monotonic()
        with retry.budget(5), pytest.raises(IdentityUnavailableError, match="no --wrapped-secret-id-file"):
            identity.token()
        assert time.monotonic() - started < 0.5
    finally:
        stop.set()
        thread.join(5)


def test_transient_renewal_errors_keep_the_token_and_an_invalid_one_is_dropped(vault, store, sealed):
    identity = make(vault, store)
    identity.establish()
    vault.unavailable = True
    with pytest.raises(Exception, match="unreachable"):
        identity._renew_or_establish()
    assert identity.token() == "plugin-token" and store.identity() is not None
    vault.unavailable = False
    del vault.live["plugin-token"]  # revoked in Vault
    with pytest.raises(IdentityUnavailableError, match="no --wrapped-secret-id-file"):
        identity._renew_or_establish()
    assert store.identity() is None


def test_an_unexpected_error_does_not_end_the_identity_loop(vault, store, sealed, monkeypatch):
    identity, sleeps = make(vault, store), []
    calls = []
    real = vault.lookup_self

    def flaky(token: str):
        calls.append(token)
        if len(calls) == 1:
            raise RuntimeError("a bug in one attempt")
        return real(token)

    monkeypatch.setattr(vault, "lookup_self", flaky)
    stop, thread = run_in_background(identity, sleeps)
    try:
        with retry.budget(5):
            assert identity.token() == "plugin-token", "the second attempt succeeded"
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(5)


def test_bootstrap_waits_for_a_renewal_in_flight_which_cannot_put_the_old_identity_back(
    vault, store, sealed, monkeypatch
):
    identity = make(vault, store)
    identity.establish()
    renewing, release = threading.Event(), threading.Event()
    renew = vault.renew_self

    def slow_renewal(token: str, increment: int | None = None) -> IssuedToken:
        renewing.set()
        assert release.wait(5)
        return renew(token, increment)

    monkeypatch.setattr(vault, "renew_self", slow_renewal)
    new = IssuedToken("new-token", "new-accessor", 3600, True)
    monkeypatch.setattr(identity, "_unwrap_secret_id", lambda token, source: "secret-id")
    monkeypatch.setattr(identity, "_login", lambda secret_id, source: new)
    renewal = threading.Thread(target=identity._renew_or_establish)
    renewal.start()
    assert renewing.wait(5)
    replaced: list[tuple[IssuedToken, IssuedToken | None]] = []
    booting = threading.Thread(target=lambda: replaced.append(identity.bootstrap("wrapping-token")))
    booting.start()
    time.sleep(0.2)
    assert replaced == [], "bootstrap waits for the renewal in flight"
    release.set()
    renewal.join(5)
    booting.join(5)
    assert identity.token() == "new-token", "the renewal of the old identity did not put it back"
    ((issued, previous),) = replaced
    assert issued is new and previous is not None and previous.accessor == "plugin-accessor"
