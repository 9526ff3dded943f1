"""The Vault adapter and the plugin identity against a real OpenBao dev server."""

from __future__ import annotations

import logging
import time

import pytest

from plugin.core.errors import (
    IdentityUnavailableError,
    VaultError,
    VaultTransientError,
    WrappingTokenError,
)
from plugin.host.seal import Sealer
from plugin.host.store import Store
from plugin.vault.client import Vault
from plugin.vault.identity import Identity

pytestmark = pytest.mark.openbao


@pytest.fixture
def vault(bao):
    return Vault(bao.addr, timeout=3)


@pytest.fixture
def plugin_token(bao, vault):
    """A plugin identity token, logged in as the plugin would."""
    secret_id = vault.unwrap(bao.wrapped_secret_id())["data"]["secret_id"]
    return vault.approle_login("approle", bao.seed.role_id, secret_id).token


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "state.db", Sealer.load_or_create(tmp_path / "seal.key"))
    yield s
    s.close()


def test_wrapping_token_is_looked_up_without_being_consumed_then_unwrapped_once(bao, vault):
    wrapping = bao.wrapped_secret_id()
    info = vault.lookup_wrapping(wrapping)
    assert info.creation_path == "auth/approle/role/vault-secrets-plugin/secret-id" and info.ttl == 600
    assert vault.lookup_wrapping(wrapping).creation_path == info.creation_path
    assert vault.unwrap(wrapping)["data"]["secret_id"]
    with pytest.raises(WrappingTokenError, match="already unwrapped"):
        vault.lookup_wrapping(wrapping)
    with pytest.raises(WrappingTokenError, match="someone else unwrapped it"):
        vault.unwrap(wrapping)


def test_child_token_carries_role_policies_and_meta_and_is_revoked(bao, vault, plugin_token):
    child = vault.mint_child(
        plugin_token, "web", 120, {"volume": "v", "mount_id": "m1", "host": "h"}, "vault-secrets-v"
    )
    data = bao.root.auth.token.lookup_accessor(child.accessor)["data"]
    assert data["meta"] == {"volume": "v", "mount_id": "m1", "host": "h"}
    assert set(data["policies"]) == {"default", "web"} and not data["orphan"]
    assert 100 < child.ttl <= 120 and child.renewable
    assert vault.fetch(child.token, "secret/data/web/db").data["password"] == "correct-horse-battery-staple"
    assert vault.fetch(child.token, "kv1/web/legacy").data == {"token": "legacy-kv1-value"}
    vault.revoke_self(child.token)
    assert not bao.token_valid(child.accessor)
    vault.revoke_self(child.token)  # already revoked: not an error


def test_errors_name_the_operation_and_never_the_token(bao, vault, plugin_token):
    with pytest.raises(VaultError, match="token role 'nope'") as denied:
        vault.mint_child(plugin_token, "nope", 60, {}, "x")
    assert plugin_token not in str(denied.value)
    child = vault.mint_child(plugin_token, "web", 60, {}, "x")
    with pytest.raises(VaultError, match="denied permission to read secret/data/other/x"):
        vault.fetch(child.token, "secret/data/other/x").data
    bao.root.secrets.kv.v2.create_or_update_secret(path="web/gone", secret={"a": "b"})
    bao.root.secrets.kv.v2.delete_latest_version_of_secret(path="web/gone")
    with pytest.raises(VaultError, match="secret/data/web/gone"):
        vault.fetch(child.token, "secret/data/web/gone").data
    vault.revoke_self(child.token)


def test_plugin_token_cannot_read_secrets_itself(vault, plugin_token):
    with pytest.raises(VaultError, match="denied permission"):
        vault.fetch(plugin_token, "secret/data/web/db").data


def test_environment_tokens_are_never_picked_up(bao, vault, monkeypatch, tmp_path):
    monkeypatch.setenv("VAULT_TOKEN", bao.server.root_token)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".vault-token").write_text(bao.server.root_token)
    with pytest.raises(VaultError):
        vault.fetch("", "secret/data/web/db").data


def test_unreachable_vault_fails_fast_with_a_clear_message():
    dead = Vault("http://127.0.0.1:9", timeout=1)
    started = time.monotonic()
    with pytest.raises(VaultTransientError, match="unreachable"):
        dead.lookup_wrapping("s.whatever")
    assert time.monotonic() - started < 5


# -- the plugin identity ------------------------------------------------------------------------


def make_identity(vault, store, wrapped_file, role_id):
    return Identity(vault, store, approle_mount="approle", role_id=role_id, wrapped_secret_id_file=wrapped_file)


def test_identity_bootstraps_once_then_resumes_sealed(bao, vault, store, tmp_path):
    wrapped = bao.write_wrapped_secret_id(tmp_path / "wrapped")
    first = make_identity(vault, store, wrapped, bao.seed.role_id).establish()
    assert bao.token_valid(first.accessor)
    # A restart: a new Identity on the same store resumes the sealed token; the used file is not a tamper.
    again = make_identity(vault, store, wrapped, bao.seed.role_id)
    assert again.establish().accessor == first.accessor
    assert again.token() == first.token


def test_consumed_file_after_identity_loss_is_recognised_not_tamper(bao, vault, store, tmp_path):
    wrapped = bao.write_wrapped_secret_id(tmp_path / "wrapped")
    issued = make_identity(vault, store, wrapped, bao.seed.role_id).establish()
    bao.root.auth.token.revoke_accessor(issued.accessor)
    with pytest.raises(IdentityUnavailableError, match="already used by this plugin"):
        make_identity(vault, store, wrapped, bao.seed.role_id).establish()
    # Delivering a new wrapped SecretID is all it takes.
    bao.write_wrapped_secret_id(wrapped)
    assert bao.token_valid(make_identity(vault, store, wrapped, bao.seed.role_id).establish().accessor)


def test_wrapping_token_used_by_someone_else_is_a_tamper_event(bao, vault, store, tmp_path, caplog):
    wrapped = bao.write_wrapped_secret_id(tmp_path / "wrapped")
    bao.root.sys.unwrap(wrapped.read_text())  # an interceptor got there first
    identity = make_identity(vault, store, wrapped, bao.seed.role_id)
    with caplog.at_level(logging.CRITICAL, logger="plugin.audit"):
        with pytest.raises(WrappingTokenError, match="possible interception"):
            identity.establish()
    assert "wrap.tamper" in caplog.text and wrapped.read_text() not in caplog.text
    with pytest.raises(IdentityUnavailableError):
        identity.token()


def test_wrapping_token_from_an_unexpected_path_is_refused_and_left_unconsumed(bao, vault, store, tmp_path):
    wrapping = bao.root.auth.token.create(policies=["default"], ttl="5m", wrap_ttl="5m")["wrap_info"]["token"]
    wrapped = tmp_path / "wrapped"
    wrapped.write_text(wrapping)
    with pytest.raises(WrappingTokenError, match="auth/token/create"):
        make_identity(vault, store, wrapped, bao.seed.role_id).establish()
    assert vault.lookup_wrapping(wrapping).creation_path == "auth/token/create"


def test_run_retries_until_a_wrapped_secret_id_is_delivered(bao, vault, store, tmp_path):
    import threading

    wrapped = tmp_path / "wrapped"
    identity = make_identity(vault, store, wrapped, bao.seed.role_id)
    stop, waits = threading.Event(), []

    def sleep(seconds):
        waits.append(seconds)
        if len(waits) == 2:
            bao.write_wrapped_secret_id(wrapped)
        if len(waits) == 3:
            stop.set()

    identity.run(stop, on_fatal=pytest.fail, sleep=sleep)
    assert waits[0] < waits[1] < 5  # backoff while the file is missing
    assert waits[2] > 3600 * 0.5  # then the periodic 24h token is renewed within the hour
    assert bao.token_valid(vault.lookup_self(identity.token()).accessor)
