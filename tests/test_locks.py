"""Output locks: a second writer is refused with the holder's name; a dead holder's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from mner.errors import LockError
from mner.locks import OutputLock, lock_path, locked

HOLD = """
import sys, time
from pathlib import Path
from mner.locks import OutputLock
lock = OutputLock(Path(sys.argv[1]), folder=sys.argv[2] == "1", what="run folder").acquire()
print("held", flush=True)
time.sleep(60)
"""


def _holder(target, folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target), "1" if folder else "0"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("folder", [True, False])
def test_second_writer_refused_then_stale_lock_taken_over(tmp_path, folder):
    target = tmp_path / ("run" if folder else "x.h5")
    if folder:
        target.mkdir()
    proc = _holder(target, folder)
    try:
        with pytest.raises(LockError) as err:
            OutputLock(target, folder=folder, what="run folder").acquire()
        msg = str(err.value)
        assert f"pid {proc.pid} on " in msg and "started" in msg and str(target) in msg
        assert "\n" not in msg
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # The dead holder left its record behind; the lock itself went with the process.
    assert lock_path(target, folder=folder).exists()
    warnings = []
    with locked(target, folder=folder, warn=warnings.append) as lock:
        assert lock.held
        assert len(warnings) == 1 and f"pid {proc.pid}" in warnings[0] and "stale" in warnings[0]
    assert not lock_path(target, folder=folder).exists()


def test_release_then_reacquire_in_same_process(tmp_path):
    target = tmp_path / "out"
    with locked(target, folder=True):
        pass
    with locked(target, folder=True) as lock:
        assert lock.took_over is None  # a clean release leaves no record to take over
    assert not (target / ".mner.lock").exists()


def test_lock_held_across_unlink_race(tmp_path):
    """A waiter that opened the lock file just before the holder removed it must not win."""
    target = tmp_path / "x.h5"
    a = OutputLock(target, folder=False).acquire()
    fd = os.open(lock_path(target, folder=False), os.O_RDWR)  # a late opener's stale inode
    a.release()
    b = OutputLock(target, folder=False).acquire()
    try:
        with pytest.raises(LockError):
            OutputLock(target, folder=False).acquire()
    finally:
        b.release()
        os.close(fd)
