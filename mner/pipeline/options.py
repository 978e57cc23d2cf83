"""Options spelled the same on every command: ``--params`` and ``-o/--set KEY=VALUE``.

Each command passes what they hold to :func:`mner.config.configure`, the one config
path, so ``-o`` means the same thing everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

ParamsOpt = Annotated[
    Path | None,
    typer.Option("--params", help="params.yaml to read this command's section from."),
]



def override_option(
    help: str = "Override a setting: -o key=value (repeatable; wins over --params and flags).",
) -> Any:
    """The ``-o/--set KEY=VALUE`` option (repeatable), with a command's own help text."""
    return Annotated[
        list[str] | None, typer.Option("-o", "--set", metavar="KEY=VALUE", help=help)
    ]


OverrideOpt = override_option()

#: ``--override``, the spelling ``mner train`` had before ``-o/--set`` became uniform;
#: hidden, so that old command lines keep working without a second spelling in --help.
OverrideAliasOpt = Annotated[
    list[str] | None, typer.Option("--override", metavar="KEY=VALUE", hidden=True)
]


def overrides(*given: list[str] | None) -> list[str]:
    """The ``key=value`` items of ``-o/--set`` and its hidden alias, in that order."""
    return [item for items in given for item in (items or [])]
