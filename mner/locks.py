"""Exclusive locks on outputs: one writer per cache file, run folder or report folder.

A second ``mner`` process that would write the same output stops with one line naming
the holder (pid, host, start time) instead of deleting or mixing the first one's files.

The lock is an advisory ``flock`` on a small lock file. The kernel drops it when the
holding process dies (``kill -9`` included), so a stale lock is detected by simply
acquiring it; the holder record left in the file by the dead process is reported as
taken over. On NFS, Linux implements ``flock`` with POSIX byte-range locks, which the
server arbitrates across hosts, so a shared filesystem between nodes is covered too.

Lock files live beside the output (``NAME.h5.lock`` for a file) or inside it
(``DIR/.mner.lock`` for a folder) and are removed on release.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from mner.errors import LockError

#: File name of the lock inside a locked folder.
FOLDER_LOCK_NAME = ".mner.lock"


def lock_path(output: Path, *, folder: bool) -> Path:
    """Where the lock of ``output`` lives: ``DIR/.mner.lock`` or ``FILE.lock``."""
    output = Path(output)
    return output / FOLDER_LOCK_NAME if folder else output.with_name(output.name + ".lock")


def _holder_text(raw: str) -> str:
    try:
        info = json.loads(raw)
        return f"pid {info['pid']} on {info['host']} (started {info['started']}, {info['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process (no holder record)"


class OutputLock:
    """An exclusive, non-blocking lock on one output.

    Args:
        output: the cache file or folder to protect.
        folder: True when ``output`` is a folder (the lock file goes inside it).
        what: a short noun for messages ("feature cache", "run folder", ...).

    Raises (on :meth:`acquire`):
        LockError: another live process holds the lock; the message names it.
    """

    def __init__(self, output: Path, *, folder: bool, what: str = "output") -> None:
        self.output = Path(output)
        self.path = lock_path(self.output, folder=folder)
        self.what = what
        self._fd: int | None = None
        #: Holder record of a dead process whose lock was taken over, if any.
        self.took_over: str | None = None

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                os.close(fd)
                raise LockError(
                    f"{self.output}: this {self.what} is being written by {_holder_text(raw)}; "
                    "wait for it to finish, stop it, or choose another output"
                ) from None
            # The holder before us may have unlinked the file between our open and our
            # flock: then we locked an orphan inode, and must lock the current file.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if old:
            self.took_over = _holder_text(old)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:200] or "python",
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:  # an unwritable folder: the kernel lock still goes with the fd
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def locked(output: Path, *, folder: bool, what: str = "output", warn=None):
    """``with locked(path, folder=..., what=...):`` hold :class:`OutputLock` for the block.

    ``warn(message)`` (default: print to stderr) is called once when a stale lock left by
    a dead process was taken over.
    """
    lock = OutputLock(output, folder=folder, what=what).acquire()
    try:
        if lock.took_over:
            (warn or (lambda m: print(m, file=sys.stderr)))(
                f"warning: {output}: took over a stale lock left by {lock.took_over}, which is no longer running"
            )
        yield lock
    finally:
        lock.release()
