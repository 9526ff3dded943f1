"""The `vault-secrets-plugin` command. Each flag can also come from the environment variable shown."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from plugin.errors import PluginError
from plugin.settings import Settings
from plugin.wrapping import DEFAULT_ALLOWED_PATHS


@click.group()
def main() -> None:
    """vault-secrets: a Docker volume plugin delivering Vault / OpenBao secrets as files on a per-container tmpfs."""


@main.command()
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="VAULT_SECRETS_SOCKET",
              default="/run/docker/plugins/vault-secrets.sock", show_default=True, help="Unix socket dockerd connects to.")
@click.option("--state-dir", type=click.Path(path_type=Path), envvar="VAULT_SECRETS_STATE_DIR",
              default="/var/lib/vault-secrets", show_default=True, help="State database and seal key (kept 0700).")
@click.option("--mount-root", type=click.Path(path_type=Path), envvar="VAULT_SECRETS_MOUNT_ROOT",
              help="Where per-mount tmpfs are made.  [default: <state-dir>/mounts]")
@click.option("--vault-addr", envvar="VAULT_ADDR", required=True, help="Vault or OpenBao address, e.g. https://vault:8200.")
@click.option("--vault-cacert", envvar="VAULT_CACERT", help="CA bundle that signed Vault's certificate.")
@click.option("--vault-namespace", envvar="VAULT_NAMESPACE", help="Vault Enterprise / OpenBao namespace.")
@click.option("--vault-timeout", type=click.FloatRange(0.5, 60), envvar="VAULT_SECRETS_VAULT_TIMEOUT", default=5.0,
              show_default=True, help="Seconds before a Vault request is abandoned.")
@click.option("--approle-mount", envvar="VAULT_SECRETS_APPROLE_MOUNT", default="approle", show_default=True,
              help="Mount path of the AppRole auth method.")
@click.option("--role-id", envvar="VAULT_SECRETS_ROLE_ID", help="AppRole RoleID of the plugin.")
@click.option("--role-id-file", type=click.Path(path_type=Path, dir_okay=False), envvar="VAULT_SECRETS_ROLE_ID_FILE",
              help="File holding the AppRole RoleID.")
@click.option("--wrapped-secret-id-file", type=click.Path(path_type=Path, dir_okay=False),
              envvar="VAULT_SECRETS_WRAPPED_SECRET_ID_FILE", help="File holding a single-use wrapping token of an AppRole SecretID.")
@click.option("--wrap-allowed-paths", envvar="VAULT_SECRETS_WRAP_ALLOWED_PATHS", default=",".join(DEFAULT_ALLOWED_PATHS),
              show_default=True, help="Comma-separated glob patterns of creation paths accepted for wrapped-token= volumes.")
@click.option("--control-socket", type=click.Path(path_type=Path), envvar="VAULT_SECRETS_CONTROL_SOCKET",
              help="Root-only socket for operator commands.  [default: <state-dir>/control.sock]")
@click.option("--docker-socket", type=click.Path(path_type=Path), envvar="VAULT_SECRETS_DOCKER_SOCKET",
              help="dockerd's API socket (e.g. /run/docker.sock): enables notify= and releasing mounts of containers "
                   "that stopped without an Unmount (dockerd restart).")
@click.option("--log-level", envvar="VAULT_SECRETS_LOG_LEVEL", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(socket_path, state_dir, mount_root, vault_addr, vault_cacert, vault_namespace, vault_timeout,
          approle_mount, role_id, role_id_file, wrapped_secret_id_file, wrap_allowed_paths, control_socket,
          docker_socket, log_level) -> None:
    """Serve the volume plugin protocol on a Unix socket."""
    if role_id_file is not None:
        if role_id:
            raise click.UsageError("give --role-id or --role-id-file, not both")
        try:
            role_id = role_id_file.read_text().strip()
        except OSError as e:
            raise click.UsageError(f"cannot read --role-id-file {role_id_file}: {e.strerror}") from e
    settings = Settings(
        socket=socket_path,
        state_dir=state_dir,
        mount_root=mount_root or state_dir / "mounts",
        vault_addr=vault_addr,
        vault_cacert=vault_cacert,
        vault_namespace=vault_namespace,
        vault_timeout=vault_timeout,
        approle_mount=approle_mount,
        role_id=role_id,
        wrapped_secret_id_file=wrapped_secret_id_file,
        wrap_allowed_paths=_allowed_paths(wrap_allowed_paths),
        control_socket=control_socket,
        docker_socket=docker_socket,
        hostname=socket.gethostname(),
    )
    from plugin.server import serve as run  # gunicorn is imported only by the command that needs it

    try:
        run(settings, log_level=log_level)
    except PluginError as e:
        raise click.ClickException(str(e)) from e


@main.command()
@click.option("--wrapped-secret-id-file", type=click.File("r"), required=True,
              help="File holding a single-use wrapping token of a new AppRole SecretID ('-' for standard input).")
@click.option("--state-dir", type=click.Path(path_type=Path), envvar="VAULT_SECRETS_STATE_DIR",
              default="/var/lib/vault-secrets", show_default=True, help="The running plugin's state directory.")
@click.option("--control-socket", type=click.Path(path_type=Path), envvar="VAULT_SECRETS_CONTROL_SOCKET",
              help="The running plugin's control socket.  [default: <state-dir>/control.sock]")
def bootstrap(wrapped_secret_id_file, state_dir, control_socket) -> None:
    """Give a running plugin a new identity from a wrapped SecretID, without a restart."""
    path = control_socket or state_dir / "control.sock"
    token = wrapped_secret_id_file.read().strip()
    if not token:
        raise click.UsageError("the wrapped SecretID file is empty")
    click.echo(f"handing the wrapped SecretID to the plugin on {path} ...", err=True)
    from plugin.control import call

    try:
        reply = call(path, "Bootstrap", {"WrappingToken": token})
    except PluginError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"plugin identity established (accessor {reply['Accessor']}, ttl {reply['TTL']}s)")


def _allowed_paths(raw: str) -> tuple[str, ...]:
    paths = tuple(p.strip() for p in raw.split(",") if p.strip())
    if not paths:
        raise click.BadParameter("give at least one pattern", param_hint="--wrap-allowed-paths")
    return paths


if __name__ == "__main__":
    main()
