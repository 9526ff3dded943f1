"""Dynamic PostgreSQL credentials on an OpenBao/Vault dev server: the database secrets engine.

Only plain connection facts go in (host, port, superuser name and password), so devenv needs
nothing from tests; tests/support/postgres.py provides a throwaway cluster that has them.
"""

from __future__ import annotations

import hvac
from hvac.exceptions import InvalidPath

PLUGIN_NAME = "postgresql-database-plugin"
CONNECTION = "postgres"
DATABASE = "postgres"

CREATION_STATEMENTS = [
    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
    f'GRANT CONNECT ON DATABASE "{DATABASE}" TO "{{{{name}}}}";',
]
REVOCATION_STATEMENTS = [
    # End the role's sessions first: DROP ROLE does not, and a live session would keep it usable.
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';",
    # DROP ROLE fails while the role still holds privileges.
    f'REVOKE ALL PRIVILEGES ON DATABASE "{DATABASE}" FROM "{{{{name}}}}";',
    'DROP ROLE IF EXISTS "{{name}}";',
]


def configure_database_engine(
    root: hvac.Client,
    host: str,
    port: int,
    user: str,
    password: str,
    *,
    mount: str = "database",
    role: str = "app",
    default_ttl: str = "1h",
    max_ttl: str = "24h",
    policy_role: str = "web",
) -> None:
    """Enable the database engine at `mount` (if needed), connect it to PostgreSQL at host:port as
    superuser `user`, create the dynamic role `role`, and let policy `policy_role` read
    `<mount>/creds/<role>`. Idempotent: running it again rewrites the same configuration."""
    if f"{mount}/" not in root.sys.list_mounted_secrets_engines()["data"]:
        root.sys.enable_secrets_engine("database", path=mount)
    root.write_data(
        f"{mount}/config/{CONNECTION}",
        data={
            "plugin_name": PLUGIN_NAME,
            "connection_url": f"postgresql://{{{{username}}}}:{{{{password}}}}@{host}:{port}/{DATABASE}?sslmode=disable",
            "username": user,
            "password": password,
            "allowed_roles": [role],
            "verify_connection": True,
        },
    )
    root.write_data(
        f"{mount}/roles/{role}",
        data={
            "db_name": CONNECTION,
            "creation_statements": CREATION_STATEMENTS,
            "revocation_statements": REVOCATION_STATEMENTS,
            "default_ttl": default_ttl,
            "max_ttl": max_ttl,
        },
    )
    _grant_read(root, policy_role, f"{mount}/creds/{role}")


def _grant_read(root: hvac.Client, policy: str, path: str) -> None:
    """Append `path "<path>" { capabilities = ["read"] }` to `policy` unless it already names the path."""
    try:
        rules = root.sys.read_policy(policy)["data"]["rules"]
    except InvalidPath:
        rules = ""
    if f'path "{path}"' in rules:
        return
    if rules and not rules.endswith("\n"):
        rules += "\n"
    root.sys.create_or_update_policy(policy, rules + f'path "{path}" {{ capabilities = ["read"] }}\n')
