"""Data commands: ``mner sample``, ``mner data stats``, ``mner score``.

Options come from, in increasing priority: the config dataclass defaults, the command's
section of ``--params`` (``sample`` or ``data``), then CLI flags, then ``-o/--set key=value``,
merged by :func:`mner.config.configure`.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mner.config import configure
from mner.data.conll import TYPES
from mner.data.dataset import ReadConfig, read_image_dependent, split_name
from mner.errors import DataError
from mner.pipeline.options import OverrideOpt, ParamsOpt

KeepOtherOpt = Annotated[
    bool | None,
    typer.Option("--keep-other", help="Keep OTHER as its own type (default: MISC)."),
]


class Size(StrEnum):
    """``mner sample --size`` presets (see ``mner.data.sample.SIZES``)."""

    small = "small"
    default = "default"


def _console() -> Console:
    # Rich falls back to 80 columns when piped, which would fold the tables.
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 140))


def _read_config(
    params: Path | None, strict: bool | None, keep_other: bool | None, over
) -> ReadConfig:
    flags = {"strict": strict, "map_other": None if keep_other is None else not keep_other}
    return configure(ReadConfig, "data", params=params, flags=flags, overrides=over)


def sample(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the dataset to.")],
    seed: Annotated[int | None, typer.Option(help="Random seed (default: 0).")] = None,
    size: Annotated[Size | None, typer.Option(help="Preset split sizes.")] = None,
    force: Annotated[
        bool, typer.Option(help="Replace --out even if it holds other files.")
    ] = False,
    params: ParamsOpt = None,
    override: OverrideOpt = None,
) -> None:
    """Generate the sample MNER dataset (tweets, images, image-dependent marks)."""
    from mner.data.sample import SIZES, SampleConfig, generate

    flags: dict[str, Any] = dict(SIZES[size.value]) if size is not None else {}
    flags["seed"] = seed
    cfg = configure(SampleConfig, "sample", params=params, flags=flags, overrides=override)
    generate(cfg, out, overwrite=force)
    manifest = json.loads((out / "sample.json").read_text(encoding="utf-8"))
    counts = manifest["counts"]
    summary = ", ".join(f"{s} {c['tweets'] - c['ocr_dependent']}" for s, c in counts.items())
    ocr = ", ".join(str(c["ocr_dependent"]) for c in counts.values())
    dep = sum(c["image_dependent"] for c in counts.values())
    typer.echo(f"wrote {out}: {summary} tweets (+ {ocr} OCR-dependent); {dep} image-dependent "
               f"entities (seed {cfg.seed})")


def stats(
    files: Annotated[list[Path], typer.Argument(help="CoNLL files, or dataset folders.")],
    images: Annotated[
        Path | None, typer.Option(help="Images folder: count present/missing/unreadable.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    strict: Annotated[
        bool | None, typer.Option("--strict", help="Reject malformed tag sequences.")
    ] = None,
    keep_other: KeepOtherOpt = None,
    params: ParamsOpt = None,
    override: OverrideOpt = None,
) -> None:
    """Tweets, tokens and entities per type for each file (Table 1 of the papers)."""
    from mner.data.stats import dataset_stats

    cfg = _read_config(params, strict, keep_other, override)
    if images is not None and not images.is_dir():
        raise DataError(f"{images}: no such images folder; pass the folder holding <id>.jpg files")
    rows = dataset_stats(
        files, images=images, map_other=cfg.map_other, strict=cfg.strict, progress=True
    )
    if as_json:
        doc = {"map_other": cfg.map_other, "files": [r.to_dict() for r in rows]}
        typer.echo(json.dumps(doc, indent=2))
        return
    types = list(dict.fromkeys(t for r in rows for t in r.entities)) or list(TYPES)
    table = Table(title="Dataset statistics (entities per type)")
    # Row names are split names unless two files share one (e.g. both datasets' train).
    names = [r.split for r in rows]
    if len(set(names)) < len(names):
        names = [r.path for r in rows]
    table.add_column("Split", overflow="fold")
    for t in types:
        table.add_column(t, justify="right")
    for name in ("Total", "#Tweets", "#Tokens"):
        table.add_column(name, justify="right")
    with_images = images is not None
    if with_images:
        for name in ("Img ok", "Missing", "Unreadable"):
            table.add_column(name, justify="right")
    for name, r in zip(names, rows, strict=True):
        cells = [name, *(str(r.entities.get(t, 0)) for t in types)]
        cells += [str(r.total), str(r.tweets), str(r.tokens)]
        if with_images and r.images is not None:
            cells += [str(r.images["ok"]), str(r.images["missing"]), str(r.images["unreadable"])]
        table.add_row(*cells)
    console = _console()
    console.print(table)
    other = sum(r.other_as_misc for r in rows)
    if cfg.map_other:
        console.print(
            f"OTHER entities are counted as MISC ({other} mapped); --keep-other keeps them apart."
        )
    for r in rows:
        if r.image_problems:
            detail = ", ".join(f"{k} {v}" for k, v in r.image_problems.items())
            console.print(f"{r.path}: unreadable images: {detail}")


def score_cmd(
    gold: Annotated[Path, typer.Option("--gold", help="Gold CoNLL file.")],
    pred: Annotated[Path, typer.Option("--pred", help="Predicted CoNLL file (same tweets).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    image_dependent: Annotated[
        Path | None,
        typer.Option(
            "--image-dependent",
            help="image_dependent.tsv: also score the image-dependent entities of this split.",
        ),
    ] = None,
    keep_other: KeepOtherOpt = None,
    params: ParamsOpt = None,
    override: OverrideOpt = None,
) -> None:
    """Entity-level P/R/F1 of a prediction file, exactly as conlleval computes them."""
    from mner.scoring import align_files, marked_for_split, score, score_marked

    cfg = _read_config(params, None, keep_other, override)
    g, p = align_files(gold, pred, map_other=cfg.map_other)
    pred_labels = [tw.labels for tw in p]
    result = score([tw.labels for tw in g], pred_labels)
    dep = None
    if image_dependent is not None:
        split = split_name(gold)
        marks = read_image_dependent(image_dependent, {split: g})
        dep = score_marked(marked_for_split(marks, split, len(g)), pred_labels)
    if as_json:
        doc = result.to_dict()
        doc["image_dependent"] = dep.to_dict() if dep is not None else None
        typer.echo(json.dumps(doc, indent=2))
        return
    table = Table(title=f"{pred} vs {gold}")
    types = list(result.per_type)
    for t in types:
        table.add_column(f"{t} F1", justify="right")
    for name in ("P", "R", "F1"):
        table.add_column(name, justify="right")
    table.add_row(
        *(f"{result.per_type[t].f1:.2f}" for t in types),
        f"{result.overall.precision:.2f}",
        f"{result.overall.recall:.2f}",
        f"{result.overall.f1:.2f}",
    )
    console = _console()
    console.print(table)
    o = result.overall
    console.print(f"entities: {o.n_gold} gold, {o.n_pred} predicted, {o.n_correct} correct")
    if dep is not None:
        console.print(
            f"image-dependent: P {dep.precision:.2f} R {dep.recall:.2f} F1 {dep.f1:.2f} "
            f"({dep.n_gold} marked, {dep.n_pred} predicted on them, {dep.n_correct} correct)"
        )


def register(app: typer.Typer) -> None:
    """Add ``sample``, ``data stats`` and ``score`` to the ``mner`` app."""
    app.command("sample")(sample)
    data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
    data_app.command("stats")(stats)
    app.add_typer(data_app, name="data")
    app.command("score")(score_cmd)
