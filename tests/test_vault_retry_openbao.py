"""The Vault adapter's one error classification and its retries, against real OpenBao behind the fault proxy.

Each transient answer a production Vault gives (5xx but 501, 429, 412, a reset, a timeout) is retried
within the caller's budget and then succeeds; each final one (403, 400, 501) is raised at once, sent once.
Without a budget a request is tried once. An unwrap is not sent again once it may have been carried out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import hypothesis
import pytest
from hypothesis import strategies as st

from plugin.core import retry
from plugin.core.errors import (
    AnswerLostError,
    PluginError,
    TokenInvalidError,
    VaultError,
    VaultTransientError,
    WrappingTokenError,
)
from plugin.vault.client import Vault
from tests.support.faultproxy import FaultProxy

pytestmark = pytest.mark.openbao

READ = "/v1/secret/data/web/db"


@pytest.fixture
def proxy(bao) -> Iterator[FaultProxy]:
    with FaultProxy(bao.addr) as p:
        yield p


@pytest.fixture
def vault(proxy) -> Vault:
    return Vault(proxy.addr, timeout=1.0)


def actions(proxy: FaultProxy, path: str) -> list[str]:
    return [s.action for s in proxy.seen(path)]


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 412])
def test_transient_statuses_are_retried_within_the_budget(bao, proxy, vault, status):
    proxy.fail(READ, status, times=2)
    with retry.budget(10):
        fetched = vault.fetch(bao.server.root_token, "secret/data/web/db")
    assert fetched.data["password"] == "correct-horse-battery-staple"
    assert actions(proxy, READ) == [f"failed {status}"] * 2 + ["forwarded"]


@pytest.mark.parametrize("status, error", [(403, VaultError), (400, VaultError), (501, VaultError)])
def test_final_statuses_are_raised_at_once_and_sent_once(bao, proxy, vault, status, error):
    proxy.fail(READ, status, times=3, message="permission denied" if status == 403 else "bad request")
    started = time.monotonic()
    with retry.budget(10), pytest.raises(error) as raised:
        vault.fetch(bao.server.root_token, "secret/data/web/db")
    assert not isinstance(raised.value, VaultTransientError)
    assert time.monotonic() - started < 1
    assert actions(proxy, READ) == [f"failed {status}"]


def test_kv_upgrade_message_is_transient(bao, proxy, vault):
    proxy.fail(
        READ,
        400,
        times=1,
        message="Waiting for the primary to upgrade from non-versioned to versioned data. "
        "This backend will be unavailable for a brief period and will resume service shortly.",
    )
    with retry.budget(10):
        assert vault.fetch(bao.server.root_token, "secret/data/web/db").version is not None
    assert actions(proxy, READ) == ["failed 400", "forwarded"]


def test_without_a_budget_a_transient_error_is_tried_once(bao, proxy, vault):
    proxy.fail(READ, 500, times=1)
    with pytest.raises(VaultTransientError, match="HTTP 500: local node not active"):
        vault.fetch(bao.server.root_token, "secret/data/web/db")
    assert actions(proxy, READ) == ["failed 500"]


def test_the_budget_bounds_the_retries_and_the_error_says_so(bao, proxy, vault):
    proxy.fail(READ, 503, for_seconds=30)
    started = time.monotonic()
    with retry.budget(3), pytest.raises(VaultTransientError, match=r"HTTP 503.*gave up after \d+ attempts in [23]s"):
        vault.fetch(bao.server.root_token, "secret/data/web/db")
    # It stops when less than a worthwhile attempt (0.5 s) would be left after the next backoff.
    assert 2 < time.monotonic() - started < 3.2
    assert len(actions(proxy, READ)) >= 4


def test_resets_and_timeouts_of_repeatable_requests_are_retried(bao, proxy, vault):
    proxy.reset(READ, times=1)
    proxy.withhold(READ, 3, times=1)  # past the 1 s timeout
    with retry.budget(10):
        assert vault.fetch(bao.server.root_token, "secret/data/web/db").data["username"] == "web"
    assert actions(proxy, READ) == ["reset", "withheld", "forwarded"]


def test_an_unwrap_is_retried_only_while_it_cannot_have_been_carried_out(bao, proxy, vault):
    wrapping = bao.wrapped_secret_id()
    proxy.fail("/v1/sys/wrapping/unwrap", 503, times=1)  # answered: not carried out, so sent again
    with retry.budget(10):
        assert vault.unwrap(wrapping)["data"]["secret_id"]
    assert actions(proxy, "/v1/sys/wrapping/unwrap") == ["failed 503", "forwarded"]

    wrapping = bao.wrapped_secret_id()
    proxy.withhold("/v1/sys/wrapping/unwrap", 3, times=1)  # carried out, answer lost: never sent again
    with retry.budget(10), pytest.raises(AnswerLostError, match="may have been carried out"):
        vault.unwrap(wrapping)
    assert actions(proxy, "/v1/sys/wrapping/unwrap")[2:] == ["withheld"]
    with pytest.raises(WrappingTokenError):
        vault.lookup_wrapping(wrapping)  # spent by the unwrap whose answer was lost


def test_lookup_of_a_wrapping_token_distinguishes_unavailable_from_invalid(bao, proxy, vault):
    wrapping = bao.wrapped_secret_id()
    proxy.fail("/v1/sys/wrapping/lookup", 500, times=1)
    with pytest.raises(VaultTransientError):
        vault.lookup_wrapping(wrapping)  # says nothing about the token
    assert vault.lookup_wrapping(wrapping).creation_path.endswith("/secret-id")
    vault.unwrap(wrapping)
    with pytest.raises(WrappingTokenError):
        vault.lookup_wrapping(wrapping)


def test_a_revoked_token_is_invalid_not_transient(bao, vault):
    token = bao.root.auth.token.create(policies=["default"], ttl="1m")["auth"]["client_token"]
    assert vault.renew_self(token, increment=120).ttl == 120
    bao.root.auth.token.revoke(token)
    with retry.budget(10), pytest.raises(TokenInvalidError, match="not valid"):
        vault.renew_self(token)
    with pytest.raises(TokenInvalidError):
        vault.lookup_self(token)


def test_a_refused_connection_is_transient(bao):
    from devenv.openbao import free_loopback_port

    vault = Vault(f"http://127.0.0.1:{free_loopback_port()}", timeout=1.0)
    with retry.budget(1.5), pytest.raises(VaultTransientError, match="is unreachable"):
        vault.health()


def test_answers_without_a_body_are_vault_errors_not_crashes(bao, vault):
    """A write Vault answers with 204 (KV v1) and a read of metadata that is not there (404) end in the error
    family, so a Mount says what is wrong and a refresh falls back to comparing the data."""
    with pytest.raises(VaultError, match="Vault has no secret at kv1/web/written"):
        vault.fetch(bao.server.root_token, "kv1/web/written", (("k", "v"),))
    with pytest.raises(VaultError, match="without the data expected"):
        vault.kv2_current_version(bao.server.root_token, "secret/data/web/never-written")


@pytest.mark.parametrize(
    "body, content_type",
    [
        (b"<html><body>502 Bad Gateway</body></html>", "text/html"),
        (b"", "application/json"),
        (b'{"data": {"password": "cut', "application/json"),
    ],
)
def test_an_answer_that_is_not_vaults_json_is_a_final_error_naming_it(bao, proxy, vault, body, content_type):
    proxy.answer(READ, body, content_type=content_type, times=3)
    with retry.budget(10), pytest.raises(VaultError, match="answered something that is not Vault's JSON") as raised:
        vault.fetch(bao.server.root_token, "secret/data/web/db")
    assert not isinstance(raised.value, VaultTransientError)
    assert actions(proxy, READ) == ["answered 200"], "sent once: the same server will say the same"


def test_an_oversized_answer_is_refused_without_reading_it_all(bao, proxy, vault):
    proxy.answer(READ, b'{"data": "' + b"x" * (5 << 20) + b'"}', times=1)
    with retry.budget(10), pytest.raises(VaultError, match="answered more than 4 MiB"):
        vault.fetch(bao.server.root_token, "secret/data/web/db")


def test_a_trickling_answer_is_bounded_by_the_request_timeout_not_each_read(bao, proxy, vault):
    """One byte every 0.3 s keeps each read under the 1 s timeout; the request as a whole is cut at 1 s,
    and the retries at the budget."""
    proxy.answer(READ, b'{"data": {"password": "' + b"x" * 200 + b'"}}', trickle=0.3, for_seconds=30)
    started = time.monotonic()
    with retry.budget(3), pytest.raises(VaultTransientError, match="within 1s"):
        vault.fetch(bao.server.root_token, "secret/data/web/db")
    assert time.monotonic() - started < 4.5


@pytest.mark.parametrize(
    "path, body, call",
    [
        ("/v1/auth/approle/login", b'{"auth": {}}', lambda v, b: v.approle_login("approle", "r", "s")),
        ("/v1/auth/token/create/web", b'{"auth": null}', lambda v, b: v.mint_child(b, "web", 60, {}, "x")),
        ("/v1/auth/token/lookup-self", b'{"data": []}', lambda v, b: v.lookup_self(b)),
        ("/v1/sys/leases/renew", b'{"lease_duration": "soon"}', lambda v, b: v.renew_lease(b, "db/creds/x/1")),
    ],
)
def test_an_answer_without_the_fields_it_should_hold_is_a_vault_error_naming_the_request(
    bao, proxy, vault, path, body, call
):
    proxy.answer(path, body, times=1)
    with pytest.raises(VaultError, match="answered .* without what such an answer holds|holds no usable token"):
        call(vault, bao.server.root_token)


@hypothesis.settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)
@hypothesis.given(
    body=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(["data", "auth", "lease_duration", "metadata", "wrap_info", "x"]), inner, max_size=4
                )
            ),
            max_leaves=12,
        ).map(lambda value: json.dumps(value).encode()),
    ),
    status=st.sampled_from([200, 204, 400, 403, 404, 500]),
)
def test_whatever_vault_answers_is_a_plugin_error_or_a_value(bao, proxy, vault, body, status):
    """Any body with any status, on a read and on a login: the adapter returns a value or raises from the
    error family, never anything else (an internal error with a traceback)."""
    for path, call in (
        (READ, lambda: vault.fetch(bao.server.root_token, "secret/data/web/db")),
        ("/v1/auth/approle/login", lambda: vault.approle_login("approle", "r", "s")),
    ):
        proxy.answer(path, body, status, times=1)
        try:
            call()
        except PluginError:
            pass
