"""Test images built locally, without any registry access."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from .dockerd import Dockerd, docker_cli

BUSYBOX = Path("/bin/busybox")


def build_busybox_image(dockerd: Dockerd, name: str = "vs-busybox:test") -> str:
    """Ensure image `name` exists in `dockerd`: a static busybox with every applet in /bin.

    No-op if `docker image inspect name` already succeeds. Otherwise the rootfs
    (/bin/busybox plus one symlink per applet, PATH=/bin) is assembled in a temp
    dir, removed afterwards, and imported with `docker import`. Returns `name`.
    Raises RuntimeError if /bin/busybox is missing, AssertionError if docker fails.
    """
    if dockerd.docker("image", "inspect", name, check=False).returncode == 0:
        return name
    if not os.access(BUSYBOX, os.X_OK):
        raise RuntimeError(f"{BUSYBOX} not found; run `apt-get install busybox-static`")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
    with tempfile.TemporaryDirectory(prefix="vs-busybox-") as tmp:
        root = Path(tmp) / "rootfs"
        (root / "bin").mkdir(parents=True)
        for d in ("tmp", "etc", "proc", "sys", "dev", "root"):
            (root / d).mkdir()
        (root / "tmp").chmod(0o1777)
        (root / "bin" / "busybox").write_bytes(BUSYBOX.read_bytes())
        (root / "bin" / "busybox").chmod(0o755)
        for applet in applets:
            if applet != "busybox" and "/" not in applet:
                (root / "bin" / applet).symlink_to("busybox")
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
        (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        tar = subprocess.Popen(
            ["tar", "-C", str(root), "--numeric-owner", "--owner=0", "--group=0", "-c", "."], stdout=subprocess.PIPE
        )
        imp = subprocess.run(
            [docker_cli(), "import", "-c", "ENV PATH=/bin", "-", name],
            stdin=tar.stdout,
            env=dockerd.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        tar.stdout.close()
        if tar.wait() != 0 or imp.returncode != 0:
            raise AssertionError(
                f"docker import of {name} failed (tar rc={tar.returncode}, "
                f"import rc={imp.returncode})\n{imp.stdout}\n{imp.stderr}"
            )
    return name
