"""Secret data read from Vault -> the bytes of each file of a mount. Pure: no I/O.

Error messages name paths, fields and keys, never values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from plugin.core.errors import SecretFormatError
from plugin.core.spec import SecretFile, Source, Spec
from plugin.core.template import render_template

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def render_files(
    spec: Spec, secrets: Mapping[Source, Mapping[str, Any]], only: set[Source] | None = None
) -> dict[str, bytes]:
    """Render the files of `spec` from `secrets` (source -> its data); with `only`, just the files using those sources.

    Raises `SecretFormatError` if a field is missing or the data cannot take the requested format.
    """
    files = [f for f in spec.files if only is None or only & set(f.sources)]
    return {f.name: _render(f, secrets) for f in files}


def _render(file: SecretFile, secrets: Mapping[Source, Mapping[str, Any]]) -> bytes:
    if file.template is not None:
        return render_template(file.name, file.template, {ref: secrets[source] for ref, source in file.refs}).encode()
    return render_file(file, secrets[file.sources[0]])


def render_file(file: SecretFile, data: Mapping[str, Any]) -> bytes:
    if file.format == "raw":
        if file.field is None or file.field not in data:  # a raw file always has a field (parse_spec)
            fields = ", ".join(sorted(map(str, data))) or "none"
            raise SecretFormatError(
                f"secret {file.path} has no field {file.field!r} (file {file.name}); its fields are: {fields}"
            )
        return _scalar(data[file.field]).encode()
    if file.format == "json":
        return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    if file.format == "pem":
        return _pem_chain(file, data)
    return "".join(_env_line(file, key, value) for key, value in sorted(data.items())).encode()


def _pem_chain(file: SecretFile, data: Mapping[str, Any]) -> bytes:
    """A certificate followed by its issuing chain, as servers expect; the private key goes in its own file."""
    if not isinstance(data.get("certificate"), str):
        raise SecretFormatError(f"secret {file.path} has no certificate, so file {file.name} cannot use format pem")
    chain = data.get("ca_chain") or ([data["issuing_ca"]] if data.get("issuing_ca") else [])
    return "".join(pem.strip() + "\n" for pem in [data["certificate"], *chain]).encode()


def _env_line(file: SecretFile, key: str, value: Any) -> str:
    """One `KEY='value'` line that `sh` sources back to exactly `value`."""
    if not _ENV_KEY.fullmatch(key):
        raise SecretFormatError(
            f"secret {file.path} has key {key[:60]!r}, which is not a shell variable name; "
            f"file {file.name} cannot use format env (use json, or a raw file per field)"
        )
    text = _scalar(value)
    if "\0" in text:
        raise SecretFormatError(f"secret {file.path} key {key} contains a NUL byte, which format env cannot carry")
    return f"{key}='" + text.replace("'", "'\\''") + "'\n"


def _scalar(value: Any) -> str:
    """Strings are written exactly as stored; anything else (numbers, nested objects) as JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
