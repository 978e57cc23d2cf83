"""The public Python API (``import mner``): the CLI's commands as functions.

Every stage takes the same options as its command, through the same config objects:
either a config dataclass (``ExtractConfig``, ``TrainConfig``) or keyword options,
which go through the one config path :func:`mner.config.configure` (a ``params.yaml``
section first, then the keywords), so a wrong key or type is the same one-line
:class:`~mner.errors.ConfigError` as on the command line. The ``mner`` commands are thin
layers over these functions.

Example::

    import mner
    tagger = mner.load("runs/umt")                  # a run folder or an exported model
    tagger("Kevin Durant visits Oakland", "photo.jpg")
    # [{'entity_group': 'PER', 'score': 0.98, 'word': 'Kevin Durant', 'start': 0, 'end': 12,
    #   'word_start': 0, 'word_end': 2}, ...]
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mner.errors import ConfigError, DataError

if TYPE_CHECKING:
    from mner.apps.bulk import BulkResult
    from mner.apps.predict import Predictor
    from mner.extract.config import ExtractConfig
    from mner.train.config import TrainConfig

T = TypeVar("T")
PathLike = str | os.PathLike

_SPLITS = ("train", "valid", "dev", "test")


def _config(cls: type[T], section: str, config: T | None, params: PathLike | None,
            options: Mapping[str, Any], overrides: Sequence[str] | None = None, route=None) -> T:
    """``config`` as given, or one built from ``params`` + keyword ``options`` (+ ``-o`` strings)."""
    from mner.config import configure

    if config is not None:
        if not isinstance(config, cls):
            raise ConfigError(f"mner.{section}(): config must be a {cls.__name__}, found {type(config).__name__}")
        if options or params is not None or overrides:
            raise ConfigError(f"mner.{section}(): pass either config= or options (params=, keywords), not both")
        return config
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"mner.{section}(): unknown option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(unknown)}; valid options: {', '.join(sorted(fields))}")
    return configure(cls, section, params=None if params is None else Path(params), flags=dict(options),
                     overrides=list(overrides or []), route=route)


def load(run_or_folder: PathLike, seed: int | None = None, device: str = "auto",
         weights_dir: PathLike | None = None, context_file: PathLike | None = None) -> Predictor:
    """A predictor for a run folder (``mner train --out``) or an exported model (``mner export``).

    Args:
        run_or_folder: the folder.
        seed: which seed's model (default: the best on dev).
        device: ``auto``, ``cpu`` or ``cuda[:i]``; also where image features are computed.
        weights_dir: the folder of local vision weight files (``mner extract
            --weights-dir``), needed on another machine when the training cache used them.
        context_file: for a run trained with ``--context-file``: the file to look posts
            up in (by image id, or by post id as ``"key"``); default the run's own.

    Returns:
        A :class:`~mner.apps.predict.Predictor`: call it on a text (or a list of texts)
        with an image path, a PIL image or None (or a list of them).
    """
    from mner.apps.predict import Predictor

    return Predictor(run_or_folder, seed=seed, device=device, weights_dir=weights_dir,
                     context_file=context_file)


def predict_file(
    run: PathLike | Predictor,
    input_file: PathLike,
    out: PathLike,
    *,
    images: PathLike | None = None,
    seed: int | None = None,
    device: str = "auto",
    batch_size: int = 64,
    strict_images: bool = False,
    progress: bool | None = None,
    context_file: PathLike | None = None,
) -> BulkResult:
    """``mner predict --input FILE --out OUT``: stream a file of posts into JSON lines (resumable).

    Args:
        run: a run/exported folder, or a predictor from :func:`load`.
        input_file: JSON lines (``{"text", "image" | "image_id", "id"}``) or CoNLL.
        out: the output file (one JSON object per post); an existing one is resumed.
        images: the folder ``image_id``s are looked up in.
        seed, device: as for :func:`load`.
        batch_size: posts per batch.
        strict_images: stop at the first post whose named image is not ok.
        progress: progress bar on stderr (None: when stderr is a terminal).
        context_file: as for :func:`load`.

    Returns:
        A :class:`~mner.apps.bulk.BulkResult` (``written``, ``skipped``, ``problems``).
    """
    from mner.apps.bulk import predict_file as _predict_file
    from mner.apps.predict import Predictor

    make = run if isinstance(run, Predictor) else (
        lambda: Predictor(run, seed=seed, device=device, context_file=context_file))
    return _predict_file(make, input_file, out, images=images, batch_size=batch_size,
                         strict_images=strict_images, progress=progress)


def _data_files(data: PathLike | Sequence[PathLike] | None) -> list[Path] | None:
    """CoNLL files, with each dataset folder replaced by its train/valid/test.txt."""
    if data is None:
        return None
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    files: list[Path] = []
    for item in map(Path, items):
        found = [item / f"{s}.txt" for s in _SPLITS if (item / f"{s}.txt").is_file()] if item.is_dir() else [item]
        if not found:
            raise DataError(f"{item}: folder has no train.txt / valid.txt / test.txt; pass the CoNLL files")
        files.extend(found)
    return files


def extract(
    config: ExtractConfig | None = None,
    *,
    images: PathLike,
    out: PathLike,
    data: PathLike | Sequence[PathLike] | None = None,
    progress: bool = True,
    params: PathLike | None = None,
    nproc: int | None = None,
    **options: Any,
) -> dict:
    """``mner extract``: run the frozen vision models over images into an HDF5 feature cache.

    Args:
        config: an ``ExtractConfig``; or leave it out and give ``params`` (a
            params.yaml, its ``extract`` section) and/or keyword options
            (``profile="tiny"``, ``features=["resnet"]``, ``device="cpu"``, ...).
        images: folder of ``<id>.jpg``/``.png`` images.
        out: the cache file, e.g. ``cache/NAME.h5`` (resumable).
        data: CoNLL files or dataset folders: exactly their images are extracted.
        progress: show a progress bar.
        nproc: processes to launch with torchrun (``--nproc``): each extracts a shard and
            the shards are merged into ``out``; None or 1 runs here (under torchrun, leave
            it out: each rank already is one of the processes).

    Returns:
        The summary ``mner extract`` prints (``out``, ``images``, ``status``, ...).
    """
    from mner.extract.config import ExtractConfig
    from mner.extract.runner import run_extract

    cfg = _config(ExtractConfig, "extract", config, params, options)
    return run_extract(cfg, images=images, data=_data_files(data), out=out, progress=progress,
                       nproc=nproc)


def train(
    config: TrainConfig | None = None,
    data: PathLike | Sequence[PathLike] | None = None,
    features: PathLike | None = None,
    out: PathLike | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    params: PathLike | None = None,
    overrides: Sequence[str] | None = None,
    **options: Any,
) -> dict:
    """``mner train``: fine-tune encoder + fusion head + CRF; writes the run folder ``out``.

    Args:
        config: a ``TrainConfig``; or leave it out and give ``params`` (its ``train``
            section), keyword options (``model="umt"``, ``profile="tiny"``,
            ``epochs=3``, ``seeds=[1, 2]``, ``head={"no_cm": True}``) and/or
            ``overrides`` (``-o`` strings such as ``"no_cm=true"``).
        data: a dataset folder (train/valid/test.txt) or CoNLL files.
        features: the feature cache (models that read image features).
        out: the run folder to write.
        resume: continue an interrupted run.
        overwrite: replace a run already in ``out``.

    Returns:
        The contents of ``out/metrics.json``.
    """
    from mner.train.config import TrainConfig, route_head_options
    from mner.train.trainer import train_run

    if data is None or out is None:
        raise ConfigError("mner.train(): pass data= (a dataset folder or CoNLL files) and out= (the run folder)")
    cfg = _config(TrainConfig, "train", config, params, options, overrides, route_head_options)
    return train_run(cfg, data, features, out, resume=resume, overwrite=overwrite)


def evaluate(
    run: PathLike,
    data: PathLike,
    *,
    seed: int | None = None,
    features: PathLike | None = None,
    device: str = "auto",
    pred_out: PathLike | None = None,
    context_file: PathLike | None = None,
    view: str | None = None,
) -> dict:
    """``mner evaluate``: score a trained run (or exported model) on a CoNLL file.

    Args:
        run: the run folder, or a folder ``mner export`` wrote.
        data: the CoNLL file to score.
        seed: which seed's model (default: the best on dev).
        features: the feature cache of ``data``'s images (default: the run's).
        device: ``auto``, ``cpu`` or ``cuda[:i]``.
        pred_out: also write the predictions there (BIO2 CoNLL).
        context_file: for a run that reads a context file: the file (default: the run's,
            unchanged).
        view: ``context`` or ``tweet``: which view to decode (default: the run's
            ``decode_view``).

    Returns:
        ``{"overall", "per_type", "image_dependent"}`` with precision, recall, F1 (in
        percent) and entity counts.
    """
    from mner.train.evaluation import evaluate_run

    return evaluate_run(Path(run), Path(data), seed=seed, features=None if features is None else Path(features),
                        device=device, pred_out=None if pred_out is None else Path(pred_out),
                        context_file=None if context_file is None else Path(context_file), view=view)


def export(run: PathLike, out: PathLike, *, seed: int | None = None, overwrite: bool = False) -> Path:
    """``mner export``: a run's model as a self-contained, shareable folder with a model card.

    See :func:`mner.apps.export.export_run`.
    """
    from mner.apps.export import export_run

    return export_run(run, out, seed=seed, overwrite=overwrite)
