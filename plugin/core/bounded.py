"""Running untrusted work (a volume's template) where it cannot stall or exhaust the plugin.

A template is accepted at Create and rendered at every Mount and refresh; a loop over a million-character
string never ends, a growing list eats memory, and Python cannot stop a thread. So the work runs in a
forked child: the caller's thread waits on a pipe (releasing the GIL, so other requests go on) until the
deadline, then kills the child. The child's address space is capped (RLIMIT_AS) and its answer bounded.
At most CONCURRENT children run at once, at the lowest CPU priority; waiting for a slot counts against
the deadline.

The child only computes: it touches no lock, file or socket of the parent's, and ends with `os._exit`.
"""

from __future__ import annotations

import gc
import os
import pickle
import resource
import select
import signal
import threading
import time
from collections.abc import Callable

CONCURRENT = 2  # children at once: on a small host, more would take every core
SLOT_WAIT = 0.5  # seconds
MEMORY = 256 << 20  # bytes the child may allocate beyond what it inherits
_slots = threading.BoundedSemaphore(CONCURRENT)


class BoundExceededError(Exception):
    """The work ran out of time or memory, or answered more than allowed; the message says which."""


def run_bounded(work: Callable[[], str], *, seconds: float, max_output: int) -> str:
    """`work()` in a child process, within `seconds` of wall-clock time (waiting for a slot included), a
    MEMORY cap and `max_output` bytes of answer.

    Raises `BoundExceededError`, or the exception `work` raised (re-created in the caller from its pickle)."""
    deadline = time.monotonic() + seconds
    # A fair render takes milliseconds: a slot not free soon is held by runaways, and waiting longer would
    # only tie up the server's threads too.
    wait = min(seconds, SLOT_WAIT)
    if not _slots.acquire(timeout=max(wait, 0)):
        raise BoundExceededError(f"no renderer was free within {wait:g}s (at most {CONCURRENT} at once)")
    try:
        return _run(work, deadline, seconds, max_output)
    finally:
        _slots.release()


def _run(work: Callable[[], str], deadline: float, seconds: float, max_output: int) -> str:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compute, send one pickled (ok, value) and end without any cleanup
        os.close(read_end)
        _child(work, write_end, max_output)
    os.close(write_end)
    try:
        data = _read_until(read_end, deadline, max_output + 4096)
    finally:
        os.close(read_end)
        _reap(pid)
    if data is None:
        raise BoundExceededError(f"did not finish within {seconds:g}s")
    if not data:
        raise BoundExceededError(f"used more than {MEMORY >> 20} MiB of memory, or ended without an answer")
    ok, value = pickle.loads(data)
    if ok:
        return str(value)
    raise value


def _child(work: Callable[[], str], fd: int, max_output: int) -> None:
    status = 0
    try:
        gc.disable()  # no finaliser of the parent's objects runs here
        os.nice(19)  # a runaway burns spare CPU only: the plugin's own threads come first
        resource.setrlimit(resource.RLIMIT_AS, (_address_space() + MEMORY,) * 2)
        try:
            result: tuple[bool, object] = (True, work())
        except MemoryError:
            result = (False, BoundExceededError(f"used more than {MEMORY >> 20} MiB of memory"))
        except Exception as e:  # noqa: BLE001  (sent to the parent, which raises it)
            result = (False, e)
        if result[0] and len(str(result[1]).encode()) > max_output:
            result = (False, BoundExceededError(f"produced more than {max_output} bytes"))
        payload = pickle.dumps(result)
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:  # noqa: BLE001  (nothing may escape into the parent's code)
        status = 1
    finally:
        os._exit(status)


def _read_until(fd: int, deadline: float, limit: int) -> bytes | None:
    """Everything the child writes until it closes the pipe; None if the deadline comes first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise BoundExceededError(f"answered more than {limit} bytes")
        chunks.append(chunk)


def _reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)  # done or not, it ends now
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def _address_space() -> int:
    """The calling process's current virtual memory size, in bytes (VmSize)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0
