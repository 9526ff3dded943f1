"""Who holds a mount's tmpfs, read from the kernel (`/proc/<pid>/mountinfo`), whatever runtime made the container.

A container that binds a mount has the tmpfs's device in its own mount namespace, at its own target. The
plugin's own mount points (`.../<volume>/<mount id>/data` and `.../view`) are not holders, nor are their
copies in namespaces that see the mount root by propagation (the host's, for the managed plugin).

Only a process in the host's PID namespace sees every process: elsewhere (a managed plugin without
`pidhost`) the answer is "cannot tell" (None), never "nobody".
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Mapping
from pathlib import Path

# PROC_PID_INIT_INO: the inode of the initial PID namespace, fixed in the kernel's ABI.
INIT_PID_NAMESPACE = "pid:[4026531836]"


def sees_every_process(proc: Path = Path("/proc")) -> bool:
    """Whether this process is in the host's PID namespace (so /proc lists every container's processes)."""
    try:
        return os.readlink(proc / "self" / "ns" / "pid") == INIT_PID_NAMESPACE
    except OSError:
        return False


def holders(wanted: Mapping[int, str], proc: Path = Path("/proc")) -> dict[int, list[int]] | None:
    """For each tmpfs device in `wanted` (device number -> the `/<volume>/<mount id>` its plugin-owned mount
    points end with), the PIDs holding it: one per mount namespace, its first process (a container's init,
    the one `docker kill` signals). Devices no namespace holds map to []. None if it cannot tell: not in the
    host's PID namespace, or a namespace's mount table it may not read (never "nobody" when unsure)."""
    if not sees_every_process(proc):
        return None
    found: dict[int, list[int]] = {device: [] for device in wanted}
    groups = _namespaces(proc)
    for pids in groups.values():
        try:
            held = _held(proc, pids, wanted)
        except PermissionError:  # a namespace it may not look into: it cannot say that nobody holds a mount
            return None
        if held:
            first = _first_process(proc, pids)
            for device in held:
                found[device].append(first)
    return found


def _namespaces(proc: Path) -> dict[str, list[int]]:
    """PIDs grouped by mount namespace. Where the namespace's link may not be read (another user's process,
    without CAP_SYS_PTRACE: the managed plugin), by the ID of its root mount, which is the namespace's own."""
    groups: dict[str, list[int]] = {}
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            key = os.readlink(f"{entry.path}/ns/mnt")
        except PermissionError:
            key = _root_mount(Path(entry.path))
        except OSError:  # ended meanwhile
            continue
        groups.setdefault(key, []).append(int(entry.name))
    return groups


def _root_mount(process: Path) -> str:
    """A key naming the mount namespace of `process`: the ID of its root mount (IDs are never shared between
    namespaces). A process whose mount table cannot be read at all is a group of its own."""
    try:
        for line in (process / "mountinfo").read_text().splitlines():
            fields = line.split(" ", 5)
            if len(fields) > 4 and fields[4] == "/":
                return f"root-mount:{fields[0]}"
    except OSError:
        pass
    return f"pid:{process.name}"


def _held(proc: Path, pids: list[int], wanted: Mapping[int, str]) -> set[int]:
    """The wanted devices mounted in the namespace of `pids` somewhere else than the plugin's own places."""
    for pid in pids:  # any one process of the namespace tells; the first may just have ended
        try:
            text = (proc / str(pid) / "mountinfo").read_text()
        except PermissionError:
            raise
        except OSError:  # ended meanwhile
            continue
        held = set()
        for line in text.splitlines():
            fields = line.split(" ", 5)
            if len(fields) < 5:
                continue
            major, _, minor = fields[2].partition(":")
            device = os.makedev(int(major), int(minor))
            if device in wanted and not _is_own(_unescape(fields[4]), wanted[device]):
                held.add(device)
        return held
    return set()


def _is_own(mount_point: str, tail: str) -> bool:
    return mount_point.endswith((f"{tail}/data", f"{tail}/view"))


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape")


def _first_process(proc: Path, pids: list[int]) -> int:
    """The process that entered the namespace first: the oldest whose parent is outside it (`docker exec`
    adds later ones)."""
    members = set(pids)
    roots = []
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
            # After the command: state, ppid, ..., starttime (the 22nd field of stat, the 20th here).
            ppid, started = int(fields[1]), int(fields[19])
            if ppid not in members:
                roots.append((started, pid))
    return min(roots)[1] if roots else min(pids)


def signal_each(pids: list[int], name: str) -> None:
    """Send signal `name` (such as "SIGHUP") to each of `pids`; one that has ended meanwhile is skipped."""
    number = signal.Signals[name]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)
