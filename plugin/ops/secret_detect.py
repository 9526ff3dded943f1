"""Which environment entries of a compose file look like secrets, by name and by value. Pure: no I/O.

`classify(name, value)` says why an entry looks like a secret, or returns None. A reason names the
rule that matched, never the value, so it can be printed. It is a guess: the migrate command lets the
operator correct it (`--only`, `--exclude`).
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections import Counter

# Matched against the name upper-cased, with '-' and '.' read as '_'.
NAME_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("PASSWORD", re.compile(r"PASSWORD|PASSWD|PASSPHRASE|(?:^|_)PASS(?:_|$)|_PWD(?:_|$)")),
    ("SECRET", re.compile(r"SECRET")),
    ("TOKEN", re.compile(r"TOKENS?(?:_|$)")),
    ("API_KEY", re.compile(r"API_?KEY")),
    ("PRIVATE_KEY", re.compile(r"PRIVATE_?KEY")),
    ("CREDENTIAL", re.compile(r"CREDENTIAL")),
    ("ACCESS_KEY", re.compile(r"ACCESS_?KEY")),
    ("AUTH", re.compile(r"(?:^|_)(?:AUTH|AUTHORIZATION)(?:_|$)")),
)
# Names that hold a secret only when their value carries credentials (`scheme://user:pass@host`).
DSN_NAME = re.compile(r"(?:^|_)DSN$|(?:^|_)(?:DATABASE|DB)_UR[LI]$")
# Last words of names that configure a secret rather than hold one: SECRET_KEY_FILE, TOKEN_TTL, AUTH_MODE.
NOT_A_SECRET_SUFFIX = re.compile(
    r"_(?:FILE|PATH|DIR|URL|URI|ENDPOINT|HOST|PORT|TTL|TIMEOUT|EXPIRY|EXPIRES|LENGTH|ENABLED|ENABLE|DISABLED|"
    r"MODE|PROVIDER|TYPE|METHOD|ALGORITHM|ISSUER|AUDIENCE|REALM|SCOPE|USER|USERNAME)$"
)
TRIVIAL_VALUES = frozenset({"", "true", "false", "yes", "no", "on", "off", "none", "null"})

VALUE_PREFIXES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("an AWS access key id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("a GitHub token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})")),
    ("a GitLab token", re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}")),
    ("a Slack token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}")),
    ("a Stripe key", re.compile(r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{16,}")),
    ("a Google API key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}")),
    ("an OpenAI-style key", re.compile(r"\bsk-[A-Za-z0-9_-]{20,}")),
    ("an npm token", re.compile(r"\bnpm_[A-Za-z0-9]{36}")),
    ("a Vault token", re.compile(r"\b(?:hv[sb]\.[A-Za-z0-9_-]{24,}|s\.[A-Za-z0-9]{24})\b")),
    ("a JWT", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+")),
)
PEM_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]+-----")
_TOKENISH = re.compile(r"[A-Za-z0-9+/=_.~-]+")
_HEX = re.compile(r"[0-9a-fA-F]+")
# Runs of one kind: a capitalised or lower-case word, an upper-case run, digits. Words make long runs.
_RUN = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# `$$` is compose's escape for a literal `$`; it is matched first so that `$${X}` is no interpolation.
_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def classify(name: str, value: str | None) -> str | None:
    """Why the entry `name=value` looks like a secret ("name contains PASSWORD", "value is a PEM
    block"), or None. With `value` None (taken from the shell), only the name is judged."""
    key = re.sub(r"[-.]", "_", name.upper())
    if value is None and DSN_NAME.search(key):
        return "connection string, likely with credentials"
    if value is not None:
        if DSN_NAME.search(key) and _userinfo(value) is not None:
            return "connection string with credentials"
        reason = classify_value(value)
        if reason:
            return reason
        if value.strip().lower() in TRIVIAL_VALUES:
            return None
    if NOT_A_SECRET_SUFFIX.search(key):
        return None
    for label, pattern in NAME_RULES:
        if pattern.search(key):
            return f"name contains {label}"
    return None


def classify_value(value: str) -> str | None:
    """Why `value` alone looks like a secret, or None."""
    userinfo = _userinfo(value)
    if userinfo is not None and userinfo[1]:
        return "value is a URL with a password"
    if PEM_BLOCK.search(value):
        return "value is a PEM block"
    for label, pattern in VALUE_PREFIXES:
        if pattern.search(value):
            return f"value looks like {label}"
    if looks_random(value):
        return "value is a long random-looking string"
    return None


def looks_random(value: str) -> bool:
    """A long token of high per-character entropy made of short runs (`k7Q2xLp9...`): a generated key or
    password, not a word, path, host name, version, image reference, UUID or short hex id."""
    text = value.strip()
    if len(text) < 20 or not _TOKENISH.fullmatch(text) or text.startswith(("/", ".")) or _UUID.fullmatch(text):
        return False
    if sum(not c.isalnum() for c in text) > 0.15 * len(text):
        return False
    if _HEX.fullmatch(text):  # 16 symbols: less entropy per character; short ones are ids (ObjectId)
        return len(text) >= 32 and entropy(text) >= 3.0
    if entropy(text) < 3.5:
        return False
    runs = _RUN.findall(text)
    return sum(map(len, runs)) / len(runs) <= 3.5


def entropy(text: str) -> float:
    """Shannon entropy of `text`'s characters, in bits per character."""
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def interpolations(value: str) -> tuple[str, ...]:
    """Names of the variables compose substitutes into `value` (`${DB_PASSWORD}`, `$HOME`, `${X:-d}`)."""
    return tuple(m[1] or m[2] for m in _INTERPOLATION.finditer(value) if m[0] != "$$")


def _userinfo(value: str) -> tuple[str, str] | None:
    """(user, password) of a `scheme://user[:password]@host` value, or None without userinfo."""
    if "://" not in value or "@" not in value:
        return None
    try:
        parts = urllib.parse.urlsplit(value.strip())
    except ValueError:
        return None
    if not parts.scheme or "@" not in parts.netloc:
        return None
    return parts.username or "", parts.password or ""
