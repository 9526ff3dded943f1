"""The `vault-secrets-plugin` command. Each flag can also come from the environment variable shown."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click

from plugin.core.errors import PluginError
from plugin.settings import DEFAULT_ALLOWED_PATHS, Settings

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

FC = TypeVar("FC", bound=Callable[..., Any])  # a command function, decorated with its options


class _Commands(click.Group):
    """Loads `migrate` (YAML, templates) only when it is asked for: `serve` stays lean."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "migrate"])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "migrate":
            from plugin.ops.migrate import migrate

            return migrate
        return super().get_command(ctx, name)


@click.group(cls=_Commands)
def main() -> None:
    """vault-secrets: a Docker volume plugin delivering Vault / OpenBao secrets as files on a per-container tmpfs."""


@main.command()
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(path_type=Path),
    envvar="VAULT_SECRETS_SOCKET",
    default="/run/docker/plugins/vault-secrets.sock",
    show_default=True,
    help="Unix socket dockerd connects to.",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    envvar="VAULT_SECRETS_STATE_DIR",
    default="/var/lib/vault-secrets",
    show_default=True,
    help="State database and seal key (kept 0700).",
)
@click.option(
    "--mount-root",
    type=click.Path(path_type=Path),
    envvar="VAULT_SECRETS_MOUNT_ROOT",
    default="/run/vault-secrets",
    show_default=True,
    help="Where per-mount tmpfs are made: outside --state-dir, so that a backup of the state copies no secret.",
)
@click.option(
    "--vault-addr", envvar="VAULT_ADDR", required=True, help="Vault or OpenBao address, e.g. https://vault:8200."
)
@click.option(
    "--vault-cacert",
    envvar="VAULT_CACERT",
    type=click.Path(exists=True, readable=True),
    help="CA bundle (file or directory) that signed Vault's certificate.  [default: the system's CAs]",
)
@click.option(
    "--vault-client-cert",
    envvar="VAULT_CLIENT_CERT",
    type=click.Path(exists=True, dir_okay=False, readable=True),
    help="Client certificate (PEM) for a Vault listener that requires one (mutual TLS).",
)
@click.option(
    "--vault-client-key",
    envvar="VAULT_CLIENT_KEY",
    type=click.Path(exists=True, dir_okay=False, readable=True),
    help="Private key (PEM) of --vault-client-cert.",
)
@click.option("--vault-namespace", envvar="VAULT_NAMESPACE", help="Vault Enterprise / OpenBao namespace.")
@click.option(
    "--vault-timeout",
    type=click.FloatRange(0.5, 60),
    envvar="VAULT_SECRETS_VAULT_TIMEOUT",
    default=5.0,
    show_default=True,
    help="Seconds before one Vault request is abandoned (and retried, within --mount-timeout).",
)
@click.option(
    "--mount-timeout",
    type=click.FloatRange(1, 110),
    envvar="VAULT_SECRETS_MOUNT_TIMEOUT",
    default=20.0,
    show_default=True,
    help="Seconds a Mount may wait for the plugin identity and for Vault to recover from "
    "transient errors (keep it under dockerd's deadline: 30 s for a managed plugin).",
)
@click.option(
    "--release-unheld-after",
    type=click.FloatRange(0, 3600),
    envvar="VAULT_SECRETS_RELEASE_UNHELD_AFTER",
    default=30.0,
    show_default=True,
    help="Seconds a mount must have existed before it is released once no container holds its tmpfs (its "
    "container ended while the plugin was down); 0 turns this off (with --docker-socket, dockerd is asked instead).",
)
@click.option(
    "--approle-mount",
    envvar="VAULT_SECRETS_APPROLE_MOUNT",
    default="approle",
    show_default=True,
    help="Mount path of the AppRole auth method.",
)
@click.option("--role-id", envvar="VAULT_SECRETS_ROLE_ID", help="AppRole RoleID of the plugin.")
@click.option(
    "--role-id-file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="VAULT_SECRETS_ROLE_ID_FILE",
    help="File holding the AppRole RoleID.",
)
@click.option(
    "--wrapped-secret-id-file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="VAULT_SECRETS_WRAPPED_SECRET_ID_FILE",
    help="File holding a single-use wrapping token of an AppRole SecretID.",
)
@click.option(
    "--wrap-allowed-paths",
    envvar="VAULT_SECRETS_WRAP_ALLOWED_PATHS",
    default=",".join(DEFAULT_ALLOWED_PATHS),
    show_default=True,
    help="Comma-separated glob patterns of creation paths accepted for wrapped-token= volumes.",
)
@click.option(
    "--control-socket",
    type=click.Path(path_type=Path),
    envvar="VAULT_SECRETS_CONTROL_SOCKET",
    help="Root-only socket for operator commands.  [default: <state-dir>/control.sock]",
)
@click.option(
    "--docker-socket",
    type=click.Path(path_type=Path),
    envvar="VAULT_SECRETS_DOCKER_SOCKET",
    help="dockerd's API socket (e.g. /run/docker.sock): enables notify= and releasing mounts of containers "
    "that stopped without an Unmount (dockerd restart).",
)
@click.option(
    "--metrics-addr",
    envvar="VAULT_SECRETS_METRICS_ADDR",
    help="Serve Prometheus metrics on [host]:port (a bare port binds 127.0.0.1). Off by default.",
)
@click.option(
    "--log-level",
    envvar="VAULT_SECRETS_LOG_LEVEL",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--log-format",
    envvar="VAULT_SECRETS_LOG_FORMAT",
    default="json",
    show_default=True,
    type=click.Choice(["json", "text"]),
    help="One JSON object a line, or text for humans.",
)
def serve(
    socket_path: Path,
    state_dir: Path,
    mount_root: Path,
    vault_addr: str,
    vault_cacert: str | None,
    vault_client_cert: str | None,
    vault_client_key: str | None,
    vault_namespace: str | None,
    vault_timeout: float,
    mount_timeout: float,
    release_unheld_after: float,
    approle_mount: str,
    role_id: str | None,
    role_id_file: Path | None,
    wrapped_secret_id_file: Path | None,
    wrap_allowed_paths: str,
    control_socket: Path | None,
    docker_socket: Path | None,
    metrics_addr: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Serve the volume plugin protocol on a Unix socket."""
    _check_tls(vault_addr, vault_cacert, vault_client_cert, vault_client_key)
    if mount_root.resolve().is_relative_to(state_dir.resolve()):
        raise click.UsageError(
            f"--mount-root {mount_root} is inside --state-dir {state_dir}: a backup of the state directory would "
            "copy every mounted secret; put the mounts elsewhere, e.g. --mount-root /run/vault-secrets (a tmpfs)"
        )
    if role_id_file is not None:
        if role_id:
            raise click.UsageError("give --role-id or --role-id-file, not both")
        try:
            role_id = role_id_file.read_text().strip()
        except OSError as e:
            raise click.UsageError(f"cannot read --role-id-file {role_id_file}: {e.strerror}") from e
    if metrics_addr:
        from plugin.core.metrics import parse_address

        try:
            parse_address(metrics_addr)
        except PluginError as e:
            raise click.BadParameter(str(e), param_hint="--metrics-addr") from e
    settings = Settings(
        socket=socket_path,
        state_dir=state_dir,
        mount_root=mount_root,
        vault_addr=vault_addr,
        vault_cacert=vault_cacert,
        vault_client_cert=vault_client_cert,
        vault_client_key=vault_client_key,
        vault_namespace=vault_namespace,
        vault_timeout=vault_timeout,
        mount_timeout=mount_timeout,
        release_unheld_after=release_unheld_after,
        approle_mount=approle_mount,
        role_id=role_id,
        wrapped_secret_id_file=wrapped_secret_id_file,
        wrap_allowed_paths=_allowed_paths(wrap_allowed_paths),
        control_socket=control_socket,
        docker_socket=docker_socket,
        metrics_addr=metrics_addr,
        hostname=socket.gethostname(),
    )
    from plugin.edge.server import (
        serve as run,  # gunicorn is imported only by the command that needs it
    )

    try:
        run(settings, _build_in_worker, log_level=log_level, log_format=log_format)
    except PluginError as e:
        raise click.ClickException(str(e)) from e


def _build_in_worker(settings: Settings) -> WSGIApplication:
    """The plugin's WSGI application, built in gunicorn's worker: only there are its components imported."""
    from plugin.service import build_application

    return build_application(settings)


def _control_options(command: FC) -> FC:
    """--state-dir / --control-socket: how operator commands find the running plugin."""
    command = click.option(
        "--control-socket",
        type=click.Path(path_type=Path),
        envvar="VAULT_SECRETS_CONTROL_SOCKET",
        help="The running plugin's control socket.  [default: <state-dir>/control.sock]",
    )(command)
    return click.option(
        "--state-dir",
        type=click.Path(path_type=Path),
        envvar="VAULT_SECRETS_STATE_DIR",
        default="/var/lib/vault-secrets",
        show_default=True,
        help="The running plugin's state directory.",
    )(command)


def _control(
    state_dir: Path, control_socket: Path | None, verb: str, body: dict[str, Any], timeout: float = 120
) -> dict[str, Any]:
    from plugin.edge.control import call

    try:
        return call(control_socket or state_dir / "control.sock", verb, body, timeout)
    except PluginError as e:
        raise click.ClickException(str(e)) from e


@main.command()
@click.option(
    "--wrapped-secret-id-file",
    type=click.File("r"),
    required=True,
    help="File holding a single-use wrapping token of a new AppRole SecretID ('-' for standard input).",
)
@_control_options
def bootstrap(wrapped_secret_id_file: IO[str], state_dir: Path, control_socket: Path | None) -> None:
    """Give a running plugin a new identity from a wrapped SecretID, without a restart."""
    token = wrapped_secret_id_file.read().strip()
    if not token:
        raise click.UsageError("the wrapped SecretID file is empty")
    click.echo("handing the wrapped SecretID to the running plugin ...", err=True)
    reply = _control(state_dir, control_socket, "Bootstrap", {"WrappingToken": token})
    click.echo(f"plugin identity established (accessor {reply['Accessor']}, ttl {reply['TTL']}s)")
    if "Moved" in reply:
        click.echo(f"{reply['Moved']} running mount(s) moved to it, each with a new token and its secrets anew")
        for failure in reply["Failed"]:
            click.echo(f"could not move {failure}", err=True)
        if reply["PreviousRevoked"]:
            click.echo("the previous identity is revoked")
        else:
            raise click.ClickException(
                "the previous identity was left unrevoked, as some mounts still depend on it: fix the cause above "
                "and run bootstrap again with a new wrapped SecretID"
            )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_control_options
def status(as_json: bool, state_dir: Path, control_socket: Path | None) -> None:
    """Volumes, mounts with their ages and TTLs, the plugin identity and Vault's health."""
    reply = _control(state_dir, control_socket, "Status", {})
    reply.pop("Err", None)
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    click.echo(render_status(reply))


@main.command()
@click.argument("volumes", nargs=-1)
@_control_options
def doctor(volumes: tuple[str, ...], state_dir: Path, control_socket: Path | None) -> None:
    """Check Vault, the plugin identity and each volume (or the named ones); non-zero exit on any failure."""
    click.echo(f"checking Vault, the plugin identity and {', '.join(volumes) or 'every volume'} ...", err=True)
    checks = _control(state_dir, control_socket, "Doctor", {"Volumes": list(volumes)})["Checks"]
    for check in checks:
        click.echo(f"{'PASS' if check['ok'] else 'FAIL'}  {check['name']}: {check['detail']}")
        if not check["ok"] and check["fix"]:
            click.echo(f"      fix: {check['fix']}")
    failed = sum(not c["ok"] for c in checks)
    click.echo(f"{len(checks) - failed} passed, {failed} failed")
    if failed:
        sys.exit(1)


@main.command()
@click.option("--volume", help="Revoke what was issued for this volume.")
@click.option("--all", "everything", is_flag=True, help="Revoke what was issued for every volume.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_control_options
def revoke(volume: str | None, everything: bool, yes: bool, state_dir: Path, control_socket: Path | None) -> None:
    """Break glass: revoke every token and lease issued for a volume (or all) and wipe their files."""
    if bool(volume) == everything:
        raise click.UsageError("give --volume NAME or --all")
    target = "every volume" if everything else f"volume {volume}"
    if not yes:
        click.confirm(
            f"Revoke every token and lease issued for {target} and wipe its files in running containers?", abort=True
        )
    click.echo(f"revoking what was issued for {target} ...", err=True)
    reply = _control(state_dir, control_socket, "Revoke", {"All": True} if everything else {"Volume": volume})
    click.echo(
        f"revoked the tokens of {reply['mounts']} mount(s) and {reply['credentials']} volume credential(s); "
        "their files are wiped. Containers keep running with empty volumes: restart them to mount afresh."
    )


def render_status(status: dict[str, Any]) -> str:
    """The human form of `status`: a few aligned lines per volume."""
    vault, identity = status["vault"], status["identity"]
    lines = [
        f"vault     {vault['address']}  "
        + (
            f"reachable, {'sealed' if vault['sealed'] else 'unsealed'}, {vault['version']}"
            if vault["reachable"]
            else f"UNREACHABLE: {vault['error']}"
        ),
        "identity  "
        + (
            f"{identity['accessor']}  ttl {identity['ttl']}s"
            if "accessor" in identity
            else f"NONE: {identity['error']}"
        ),
        "",
        f"{'VOLUME':24} {'MOUNT':14} {'AGE':>8} {'REFS':>4} {'TOKEN TTL':>10}  LEASES",
    ]
    for volume in status["volumes"]:
        if not volume["mounts"]:
            lines.append(f"{volume['name']:24} {'-':14}")
        for mount in volume["mounts"]:
            leases = ", ".join(f"{lease['source']} (ttl {lease['ttl']})" for lease in mount["leases"]) or "-"
            lines.append(
                f"{volume['name']:24} {mount['mount_id'][:12]:14} {_age(mount['age']):>8} {mount['refcount']:>4} "
                f"{str(mount['token_ttl']):>10}  {leases}"
            )
    return "\n".join(lines)


def _age(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _check_tls(vault_addr: str, cacert: str | None, client_cert: str | None, client_key: str | None) -> None:
    """Refuse TLS settings that would be ignored or half-applied, rather than run with less than was asked."""
    if os.environ.get("VAULT_SKIP_VERIFY", "").strip().lower() not in ("", "0", "false"):
        raise click.UsageError(
            "VAULT_SKIP_VERIFY is set, but vault-secrets never turns off TLS verification: unset it "
            "and give the CA that signed Vault's certificate with --vault-cacert (VAULT_CACERT)"
        )
    if bool(client_cert) != bool(client_key):
        raise click.UsageError(
            "give --vault-client-cert and --vault-client-key together (VAULT_CLIENT_CERT, VAULT_CLIENT_KEY)"
        )
    if (cacert or client_cert) and not vault_addr.lower().startswith("https://"):
        raise click.UsageError(
            f"--vault-cacert and --vault-client-cert need an https:// --vault-addr, not {vault_addr}"
        )


def _allowed_paths(raw: str) -> tuple[str, ...]:
    paths = tuple(p.strip() for p in raw.split(",") if p.strip())
    if not paths:
        raise click.BadParameter("give at least one pattern", param_hint="--wrap-allowed-paths")
    return paths


if __name__ == "__main__":
    main()
