"""The ``mner`` console script.

Each stage's commands live in their own module (``mner/pipeline/cmd_*.py``) with a
``register(app)`` function, so stages can be added without touching each other.
User mistakes raise :class:`mner.errors.MnerError` and are printed as one line.
"""

from __future__ import annotations

import importlib
import os
import sys

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


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit status 2."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    try:
        app()  # click's standalone mode handles usage errors and exits itself
    except MnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
