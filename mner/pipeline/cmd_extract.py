"""``mner extract`` and ``mner inspect``: stage one on the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from mner.errors import DataError
from mner.pipeline.options import OverrideOpt, ParamsOpt

_SPLITS = ("train", "valid", "dev", "test")


def _data_files(items: list[Path] | None) -> list[Path] | None:
    """``--data`` values: CoNLL files, or dataset folders (their train/valid/test.txt)."""
    if not items:
        return None
    files: list[Path] = []
    for item in items:
        if item.is_dir():
            found = [item / f"{s}.txt" for s in _SPLITS if (item / f"{s}.txt").is_file()]
            if not found:
                raise DataError(f"{item}: folder has no train.txt / valid.txt / test.txt; "
                                "pass the CoNLL files with --data")
            files.extend(found)
        else:
            files.append(item)
    return files


def build_config(params: Path | None, flags: dict[str, Any], overrides: list[str] | None):
    """ExtractConfig from params.yaml ``extract``, then CLI flags, then ``-o`` (last wins)."""
    from mner.config import configure
    from mner.extract.config import ExtractConfig

    return configure(ExtractConfig, "extract", params=params, flags=flags, overrides=overrides)


def register(app: typer.Typer) -> None:
    """Add ``extract`` and ``inspect`` to the ``mner`` app."""

    @app.command("extract", context_settings={"allow_extra_args": True})
    def extract(
        ctx: typer.Context,
        images: Path = typer.Option(..., "--images", help="Folder of <id>.jpg/.png images."),
        out: Path = typer.Option(..., "--out", help="Cache file to write, e.g. cache/NAME.h5."),
        data: list[Path] = typer.Option(None, "--data", help="CoNLL files or dataset folders "
                                        "(--data a.txt b.txt, or --data repeated); extracts "
                                        "exactly their images plus CLIP text embeddings."),
        features: str = typer.Option(None, "--features", help="Comma list of resnet, clip, "
                                     "clip_text, objects, relations, crops, tags, ocr, caption "
                                     "(default: all but tags, ocr, caption)."),
        profile: str = typer.Option(None, "--profile", help="paper or tiny."),
        device: str = typer.Option(None, "--device", help="auto, cpu or cuda."),
        batch_size: int = typer.Option(None, "--batch-size", help="Images per batch."),
        workers: int = typer.Option(None, "--workers", help="DataLoader decoding processes."),
        weights_dir: Path = typer.Option(None, "--weights-dir", help="Local weight files "
                                         "<model>.pth (see mner.extract.weights)."),
        overwrite: bool = typer.Option(None, "--overwrite/--no-overwrite",
                                       help="Start over instead of resuming/extending."),
        params: ParamsOpt = None,
        override: OverrideOpt = None,
        quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    ) -> None:
        """Run the frozen vision models over images into an HDF5 feature cache (resumable)."""
        from mner.extract.runner import run_extract

        # click has no variadic options: `--data a b c` leaves b and c as extra arguments.
        if ctx.args and not data:
            raise DataError(f"unexpected argument {ctx.args[0]!r}; CoNLL files go after --data")
        data = list(data or []) + [Path(a) for a in ctx.args]
        cfg = build_config(params, {
            "features": features, "profile": profile, "device": device, "batch_size": batch_size,
            "workers": workers, "weights_dir": weights_dir, "overwrite": overwrite,
        }, override)
        res = run_extract(cfg, images=images, data=_data_files(data), out=out, progress=not quiet)
        counts = ", ".join(f"{k} {v}" for k, v in sorted(res["status"].items()))
        typer.echo(f"wrote {res['out']}: {res['images']} images ({counts}); computed "
                   f"{res['computed']} this run; {res['sentences']} sentences; "
                   f"{res['seconds']:.1f}s")

    @app.command("inspect")
    def inspect_cmd(
        file: Path = typer.Argument(..., help="A cache written by mner extract."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
        statuses: bool = typer.Option(False, "--statuses", help="List the image ids of each "
                                      "non-ok status (missing, truncated, ...)."),
        verify: bool = typer.Option(False, "--verify", help="Re-read every dataset and compare "
                                    "with the checksums recorded at completion; exit 2 on damage."),
    ) -> None:
        """Show a cache's schema, provenance, status counts and per-dataset checksums."""
        from mner.cache.inspect import format_statuses, format_summary, summary
        from mner.cache.inspect import verify as verify_cache

        if verify:
            problems, compared = verify_cache(file)
            for line in problems:
                typer.echo(f"error: {line}", err=True)
            if problems:
                raise typer.Exit(2)
            typer.echo(f"{file}: every dataset reads back" + (
                " and matches the checksums recorded at completion" if compared
                else " (no checksums recorded: made before mner recorded them)"))
            return
        info = summary(file)
        if as_json:
            typer.echo(json.dumps(info, indent=2, sort_keys=True, default=str))
        elif statuses:
            typer.echo(format_statuses(info))
        else:
            typer.echo(format_summary(info))
