"""`make run`: the plugin on an embedded default, a local OpenBao dev server seeded with demo data.

Starts OpenBao on loopback, seeds it, delivers a wrapped SecretID to the plugin the way an operator
would, then runs `vault-secrets-plugin serve` in the foreground as a legacy plugin. Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from devenv.openbao import OpenBaoDevServer, seed_demo, wrapped_secret_id


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path(".run"), help="scratch directory (recreated)")
    parser.add_argument("--plugin-name", default="vault-secrets", help="driver name for docker volume create -d")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print(
            "make run needs root: the plugin mounts tmpfs and dockerd only talks to root-owned sockets", file=sys.stderr
        )
        return 2
    workdir = args.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(mode=0o700, parents=True)
    socket = Path("/run/docker/plugins") / f"{args.plugin_name}.sock"
    print(f"starting OpenBao dev server (log: {workdir / 'openbao.log'}) ...", flush=True)
    bao = OpenBaoDevServer(workdir)
    try:
        seed = seed_demo(bao.client())
        wrapped = workdir / "wrapped-secret-id"
        wrapped.write_text(wrapped_secret_id(bao.client()))
        wrapped.chmod(0o600)
        print(f"OpenBao at {bao.addr}, demo secrets at secret/web/db and secret/web/api, token role {seed.token_role}")
        print(_try_it(args.plugin_name, bao, seed.token_role), flush=True)
        command = [
            str(Path(sys.executable).parent / "vault-secrets-plugin"),
            "serve",
            "--socket",
            str(socket),
            "--state-dir",
            str(workdir / "state"),
            "--vault-addr",
            bao.addr,
            "--role-id",
            seed.role_id,
            "--wrapped-secret-id-file",
            str(wrapped),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VAULT_")}
        plugin = subprocess.Popen(command, env=env)
        try:
            return plugin.wait()
        except KeyboardInterrupt:
            # Not subprocess.call: it SIGKILLs the child on Ctrl-C, leaving the socket behind.
            plugin.terminate()
            return plugin.wait()
    finally:
        bao.stop()
        print("stopped OpenBao", flush=True)


def _try_it(name: str, bao: OpenBaoDevServer, role: str) -> str:
    return f"""
Try it from another shell:
  docker volume create -d {name} -o role={role} \\
      -o secret.db_password=secret/data/web/db#password -o uid=1000 web-secrets
  docker run --rm --user 1000 -v web-secrets:/run/secrets busybox cat /run/secrets/db_password
  docker volume rm web-secrets
Inspect OpenBao with: VAULT_ADDR={bao.addr} VAULT_TOKEN={bao.root_token} bao token lookup
(the root token of this throwaway dev server; Ctrl-C stops the plugin and OpenBao)
"""


if __name__ == "__main__":
    sys.exit(main())
