"""Environment failures on the command line: one line naming the file and the fix, exit 2.

Each failure is real: a path under a regular file (tests run as root, where chmod does
not stop a write), a file-size limit (RLIMIT_FSIZE) in a subprocess, a write hook that
raises ENOSPC, and a second process holding the report folder's lock.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_report import make_run  # a run folder as mner train writes it, without training


def one_error_line(stderr: str) -> str:
    lines = stderr.strip("\n").split("\n")
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def a_file(tmp_path) -> Path:
    """A regular file: any path below it cannot be created, even by root."""
    f = tmp_path / "a_file"
    f.write_text("not a folder\n")
    return f


def test_sample_into_a_path_under_a_file(a_file, mner_cli):
    code, _, err = mner_cli("sample", "--out", a_file / "sub", "--size", "small")
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"error: {a_file}: cannot create (")
    assert line.endswith("; a file is in the way; remove it or choose another path")
    assert a_file.read_text() == "not a folder\n"


def _file_size_limit(limit: int):
    def setup() -> None:
        # Without SIG_IGN the kernel kills the writer with SIGXFSZ; ignored, write()
        # fails with EFBIG, as it does for a user whose shell has `ulimit -f`.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return setup


def test_sample_under_a_file_size_limit(tmp_path):
    out = tmp_path / "sample"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "mner.pipeline.cli", "sample", "--out", str(out), "--size", "small"],
        preexec_fn=_file_size_limit(1000), capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    # The file being written when the limit hit: an image in the partial of --out.
    assert line.startswith(f"error: {tmp_path}/") and "sample" in line.split(":")[1]
    assert line.endswith(
        ": write failed (File too large); raise the file-size limit (ulimit -f) or write elsewhere"
    )
    assert not out.exists()  # the final name only ever holds a complete dataset


@pytest.fixture
def one_run(tmp_path) -> Path:
    return make_run(tmp_path / "runs", "bert", "bert_crf", "sample", [70.0])


def test_report_into_a_path_under_a_file(one_run, a_file, mner_cli):
    code, _, err = mner_cli("report", one_run, "--out", a_file / "reports", "-o", "plots=false")
    assert code == 2
    assert one_error_line(err) == (
        f"error: {a_file}/reports: cannot open or create (Not a directory); "
        "a part of the path is a file, not a folder; choose another path"
    )


def test_report_on_a_full_disk(one_run, tmp_path, mner_cli, monkeypatch):
    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", disk_full)
    out = tmp_path / "reports"
    code, _, err = mner_cli("report", one_run, "--out", out, "-o", "plots=false")
    assert code == 2
    assert one_error_line(err) == (
        f"error: {out}/results.md.part: write failed (No space left on device); "
        "free disk space, or write elsewhere, and run again"
    )
    assert sorted(p.name for p in out.iterdir()) == []  # no report, and the lock released


def test_evaluate_pred_into_a_path_under_a_file(sample_dir, a_file, mner_cli, monkeypatch):
    """The prediction file is written by the real writer; scoring a run is stubbed out
    because training one for this test would cost the suite tens of seconds."""
    from mner.data.conll import read_conll, write_conll
    from mner.train import evaluation

    def evaluate_run(run, data, *, seed, features, device, pred_out, **_):
        write_conll(pred_out, read_conll(data))
        raise AssertionError("unreachable: the write must fail")

    monkeypatch.setattr(evaluation, "evaluate_run", evaluate_run)
    pred = a_file / "preds" / "test.txt"
    code, _, err = mner_cli("evaluate", "--run", a_file.parent, "--data",
                            sample_dir / "test.txt", "--pred", pred)
    assert code == 2
    assert one_error_line(err) == (
        f"error: {a_file}/preds: cannot open or create (Not a directory); "
        "a part of the path is a file, not a folder; choose another path"
    )


def test_report_folder_is_locked_by_a_live_writer(one_run, tmp_path, mner_cli):
    out = tmp_path / "reports"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from mner.locks import OutputLock\n"
         f"OutputLock({str(out)!r}, folder=True, what='report folder').acquire()\n"
         "print('locked', flush=True)\n"
         "time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        code, _, err = mner_cli("report", one_run, "--out", out, "-o", "plots=false")
        assert code == 2
        line = one_error_line(err)
        assert line.startswith(f"error: {out}: this report folder is being written by pid {holder.pid} on ")
        assert line.endswith("wait for it to finish, stop it, or choose another output")
        assert [p.name for p in out.iterdir()] == [".mner.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is taken over with a warning.
    code, out_text, err = mner_cli("report", one_run, "--out", out, "-o", "plots=false")
    assert code == 0, err
    assert f"took over a stale lock left by pid {holder.pid}" in err
    assert sorted(p.name for p in out.iterdir()) == [
        "dev_f1.csv", "metrics.json", "results.json", "results.md"]


@pytest.mark.parametrize("code, line", [
    (errno.EACCES, "out/x: cannot access (Permission denied); choose a writable folder or fix "
                   "its permissions"),
    (errno.EROFS, "out/x: cannot write (Read-only file system); choose a writable folder "
                  "(this filesystem is read-only)"),
    (errno.EDQUOT, "out/x: write failed (Disk quota exceeded); free space within your disk "
                   "quota, or write elsewhere"),
    (errno.ENOENT, "out/x: not found (No such file or directory); check the path; the folder "
                   "it names must exist"),
    (errno.ENOTSUP, "out/x: failed (Operation not supported); check the path and run again"),
])
def test_os_error_line_by_errno(code, line):
    from mner.pipeline.cli import os_error_line

    assert os_error_line(OSError(code, os.strerror(code), "out/x")) == line


def test_os_error_line_finds_the_file_being_written(tmp_path):
    """write() does not record a file name: the open file in the traceback is named."""
    from mner.pipeline.cli import os_error_line

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = tmp_path / "data.bin"
    try:
        with open(target, "wb") as f:
            Full().write(b"x")
            f.write(b"never")
    except OSError as exc:
        line = os_error_line(exc)
    assert line == (f"{target}: write failed (No space left on device); "
                    "free disk space, or write elsewhere, and run again")
