"""Per-mount tmpfs: the only module that mounts and unmounts.

Layout for one mount: `<root>/<volume>/<mount id>/data` is a private tmpfs the plugin writes into, and
`<root>/<volume>/<mount id>/view` a read-only bind of it, which is what dockerd bind-mounts into the
container. Both carry `nodev,nosuid,noexec`. The tmpfs itself (its superblock) is read-only but while
the plugin swaps files: whatever a runtime does with the path (Podman binds it read-write and without
noexec), the container, though it owns the tmpfs root, can neither write nor chmod, and the files have no
execute bit. Files are written as the OpenBao agent's file sink does: temp file, owner and mode, then
rename, so a reader never sees a partial file.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from plugin.core.errors import MountError
from plugin.core.ports import Mounter
from plugin.host.holders import holders

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2
_HARDENED = MS_NOSUID | MS_NODEV | MS_NOEXEC

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _mount(source: str, target: Path, fstype: str | None, flags: int, data: str | None = None) -> None:
    rc = _libc.mount(
        source.encode(),
        str(target).encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


def _umount(target: Path) -> None:
    if _libc.umount2(str(target).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more): nothing to undo
            raise OSError(err, os.strerror(err), str(target))


def directory_mode(file_mode: int) -> int:
    """The tmpfs root's mode: whoever may read a file may list and enter the directory, nobody may write."""
    readable = file_mode & 0o444
    return readable | (readable >> 2)


class TmpfsMounter(Mounter):
    """Creates and removes the tmpfs of each mount under `root`. Raises `MountError` on OS failures."""

    def __init__(self, root: Path):
        self._root = root

    def view_path(self, volume: str, mount_id: str) -> Path:
        return self._root / volume / mount_id / "view"

    def is_mounted(self, volume: str, mount_id: str) -> bool:
        return os.path.ismount(self.view_path(volume, mount_id))

    def mount(
        self, volume: str, mount_id: str, files: Mapping[str, bytes], *, uid: int, gid: int, mode: int, size: int
    ) -> Path:
        """Mount a fresh tmpfs holding `files` and return its read-only view.

        On failure everything made so far is removed before `MountError` is raised.
        """
        base = self._root / volume / mount_id
        data, view = base / "data", base / "view"
        try:
            self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
            (self._root / volume).mkdir(mode=0o700, exist_ok=True)
            base.mkdir(mode=0o700)
            data.mkdir(mode=0o700)
            view.mkdir(mode=0o700)
            options = f"size={size},nr_inodes={len(files) * 2 + 16},mode={directory_mode(mode):o},uid={uid},gid={gid}"
            _mount("tmpfs", data, "tmpfs", _HARDENED, options)
            with _tmpfs_root(data) as root:
                for name, content in files.items():
                    write_atomically(root, name, content, uid=uid, gid=gid, mode=mode)
            _mount("none", data, None, MS_REMOUNT | MS_RDONLY | _HARDENED)  # the superblock: for every mount of it
            _mount(str(data), view, None, MS_BIND)
            # A bind mount ignores flags on creation; they take effect only on a remount.
            _mount("none", view, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _HARDENED)
        except OSError as e:
            self._remove(volume, mount_id)
            raise MountError(_failure(f"could not create the tmpfs for volume {volume}", e, files, size)) from e
        return view

    def rewrite(
        self, volume: str, mount_id: str, files: Mapping[str, bytes], *, uid: int, gid: int, mode: int
    ) -> list[str]:
        """Replace the files whose content changed, all or none (see `_swap`); returns the names written."""
        data = self._root / volume / mount_id / "data"
        try:
            with _tmpfs_root(data) as root:
                changed = [name for name, content in files.items() if _read(root, name) != content]
                if not changed:
                    return []
                with _writable(data):
                    _swap(root, changed, files, uid=uid, gid=gid, mode=mode)
        except OSError as e:
            raise MountError(_failure(f"could not update the files of volume {volume}", e, files, None)) from e
        return changed

    def wipe(self, volume: str, mount_id: str) -> None:
        """Delete every file of a mount, leaving its (now empty) tmpfs mounted for the running container."""
        data = self._root / volume / mount_id / "data"
        try:
            with _tmpfs_root(data) as root, _writable(data):
                for name in os.listdir(root):
                    os.unlink(name, dir_fd=root)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise MountError(f"could not wipe the files of volume {volume}: {e.strerror} ({e.filename})") from e

    def holders(self, volume: str, mount_id: str) -> list[int] | None:
        """The containers binding the mount, from every process's mountinfo (see `plugin.host.holders`)."""
        found = self.holders_of([(volume, mount_id)])
        return None if found is None else found[(volume, mount_id)]

    def holders_of(self, mounts: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[int]] | None:
        """`holders` of each (volume, mount ID), from one look at every process."""
        devices: dict[int, tuple[str, str]] = {}
        for volume, mount_id in mounts:
            try:
                with _tmpfs_root(self._root / volume / mount_id / "data") as root:
                    devices[os.fstat(root).st_dev] = (volume, mount_id)
            except OSError:
                pass  # not mounted: nobody holds it
        found = holders({device: f"/{v}/{m}" for device, (v, m) in devices.items()})
        if found is None:
            return None
        held: dict[tuple[str, str], list[int]] = {key: [] for key in mounts}
        for device, key in devices.items():
            held[key] = found[device]
        return held

    def unmount(self, volume: str, mount_id: str) -> None:
        """Unmount the view and the tmpfs and remove their directories. Unknown mounts are a no-op."""
        try:
            self._remove(volume, mount_id)
        except OSError as e:
            raise MountError(f"could not remove the tmpfs of volume {volume}: {e.strerror} ({e.filename})") from e

    def _remove(self, volume: str, mount_id: str) -> None:
        base = self._root / volume / mount_id
        for path in (base / "view", base / "data"):
            _umount(path)
        for path in (base / "view", base / "data", base, self._root / volume):
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.ENOTEMPTY or path == base:
                    raise


@contextlib.contextmanager
def _tmpfs_root(data: Path) -> Iterator[int]:
    """A descriptor of the tmpfs mounted at `data`, for writing relative to it: a write through it lands in
    that tmpfs (in memory) even if it is unmounted meanwhile, never in the directory beneath, which is on
    disk. Raises `OSError` (ENOENT) if no tmpfs is mounted at `data` any more (an Unmount came first)."""
    fd = os.open(data, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_dev == os.stat(data.parent).st_dev:  # a plain directory: nothing is mounted here
            raise OSError(errno.ENOENT, "the tmpfs is not mounted any more", str(data))
        yield fd
    finally:
        os.close(fd)


# Held while a tmpfs is writable: one swap at a time on the host (they are rare and quick).
_WRITABLE = threading.Lock()


@contextlib.contextmanager
def _writable(data: Path) -> Iterator[None]:
    """The tmpfs at `data` writable (its superblock read-write) for the block, read-only again after it."""
    with _WRITABLE:
        _mount("none", data, None, MS_REMOUNT | _HARDENED)
        try:
            yield
        finally:
            _mount("none", data, None, MS_REMOUNT | MS_RDONLY | _HARDENED)


def _swap(root: int, names: list[str], files: Mapping[str, bytes], *, uid: int, gid: int, mode: int) -> None:
    """Replace `names` in `root`, all or none: every new file is written in full beside the old one first,
    then each renamed over it, so a tmpfs too full for the new secrets keeps every old file (and no temp)."""
    staged: list[str] = []
    try:
        for name in names:
            staged.append(_stage(root, name, files[name], uid=uid, gid=gid, mode=mode))
    except BaseException:
        for temp in staged:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=root)
        raise
    for name, temp in zip(names, staged, strict=True):
        os.rename(temp, name, src_dir_fd=root, dst_dir_fd=root)


def _read(root: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as file:
        return file.read()


def write_atomically(root: int, name: str, content: bytes, *, uid: int, gid: int, mode: int) -> None:
    """Write `name` in the directory `root` (a descriptor) via a temp file renamed over it: readers see the
    old or the new file, whole. An `OSError` names the file (calls on a descriptor, such as a write that
    finds the tmpfs full, do not)."""
    temp = _stage(root, name, content, uid=uid, gid=gid, mode=mode)
    try:
        os.rename(temp, name, src_dir_fd=root, dst_dir_fd=root)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=root)
        raise OSError(e.errno, e.strerror, name) from e


def _stage(root: int, name: str, content: bytes, *, uid: int, gid: int, mode: int) -> str:
    """Write `content` to a temp file for `name` in `root`, owned and moded already; returns the temp's name.
    On failure nothing is left, and the `OSError` names `name`."""
    temp = f".{name}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=root)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
    except OSError as e:
        # A part-written temp file would be visible (and readable) in the container's view: never leave one.
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=root)
        if e.filename is None:
            raise OSError(e.errno, e.strerror, name) from e
        raise
    return temp


def _failure(what: str, error: OSError, files: Mapping[str, bytes], size: int | None) -> str:
    """The Err for a failed write: a full tmpfs says which file did not fit and how much the secrets need."""
    name = Path(str(error.filename)).name
    if error.errno == errno.ENOSPC and name in files:
        total = sum(len(content) for content in files.values())
        limit = f"size={size // 1024}k" if size else "its size="
        return (
            f"{what}: file {name} ({len(files[name])} bytes) does not fit; the secrets take {total} bytes in "
            f"{len(files)} file(s), more than {limit} leaves room for: raise size= (at most 16m)"
        )
    return f"{what}: {error.strerror} ({name if name in files else error.filename})"
