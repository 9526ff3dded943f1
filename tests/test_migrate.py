"""migrate: a compose file's secret environment entries -> vault-secrets volumes, Vault commands, KV v2 writes."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from devenv.openbao import bao_binary, free_loopback_port
from plugin.core.spec import parse_spec
from plugin.ops.migrate import REDACTED, migrate

DOC = Path(__file__).resolve().parent.parent / "docs" / "migration.md"
SEPARATOR = "\n# ---- Vault / OpenBao commands ----\n"
NO_VAULT = {"VAULT_ADDR": None, "VAULT_TOKEN": None, "BAO_ADDR": None, "BAO_TOKEN": None}

WEB = """
    name: shop
    services:
      web:
        image: example/web
        user: "1000"
        environment:
          LOG_LEVEL: info
          DB_PASSWORD: hunter2-horse
          API_TOKEN: tok-3f9a8b7c
"""

# Values a shell, a heredoc or `bao kv put` could mangle; `$$` is compose's escape of `$`.
NASTY = {
    "DB_PASSWORD": 'it\'s a "quoted" pa$$word \\ with spaces',
    "TLS_PRIVATE_KEY": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n",
    "API_TOKEN": "@not-a-file",
    "SESSION_SECRET": "-",
    "UNICODE_PASSWORD": "pässwörd-✓",
    "MULTILINE_SECRET": "first\nJSON\nHCL\nlast",
    "CACHE_URL": "redis://:r3d1s-pw@cache:6379/0",
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
}
STORED = {k: v.replace("$$", "$") for k, v in NASTY.items()}


def nasty_compose(project: str, service: str = "app", **others: dict) -> str:
    app = {"image": "example/app", "user": "1000:1000", "environment": {"LOG_LEVEL": "info", **NASTY}}
    return yaml.safe_dump({"name": project, "services": {service: app, **others}})


def run(tmp_path: Path, compose: str, *args: str, env: dict | None = None):
    path = tmp_path / "docker-compose.yml"
    path.write_text(textwrap.dedent(compose))
    return CliRunner(env={**NO_VAULT, **(env or {})}).invoke(migrate, [str(path), *args], catch_exceptions=False)


def split(result) -> tuple[dict, str]:
    assert result.exit_code == 0, result.output
    compose, sep, script = result.stdout.partition(SEPARATOR)
    assert sep, result.stdout
    return yaml.safe_load(compose), script


def kv_json(script: str) -> list[dict]:
    """The JSON documents fed to `bao kv put` in the script."""
    return [json.loads(m) for m in re.findall(r"<<'JSON'\n(.*?)\nJSON\n", script, re.S)]


# -- the rewritten compose file ---------------------------------------------------------------------


def test_mapping_environment_secrets_move_to_a_volume_read_through_file_variables(tmp_path):
    compose, script = split(run(tmp_path, WEB))
    web = compose["services"]["web"]
    assert web["environment"] == {
        "LOG_LEVEL": "info",
        "DB_PASSWORD_FILE": "/run/secrets/db_password",
        "API_TOKEN_FILE": "/run/secrets/api_token",
    }
    assert web["volumes"] == [
        {
            "type": "volume",
            "source": "shop-web-secrets",
            "target": "/run/secrets",
            "volume": {"nocopy": True},
        }
    ]
    opts = {
        "role": "web",
        "uid": "1000",
        "secret.db_password": "secret/data/shop/web#DB_PASSWORD",
        "secret.api_token": "secret/data/shop/web#API_TOKEN",
    }
    assert compose["volumes"] == {"shop-web-secrets": {"driver": "vault-secrets", "driver_opts": opts}}
    assert {f.name: (f.path, f.field) for f in parse_spec(opts).files} == {
        "db_password": ("secret/data/shop/web", "DB_PASSWORD"),
        "api_token": ("secret/data/shop/web", "API_TOKEN"),
    }
    assert "bao kv put -mount=secret -cas=0 shop/web - <<'JSON'" in script
    assert kv_json(script) == [{"DB_PASSWORD": REDACTED, "API_TOKEN": REDACTED}]
    assert (
        'bao policy write shop-web - <<\'HCL\'\npath "secret/data/shop/web" { capabilities = ["read"] }\nHCL' in script
    )
    assert "bao write auth/token/roles/web allowed_policies=shop-web renewable=true" in script
    assert '#   path "auth/token/create/web" { capabilities = ["update"] }' in script


def test_list_environment_keeps_its_form_and_other_services_are_untouched(tmp_path):
    compose, _ = split(
        run(
            tmp_path,
            """
        services:
          db:
            image: postgres:16
            environment: ["POSTGRES_USER=app", "POSTGRES_PASSWORD=pg-pw", "POSTGRES_DB=app"]
            volumes: ["pgdata:/var/lib/postgresql/data"]
          cache:
            image: redis:7
            environment: [MAXMEMORY=64mb]
        volumes:
          pgdata:
    """,
            "--kv-mount",
            "kv/",
            "--path-prefix",
            "/apps/prod/",
            "-p",
            "Shop.Prod",
        )
    )
    db = compose["services"]["db"]
    assert db["environment"] == [
        "POSTGRES_USER=app",
        "POSTGRES_PASSWORD_FILE=/run/secrets/postgres_password",
        "POSTGRES_DB=app",
    ]
    assert db["volumes"][0] == "pgdata:/var/lib/postgresql/data"
    assert compose["services"]["cache"] == {"image": "redis:7", "environment": ["MAXMEMORY=64mb"]}
    assert compose["volumes"]["pgdata"] is None
    assert compose["volumes"]["shopprod-db-secrets"]["driver_opts"] == {
        "role": "db",
        "secret.postgres_password": "kv/data/apps/prod/db#POSTGRES_PASSWORD",
    }


def test_the_project_name_defaults_to_the_directory_like_compose(tmp_path):
    project = tmp_path / "My_Shop"
    project.mkdir()
    compose, _ = split(run(project, WEB.replace("name: shop", "")))
    assert list(compose["volumes"]) == ["my_shop-web-secrets"]
    assert (
        compose["volumes"]["my_shop-web-secrets"]["driver_opts"]["secret.db_password"]
        == "secret/data/my_shop/web#DB_PASSWORD"
    )


def test_interpolated_values_are_left_as_they_are_and_reported(tmp_path):
    result = run(
        tmp_path,
        """
        services:
          web:
            image: example/web
            environment:
              DB_PASSWORD: ${DB_PASSWORD}
              SMTP_PASSWORD: "${SMTP_PASSWORD:-dev-default-pw}"
              GITHUB_TOKEN:
              DATABASE_URL: $DATABASE_URL
              LOG_LEVEL: ${LOG_LEVEL:-info}
              API_KEY: real-api-key-value
          worker:
            image: example/worker
            environment: [QUEUE_SECRET, "QUEUE=jobs"]
    """,
    )
    compose, _ = split(result)
    assert compose["services"]["web"]["environment"] == {
        "DB_PASSWORD": "${DB_PASSWORD}",
        "SMTP_PASSWORD": "${SMTP_PASSWORD:-dev-default-pw}",
        "GITHUB_TOKEN": None,
        "DATABASE_URL": "$DATABASE_URL",
        "LOG_LEVEL": "${LOG_LEVEL:-info}",
        "API_KEY_FILE": "/run/secrets/api_key",
    }
    assert compose["services"]["worker"]["environment"] == ["QUEUE_SECRET", "QUEUE=jobs"]
    for service, key in [
        ("web", "DB_PASSWORD"),
        ("web", "SMTP_PASSWORD"),
        ("web", "GITHUB_TOKEN"),
        ("web", "DATABASE_URL"),
        ("worker", "QUEUE_SECRET"),
    ]:
        assert f"{service}: {key} is left as is: its value comes from your shell" in result.stderr
        assert "cannot move it; store it yourself" in result.stderr
    assert "LOG_LEVEL" not in result.stderr
    assert "dev-default-pw" not in result.stderr  # the notices name variables, never a default value


def test_a_value_left_in_an_anchor_definition_is_an_error_and_not_printed(tmp_path):
    result = run(
        tmp_path,
        """
        x-env: &env
          LOG_LEVEL: info
          DB_PASSWORD: hunter2-horse
        x-list: [A=b, DB_PASSWORD=hunter2-horse]
        services:
          web: {image: x, environment: *env}
          worker:
            image: x
            environment:
              <<: *env
              QUEUE: jobs
    """,
    )
    assert result.exit_code == 1
    assert "x-env.DB_PASSWORD, x-list[1] would still hold a value that moves to Vault" in result.stderr
    assert "hunter2-horse" not in result.output


def test_shared_anchors_without_secrets_are_expanded(tmp_path):
    result = run(
        tmp_path,
        """
        x-base: &base {image: example/app, restart: always, labels: [team=a]}
        services:
          web: {<<: *base, environment: {DB_PASSWORD: hunter2-horse}}
          worker: *base
    """,
    )
    compose, _ = split(result)
    assert (
        compose["services"]["worker"]
        == compose["x-base"]
        == {"image": "example/app", "restart": "always", "labels": ["team=a"]}
    )
    assert "&id" not in result.stdout and "*id" not in result.stdout


def test_env_files_are_listed_not_migrated(tmp_path):
    result = run(
        tmp_path,
        WEB
        + """
        env_file: [common.env, {path: web.env, required: false}]
      db:
        image: postgres
        env_file: db.env
    """,
    )
    split(result)
    for service, name in [("web", "common.env"), ("web", "web.env"), ("db", "db.env")]:
        assert f"{service}: env_file {name} is not migrated automatically" in result.stderr


@pytest.mark.parametrize(
    ("user", "owner"),
    [
        ('"1000"', {"uid": "1000"}),
        ('"1000:1001"', {"uid": "1000", "gid": "1001"}),
        ("1000", {"uid": "1000"}),
        ('"0"', {"uid": "0"}),
        ("app", {}),
        ('"app:staff"', {}),
        ("null", {}),
    ],
)
def test_numeric_user_becomes_the_owner_of_the_files(tmp_path, user, owner):
    result = run(tmp_path, WEB.replace('user: "1000"', f"user: {user}"))
    compose, _ = split(result)
    opts = compose["volumes"]["shop-web-secrets"]["driver_opts"]
    assert {k: v for k, v in opts.items() if k in ("uid", "gid")} == owner
    assert ("is not numeric: set uid=" in result.stderr) == user.strip('"').startswith("app")


def test_exclude_keeps_an_entry_and_only_chooses_exactly(tmp_path):
    compose, _ = split(run(tmp_path, WEB, "--exclude", "API_TOKEN"))
    assert compose["services"]["web"]["environment"] == {
        "LOG_LEVEL": "info",
        "DB_PASSWORD_FILE": "/run/secrets/db_password",
        "API_TOKEN": "tok-3f9a8b7c",
    }
    result = run(tmp_path, WEB, "--only", "LOG_LEVEL", "--only", "API_TOKEN")
    compose, script = split(result)
    assert compose["services"]["web"]["environment"] == {
        "LOG_LEVEL_FILE": "/run/secrets/log_level",
        "DB_PASSWORD": "hunter2-horse",
        "API_TOKEN_FILE": "/run/secrets/api_token",
    }
    assert "LOG_LEVEL moves to secret/data/shop/web (chosen with --only)" in result.stderr
    assert list(kv_json(script)[0]) == ["LOG_LEVEL", "API_TOKEN"]


@pytest.mark.parametrize("option", ["--only", "--exclude"])
def test_a_name_no_service_has_is_an_error(tmp_path, option):
    result = run(tmp_path, WEB, option, "DB_PASSWROD")
    assert result.exit_code == 1
    assert "--only/--exclude DB_PASSWROD: no service in" in result.stderr


def test_consume_env_gives_one_env_file_per_service(tmp_path):
    result = run(tmp_path, WEB, "--consume", "env")
    compose, script = split(result)
    assert compose["services"]["web"]["environment"] == {"LOG_LEVEL": "info"}
    opts = compose["volumes"]["shop-web-secrets"]["driver_opts"]
    assert opts == {"role": "web", "uid": "1000", "secret.web.env": "secret/data/shop/web", "format.web.env": "env"}
    (file,) = parse_spec(opts).files
    assert (file.name, file.path, file.field, file.format) == ("web.env", "secret/data/shop/web", None, "env")
    assert "set -a; . /run/secrets/web.env; set +a; exec <command>" in result.stderr
    assert kv_json(script) == [{"DB_PASSWORD": REDACTED, "API_TOKEN": REDACTED}]


def test_consume_env_drops_an_environment_left_empty(tmp_path):
    compose, _ = split(run(tmp_path, WEB.replace("LOG_LEVEL: info", ""), "--consume", "env", "--target", "/run/vault/"))
    web = compose["services"]["web"]
    assert "environment" not in web
    assert web["volumes"][0]["target"] == "/run/vault"


def test_no_secret_value_is_printed_unless_asked(tmp_path):
    result = run(tmp_path, nasty_compose("shop"))
    compose, script = split(result)
    assert set(compose["services"]["app"]["environment"]) == {"LOG_LEVEL", *(f"{k}_FILE" for k in NASTY)}
    assert kv_json(script) == [dict.fromkeys(NASTY, REDACTED)]
    for value in [*NASTY.values(), *STORED.values(), "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", "r3d1s-pw", "pässwörd"]:
        if value != "-":
            assert value not in result.output
    assert script.count("exit 1") == 1  # a redacted script stops before it could store placeholders

    result = run(tmp_path, nasty_compose("shop"), "--show-values")
    assert kv_json(split(result)[1]) == [STORED]
    assert "exit 1" not in result.stdout


# -- files, and errors ------------------------------------------------------------------------------


def test_output_gets_the_compose_file_and_stdout_only_the_commands(tmp_path):
    result = run(tmp_path, WEB, "--output", str(tmp_path / "out.yml"))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("#!/bin/sh\n")
    written = (tmp_path / "out.yml").read_text()
    assert written.startswith("# Rewritten by vault-secrets-plugin migrate from docker-compose.yml")
    assert yaml.safe_load(written)["volumes"]["shop-web-secrets"]["driver"] == "vault-secrets"
    assert "hunter2-horse" in (tmp_path / "docker-compose.yml").read_text()


def test_in_place_keeps_the_original_as_bak_with_its_mode(tmp_path):
    original = tmp_path / "docker-compose.yml"
    original.write_text(textwrap.dedent(WEB))
    original.chmod(0o640)
    result = CliRunner(env=NO_VAULT).invoke(migrate, [str(original), "--in-place"])
    assert result.exit_code == 0, result.output
    bak = tmp_path / "docker-compose.yml.bak"
    assert bak.read_text() == textwrap.dedent(WEB)
    assert bak.stat().st_mode & 0o777 == 0o640 == original.stat().st_mode & 0o777
    assert "hunter2-horse" not in original.read_text()
    assert "and its .bak" in result.stderr
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("compose", "args", "message"),
    [
        ("services: [web]", (), "is not a compose file: it has no 'services:' mapping"),
        ("- just\n- a list\n", (), "is not a compose file"),
        ("services: {}", (), "has no services"),
        ("services:\n  web: {environment: [A=b\n", (), "is not valid YAML"),
        ("services:\n  web: {image: x, environment: {LOG_LEVEL: info}}", (), "nothing to migrate in"),
        ("services:\n  web: {image: x, environment: text}", (), "service web: environment must be a mapping or a list"),
        (
            "services:\n  web: {environment: {DB_PASSWORD: x, DB_PASSWORD_FILE: /f}}",
            (),
            "DB_PASSWORD_FILE would be defined twice",
        ),
        (
            "services:\n  web: {environment: {DB_PASSWORD: x, db_password: y}}",
            (),
            "would be defined twice (or as the same file)",
        ),
        (
            "services:\n  web: {environment: {DB_PASSWORD: x}, volumes: ['s:/run/secrets:ro']}",
            (),
            "already uses /run/secrets",
        ),
        ("services:\n  web: {environment: {DB_PASSWORD: x}, secrets: [db]}", (), "already uses /run/secrets"),
        (
            "name: p\nservices:\n  web: {environment: {DB_PASSWORD: x}}\nvolumes: {p-web-secrets: {}}",
            (),
            "already declared",
        ),
        ("services:\n  web: {environment: {'DB PASSWORD': x}}", (), "the volume options would be refused"),
        (WEB, ("--setup-vault",), "only apply with --write"),
        (WEB, ("--overwrite",), "only apply with --write"),
        (WEB, ("--output", "{input}"), "give --in-place"),
        (
            WEB,
            ("--output", "{tmp}/missing/dir/out.yml"),
            "cannot write {tmp}/missing/dir/out.yml: No such file or directory",
        ),
    ],
)
def test_errors_say_what_is_wrong(tmp_path, compose, args, message):
    args = [a.format(input=tmp_path / "docker-compose.yml", tmp=tmp_path) for a in args]
    result = run(tmp_path, compose, *args)
    assert result.exit_code != 0
    assert message.format(tmp=tmp_path) in result.stderr


def test_a_missing_file_is_named(tmp_path):
    result = CliRunner(env=NO_VAULT).invoke(migrate, [str(tmp_path / "nope.yml")])
    assert result.exit_code == 1
    assert f"cannot read {tmp_path / 'nope.yml'}: No such file or directory" in result.stderr


def test_write_says_when_vault_is_unreachable_and_writes_no_compose_file(tmp_path):
    addr = f"http://127.0.0.1:{free_loopback_port()}"
    result = run(
        tmp_path, WEB, "--write", "-o", str(tmp_path / "out.yml"), env={"VAULT_ADDR": addr, "VAULT_TOKEN": "t"}
    )
    assert result.exit_code == 1
    assert f"cannot reach Vault at {addr}" in result.stderr
    assert not (tmp_path / "out.yml").exists()


def test_write_needs_the_operators_token(tmp_path):
    result = run(tmp_path, WEB, "--write", env={"VAULT_ADDR": "http://127.0.0.1:1", "HOME": str(tmp_path)})
    assert result.exit_code == 1
    assert "no Vault token: set VAULT_TOKEN or log in" in result.stderr


# -- against a real OpenBao -------------------------------------------------------------------------


def read_kv(bao, path: str, mount: str = "secret") -> tuple[dict, int]:
    data = bao.root.secrets.kv.v2.read_secret_version(path=path, mount_point=mount, raise_on_deleted_version=True)[
        "data"
    ]
    return data["data"], data["metadata"]["version"]


def as_operator(bao, token: str | None = None) -> dict:
    return {"VAULT_ADDR": bao.addr, "VAULT_TOKEN": token or bao.server.root_token}


@pytest.mark.openbao
def test_write_stores_the_values_and_refuses_to_replace_them(bao, tmp_path, unique_name):
    env = as_operator(bao)
    web = yaml.safe_load(textwrap.dedent(WEB))["services"]["web"]
    result = run(tmp_path, nasty_compose(unique_name, web=web), "--write", "-o", str(tmp_path / "out.yml"), env=env)
    assert result.exit_code == 0, result.output
    assert f"wrote {len(NASTY)} keys to secret/data/{unique_name}/app" in result.stderr
    assert f"wrote 2 keys to secret/data/{unique_name}/web" in result.stderr
    assert read_kv(bao, f"{unique_name}/app") == (STORED, 1)
    assert read_kv(bao, f"{unique_name}/web") == ({"DB_PASSWORD": "hunter2-horse", "API_TOKEN": "tok-3f9a8b7c"}, 1)
    assert "(stored by migrate --write)" in result.stdout and "bao kv put" not in result.stdout
    assert "bao write auth/token/roles/app allowed_policies=" in result.stdout  # no --setup-vault: still to do
    for value in STORED.values():
        assert value == "-" or value not in result.output
    (tmp_path / "out.yml").unlink()

    again = run(tmp_path, nasty_compose(unique_name), "--write", "-o", str(tmp_path / "out.yml"), env=env)
    assert again.exit_code == 1
    assert f"already exists, nothing written: secret/data/{unique_name}/app; rerun with --overwrite" in again.stderr
    assert read_kv(bao, f"{unique_name}/app")[1] == 1
    assert not (tmp_path / "out.yml").exists()

    replaced = run(
        tmp_path,
        nasty_compose(unique_name).replace("AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPL2"),
        "--write",
        "--overwrite",
        env=env,
    )
    assert replaced.exit_code == 0, replaced.output
    assert read_kv(bao, f"{unique_name}/app") == ({**STORED, "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPL2"}, 2)


@pytest.mark.openbao
def test_check_and_set_refuses_when_the_token_cannot_read_metadata(bao, tmp_path, unique_name):
    bao.root.sys.create_or_update_policy(
        unique_name, f'path "secret/data/{unique_name}/*" {{ capabilities = ["create", "update"] }}\n'
    )
    token = bao.root.auth.token.create(policies=[unique_name], ttl="5m")["auth"]["client_token"]
    bao.root.secrets.kv.v2.create_or_update_secret(path=f"{unique_name}/web", secret={"OLD": "x"}, mount_point="secret")
    result = run(tmp_path, WEB.replace("shop", unique_name), "--write", env=as_operator(bao, token))
    assert result.exit_code == 1
    assert f"secret/data/{unique_name}/web already exists (written meanwhile?); rerun with --overwrite" in result.stderr
    assert read_kv(bao, f"{unique_name}/web") == ({"OLD": "x"}, 1)


@pytest.mark.openbao
def test_setup_vault_writes_a_policy_and_token_role_that_read_the_secret(bao, tmp_path, unique_name):
    compose = WEB.replace("web:", f"{unique_name}:").replace("name: shop", "name: apps")
    result = run(tmp_path, compose, "--write", "--setup-vault", env=as_operator(bao))
    assert result.exit_code == 0, result.output
    policy = f"apps-{unique_name}"
    assert f"wrote policy {policy} and token role {unique_name}" in result.stderr
    assert "bao policy write" not in result.stdout
    assert f'#   path "auth/token/create/{unique_name}" {{ capabilities = ["update"] }}' in result.stdout
    role = bao.root.read(f"auth/token/roles/{unique_name}")["data"]
    assert role["allowed_policies"] == [policy] and role["renewable"] is True
    # what the plugin does at Mount: a child token from the role reads exactly the migrated secret
    child = bao.root.auth.token.create(role_name=unique_name, ttl="5m")["auth"]["client_token"]
    reader = bao.server.client(child)
    assert (
        reader.secrets.kv.v2.read_secret_version(
            path=f"apps/{unique_name}", mount_point="secret", raise_on_deleted_version=True
        )["data"]["data"]["API_TOKEN"]
        == "tok-3f9a8b7c"
    )
    with pytest.raises(Exception, match="permission denied"):
        reader.secrets.kv.v2.read_secret_version(path="web/db", mount_point="secret", raise_on_deleted_version=True)


@pytest.mark.openbao
def test_setup_vault_refuses_to_replace_an_existing_role(bao, tmp_path, unique_name):
    result = run(tmp_path, WEB.replace("shop", unique_name), "--write", "--setup-vault", env=as_operator(bao))
    assert result.exit_code == 1
    assert f"already exists, nothing written: policy {unique_name}-web or token role web" in result.stderr
    assert bao.root.read(f"secret/metadata/{unique_name}/web") is None


@pytest.mark.openbao
@pytest.mark.parametrize(
    ("mount", "message"),
    [
        ("kv1", "kv1/ at {addr} is not a KV version 2 mount (version 1)"),
        ("nosuch", "no secrets engine at nosuch/ on {addr}"),
    ],
)
def test_write_refuses_what_is_not_a_kv2_mount(bao, tmp_path, mount, message):
    result = run(tmp_path, WEB, "--write", "--kv-mount", mount, env=as_operator(bao))
    assert result.exit_code == 1
    assert message.format(addr=bao.addr) in result.stderr


@pytest.mark.openbao
def test_write_names_the_path_it_may_not_write(bao, tmp_path, unique_name):
    bao.root.sys.create_or_update_policy(unique_name, 'path "secret/data/elsewhere/*" { capabilities = ["read"] }\n')
    token = bao.root.auth.token.create(policies=[unique_name], ttl="5m")["auth"]["client_token"]
    result = run(tmp_path, WEB.replace("shop", unique_name), "--write", env=as_operator(bao, token))
    assert result.exit_code == 1
    assert f"permission denied by Vault on secret/data/{unique_name}/web" in result.stderr


@pytest.mark.openbao
def test_the_printed_commands_work_with_the_bao_cli(bao, tmp_path, unique_name):
    compose = nasty_compose(unique_name, service=unique_name)
    result = run(tmp_path, compose, "--show-values", "-o", str(tmp_path / "out.yml"))
    assert result.exit_code == 0, result.output
    (tmp_path / "setup.sh").write_text(result.stdout)
    env = {
        "PATH": f"{Path(bao_binary()).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "BAO_ADDR": bao.addr,
        "BAO_TOKEN": bao.server.root_token,
    }
    done = subprocess.run(["sh", str(tmp_path / "setup.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert read_kv(bao, f"{unique_name}/{unique_name}") == (STORED, 1)
    assert bao.root.read(f"auth/token/roles/{unique_name}")["data"]["allowed_policies"] == [
        f"{unique_name}-{unique_name}"
    ]
    again = subprocess.run(["sh", str(tmp_path / "setup.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "check-and-set" in again.stderr  # -cas=0: never replaces a secret


# -- the migration guide ----------------------------------------------------------------------------


def doc_block(heading: str) -> str:
    """The first fenced block under `## heading` in docs/migration.md."""
    match = re.search(rf"^## {re.escape(heading)}\n.*?^```\w*\n(.*?)^```$", DOC.read_text(), re.M | re.S)
    assert match, f"docs/migration.md has no fenced block under '## {heading}'"
    return match[1]


def test_the_migration_guide_shows_what_the_command_does(tmp_path, monkeypatch):
    (command,) = doc_block("Run it").splitlines()
    program, subcommand, *args = shlex.split(command)
    assert (program, subcommand) == ("vault-secrets-plugin", "migrate")
    monkeypatch.chdir(tmp_path)
    Path(args[0]).write_text(doc_block("Before"))
    result = CliRunner(env=NO_VAULT).invoke(migrate, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    after = Path(args[args.index("--output") + 1]).read_text()
    assert after == doc_block("After")
    assert result.stdout == doc_block("The Vault commands")
    assert result.stderr == doc_block("What it reports")
    for volume in yaml.safe_load(after)["volumes"].values():
        if volume and volume.get("driver") == "vault-secrets":
            parse_spec(volume["driver_opts"])


def test_every_migrate_flag_is_in_the_guide_and_back():
    table = DOC.read_text().split("\n## Options\n")[1]
    documented = {
        flag for row in table.splitlines() if row.startswith("| `") for flag in re.findall(r"`(--[a-z-]+)", row)
    }
    assert documented == {opt for param in migrate.params for opt in param.opts if opt.startswith("--")}


def test_in_place_keeps_comments_anchors_key_order_and_quoting(tmp_path):
    original = tmp_path / "docker-compose.yml"
    original.write_text(
        textwrap.dedent(
            """\
            # The shop, as deployed.
            x-base: &base
              image: example/app   # pinned by CI
              restart: always
            services:
              worker: *base
              web:
                <<: *base
                user: '1000'
                environment:
                  LOG_LEVEL: info   # keep it quiet
                  DB_PASSWORD: hunter2-horse
            """
        )
    )
    result = CliRunner(env=NO_VAULT).invoke(migrate, [str(original), "--in-place"])
    assert result.exit_code == 0, result.output
    text = original.read_text()
    for kept in (
        "# The shop, as deployed.",
        "# pinned by CI",
        "# keep it quiet",
        "x-base: &base",
        "worker: *base",
        "<<: *base",
        "user: '1000'",
    ):
        assert kept in text, f"{kept!r} was lost:\n{text}"
    assert text.index("worker:") < text.index("web:") < text.index("LOG_LEVEL") < text.index("DB_PASSWORD_FILE")
    assert "hunter2-horse" not in text
    compose = yaml.safe_load(text)
    assert compose["services"]["worker"] == {"image": "example/app", "restart": "always"}
    assert compose["services"]["web"]["environment"]["DB_PASSWORD_FILE"] == "/run/secrets/db_password"
