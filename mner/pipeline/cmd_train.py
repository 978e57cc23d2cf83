"""Stage two's commands: ``mner train``, ``evaluate``, ``predict``, ``export`` and ``models``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from mner.errors import ConfigError
from mner.pipeline.options import OverrideAliasOpt, ParamsOpt, override_option, overrides

OverrideOpt = override_option(
    "Set a train option (-o epochs=3) or a head option (-o head.no_cm=true, or -o no_cm=true "
    "when unambiguous); repeatable, wins over --params and flags."
)


def train(
    data: Annotated[list[str], typer.Option("--data", help="dataset folder, or CoNLL files (repeat)")],
    out: Annotated[Path, typer.Option("--out", help="run folder to write, e.g. runs/umt")],
    features: Annotated[Path | None, typer.Option("--features", help="feature cache (.h5) from `mner extract`")] = None,
    model: Annotated[str | None, typer.Option("--model", help="head name (see `mner models`)")] = None,
    profile: Annotated[str | None, typer.Option("--profile", help="paper or tiny")] = None,
    encoder: Annotated[str | None, typer.Option("--encoder", help="HF name or local folder of the encoder")] = None,
    seeds: Annotated[str | None, typer.Option("--seeds", help="comma-separated seeds, one run each, e.g. 1,2,3")] = None,
    context_file: Annotated[
        Path | None, typer.Option("--context-file", help="JSON lines {\"image_id\" or \"key\", \"context\"} read with each tweet")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a run already in --out")] = False,
    nproc: Annotated[int, typer.Option(
        "--nproc", min=1,
        help="ranks to start on this machine (runs torchrun itself; 1: one process); one seed: DDP, "
             "several: seed-parallel (-o parallel=ddp|seeds forces one)",
    )] = 1,
    params: ParamsOpt = None,
    override: OverrideOpt = None,
    override_alias: OverrideAliasOpt = None,
) -> None:
    """Fine-tune encoder + fusion head + CRF on cached features; writes RUN/metrics.json."""
    from mner.apps.api import train as train_run  # the Python API's mner.train
    from mner.config import configure
    from mner.train import distributed
    from mner.train.config import TrainConfig, route_head_options

    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    if nproc > 1:
        # The same command under torchrun, without --nproc; each rank prints its own errors.
        code = distributed.launch(nproc, _without_nproc(sys.argv[1:]))
        if code:
            raise typer.Exit(code)
        return
    # -o sets a train option (epochs=3) or a head option (head.no_cm=true, or no_cm=true
    # when no_cm is only a head option); --seeds "1,2,3" is read like -o seeds=1,2,3.
    cfg = configure(
        TrainConfig,
        "train",
        params=params,
        flags={"model": model, "profile": profile, "encoder": encoder, "seeds": seeds,
               "context_file": None if context_file is None else str(context_file)},
        overrides=overrides(override, override_alias),
        route=route_head_options,
    )
    src = data[0] if len(data) == 1 else data
    try:
        result = train_run(cfg, src, features, out, resume=resume, overwrite=overwrite)
    except distributed.RankFailed:
        if distributed.world().is_main:
            raise
        raise typer.Exit(2) from None  # rank 0 prints the one line
    if not distributed.world().is_main:
        return
    s = result["summary"]
    line = f"{cfg.model}: dev F1 {s['dev']['overall']['f1']['mean']:.2f}"
    if s["test"] is not None:
        line += f", test F1 {s['test']['overall']['f1']['mean']:.2f}"
        if s["test"]["image_dependent"] is not None:
            line += f" (image-dependent {s['test']['image_dependent']['f1']['mean']:.2f})"
    typer.echo(f"{line}; wrote {out}/metrics.json")


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def evaluate(
    run: Annotated[Path, typer.Option("--run", help="run folder written by `mner train`")],
    data: Annotated[Path, typer.Option("--data", help="CoNLL file to score, e.g. DIR/test.txt")],
    features: Annotated[Path | None, typer.Option("--features", help="cache to read (default: the run's)")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="which seed (default: best on dev)")] = None,
    pred: Annotated[Path | None, typer.Option("--pred", help="also write the predictions (BIO2 CoNLL)")] = None,
    device: Annotated[str, typer.Option("--device")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print the scores as JSON")] = False,
    context_file: Annotated[
        Path | None, typer.Option("--context-file", help="context file (default: the run's, unchanged)")
    ] = None,
    view: Annotated[
        str | None, typer.Option("--view", help="decode the context or the tweet view (default: the run's decode_view)")
    ] = None,
) -> None:
    """Score a trained run on a CoNLL file (overall, per type, image-dependent subset)."""
    from mner.apps.api import evaluate as evaluate_run  # the Python API's mner.evaluate

    r = evaluate_run(run, data, seed=seed, features=features, device=device, pred_out=pred,
                     context_file=context_file, view=view)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    from mner.data.conll import TYPES

    # the papers' column order (PER LOC ORG MISC), then any other type found
    order = {t: i for i, t in enumerate(TYPES)}
    per_type = sorted(r["per_type"].items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    rows = [*per_type, ("overall", r["overall"])]
    if r["image_dependent"] is not None:
        rows.append(("image-dependent", r["image_dependent"]))
    typer.echo(f"{'':16} {'P':>6} {'R':>6} {'F1':>6} {'gold':>5} {'pred':>5}")
    for name, p in rows:
        typer.echo(
            f"{name:16} {p['precision']:6.2f} {p['recall']:6.2f} {p['f1']:6.2f} "
            f"{p['n_gold']:5d} {p['n_pred']:5d}"
        )


def predict(
    run: Annotated[Path, typer.Option(
        "--run", "--run-dir",
        help="run folder written by `mner train` (or `mner export`); spell it --run-dir under torchrun, "
             "whose own parser takes --run for its --run-path")],
    text: Annotated[str | None, typer.Option("--text", help="one tweet as raw text")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="its image (optional)")] = None,
    input_file: Annotated[Path | None, typer.Option("--input", help="batch input: .conll/.txt or .jsonl")] = None,
    images: Annotated[Path | None, typer.Option("--images", help="images folder for --input (by image id)")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="which seed (default: best on dev)")] = None,
    device: Annotated[str, typer.Option("--device")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
    strict_images: Annotated[
        bool,
        typer.Option("--strict-images", help="stop, before tagging anything, if any named image is not ok"),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="with --input: stream the predictions into this JSON-lines file (resumable)"),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="with --out: posts per batch", min=1)] = 64,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help="with --out: progress bar (default: on a terminal)")
    ] = None,
    context_file: Annotated[
        Path | None, typer.Option("--context-file", help="context file, by image id or post id (default: the run's)")
    ] = None,
) -> None:
    """Print the entities (type, word span, characters, score) of new tweets.

    Each post's image gets a status (``image_status`` in --json: ok, missing, truncated,
    not_image, empty, too_large, unreadable, outside, or none when the post names no
    image); a post whose image is not ok is tagged without it, with a warning line.
    Malformed posts (JSON lines, CoNLL tweets) are listed at the end (exit 2) after the
    others are tagged. --out streams any number of posts into a file, resumably (also
    under torchrun).
    """
    from mner.apps.predict import Post, Predictor, image_line, read_posts, tokenize
    from mner.errors import DataError

    if (text is None) == (input_file is None):
        raise ConfigError("predict: pass either --text \"...\" [--image PATH] or --input FILE")
    if out is not None:
        if input_file is None:
            raise ConfigError("predict: --out goes with --input FILE; for --text, use --json and redirect it")
        from mner.apps.api import predict_file

        res = predict_file(run, input_file, out, images=images, seed=seed, device=device, batch_size=batch_size,
                           strict_images=strict_images, progress=progress, context_file=context_file)
        if res.problems:
            from mner.apps.bulk import problems_path

            raise DataError(
                f"{input_file}: {len(res.problems)} line(s) could not be read (listed above and in "
                f"{problems_path(out)}); the other posts are in {out}; fix those lines and run them again"
            )
        typer.echo(f"predict: wrote {res.written} post(s) to {res.out}"
                   + (f" ({res.skipped} already there)" if res.skipped else ""), err=True)
        return
    # A flag of the other mode would be ignored, and the posts tagged without the images meant.
    if text is not None and images is not None:
        raise ConfigError("predict: --images goes with --input; give --text its image with --image PATH")
    if input_file is not None and image is not None:
        raise ConfigError("predict: --image goes with --text; give --input's posts an \"image\" or "
                          "\"image_id\" each (JSON lines), or --images DIR")
    if text is not None:
        if not tokenize(text)[0]:
            raise ConfigError("--text has no words to tag; pass the tweet's text")
        posts = [Post("text", text, "--text", image, None if image is None else str(image))]
        problems: list[str] = []
    else:
        if images is None and (input_file.parent / "images").is_dir():
            images = input_file.parent / "images"
        posts, problems = read_posts(input_file, images)
    predictor = Predictor(run, seed=seed, device=device, context_file=context_file) if posts else None
    checks, warnings = predictor.check_posts(posts, strict=strict_images) if predictor else ([], [])
    for line in warnings:
        typer.echo(line, err=True)
    results = predictor.tag(posts, checks) if predictor else []
    for p, c, r in zip(posts, checks, results, strict=True):
        if c.ok and not r.image.ok:  # decoded, then failed in the extractors
            typer.echo(f"warning: {image_line(p, r.image)}; tagged without it", err=True)
    for p, r in zip(posts, results, strict=True):
        if as_json:
            typer.echo(json.dumps(r.record(p.id, p.line), ensure_ascii=False))
            continue
        if text is None:
            typer.echo(f"{p.id}: {' '.join(p.text) if not isinstance(p.text, str) else p.text}")
        for e, sc in zip(r.entities, r.scored, strict=True):
            where = f"words {e['start']}-{e['end']}"
            if "char_start" in e:
                where += f", chars {e['char_start']}-{e['char_end']}"
            typer.echo(f"  {e['type']:4} {e['text']!r} ({where}, score {sc['score']:.2f})")
        if not r.entities:
            typer.echo("  (no entities)")
    if problems:
        for line in problems:
            typer.echo(f"error: {line}", err=True)
        raise DataError(
            f"{input_file}: {len(problems)} post(s) could not be read (listed above); "
            f"the other {len(posts)} were tagged; fix those lines and run them again"
        )


def export(
    run: Annotated[Path, typer.Argument(help="run folder written by `mner train`")],
    out: Annotated[Path, typer.Option("--out", help="folder to write, e.g. models/umt")],
    seed: Annotated[int | None, typer.Option("--seed", help="which seed (default: best on dev)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing --out")] = False,
) -> None:
    """Write a run's model as a self-contained folder with a model card (README.md)."""
    from mner.apps.api import export as export_model

    path = export_model(run, out, seed=seed, overwrite=overwrite)
    typer.echo(f"wrote {path} (model card: {path / 'README.md'}); load it with mner.load({str(path)!r})")


def models(
    recipe: Annotated[bool, typer.Option("--recipe", help="also show each head's paper training recipe, with sources")] = False,
    model: Annotated[str | None, typer.Option("--model", help="only this head")] = None,
) -> None:
    """List the registered heads, one line each, with the cached features they read.

    ``--recipe`` adds under each head the training recipe ``--profile paper`` applies:
    every value (per dataset where it differs) and where it comes from.
    """
    from mner.train.config import CONTEXT_PRESETS
    from mner.train.heads.base import HEADS, get_head
    from mner.train.recipes import recipe_of

    get_head("bert_crf")  # imports the heads package, which registers them all
    names = [get_head(model).name] if model is not None else sorted(HEADS)
    for name in names:
        cls = HEADS[name]
        needs = list(cls.needs) + (["clip_text"] if cls.needs_text_teacher else [])
        # A context preset reads text features (or a --context-file) through its context.
        context = [s if s != "file" else "--context-file" for s in CONTEXT_PRESETS.get(name, {}).get("context", ())]
        extra = f"; context: {', '.join(context)}" if context else ""
        typer.echo(f"{name:12} {cls.summary}  [features: {', '.join(needs) or 'none'}{extra}]")
        if not recipe:
            continue
        r = recipe_of(cls) or recipe_of(get_head("bert_crf"))
        typer.echo(f"  recipe ({'' if recipe_of(cls) else 'none declared; bert_crf: '}{r.paper}):")
        rows = r.rows()
        width = max(len(k) for k, _, _ in rows)
        for key, value, source in rows:
            typer.echo(f"    {key:{width}}  {value:17}  {source}")
        for note in r.notes:
            typer.echo(f"    note: {note}")


def register(app: typer.Typer) -> None:
    """Add the stage-two commands to the ``mner`` app."""
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("predict")(predict)
    app.command("export")(export)
    app.command("models")(models)
