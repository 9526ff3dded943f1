"""Volume options (`docker volume create -o`, compose `driver_opts`) -> a validated `Spec`.

Pure: no I/O. Everything a user can get wrong is caught here, at Create, with a message naming the
option and the accepted forms, so that Mount only fails for reasons that lie in Vault.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Literal

from plugin.core.errors import InvalidOptionError
from plugin.core.template import template_sources

Format = Literal["raw", "json", "env", "pem", "template"]
FORMATS: tuple[Format, ...] = ("raw", "json", "env", "pem")

DEFAULT_TTL = 3600
MIN_TTL = 5
MAX_TTL = 768 * 3600
DEFAULT_SIZE = 1 << 20
MAX_SIZE = 16 << 20
MIN_SIZE = 4 << 10
DEFAULT_MODE = 0o400
MAX_FILES = 64
MAX_ID = 2**32 - 2

# A file name is one conservative path component: no separators, no NUL, no leading dot (so no
# `.`, `..` or hidden files), nothing a shell or a path join could reinterpret.
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_ROLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@:+=-]{0,254}")
_DURATION_PART = re.compile(r"([0-9]{1,9})([smhd])")
_SIZE = re.compile(r"([0-9]{1,12})([kKmM]?)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

SCALAR_OPTIONS = (
    "role",
    "wrapped-token",
    "role-id",
    "approle-mount",
    "token-file",
    "ttl",
    "uid",
    "gid",
    "mode",
    "size",
    "refresh",
    "rotate-grace",
    "notify",
)
DEFAULT_REFRESH = 300
MIN_REFRESH = 5
DEFAULT_ROTATE_GRACE = 60
SIGNALS = ("SIGHUP", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGTERM", "SIGQUIT", "SIGWINCH")
_PARAM_KEY = re.compile(r"[A-Za-z0-9_.-]{1,128}")
TOKEN_FILE_WRAP_TTL = 300
_WRAPPING_TOKEN = re.compile(r"[A-Za-z0-9._:+/=-]{1,1024}")
FILE_OPTION_PREFIXES = ("secret.", "format.", "template.")
# Names under which users try to hand over a plain token; refused with an explanation, not as "unknown".
TOKEN_OPTIONS = ("token", "vault-token", "vault_token", "VAULT_TOKEN")


@dataclasses.dataclass(frozen=True)
class Source:
    """One Vault request: a read of `path`, or (with `params`) a write of them to it, as for
    `database/creds/app` or `pki/issue/web?common_name=web.internal`. Files naming the same source
    share one request, one response and one lease."""

    path: str
    params: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return self.path + ("?" + urllib.parse.urlencode(self.params) if self.params else "")


@dataclasses.dataclass(frozen=True)
class SecretFile:
    """One file of the volume: `field` of the secret at `path` (all of it if None), or a template.

    Template files have `format` "template", their text in `template`, and in `refs` each literal
    `secret()` argument with the source it names.
    """

    name: str
    path: str
    field: str | None
    format: Format
    params: tuple[tuple[str, str], ...] = ()
    template: str | None = None
    refs: tuple[tuple[str, Source], ...] = ()

    @property
    def sources(self) -> tuple[Source, ...]:
        return (
            tuple(source for _, source in self.refs) if self.template is not None else (Source(self.path, self.params),)
        )


@dataclasses.dataclass(frozen=True)
class Spec:
    """A volume's validated configuration: where secrets live, how to render them, whose tokens read them.

    Tokens are minted from token role `role`, or from the credential unwrapped from `wrapped_token` at
    Create (an AppRole SecretID when `role_id` is set). `wrapped_token` is single-use material only.
    """

    role: str | None
    files: tuple[SecretFile, ...]
    wrapped_token: str | None = dataclasses.field(default=None, repr=False)
    role_id: str | None = None
    approle_mount: str = "approle"
    token_file: str | None = None
    ttl: int = DEFAULT_TTL
    uid: int = 0
    gid: int = 0
    mode: int = DEFAULT_MODE
    size: int = DEFAULT_SIZE
    refresh: int = DEFAULT_REFRESH
    rotate_grace: int = DEFAULT_ROTATE_GRACE
    notify: str | None = None

    @property
    def sources(self) -> tuple[Source, ...]:
        """Distinct sources in first-use order: each is requested once per mount however many files use it."""
        return tuple(dict.fromkeys(s for f in self.files for s in f.sources))


def parse_spec(options: Mapping[str, str] | None) -> Spec:
    """Validate `options` and return the `Spec`. Raises `InvalidOptionError` naming the first bad option."""
    options = dict(options or {})
    for key, value in options.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidOptionError(
                f'option {_show(str(key))} must be a string (in compose, quote values such as mode: "0440")'
            )
        if key in TOKEN_OPTIONS:
            raise InvalidOptionError(
                f"option {key} is refused: volume options are shown to anyone with Docker API access "
                "(docker volume inspect), so a Vault token must never be one; use role=<token role> instead"
            )
        if key not in SCALAR_OPTIONS and not key.startswith(FILE_OPTION_PREFIXES):
            raise InvalidOptionError(
                f"unknown option {_show(key)}: accepted options are role, wrapped-token, role-id, approle-mount, "
                "token-file, ttl, uid, gid, mode, size, refresh, rotate-grace, notify, "
                "secret.<file>=<vault path>[?params][#field], format.<file>=raw|json|env|pem and template.<file>"
            )
    role, wrapped_token = options.get("role"), options.get("wrapped-token")
    if role is None and wrapped_token is None:
        raise InvalidOptionError(
            "missing option role: give the Vault token role to mint per-container tokens from, e.g. -o role=web "
            "(or -o wrapped-token=<single-use wrapping token>)"
        )
    if role is not None and wrapped_token is not None:
        raise InvalidOptionError("give role= or wrapped-token=, not both: each says where container tokens come from")
    if role is not None and not _ROLE_NAME.fullmatch(role):
        raise InvalidOptionError(
            f"option role={_show(role)} is not a valid token role name (letters, digits, '.', '_', '-')"
        )
    if wrapped_token is not None and not _WRAPPING_TOKEN.fullmatch(wrapped_token):
        raise InvalidOptionError(
            "option wrapped-token is not a Vault wrapping token (give the token itself, e.g. from -wrap-ttl=5m)"
        )
    for key in ("role-id", "approle-mount"):
        if key in options and wrapped_token is None:
            raise InvalidOptionError(f"option {key} only applies with wrapped-token= (a wrapped AppRole SecretID)")
        if key in options and not _ROLE_NAME.fullmatch(options[key]):
            raise InvalidOptionError(f"option {key}={_show(options[key])}: expected letters, digits, '.', '_' or '-'")
    token_file = options.get("token-file")
    files = _parse_files(options, allow_none=token_file is not None)
    if token_file is not None:
        if not _FILE_NAME.fullmatch(token_file):
            raise InvalidOptionError(
                f"option token-file={_show(token_file)}: the file name must be one path component "
                "of letters, digits, '.', '_' or '-', not starting with '.'"
            )
        if token_file in {f.name for f in files}:
            raise InvalidOptionError(f"option token-file={token_file} names the same file as secret.{token_file}")
    return Spec(
        role=role,
        files=files,
        wrapped_token=wrapped_token,
        role_id=options.get("role-id"),
        approle_mount=options.get("approle-mount", "approle"),
        token_file=token_file,
        ttl=_parse_bounded(
            "ttl",
            options.get("ttl"),
            parse_duration,
            DEFAULT_TTL,
            MIN_TTL,
            MAX_TTL,
            "a duration such as 90s, 15m, 1h or 1h30m",
        ),
        uid=_parse_bounded("uid", options.get("uid"), _parse_int, 0, 0, MAX_ID, "a numeric user id such as 1000"),
        gid=_parse_bounded("gid", options.get("gid"), _parse_int, 0, 0, MAX_ID, "a numeric group id such as 1000"),
        mode=_parse_mode(options.get("mode")),
        size=_parse_bounded(
            "size",
            options.get("size"),
            parse_size,
            DEFAULT_SIZE,
            MIN_SIZE,
            MAX_SIZE,
            "a size such as 512k or 1m (at most 16m)",
        ),
        refresh=_parse_refresh(options.get("refresh")),
        rotate_grace=_parse_bounded(
            "rotate-grace",
            options.get("rotate-grace"),
            parse_duration,
            DEFAULT_ROTATE_GRACE,
            0,
            86400,
            "a duration such as 30s or 5m (at most 1d)",
        ),
        notify=_parse_signal(options.get("notify")),
    )


def _parse_files(options: Mapping[str, str], allow_none: bool) -> tuple[SecretFile, ...]:
    sources = {k.removeprefix("secret."): v for k, v in options.items() if k.startswith("secret.")}
    formats = {k.removeprefix("format."): v for k, v in options.items() if k.startswith("format.")}
    templates = {k.removeprefix("template."): v for k, v in options.items() if k.startswith("template.")}
    if not sources and not templates and not allow_none:
        raise InvalidOptionError(
            "no secret.<file> option: add at least one, e.g. -o secret.db_password=secret/data/web/db#password"
        )
    if len(sources) + len(templates) > MAX_FILES:
        raise InvalidOptionError(
            f"too many secret.<file> and template.<file> options ({len(sources) + len(templates)}): at most {MAX_FILES} files per volume"
        )
    for name in formats:
        if name not in sources:
            raise InvalidOptionError(f"option format.{_show(name)} has no matching secret.{_show(name)} option")
    files = []
    for name, text in templates.items():
        _check_file_name("template", name)
        if name in sources:
            raise InvalidOptionError(f"file {name} has both a secret.{name} and a template.{name} option: keep one")
        refs = tuple(
            (ref, _parse_source(f"template.{name}", ref, allow_field=False)) for ref in template_sources(name, text)
        )
        files.append(
            SecretFile(
                name=name,
                path="",
                field=None,
                format="template",
                template=text,
                refs=tuple((ref, Source(path, params)) for ref, (path, params, _) in refs),
            )
        )
    for name, source in sources.items():
        _check_file_name("secret", name)
        path, params, field = _parse_source(f"secret.{name}", source)
        fmt = formats.get(name, "raw" if field is not None else "json")
        if fmt not in FORMATS:
            raise InvalidOptionError(f"option format.{name}={_show(fmt)}: accepted formats are raw, json, env and pem")
        if fmt == "raw" and field is None:
            raise InvalidOptionError(f"option secret.{name}: format raw needs a field, e.g. {_show(path)}#password")
        if fmt != "raw" and field is not None:
            raise InvalidOptionError(
                f"option secret.{name}: format {fmt} renders the whole secret; drop #{_show(field)} or use format raw"
            )
        files.append(SecretFile(name=name, path=path, field=field, format=fmt, params=params))
    return tuple(files)


def _check_file_name(kind: str, name: str) -> None:
    if not _FILE_NAME.fullmatch(name):
        raise InvalidOptionError(
            f"option {kind}.{_show(name)}: the file name must be one path component of letters, digits, "
            "'.', '_' or '-', not starting with '.' (for example secret.db_password)"
        )


def _parse_source(
    option: str, source: str, allow_field: bool = True
) -> tuple[str, tuple[tuple[str, str], ...], str | None]:
    """`path[?k=v&...][#field]` -> (path, params, field)."""
    rest, sep, field = source.partition("#")
    path, _, query = rest.partition("?")
    path = path.strip("/")
    segments = path.split("/")
    if len(source) > 2048 or len(segments) < 2 or not all(_PATH_SEGMENT.fullmatch(s) for s in segments):
        raise InvalidOptionError(
            f"option {option}={_show(source)}: expected a Vault API path with optional ?parameters and #field, "
            "e.g. secret/data/web/db#password, kv/web/db#password or pki/issue/web?common_name=web.internal#certificate"
        )
    if _answers_with_a_token(segments):
        raise InvalidOptionError(
            f"option {option}={_show(source)}: {_show(path)} answers with a Vault token (the mount's own, or a new "
            "one), which would sit in the container's files outside the plugin's control: refused. To give the "
            "container a token of its own, revoked when it stops, use token-file=<name>"
        )
    try:
        params = tuple(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)) if query else ()
    except ValueError as e:
        raise InvalidOptionError(f"option {option}: parameters after '?' must be key=value pairs joined by '&'") from e
    for key, value in params:
        if not _PARAM_KEY.fullmatch(key) or any(ord(c) < 32 for c in value):
            raise InvalidOptionError(f"option {option}: parameter {_show(key)} has a forbidden character")
    if sep and not allow_field:
        raise InvalidOptionError(f'option {option}: use secret("{path}").field in the template, not #field')
    if sep and not field:
        raise InvalidOptionError(f"option {option}: empty field after '#'")
    if sep and any(c in field for c in "\x00/\n\r"):
        raise InvalidOptionError(f"option {option}: field {_show(field)} contains a forbidden character")
    return path, params, (field if sep else None)


def _answers_with_a_token(segments: list[str]) -> bool:
    """Token endpoints (auth/token/...: lookup-self shows the reader's own token, create makes one), logins
    (auth/<method>/login) and response wrapping (sys/wrapping/...), also below a namespace prefix."""
    for i, segment in enumerate(segments):
        following = segments[i + 1 : i + 3]
        if segment == "auth" and (following[:1] == ["token"] or following[1:2] == ["login"]):
            return True
        if segment == "sys" and following[:1] == ["wrapping"]:
            return True
    return False


def _parse_signal(raw: str | None) -> str | None:
    if raw is None:
        return None
    name = raw.upper() if raw.upper().startswith("SIG") else "SIG" + raw.upper()
    if name not in SIGNALS:
        raise InvalidOptionError(f"option notify={_show(raw)}: expected one of {', '.join(SIGNALS)}")
    return name


def _parse_mode(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_MODE
    if not re.fullmatch(r"0?[0-7]{3}", raw):
        raise InvalidOptionError(f"option mode={_show(raw)}: expected octal permissions such as 0400 or 0440")
    mode = int(raw, 8)
    if not mode & 0o400:
        raise InvalidOptionError(f"option mode={raw}: the owner must be able to read the files (include 0400)")
    if mode & 0o111:
        # The tmpfs is noexec, but docker's own read-only remount for `-v NAME:PATH:ro` drops that flag:
        # a secret must never be runnable as a program in the container.
        raise InvalidOptionError(f"option mode={raw}: secret files are never executable (use e.g. 0400, 0440 or 0444)")
    return mode


def _parse_bounded(
    name: str,
    raw: str | None,
    parse: Callable[[str], int | None],
    default: int,
    low: int,
    high: int,
    accepted: str,
) -> int:
    if raw is None:
        return default
    value = parse(raw)
    if value is None or not low <= value <= high:
        raise InvalidOptionError(f"option {name}={_show(raw)}: expected {accepted}")
    return value


def _parse_refresh(raw: str | None) -> int:
    """0 turns polling off; otherwise at least MIN_REFRESH: each check is a Vault request per mount."""
    accepted = f"a duration such as 30s or 5m (at least {MIN_REFRESH}s), or 0 to turn polling off"
    refresh = _parse_bounded("refresh", raw, parse_duration, DEFAULT_REFRESH, 0, MAX_TTL, accepted)
    if 0 < refresh < MIN_REFRESH:
        raise InvalidOptionError(f"option refresh={_show(raw or '')}: expected {accepted}")
    return refresh


def _parse_int(raw: str) -> int | None:
    return int(raw) if re.fullmatch(r"[0-9]{1,12}", raw) else None


def parse_duration(raw: str) -> int | None:
    """`90`, `90s`, `15m`, `1h30m`, `2d` -> seconds; None if malformed."""
    if re.fullmatch(r"[0-9]{1,12}", raw):
        return int(raw)
    parts = _DURATION_PART.findall(raw)
    if not parts or "".join(n + u for n, u in parts) != raw:
        return None
    order = [list(_UNITS).index(u) for _, u in parts]
    if order != sorted(set(order), reverse=True):  # each unit once, largest first: 1h30m, not 1h1h or 30m1h
        return None
    return sum(int(n) * _UNITS[u] for n, u in parts)


def parse_size(raw: str) -> int | None:
    """`4096`, `512k`, `1m` -> bytes; None if malformed."""
    match = _SIZE.fullmatch(raw)
    if not match:
        return None
    return int(match[1]) * {"": 1, "k": 1 << 10, "m": 1 << 20}[match[2].lower()]


def _show(text: str, limit: int = 60) -> str:
    """Quote user input for an error message: bounded and with control characters escaped."""
    shown = repr(text[:limit])
    return shown + ("..." if len(text) > limit else "")
