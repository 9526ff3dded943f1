"""secret_detect: which compose environment entries look like secrets, by name and by value."""

from __future__ import annotations

import pytest

from plugin.ops.secret_detect import classify, entropy, interpolations, looks_random

# (name, value, the reason expected, or None for "not a secret")
CASES = [
    # names
    ("DB_PASSWORD", "hunter2", "name contains PASSWORD"),
    ("POSTGRES_PASSWORD", "postgres", "name contains PASSWORD"),
    ("MYSQL_ROOT_PASSWD", "x", "name contains PASSWORD"),
    ("SMTP_PASS", "mail-pass", "name contains PASSWORD"),
    ("GPG_PASSPHRASE", "long phrase here", "name contains PASSWORD"),
    ("DJANGO_SECRET_KEY", "django-insecure-abc", "name contains SECRET"),
    ("client-secret", "abc", "name contains SECRET"),
    ("GITHUB_TOKEN", "abc", "name contains TOKEN"),
    ("ACCESSTOKEN", "abc", "name contains TOKEN"),
    ("TOKEN_SECRET", "abc", "name contains SECRET"),
    ("MAPS_API_KEY", "abc", "name contains API_KEY"),
    ("SENDGRID_APIKEY", "abc", "name contains API_KEY"),
    ("JWT_PRIVATE_KEY", "abc", "name contains PRIVATE_KEY"),
    ("GOOGLE_APPLICATION_CREDENTIALS_JSON", "{}", "name contains CREDENTIAL"),
    ("MINIO_ACCESS_KEY", "minio", "name contains ACCESS_KEY"),
    ("BASIC_AUTH", "user:pass", "name contains AUTH"),
    ("REDIS_AUTH", "s3cret", "name contains AUTH"),
    ("AUTHORIZATION", "Basic dXNlcjpwYXNz", "name contains AUTH"),
    # names that configure a secret, or hold a trivial value
    ("TOKENIZER", "bert-base", None),
    ("AUTHOR", "Jane", None),
    ("AUTH_MODE", "oauth", None),
    ("AUTH_PROVIDER", "github", None),
    ("REQUIRE_AUTH", "true", None),
    ("PASSWORD_AUTH_ENABLED", "yes", None),
    ("SECRET_KEY_FILE", "/run/secrets/secret_key", None),
    ("SECRETS_DIR", "/run/secrets", None),
    ("TOKEN_TTL", "3600", None),
    ("TOKEN_URL", "https://auth.example.test/token", None),
    ("PASSWORD_MIN_LENGTH", "12", None),
    ("DB_PASSWORD", "", None),
    # connection strings
    ("DATABASE_URL", "postgres://app:pw@db:5432/app", "connection string with credentials"),
    ("DATABASE_URL", "postgres://app@db:5432/app", "connection string with credentials"),
    ("SENTRY_DSN", "https://abc123@o1.ingest.sentry.io/1", "connection string with credentials"),
    ("DATABASE_URL", "postgres://db:5432/app", None),
    ("DATABASE_URL", None, "connection string, likely with credentials"),
    ("CACHE_URL", "redis://:s3cret@cache:6379/0", "value is a URL with a password"),
    ("UPSTREAM", "https://user:pw@proxy.example.test:3128", "value is a URL with a password"),
    ("UPSTREAM", "https://proxy.example.test:3128/path?user=x", None),
    ("BROKER", "amqp://guest@rabbit//", None),
    # values
    ("TLS_KEY", "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----", "value is a PEM block"),
    ("SIGNING", "-----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----", "value is a PEM block"),
    ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE", "value looks like an AWS access key id"),
    ("GH", "ghp_" + "a1B2" * 9, "value looks like a GitHub token"),
    ("GH", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "value looks like a GitHub token"),
    ("SLACK", "xoxb-123456789012-1234567890123-abcdefghij", "value looks like a Slack token"),
    ("STRIPE", "sk_live_4eC39HqLyjWDarjtT1zdp7dc", "value looks like a Stripe key"),
    ("GL", "glpat-abcdefghijklmnopqrst", "value looks like a GitLab token"),
    ("GOOGLE", "AIza" + "SyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6q", "value looks like a Google API key"),
    ("VAULT", "hvs.CAESIJ3pB8kY3c1dWc7k0eXz0aGk1ZzR1bGx5c2VjcmV0", "value looks like a Vault token"),
    (
        "BEARER",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "value looks like a JWT",
    ),
    ("SESSION_SALT", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "value is a long random-looking string"),
    ("X", "5f4dcc3b5aa765d61d8327deb882cf99", "value is a long random-looking string"),
    ("X", "Zx8kQ2pL7vN4rT1wY6bM3cF9", "value is a long random-looking string"),
    # ordinary configuration values
    ("LOG_LEVEL", "debug", None),
    ("TZ", "Europe/Amsterdam", None),
    ("LANG", "en_US.UTF-8", None),
    ("IMAGE", "ghcr.io/org/image:1.2.3", None),
    ("VERSION", "v1.2.3-rc.4+build.20240101", None),
    ("APP_NAME", "AppName_Release_2024_Build_15", None),
    ("MAIN_CLASS", "com.example.service.MainApplication", None),
    ("DATA_DIR", "/var/lib/app/data/0123456789abcdefABCDEF", None),
    ("REQUEST_ID", "550e8400-e29b-41d4-a716-446655440000", None),
    ("OBJECT_ID", "507f1f77bcf86cd799439011", None),
    ("JAVA_OPTS", "-Xmx512m -Xms256m -Dfile.encoding=UTF-8", None),
    ("API_ENDPOINT", "https://api.example.test/v1", None),
    ("PORT", "8080", None),
]


@pytest.mark.parametrize(("name", "value", "expected"), CASES, ids=[f"{n}={str(v)[:24]}" for n, v, _ in CASES])
def test_classify(name, value, expected):
    assert classify(name, value) == expected


@pytest.mark.parametrize("reason", [r for _, _, r in CASES if r])
def test_reasons_never_contain_the_value(reason):
    values = [str(v) for _, v, _ in CASES if v]
    assert not any(v in reason for v in values if len(v) > 4)


@pytest.mark.parametrize(
    ("value", "names"),
    [
        ("${DB_PASSWORD}", ("DB_PASSWORD",)),
        ("$DB_PASSWORD", ("DB_PASSWORD",)),
        ("${DB_PASSWORD:-changeme}", ("DB_PASSWORD",)),
        ("${DB_PASSWORD:?set it}", ("DB_PASSWORD",)),
        ("postgres://app:${PW}@db/${DB}", ("PW", "DB")),
        ("pa$$word", ()),  # `$$` is a literal `$`
        ("$${NOT_A_VAR}", ()),
        ("cost: 5$", ()),
        ("plain", ()),
    ],
)
def test_interpolations(value, names):
    assert interpolations(value) == names


def test_entropy():
    assert entropy("aaaa") == 0
    assert entropy("abcd") == 2
    assert entropy("0123456789abcdef") == 4


@pytest.mark.parametrize(
    "value", ["0" * 40, "abababababababababababababababab", "short1A", "/run/secrets/abcdefGHIJ1234567"]
)
def test_looks_random_refuses_low_entropy_short_and_paths(value):
    assert not looks_random(value)
