"""render: secret data -> file bytes. Env files are checked by sourcing them with the real /bin/sh."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from plugin.core.errors import SecretFormatError
from plugin.core.render import render_file, render_files
from plugin.core.spec import SecretFile, Source, parse_spec

SECRET_VALUE = "hunter2-do-not-leak"


def raw(field: str = "password") -> SecretFile:
    return SecretFile(name="pw", path="secret/data/web/db", field=field, format="raw")


def as_json() -> SecretFile:
    return SecretFile(name="db.json", path="secret/data/web/db", field=None, format="json")


def as_env() -> SecretFile:
    return SecretFile(name="db.env", path="secret/data/web/db", field=None, format="env")


def render_error(file: SecretFile, data: dict) -> str:
    with pytest.raises(SecretFormatError) as caught:
        render_file(file, data)
    return str(caught.value)


def source(env_file: Path, *keys: str) -> list[str]:
    """Source `env_file` with /bin/sh once per key and return each variable's value exactly."""
    values = []
    for key in keys:
        result = subprocess.run(
            ["/bin/sh", "-c", f'set -a; . "$1"; printf %s "${key}"', "sh", str(env_file)],
            capture_output=True,
            check=True,
            env={"PATH": "/usr/bin:/bin", "HOME": "/home-must-not-appear"},
        )
        assert result.stderr == b""
        values.append(result.stdout.decode())
    return values


# -- raw ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("s3cret", b"s3cret"),
        ("", b""),
        ("pässwörd ✓ 密码", "pässwörd ✓ 密码".encode()),
        ("line1\nline2\n", b"line1\nline2\n"),
        ("  padded\t", b"  padded\t"),
        (42, b"42"),
        (1.5, b"1.5"),
        (True, b"true"),
        (None, b"null"),
        ({"b": 1, "a": ["x", "é"]}, '{"a": ["x", "é"], "b": 1}'.encode()),
    ],
)
def test_raw_writes_the_field_exactly(value, expected):
    assert render_file(raw(), {"password": value, "other": "ignored"}) == expected


def test_raw_missing_field_lists_field_names_but_no_values():
    message = render_error(raw("password"), {"username": SECRET_VALUE, "api_key": SECRET_VALUE + "2"})

    assert "'password'" in message
    assert "api_key, username" in message
    assert "secret/data/web/db" in message
    assert SECRET_VALUE not in message


def test_raw_missing_field_of_empty_secret():
    assert "none" in render_error(raw("password"), {})


# -- json ---------------------------------------------------------------------------------------


def test_json_is_sorted_indented_and_newline_terminated():
    assert render_file(as_json(), {"b": 1, "a": "x"}) == b'{\n  "a": "x",\n  "b": 1\n}\n'


def test_json_round_trips():
    data = {"zeta": "ü'\"$`\n\\", "alpha": {"nested": [1, 2.5, None, True]}, "empty": ""}

    text = render_file(as_json(), data).decode("utf-8")

    assert json.loads(text) == data
    assert list(json.loads(text)) == ["alpha", "empty", "zeta"]
    assert "ü" in text


# -- env ----------------------------------------------------------------------------------------


TRICKY = [
    "plain",
    "it's",
    "''",
    "'\\''",
    'say "hi"',
    "$HOME",
    "${HOME}",
    "`id`",
    "$(id)",
    "a\nb",
    "trailing newline\n",
    "\n\n",
    "back\\slash\\n\\",
    "crlf\r\n",
    "tab\there",
    "üñí©ødé ✓ 密码",
    "",
    " leading and trailing ",
    "*",
    "~",
    "a;b&&c|d",
    "#not a comment",
]


@pytest.mark.parametrize("value", TRICKY)
def test_env_round_trips_through_sh(tmp_path, value):
    env_file = tmp_path / "secret.env"
    env_file.write_bytes(render_file(as_env(), {"A_BEFORE": "first", "VALUE": value, "Z_AFTER": "last"}))

    assert source(env_file, "A_BEFORE", "VALUE", "Z_AFTER") == ["first", value, "last"]


def test_env_all_tricky_values_in_one_file(tmp_path):
    data = {f"K{i}": value for i, value in enumerate(TRICKY)}
    env_file = tmp_path / "secret.env"
    env_file.write_bytes(render_file(as_env(), data))

    assert source(env_file, *data) == list(data.values())


def test_env_non_string_values_are_json(tmp_path):
    env_file = tmp_path / "secret.env"
    env_file.write_bytes(render_file(as_env(), {"N": 42, "OBJ": {"b": 1, "a": "it's"}, "NONE": None}))

    assert source(env_file, "N", "OBJ", "NONE") == ["42", '{"a": "it\'s", "b": 1}', "null"]


def test_env_lines_are_sorted_and_single_quoted():
    assert render_file(as_env(), {"B": "x", "A": "it's"}) == b"A='it'\\''s'\nB='x'\n"


@pytest.mark.parametrize("key", ["1A", "A-B", "a b", "", "A=B", "A\nB", "É", "$A"])
def test_env_refuses_keys_that_are_not_shell_names(key):
    message = render_error(as_env(), {"GOOD": "fine", key: SECRET_VALUE})

    assert repr(key) in message
    assert SECRET_VALUE not in message


def test_env_refuses_nul_in_value():
    message = render_error(as_env(), {"TOKEN": SECRET_VALUE + "\0tail"})

    assert "TOKEN" in message
    assert SECRET_VALUE not in message


# -- render_files -------------------------------------------------------------------------------


def test_render_files_renders_each_file_from_its_path():
    spec = parse_spec(
        {
            "role": "web",
            "secret.db_password": "secret/data/web/db#password",
            "secret.db_user": "secret/data/web/db#username",
            "secret.api.json": "secret/data/web/api",
            "secret.api.env": "secret/data/web/api",
            "format.api.env": "env",
        }
    )
    secrets = {
        Source("secret/data/web/db"): {"password": "pw", "username": "alice"},
        Source("secret/data/web/api"): {"KEY": "k"},
    }

    assert render_files(spec, secrets) == {
        "db_password": b"pw",
        "db_user": b"alice",
        "api.json": b'{\n  "KEY": "k"\n}\n',
        "api.env": b"KEY='k'\n",
    }


def test_render_files_fails_if_any_field_is_missing():
    spec = parse_spec({"role": "web", "secret.a": "kv/web#a", "secret.b": "kv/web#b"})

    with pytest.raises(SecretFormatError, match="'b'"):
        render_files(spec, {Source("kv/web"): {"a": SECRET_VALUE}})


PKI = {
    "certificate": "-----BEGIN CERTIFICATE-----\nLEAF\n-----END CERTIFICATE-----",
    "issuing_ca": "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----",
    "ca_chain": ["-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n"],
    "private_key": "-----BEGIN RSA PRIVATE KEY-----\nKEY\n-----END RSA PRIVATE KEY-----",
}


def test_pem_is_certificate_then_chain_and_the_key_stays_in_its_own_file():
    spec = parse_spec(
        {
            "role": "web",
            "secret.tls.crt": "pki/issue/web?common_name=web.internal",
            "format.tls.crt": "pem",
            "secret.tls.key": "pki/issue/web?common_name=web.internal#private_key",
        }
    )
    files = render_files(spec, {spec.sources[0]: PKI})
    assert files["tls.crt"] == (PKI["certificate"] + "\n" + PKI["ca_chain"][0]).encode()
    assert b"PRIVATE KEY" not in files["tls.crt"]
    assert files["tls.key"] == PKI["private_key"].encode()
    without_chain = {k: v for k, v in PKI.items() if k != "ca_chain"}
    assert render_files(spec, {spec.sources[0]: without_chain})["tls.crt"].count(b"BEGIN CERTIFICATE") == 2


def test_pem_without_a_certificate_is_refused():
    spec = parse_spec({"role": "web", "secret.c": "kv/web", "format.c": "pem"})
    with pytest.raises(SecretFormatError, match="no certificate"):
        render_files(spec, {spec.sources[0]: {"password": SECRET_VALUE}})


def test_template_renders_several_sources_and_only_can_limit_the_files():
    spec = parse_spec(
        {
            "role": "web",
            "template.dsn": 'postgresql://{{ secret("database/creds/app").username }}:'
            '{{ secret("database/creds/app").password }}@db/{{ secret("kv/web").name }}',
            "secret.other": "kv/web#name",
        }
    )
    db, kv = Source("database/creds/app"), Source("kv/web")
    secrets = {db: {"username": "u1", "password": "p1"}, kv: {"name": "app"}}
    assert render_files(spec, secrets) == {"dsn": b"postgresql://u1:p1@db/app", "other": b"app"}
    assert render_files(spec, secrets, only={db}) == {"dsn": b"postgresql://u1:p1@db/app"}


def test_template_errors_name_the_file_and_not_the_value():
    spec = parse_spec({"role": "web", "template.t": '{{ secret("kv/web").passwrd }}'})
    with pytest.raises(SecretFormatError, match="template t: 'dict object' has no attribute 'passwrd'") as caught:
        render_files(spec, {spec.sources[0]: {"password": SECRET_VALUE}})
    assert SECRET_VALUE not in str(caught.value)
    spec = parse_spec({"role": "web", "template.t": '{{ secret("kv/web").password + 1 }}'})
    with pytest.raises(SecretFormatError, match="TypeError") as caught:
        render_files(spec, {spec.sources[0]: {"password": SECRET_VALUE}})
    assert SECRET_VALUE not in str(caught.value)


def test_template_cannot_reach_python_internals():
    spec = parse_spec({"role": "web", "template.t": '{{ secret("kv/web").__class__.__mro__ }}'})
    with pytest.raises(SecretFormatError, match="SecurityError"):
        render_files(spec, {spec.sources[0]: {}})


def test_a_template_cannot_change_what_other_files_are_rendered_from():
    spec = parse_spec(
        {
            "role": "web",
            "template.a": '{{ secret("kv/web").update({"password": "x"}) }}',
            "secret.b": "kv/web#password",
        }
    )
    data = {"password": SECRET_VALUE}
    with pytest.raises(SecretFormatError, match="template a: SecurityError: .*unsafe"):
        render_files(spec, {spec.sources[0]: data})
    assert render_files(spec, {spec.sources[0]: data}, only=set()) == {} and data == {"password": SECRET_VALUE}
    assert render_file(spec.files[1], data) == SECRET_VALUE.encode()


@pytest.mark.parametrize(
    "template, bound",
    [
        (
            "{% for a in 'x' * 1000000 %}{% for b in 'x' * 1000000 %}{% endfor %}{% endfor %}",
            "did not finish within 2s",
        ),
        ("{{ 'x' * 1000000000 }}", "used more than 256 MiB of memory.*"),
        ("{{ 'x' * 20000000 }}", "produced more than 16777216 bytes"),
    ],
)
def test_a_runaway_template_is_stopped_at_its_bound(template, bound):
    spec = parse_spec({"role": "web", "template.t": template})
    started = time.monotonic()
    with pytest.raises(SecretFormatError, match=f"template t: {bound}; a template gets 2s"):
        render_files(spec, {})
    assert time.monotonic() - started < 3


def test_runaway_templates_do_not_stop_other_work():
    """Renders run in child processes: while four runaways burn their 2 s, this thread goes on."""
    import threading

    spec = parse_spec({"role": "web", "template.t": "{% for a in 'x' * 100000000 %}{% endfor %}"})
    errors: list[Exception] = []

    def runaway() -> None:
        try:
            render_files(spec, {})
        except SecretFormatError as e:
            errors.append(e)

    threads = [threading.Thread(target=runaway) for _ in range(6)]
    for thread in threads:
        thread.start()
    started, ticks = time.monotonic(), 0
    while any(thread.is_alive() for thread in threads):
        time.sleep(0.01)
        ticks += 1
    assert len(errors) == 6 and all("2s" in str(e) or "no renderer was free" in str(e) for e in errors)
    # Generous: the children run at the lowest priority, so the waits above overrun by far less than this.
    assert ticks > 0.25 * (time.monotonic() - started) / 0.01, "the calling process stayed responsive"
