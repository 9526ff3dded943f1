"""`vault-secrets-plugin migrate`: move secrets out of a compose file's `environment:` into Vault / OpenBao KV v2,
read by a vault-secrets volume per service.

A dry run by default, printing no secret value unless --show-values. `--write` stores the values with the
operator's own token, never the plugin's. Every generated volume's options go through `parse_spec`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import click
import ruamel.yaml
import ruamel.yaml.emitter
import ruamel.yaml.error

from plugin.core.errors import (
    CheckAndSetError,
    InvalidOptionError,
    PermissionDeniedError,
    VaultError,
    VaultTransientError,
)
from plugin.core.spec import parse_spec
from plugin.ops.secret_detect import classify, interpolations

REDACTED = "<redacted: from compose file>"


class MigrationError(click.ClickException):
    """The compose file cannot be migrated, or Vault refused; the message says why and never holds a value."""


@dataclasses.dataclass(frozen=True)
class Choices:
    """The operator's choices: names, where secrets go, how apps read them, which entries move."""

    project: str
    mount: str = "secret"
    prefix: str = ""
    consume: str = "file"  # or "env"
    target: str = "/run/secrets"
    only: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Service:
    """A migrated service: the values to store at `<mount>/data/<kv_path>`, read by token role `name`."""

    name: str
    kv_path: str
    secrets: dict[str, str]

    @property
    def policy(self) -> str:
        return self.kv_path.replace("/", "-")


def plan(compose: object, source: str, choices: Choices) -> tuple[list[Service], list[str]]:
    """Rewrite the parsed `compose` in place -> (migrated services, notices for the operator).

    Raises MigrationError for a file that is not a compose file or whose services cannot take the volume."""
    if not isinstance(compose, dict) or not isinstance(compose.get("services"), dict):
        raise MigrationError(f"{source} is not a compose file: it has no 'services:' mapping")
    if not compose["services"]:
        raise MigrationError(f"{source} has no services")
    volumes: dict[str, object] = compose.get("volumes") or {}
    migrated: list[Service] = []
    notices: list[str] = []
    seen: set[str] = set()
    for name, svc in compose["services"].items():
        for env_file in _as_list((svc or {}).get("env_file")):
            notices.append(
                f"{name}: env_file {env_file.get('path') if isinstance(env_file, dict) else env_file} is not "
                "migrated automatically: move its secrets into environment: and run migrate again"
            )
        if isinstance(svc, dict) and svc.get("environment") is not None:
            migrated += _service(f"{source}: service {name}", name, svc, volumes, choices, notices, seen)
    for key in [*choices.only, *choices.exclude]:
        if key not in seen:
            raise MigrationError(f"--only/--exclude {key}: no service in {source} has an environment entry {key}")
    if left := _leftovers(compose, migrated):
        raise MigrationError(
            f"{source}: {', '.join(left)} would still hold a value that moves to Vault (YAML anchors are "
            "expanded into the services, their x- definitions stay): move the entry into each service's "
            "environment, or --exclude it"
        )
    if migrated:
        compose["volumes"] = volumes
    return migrated, notices


def _service(
    where: str,
    name: str,
    svc: dict[str, Any],
    volumes: dict[str, object],
    c: Choices,
    notices: list[str],
    seen: set[str],
) -> list[Service]:
    env, kv_path = svc["environment"], f"{c.prefix}/{name}".lstrip("/")
    if not isinstance(env, (dict, list)):
        raise MigrationError(f"{where}: environment must be a mapping or a list of KEY=value")
    # (key, value as compose passes it or None when it comes from the shell, the entry as written)
    items = (
        [(str(k), _text(v), v) for k, v in env.items()]
        if isinstance(env, dict)
        else [(k, v if sep else None, entry) for entry in env for k, sep, v in [str(entry).partition("=")]]
    )
    seen.update(key for key, _, _ in items)
    secrets, env_out = {}, []
    for key, value, original in items:
        from_shell = value is None or bool(interpolations(value))
        reason = classify(key, value) or (classify(key, None) if from_shell else None)
        if (key in c.only if c.only else reason is not None) and key not in c.exclude:
            if from_shell:
                notices.append(
                    f"{name}: {key} is left as is: its value comes from your shell when compose runs, so migrate "
                    f"cannot move it; store it yourself (bao kv patch -mount={c.mount} {kv_path} {key}=-) and "
                    "add it to the volume"
                )
            else:
                assert value is not None  # from_shell covers None
                secrets[key] = value.replace("$$", "$")  # `$$` is compose's escape of a literal `$`
                notices.append(f"{name}: {key} moves to {c.mount}/data/{kv_path} ({reason or 'chosen with --only'})")
                file = f"{c.target}/{key.lower()}"
                env_out += (
                    [(f"{key}_FILE", file if isinstance(env, dict) else f"{key}_FILE={file}")]
                    if c.consume == "file"
                    else []
                )
                continue
        env_out.append((key, original))
    if not secrets:
        return []
    volume, options = f"{c.project}-{name}-secrets", {"role": name, **_owner(name, svc.get("user"), notices)}
    if c.consume == "env":
        options.update({f"secret.{name}.env": f"{c.mount}/data/{kv_path}", f"format.{name}.env": "env"})
        notices.append(
            f"{name}: the app must load {c.target}/{name}.env itself: start it with "
            f"sh -c 'set -a; . {c.target}/{name}.env; set +a; exec <command>'"
        )
    else:
        options.update({f"secret.{key.lower()}": f"{c.mount}/data/{kv_path}#{key}" for key in secrets})
        notices.append(
            f"{name}: the app now reads {', '.join(k + '_FILE' for k in secrets)}; if it cannot read "
            "*_FILE variables, run migrate with --consume env"
        )
    try:
        parse_spec(options)
    except InvalidOptionError as e:
        raise MigrationError(
            f"{where}: the volume options would be refused ({e}); leave that entry out with --exclude"
        ) from e
    keys, files = [k for k, _ in env_out], [k.lower() for k in secrets]
    if clashes := sorted({k for k in keys if keys.count(k) > 1} | {k for k in secrets if files.count(k.lower()) > 1}):
        raise MigrationError(
            f"{where}: {', '.join(clashes)} would be defined twice (or as the same file); leave one out with --exclude"
        )
    mounted = [
        v.get("target") if isinstance(v, dict) else (str(v).split(":") * 2)[1] for v in _as_list(svc.get("volumes"))
    ]
    if c.target in mounted or (svc.get("secrets") and c.target == "/run/secrets"):
        raise MigrationError(f"{where} already uses {c.target} (a volume, or compose secrets:); give another --target")
    if volume in volumes:
        raise MigrationError(f"{where}: a volume {volume} is already declared; give another --project-name")
    if not env_out:
        del svc["environment"]
    elif _shared(env):  # an anchor other entries alias, or a merge of one: this service gets its own copy
        svc["environment"] = dict(env_out) if isinstance(env, dict) else [entry for _, entry in env_out]
    else:  # in place, so that the comments and order of the entries left stay as they were
        _replace_entries(env, dict(env_out))
    svc["volumes"] = [
        *_as_list(svc.get("volumes")),
        # Not read_only: the tmpfs is read-only in itself, and a read-only bind would lose nodev,nosuid,noexec.
        {"type": "volume", "source": volume, "target": c.target, "volume": {"nocopy": True}},
    ]
    volumes[volume] = {"driver": "vault-secrets", "driver_opts": options}
    return [Service(name, kv_path, secrets)]


def _shared(node: object) -> bool:
    """Whether a loaded mapping or list may stand for more than itself: it carries an anchor, or merges one."""
    anchor = getattr(node, "anchor", None)
    return bool(anchor is not None and anchor.value) or bool(getattr(node, "merge", None))


def _replace_entries(env: dict[object, object] | list[object], entries: dict[str, object]) -> None:
    """Make `env` hold `entries` (its kept entries, then each migrated one's `_FILE` entry in its place), editing
    it rather than building a new one: a round-trip mapping keeps its comments only on the keys it still has."""
    if isinstance(env, list):
        env[:] = list(entries.values())
        return
    keys = {str(key): key for key in env}
    for name, value in entries.items():
        if name in keys:
            continue
        migrated = name.removesuffix("_FILE")
        if migrated in keys and hasattr(env, "insert"):
            env.insert(list(env).index(keys[migrated]), name, value)
        else:
            env[name] = value
    for name, key in keys.items():
        if name not in entries:
            del env[key]


def _leftovers(compose: dict[str, object], services: list[Service]) -> list[str]:
    """Where an `x-` extension field, the usual home of anchors, holds a migrated `KEY` with its value."""
    moved, found = {(k, v) for s in services for k, v in s.secrets.items()}, []

    def walk(node: object, where: str) -> None:
        for key, value in node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ():
            name, text = (str(key), _text(value)) if isinstance(node, dict) else str(value).partition("=")[::2]
            if (name, (text or "").replace("$$", "$")) in moved:
                found.append(f"{where}.{key}" if isinstance(node, dict) else f"{where}[{key}]")
            walk(value, f"{where}.{key}" if isinstance(node, dict) else f"{where}[{key}]")

    for key, value in compose.items():
        if str(key).startswith("x-"):
            walk(value, str(key))
    return found


def _owner(name: str, user: object, notices: list[str]) -> dict[str, str]:
    """uid/gid options from the service's `user:` when numeric, so the app can read its files."""
    uid, _, gid = str(user).partition(":") if user is not None else ("", "", "")
    if uid and not uid.isdigit():
        notices.append(
            f"{name}: user {uid!r} is not numeric: set uid= (and gid=) on the volume to its numeric id, "
            "or the files stay owned by root with mode 0400"
        )
    return {k: v for k, v in (("uid", uid), ("gid", gid)) if v.isdigit()}


def script(services: list[Service], mount: str, *, show_values: bool, stored: bool, set_up: bool) -> str:
    """The Vault / OpenBao commands creating what the volumes read, as a `sh` script for the operator."""
    lines = [
        "#!/bin/sh",
        "# Vault / OpenBao setup for the migrated services: run it with your own token (bao login).",
        "set -eu",
    ]
    if not (show_values or stored):
        lines += [
            f"# The values are redacted: replace each {REDACTED} below and delete the next two lines,",
            "# or let migrate store them (--write), or print them (--show-values).",
            "echo 'edit this script first: its secret values are redacted' >&2",
            "exit 1",
        ]
    for s in services:
        lines.append(
            f"\n# {s.name}: {len(s.secrets)} secret(s) at {mount}/data/{s.kv_path}, read with token role {s.name}"
        )
        if stored:
            lines.append("# (stored by migrate --write)")
        else:  # JSON on stdin: no value is ever read as @file or -, and any character survives
            data = {k: (v if show_values else REDACTED) for k, v in s.secrets.items()}
            lines += [f"bao kv put -mount={mount} -cas=0 {s.kv_path} - <<'JSON'", json.dumps(data, indent=2), "JSON"]
        if not set_up:
            lines += [
                f"bao policy write {s.policy} - <<'HCL'",
                _policy(mount, s).rstrip(),
                "HCL",
                f"bao write auth/token/roles/{s.name} allowed_policies={s.policy} renewable=true",
            ]
    lines += ["\n# Add to the plugin's own policy (vault-secrets-plugin), so it may mint tokens from these roles:"]
    lines += [f'#   path "auth/token/create/{s.name}" {{ capabilities = ["update"] }}' for s in services]
    return "\n".join(lines) + "\n"


def _policy(mount: str, service: Service) -> str:
    return f'path "{mount}/data/{service.kv_path}" {{ capabilities = ["read"] }}\n'


def store(services: list[Service], mount: str, addr: str | None, *, overwrite: bool, set_up: bool) -> None:
    """Write each service's secrets to KV v2 (check-and-set 0 unless `overwrite`) and, with `set_up`, its policy
    and token role, with the operator's token. Writes nothing if something exists, unless `overwrite`."""
    from plugin.vault.operator import OperatorVault  # only --write talks to Vault

    vault = OperatorVault(addr, os.environ.get("VAULT_TOKEN") or os.environ.get("BAO_TOKEN"))
    if not vault.has_token:  # hvac also read ~/.vault-token
        raise MigrationError(
            "no Vault token: set VAULT_TOKEN or log in (bao login); use your own token, never the plugin's"
        )
    path = f"sys/internal/ui/mounts/{mount}"
    try:
        try:
            version = vault.kv_version(mount)
        except PermissionDeniedError as e:
            raise MigrationError(f"no secrets engine at {mount}/ on {vault.url} that your token may use") from e
        if version != "2":
            raise MigrationError(
                f"{mount}/ at {vault.url} is not a KV version 2 mount (version {version or 'unknown'})"
            )
        exists = []
        for s in [] if overwrite else services:
            try:
                exists += [f"{mount}/data/{s.kv_path}"] if vault.exists(path := f"{mount}/metadata/{s.kv_path}") else []
            except PermissionDeniedError:
                pass  # a token may write data without reading metadata: check-and-set still refuses
            if set_up and (
                vault.exists(path := f"sys/policies/acl/{s.policy}") or vault.exists(f"auth/token/roles/{s.name}")
            ):
                exists.append(f"policy {s.policy} or token role {s.name}")
        if exists:
            raise MigrationError(
                f"already exists, nothing written: {', '.join(exists)}; rerun with --overwrite to replace"
            )
        for s in services:
            path = f"{mount}/data/{s.kv_path}"
            vault.write_kv(mount, s.kv_path, s.secrets, cas=None if overwrite else 0)
            click.echo(f"wrote {len(s.secrets)} keys to {path}", err=True)
            if set_up:
                vault.write_policy(s.policy, _policy(mount, s))
                vault.write_token_role(s.name, s.policy)
                click.echo(f"wrote policy {s.policy} and token role {s.name}", err=True)
    except VaultTransientError as e:
        raise MigrationError(str(e)) from e
    except PermissionDeniedError as e:
        raise MigrationError(f"{e}: your token needs access to it") from e
    except CheckAndSetError as e:
        raise MigrationError(f"{path} already exists (written meanwhile?); rerun with --overwrite to replace it") from e
    except VaultError as e:
        raise MigrationError(str(e)) from e


@click.command()
@click.argument("compose_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--kv-mount", default="secret", show_default=True, help="Mount path of the KV version 2 engine.")
@click.option(
    "--path-prefix", help="Secrets go to <kv-mount>/data/<path-prefix>/<service>.  [default: the project name]"
)
@click.option("-p", "--project-name", help="For volume names.  [default: name: in the file, else its directory]")
@click.option(
    "--only", multiple=True, metavar="NAME", help="Migrate exactly these entries, whatever the guess (repeatable)."
)
@click.option("--exclude", multiple=True, metavar="NAME", help="Never migrate this entry (repeatable).")
@click.option(
    "--consume",
    type=click.Choice(["file", "env"]),
    default="file",
    show_default=True,
    help="file: one file per secret, and KEY_FILE=<path> entries; env: one <service>.env file to source.",
)
@click.option(
    "--target", default="/run/secrets", show_default=True, help="Where the volume is mounted in the containers."
)
@click.option("--show-values", is_flag=True, help="Put the secret values in the printed commands (redacted otherwise).")
@click.option(
    "--write", is_flag=True, help="Store the values in KV v2 with your own token (VAULT_TOKEN or ~/.vault-token)."
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="With --write: replace secrets (with --setup-vault, policies and roles) that exist.",
)
@click.option("--setup-vault", is_flag=True, help="With --write: also write each service's policy and token role.")
@click.option(
    "--vault-addr",
    envvar=["VAULT_ADDR", "BAO_ADDR"],
    help="Vault or OpenBao address, for --write (VAULT_ADDR or BAO_ADDR).",
)
@click.option(
    "-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="Write the rewritten compose file here."
)
@click.option("--in-place", is_flag=True, help="Rewrite COMPOSE_FILE itself, keeping the original as COMPOSE_FILE.bak.")
def migrate(
    compose_file: Path,
    kv_mount: str,
    path_prefix: str | None,
    project_name: str | None,
    only: tuple[str, ...],
    exclude: tuple[str, ...],
    consume: str,
    target: str,
    show_values: bool,
    write: bool,
    overwrite: bool,
    setup_vault: bool,
    vault_addr: str | None,
    output: Path | None,
    in_place: bool,
) -> None:
    """Move secrets from COMPOSE_FILE's environment entries into Vault / OpenBao and vault-secrets volumes.

    Prints the rewritten compose file and the Vault commands that store the secrets and create their
    policies and token roles. Secret values are never printed unless --show-values."""
    if (setup_vault or overwrite) and not write:
        raise click.UsageError("--setup-vault and --overwrite only apply with --write")
    if output and (in_place or output.resolve() == compose_file.resolve()):
        raise click.UsageError("to rewrite the compose file itself, give --in-place (it keeps a .bak), not --output")
    try:
        text = compose_file.read_text()
        compose = _yaml().load(text)
    except OSError as e:
        raise MigrationError(f"cannot read {compose_file}: {e.strerror}") from e
    except ruamel.yaml.error.YAMLError as e:
        raise MigrationError(f"{compose_file} is not valid YAML: {e}") from e
    raw = (
        project_name
        or (compose.get("name") if isinstance(compose, dict) else None)
        or compose_file.resolve().parent.name
    )
    if not (project := re.sub(r"[^a-z0-9_-]", "", str(raw).lower()).lstrip("_-")):
        raise MigrationError(f"cannot make a project name of {raw!r}: give --project-name")
    mount = kv_mount.strip("/")
    services, notices = plan(
        compose,
        str(compose_file),
        Choices(
            project,
            mount,
            (project if path_prefix is None else path_prefix).strip("/"),
            consume,
            target.rstrip("/"),
            only,
            exclude,
        ),
    )
    for notice in notices:
        click.echo(notice, err=True)
    if not services:
        raise MigrationError(
            f"nothing to migrate in {compose_file}: no environment entry looks like a secret (see --only)"
        )
    click.echo(
        f"the values stay in {compose_file}{' and its .bak' if in_place else ''} (and any copy or git history "
        "of it): rotate them once the services read them from Vault",
        err=True,
    )
    if write:  # before the compose file is written: it would point at secrets that are not there
        store(services, mount, vault_addr, overwrite=overwrite, set_up=setup_vault)
    rewritten = (
        f"# Rewritten by vault-secrets-plugin migrate from {compose_file.name}: secrets come from vault-secrets\n"
        "# volumes.\n" + _dump(compose)
    )
    commands = script(services, mount, show_values=show_values, stored=write, set_up=setup_vault)
    if not (destination := compose_file if in_place else output):
        click.echo(rewritten + "\n# ---- Vault / OpenBao commands ----\n" + commands, nl=False)
        return
    try:
        tmp = destination.with_name(f".{destination.name}.tmp")
        tmp.write_text(rewritten)
        if in_place:  # the .bak keeps the original's mode: it still holds the values
            shutil.copy2(compose_file, f"{compose_file}.bak")
            shutil.copymode(compose_file, tmp)
        tmp.replace(destination)
    except OSError as e:
        raise MigrationError(
            f"cannot write {e.filename if str(e.filename).endswith('.bak') else destination}: {e.strerror}"
        ) from e
    click.echo(f"wrote the rewritten compose file to {destination}", err=True)
    click.echo(commands, nl=False)


class _Emitter(ruamel.yaml.emitter.Emitter):
    """Strings the migration adds that need quotes get double ones (`uid: "1000"`, as in the docs); quotes
    the original file chose are kept as they were."""

    def choose_scalar_style(self) -> str | None:
        style: str | None = super().choose_scalar_style()
        return '"' if style == "'" and self.event.style != "'" else style


def _yaml() -> ruamel.yaml.YAML:
    """Round-trip YAML: comments, anchors, key order and quoting of the original survive the rewrite.
    New entries are block style with list items indented under their key, as compose files usually are."""
    yaml = ruamel.yaml.YAML(typ="rt")
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 1 << 16  # never fold a long value (a DSN, a command) across lines
    yaml.preserve_quotes = True
    yaml.Emitter = _Emitter
    return yaml


def _dump(data: object) -> str:
    stream = io.StringIO()
    _yaml().dump(data, stream)
    return stream.getvalue()


def _text(value: object) -> str | None:
    """An environment mapping value as compose passes it: booleans lower-case, null means 'from the shell'."""
    return None if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _as_list(value: object) -> list[Any]:
    return [] if value is None else value if isinstance(value, list) else [value]
