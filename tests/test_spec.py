"""spec.parse_spec: volume options -> a validated Spec, or an InvalidOptionError naming the bad option."""

from __future__ import annotations

import pytest

from plugin.core.errors import InvalidOptionError
from plugin.core.spec import (
    DEFAULT_MODE,
    DEFAULT_SIZE,
    DEFAULT_TTL,
    MAX_FILES,
    SecretFile,
    Source,
    Spec,
    parse_spec,
)

VALID = {"role": "web", "secret.db_password": "secret/data/web/db#password"}
HUGE = 10_000


def options(**changes: object) -> dict[str, object]:
    """VALID with `changes` applied; a value of None removes the option. Keys use `__` for `.`."""
    result: dict[str, object] = dict(VALID)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def refusal(opts: dict) -> str:
    with pytest.raises(InvalidOptionError) as caught:
        parse_spec(opts)
    return str(caught.value)


# -- accepted -----------------------------------------------------------------------------------


def test_full_example_gives_every_field():
    spec = parse_spec(
        {
            "role": "web.api-1",
            "ttl": "15m",
            "uid": "1000",
            "gid": "2000",
            "mode": "0440",
            "size": "512k",
            "secret.db_password": "secret/data/web/db#password",
            "secret.db_user": "secret/data/web/db#username",
            "secret.api.json": "/secret/data/web/api/",
            "secret.app.env": "kv/web/app",
            "secret.tls-key": "pki/issue/web#private_key",
            "format.app.env": "env",
            "format.api.json": "json",
            "format.db_user": "raw",
        }
    )

    assert spec == Spec(
        role="web.api-1",
        files=(
            SecretFile("db_password", "secret/data/web/db", "password", "raw"),
            SecretFile("db_user", "secret/data/web/db", "username", "raw"),
            SecretFile("api.json", "secret/data/web/api", None, "json"),
            SecretFile("app.env", "kv/web/app", None, "env"),
            SecretFile("tls-key", "pki/issue/web", "private_key", "raw"),
        ),
        ttl=900,
        uid=1000,
        gid=2000,
        mode=0o440,
        size=512 * 1024,
    )


def test_sources_are_distinct_in_first_use_order():
    spec = parse_spec(
        {
            "role": "web",
            "secret.c": "kv/c#x",
            "secret.a1": "kv/a#x",
            "secret.c2": "kv/c#y",
            "secret.b": "kv/b#x",
            "secret.a2": "kv/a#y",
        }
    )

    assert [str(s) for s in spec.sources] == ["kv/c", "kv/a", "kv/b"]


def test_sources_with_parameters_and_templates_share_requests():
    spec = parse_spec(
        {
            "role": "web",
            "secret.cert": "pki/issue/web?common_name=web.internal&ttl=24h",
            "format.cert": "pem",
            "secret.key": "pki/issue/web?common_name=web.internal&ttl=24h#private_key",
            "secret.user": "database/creds/app#username",
            "template.dsn": 'postgresql://{{ secret("database/creds/app").username }}@db/app',
            "refresh": "0",
            "rotate-grace": "2m",
            "notify": "hup",
        }
    )
    assert [str(s) for s in spec.sources] == [
        "database/creds/app",
        "pki/issue/web?common_name=web.internal&ttl=24h",
    ]
    assert spec.sources[1] == Source("pki/issue/web", (("common_name", "web.internal"), ("ttl", "24h")))
    dsn = next(f for f in spec.files if f.name == "dsn")
    assert dsn.format == "template" and dsn.refs == (("database/creds/app", Source("database/creds/app")),)
    assert (spec.refresh, spec.rotate_grace, spec.notify) == (0, 120, "SIGHUP")


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"secret.x": "pki/issue/web?common_name"}, "key=value pairs"),
        ({"secret.x": "pki/issue/web?a b=c#f"}, "forbidden character"),
        ({"template.x": "{{ secret(path) }}"}, "one quoted Vault path"),
        ({"template.x": "{{ range(3) }}"}, "unknown name 'range'"),
        ({"template.x": '{{ secret("kv/a#f") }}'}, "not #field"),
        ({"template.x": "{% if %}"}, "syntax error on line 1"),
        ({"template.x": "a", "secret.x": "kv/a#b"}, "keep one"),
        ({"secret.x": "kv/a#b", "notify": "KILL"}, "option notify='KILL'"),
        ({"secret.x": "kv/a#b", "refresh": "soon"}, "option refresh='soon'"),
        ({"secret.x": "kv/a#b", "format.x": "pem"}, "format pem renders the whole secret"),
    ],
)
def test_lease_and_template_options_are_validated(options, expected):
    assert expected in refusal({"role": "web", **options})


def test_defaults():
    spec = parse_spec({"role": "web", "secret.pw": "kv/web#password", "secret.all": "kv/web"})

    assert (spec.ttl, spec.uid, spec.gid, spec.mode, spec.size) == (3600, 0, 0, 0o400, 1 << 20)
    assert (DEFAULT_TTL, DEFAULT_MODE, DEFAULT_SIZE) == (3600, 0o400, 1 << 20)
    assert [(f.name, f.format) for f in spec.files] == [("pw", "raw"), ("all", "json")]


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("15m", 900),
        ("1h30m", 5400),
        ("2d", 172800),
        ("5s", 5),
        ("768h", 768 * 3600),
        ("32d", 768 * 3600),
    ],
)
def test_ttl_durations(raw, seconds):
    assert parse_spec(options(ttl=raw)).ttl == seconds


@pytest.mark.parametrize(
    ("key", "raw", "value"),
    [
        ("uid", "0", 0),
        ("uid", "1000", 1000),
        ("uid", "4294967294", 2**32 - 2),
        ("gid", "0", 0),
        ("gid", "65534", 65534),
        ("gid", "4294967294", 2**32 - 2),
    ],
)
def test_ids(key, raw, value):
    assert getattr(parse_spec(options(**{key: raw})), key) == value


@pytest.mark.parametrize(("raw", "mode"), [("0400", 0o400), ("0440", 0o440), ("666", 0o666), ("600", 0o600)])
def test_modes(raw, mode):
    assert parse_spec(options(mode=raw)).mode == mode


@pytest.mark.parametrize(
    ("raw", "size"),
    [("512k", 512 << 10), ("1m", 1 << 20), ("4096", 4096), ("4K", 4096), ("2M", 2 << 20), ("16m", 16 << 20)],
)
def test_sizes(raw, size):
    assert parse_spec(options(size=raw)).size == size


def test_64_files_and_128_character_names_are_accepted():
    opts = {"role": "web", **{f"secret.f{i}": f"kv/app#k{i}" for i in range(MAX_FILES - 1)}}
    opts["secret." + "n" * 128] = "kv/app#long"

    spec = parse_spec(opts)

    assert len(spec.files) == 64
    assert spec.files[-1].name == "n" * 128


def test_none_options_is_refused_for_missing_role():
    assert "role" in refusal(None)


# -- refused: every message names the offending option -----------------------------------------


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"colour": "red"}, "colour"),
        ({"Role": "web"}, "Role"),
        ({"secrets.x": "kv/a#b"}, "secrets.x"),
        ({"role": None}, "role"),
        ({"role": ""}, "role"),
        ({"secret__db_password": None}, "secret."),
        ({"format__ghost": "raw"}, "format.'ghost'"),
        ({"format__db_password": "yaml"}, "format.db_password"),
        ({"format__db_password": ""}, "format.db_password"),
        ({"secret__db_password": "kv/web/db", "format__db_password": "raw"}, "secret.db_password"),
        ({"format__db_password": "json"}, "secret.db_password"),
        ({"format__db_password": "env"}, "secret.db_password"),
        ({"secret__db_password": "kv/web/db#"}, "secret.db_password"),
        ({"secret__db_password": "kv/web/db#a/b"}, "secret.db_password"),
        ({"secret__db_password": "kv/web/db#a\nb"}, "secret.db_password"),
        ({"secret__db_password": "kv/web/db#a\x00b"}, "secret.db_password"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_refusals_name_the_option(changes, named):
    assert named in refusal(options(**changes))


@pytest.mark.parametrize("key", ["token", "vault-token", "vault_token", "VAULT_TOKEN"])
def test_plain_token_options_are_refused_without_echoing_the_token(key):
    message = refusal({**VALID, key: "hvs.PLAIN-TOKEN-VALUE"})

    assert f"option {key} is refused" in message
    assert "PLAIN-TOKEN-VALUE" not in message


@pytest.mark.parametrize(
    "role",
    ["web/admin", "../web", ".web", "-web", "web app", "wéb", "web\x00", "web\n", "r" * 129],
)
def test_bad_role_names(role):
    assert "role=" in refusal(options(role=role))


@pytest.mark.parametrize(
    "name",
    ["a/b", "..", ".", ".env", "-x", "a\x00b", "pässwort", "пароль", "a b", " a", "", "x" * 129],
)
def test_bad_file_names(name):
    message = refusal({**VALID, f"secret.{name}": "kv/web#password"})

    assert "secret." + repr(name)[:40] in message
    assert "\x00" not in message


@pytest.mark.parametrize(
    "source",
    [
        "secret",
        "secret#password",
        "#password",
        "",
        "/",
        "secret/../db#password",
        "secret/./db#password",
        "secret//db#password",
        "secret/data/web db#password",
        "secret/data/web\x00#password",
        "secret/data/.hidden#password",
        "secret/data/wéb#password",
    ],
)
def test_bad_vault_paths(source):
    assert "secret.db_password" in refusal(options(secret__db_password=source))


@pytest.mark.parametrize(
    "ttl",
    ["1x", "", "4s", "0", "0s", "769h", "33d", "-5s", "1.5h", "1h 30m", " 90", "h", "90S", "\u0661\u0662\u0660s"],
)
def test_bad_ttls(ttl):
    assert "ttl=" in refusal(options(ttl=ttl))


@pytest.mark.parametrize("key", ["uid", "gid"])
@pytest.mark.parametrize("raw", ["-1", "abc", "1.0", "", " 1", "+1", "4294967295", "99999999999", "\u0661"])
def test_bad_ids(key, raw):
    assert f"{key}=" in refusal(options(**{key: raw}))


@pytest.mark.parametrize(
    "mode", ["0888", "0200", "0000", "0040", "04400", "0o400", "rw", "", "400 ", "4755", "0500", "0777", "0441"]
)
def test_bad_modes(mode):
    assert "mode=" in refusal(options(mode=mode))


@pytest.mark.parametrize(
    "size", ["1k", "4095", "17m", "16385k", "1g", "", "1.5m", "-1m", "m", "\u0661\u0660\u0662\u0664\u0660"]
)
def test_bad_sizes(size):
    assert "size=" in refusal(options(size=size))


@pytest.mark.parametrize("key", ["ttl", "uid", "gid", "size"])
def test_huge_numbers_are_refused_as_invalid_option(key):
    assert f"{key}=" in refusal(options(**{key: "9" * 5000}))


def test_more_than_64_files():
    opts = {"role": "web", **{f"secret.f{i}": f"kv/app#k{i}" for i in range(MAX_FILES + 1)}}

    assert "secret." in refusal(opts)


@pytest.mark.parametrize(
    ("key", "value"),
    [("uid", 1000), ("ttl", 3600), ("size", None), ("secret.db_password", b"kv/web#password"), ("role", ["web"])],
)
def test_non_string_values_are_refused(key, value):
    assert f"option {key!r} must be a string" in refusal({**VALID, key: value})


def test_non_string_value_refusal_names_the_option():
    assert "uid" in refusal({**VALID, "uid": 1000})


# -- messages stay bounded ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"x" * HUGE: "1"},
        {"role": "r" * HUGE},
        {"role": "bad role " * (HUGE // 9)},
        {"ttl": "x" * HUGE},
        {"uid": "x" * HUGE},
        {"mode": "7" * HUGE},
        {"size": "x" * HUGE},
        {"secret." + "n" * HUGE: "kv/web#password"},
        {"secret.db_password": "bad path " * (HUGE // 9)},
        {"secret.db_password": "kv/web#" + "/" * HUGE},
        {"format.db_password": "f" * HUGE},
        {"format." + "g" * HUGE: "raw"},
        {"secret.db_password": "kv/web#" + "F" * HUGE, "format.db_password": "json"},
        {"secret.db_password": "kv/" * (HUGE // 3) + "web", "format.db_password": "raw"},
    ],
    ids=lambda changes: ",".join(f"{k[:16]}={str(v)[:12]}" for k, v in changes.items()),
)
def test_messages_do_not_echo_a_10k_value(changes):
    message = refusal({**VALID, **changes})

    assert len(message) < 500


def test_messages_escape_control_characters_of_a_field():
    message = refusal(options(secret__db_password="kv/web#\x1b[2Jfield", format__db_password="env"))

    assert "\x1b" not in message


@pytest.mark.parametrize(
    "source",
    [
        "auth/token/lookup-self#id",
        "auth/token/lookup?token=x#id",
        "auth/token/create/web?ttl=1h",
        "auth/approle/login?role_id=a&secret_id=b",
        "sys/wrapping/unwrap?token=x",
        "team-a/auth/token/lookup-self#id",
    ],
)
def test_sources_that_answer_with_a_token_are_refused_with_the_way_to_give_one(source):
    with pytest.raises(InvalidOptionError, match="answers with a Vault token .* use token-file=<name>"):
        parse_spec({"role": "web", "secret.me": source})
    with pytest.raises(InvalidOptionError, match="answers with a Vault token"):
        parse_spec({"role": "web", "template.me": f'{{{{ secret("{source.split("#")[0]}") }}}}'})


@pytest.mark.parametrize("source", ["secret/data/web/auth#token", "database/creds/token", "kv/sys/config#x"])
def test_secrets_merely_named_like_token_endpoints_are_accepted(source):
    assert parse_spec({"role": "web", "secret.x": source}).files[0].path == source.split("#")[0]


@pytest.mark.parametrize("raw", ["1h1h", "30m1h", "1s1m", "2d2d"])
def test_durations_with_repeated_or_unordered_units_are_refused(raw):
    with pytest.raises(InvalidOptionError, match=f"option ttl='{raw}'"):
        parse_spec({"role": "web", "secret.x": "kv/a#b", "ttl": raw})
    assert parse_spec({"role": "web", "secret.x": "kv/a#b", "ttl": "1d2h3m4s"}).ttl == 86400 + 7200 + 184


@pytest.mark.parametrize("raw", ["1s", "4", "4s"])
def test_a_refresh_below_the_minimum_is_refused(raw):
    with pytest.raises(InvalidOptionError, match=f"option refresh='{raw}': expected .*at least 5s"):
        parse_spec({"role": "web", "secret.x": "kv/a#b", "refresh": raw})
    assert parse_spec({"role": "web", "secret.x": "kv/a#b", "refresh": "0"}).refresh == 0
    assert parse_spec({"role": "web", "secret.x": "kv/a#b", "refresh": "5s"}).refresh == 5
