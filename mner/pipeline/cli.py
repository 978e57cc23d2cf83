"""The ``mner`` console script.

Each stage's commands live in their own module (``mner/pipeline/cmd_*.py``) with a
``register(app)`` function, so stages can be added without touching each other.
User mistakes raise :class:`mner.errors.MnerError` and are printed as one line; an
environment failure that escapes a command as an ``OSError`` (unwritable folder, disk
full, file-size limit, read-only filesystem) is printed as one line too, naming the file,
what failed and what to do (:func:`os_error_line`).
"""

from __future__ import annotations

import errno
import importlib
import io
import os
import sys
import types

import typer

from mner.errors import MnerError

app = typer.Typer(
    name="mner",
    help="Multimodal NER: cached vision features, BERT + fusion heads + CRF.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Order here is the order `mner --help` lists the command groups in.
_COMMAND_MODULES = (
    "mner.pipeline.cmd_data",
    "mner.pipeline.cmd_extract",
    "mner.pipeline.cmd_train",
    "mner.pipeline.cmd_report",
)

@app.callback()
def _root() -> None:
    """Multimodal NER: cached vision features, BERT + fusion heads + CRF."""


for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


@app.command()
def version() -> None:
    """Print the mner version and the versions of the libraries it relies on."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    from mner import __version__

    print(f"mner {__version__}")
    for lib in ("torch", "torchvision", "transformers", "open_clip_torch", "h5py", "dvc"):
        try:
            print(f"{lib} {_v(lib)}")
        except PackageNotFoundError:
            print(f"{lib} (not installed)")


#: errno -> (what failed, what to do). Anything else: "failed", "check the path".
_OS_FAILURES: dict[int, tuple[str, str]] = {
    errno.EACCES: ("cannot access", "choose a writable folder or fix its permissions"),
    errno.EPERM: ("cannot access", "choose a writable folder or fix its permissions"),
    errno.EROFS: ("cannot write", "choose a writable folder (this filesystem is read-only)"),
    errno.ENOSPC: ("write failed", "free disk space, or write elsewhere, and run again"),
    errno.EDQUOT: ("write failed", "free space within your disk quota, or write elsewhere"),
    errno.EFBIG: ("write failed", "raise the file-size limit (ulimit -f) or write elsewhere"),
    errno.ENOENT: ("not found", "check the path; the folder it names must exist"),
    errno.ENOTDIR: ("cannot open or create", "a part of the path is a file, not a folder; choose another path"),
    errno.EEXIST: ("cannot create", "a file is in the way; remove it or choose another path"),
    errno.EISDIR: ("is a folder", "pass a file path, not a folder"),
    errno.EIO: ("I/O error", "check the disk and run again"),
}


def os_error_line(exc: OSError) -> str:
    """One line for an ``OSError``: ``<file>: <what failed> (<strerror>); <fix>``.

    The file is the error's own ``filename`` when the failing call knew it (``open``,
    ``mkdir``, ``rename``). A failed ``write()`` does not record one, so then the open
    file being written is looked up in the traceback, innermost frame first.
    """
    path = exc.filename if exc.filename is not None else _path_in_traceback(exc.__traceback__)
    what, fix = _OS_FAILURES.get(exc.errno or -1, ("failed", "check the path and run again"))
    reason = " ".join((exc.strerror or str(exc)).split())  # some libraries' span lines
    if isinstance(path, (str, bytes, os.PathLike)):
        path = os.fsdecode(path)
    head = f"{path}: " if path is not None else ""
    return f"{head}{what} ({reason}); {fix}"


def _path_in_traceback(tb: types.TracebackType | None) -> str | None:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    # An open file object is what was being written; a path object is a weaker hint.
    for kind in (io.IOBase, os.PathLike):
        for frame in reversed(frames):
            for value in frame.f_locals.values():
                if kind is io.IOBase and isinstance(value, io.IOBase):
                    name = getattr(value, "name", None)
                    if isinstance(name, (str, bytes, os.PathLike)):
                        return os.fsdecode(name)
                elif kind is os.PathLike and isinstance(value, os.PathLike):
                    return os.fspath(value)
    return None


def main() -> None:
    """Entry point: run the app; user errors and environment failures are one line, exit 2."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    try:
        app()  # click's standalone mode handles usage errors and exits itself
    except MnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        # An environment failure (disk full, unwritable folder, file-size limit) is not a
        # bug in mner: the user needs the file and the fix, not a traceback.
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
