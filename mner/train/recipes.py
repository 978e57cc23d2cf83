"""Per-paper training recipes: how each paper fine-tuned its model.

Each head declares its paper's recipe as a class attribute ``recipe`` (a
:class:`Recipe`); ``--profile paper`` applies it (``TrainConfig`` in
:mod:`mner.train.config`), the tiny profile keeps its own test values
(``PROFILE_DEFAULTS["tiny"]`` there), and any value the user sets (params.yaml, a flag,
``-o``) wins over both. Every value carries its source: the paper's section, the released
code file, or "not given: ..." with what mner follows instead. ``mner models --recipe``
prints them; docs/fidelity.md tabulates them.

Datasets. Some values differ per dataset (UMT's and MAF's released code train
Twitter-2015 and Twitter-2017 for different numbers of epochs). The dataset is
recognised from ``train.dataset_name`` or, when that is not set, the name of the data
folder (``data/twitter2017/`` -> ``twitter2017``): lower-cased and stripped of
everything but letters and digits, a name that is one of the aliases in
:data:`DATASET_ALIASES` or starts with ``twitter2015`` / ``twitter2017`` is that
dataset. Any other name (the generated sample, your own data) gets the recipe's
base values.

Model selection. The papers train a fixed number of epochs and test the epoch with
the best dev F1; the recipes do the same with ``patience: 0`` (no early stopping),
and the trainer keeps the best dev epoch's model whatever the patience.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: The TrainConfig fields a recipe sets, in the order ``mner models --recipe`` shows them.
RECIPE_FIELDS = (
    "encoder", "batch_size", "epochs", "patience", "lr_encoder", "lr_head", "warmup_ratio",
    "max_length", "dropout",
)

#: Names a dataset folder (or ``dataset_name``) may have, after lower-casing and keeping
#: letters and digits only, for each dataset with per-dataset recipe values.
DATASET_ALIASES: dict[str, tuple[str, ...]] = {
    "twitter2015": ("twitter2015", "twitter15", "tw15", "t15"),
    "twitter2017": ("twitter2017", "twitter17", "tw17", "t17"),
}

#: One recipe value and where it comes from.
Setting = tuple[Any, str]

#: What "not given" means when a paper is silent on warmup or selection.
DEVLIN = "not given: follows Devlin et al. (2019) BERT fine-tuning"
BEST_DEV = "best dev epoch over the fixed epochs (no early stopping)"


def dataset_key(name: str | None) -> str | None:
    """The recipe dataset key (``twitter2015`` / ``twitter2017``) a name stands for, or None.

    Args:
        name: ``train.dataset_name`` or the data folder's name, e.g. ``Twitter-2017``.
    """
    if not name:
        return None
    norm = re.sub(r"[^a-z0-9]", "", str(name).lower())
    for key, aliases in DATASET_ALIASES.items():
        if norm in aliases or norm.startswith(key):
            return key
    return None


@dataclass(frozen=True)
class Recipe:
    """A paper's fine-tuning recipe: every :data:`RECIPE_FIELDS` value with its source.

    Each field but ``paper``, ``datasets`` and ``notes`` is a ``(value, source)`` pair.

    Attributes:
        paper: the paper (and released code) the values come from.
        encoder: pretrained text encoder (Hugging Face name).
        batch_size: training sentences per batch.
        epochs: training epochs (the best dev epoch among them is kept).
        patience: early-stopping patience; 0 = none (the papers select the best dev epoch).
        lr_encoder: learning rate of the text encoder.
        lr_head: learning rate of the fusion head, emission layer and CRF.
        warmup_ratio: share of the steps with linear warmup.
        max_length: maximum sub-tokens per window.
        dropout: dropout before the emission layer.
        datasets: per-dataset overrides, ``{"twitter2017": {"epochs": (22, "source")}}``.
        notes: what the paper does that a training config does not hold (e.g. "mean of
            3 runs"); shown with the recipe.
    """

    paper: str
    encoder: Setting
    batch_size: Setting
    epochs: Setting
    patience: Setting
    lr_encoder: Setting
    lr_head: Setting
    warmup_ratio: Setting
    max_length: Setting
    dropout: Setting
    datasets: Mapping[str, Mapping[str, Setting]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A recipe is code: a malformed one is a programming error, caught at import.
        settings = [(k, getattr(self, k)) for k in RECIPE_FIELDS]
        for ds, over in self.datasets.items():
            if ds not in DATASET_ALIASES:
                raise TypeError(f"recipe of {self.paper}: unknown dataset {ds!r}")
            for k, v in over.items():
                if k not in RECIPE_FIELDS:
                    raise TypeError(f"recipe of {self.paper}: {ds}.{k} is not a recipe field")
                settings.append((f"{ds}.{k}", v))
        for k, v in settings:
            if not (isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], str) and v[1]):
                raise TypeError(f"recipe of {self.paper}: {k} must be (value, source), got {v!r}")

    def setting(self, key: str, dataset: str | None = None) -> Setting:
        """``(value, source)`` of ``key`` for ``dataset`` (a :func:`dataset_key` or None)."""
        over = self.datasets.get(dataset or "", {})
        return over.get(key, getattr(self, key))

    def values(self, dataset: str | None = None) -> dict[str, Any]:
        """``{field: value}`` of every recipe field for ``dataset``."""
        return {k: self.setting(k, dataset)[0] for k in RECIPE_FIELDS}

    def rows(self) -> list[tuple[str, str, str]]:
        """``(field, value, source)`` rows: base values, then each dataset's overrides."""
        out = [(k, _show(self.setting(k)[0]), self.setting(k)[1]) for k in RECIPE_FIELDS]
        for ds, over in self.datasets.items():
            out += [(f"{k} ({ds})", _show(v), src) for k, (v, src) in over.items()]
        return out


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def recipe_of(head_cls: type) -> Recipe | None:
    """The head class's declared :class:`Recipe` (None for a head without one)."""
    recipe = getattr(head_cls, "recipe", None)
    return recipe if isinstance(recipe, Recipe) else None


#: UMT's training recipe, from its released code (jefferyYu/UMT, run_mtmner_crf.py/.sh):
#: ``umt`` trains with it, and so does ``bert_crf``, the text-only baseline of UMT's
#: paper that no paper in the set gives a recipe for (baseline and UMT then differ only
#: in the fusion head).
UMT_CODE = Recipe(
    "Yu et al. (2020), UMT: the values of its released code jefferyYu/UMT",
    encoder=("bert-base-cased", "run_mtmner_crf.sh: --bert_model=bert-base-cased"),
    batch_size=(32, "run_mtmner_crf.sh: --train_batch_size=32"),
    epochs=(24, "run_mtmner_crf.py: 24 epochs for twitter2015"),
    patience=(0, "run_mtmner_crf.py: " + BEST_DEV),
    lr_encoder=(5e-5, "run_mtmner_crf.py: --learning_rate 5e-5 for every parameter"),
    lr_head=(5e-5, "run_mtmner_crf.py: --learning_rate 5e-5 for every parameter"),
    warmup_ratio=(0.1, "run_mtmner_crf.py: --warmup_proportion 0.1"),
    max_length=(128, "run_mtmner_crf.sh: --max_seq_length=128"),
    dropout=(0.1, DEVLIN + " (BERT's hidden dropout 0.1)"),
    datasets={"twitter2017": {"epochs": (22, "run_mtmner_crf.py: 22 epochs for twitter2017")}},
)


def differences(recipe: Recipe, config: Mapping[str, Any], dataset: str | None = None) -> list[str]:
    """How a run's recorded config departs from ``recipe``.

    Args:
        recipe: the paper recipe of the run's model.
        config: the run's ``config.yaml`` as a mapping.
        dataset: the run's dataset name when ``config`` has no ``dataset_name`` (the
            report takes it from provenance.json).

    Returns:
        ``["batch_size 16 (paper 64)", ...]``; empty: the recipe as published.
    """
    key = dataset_key(config.get("dataset_name")) or dataset_key(dataset)
    out = []
    for k, paper in recipe.values(key).items():
        if k in config and config[k] is not None and config[k] != paper:
            out.append(f"{k} {_show(config[k])} (paper {_show(paper)})")
    return out


def mark(recipe: Recipe | None, config: Mapping[str, Any], dataset: str | None = None) -> str:
    """The report's one-cell verdict on a run's settings against its paper recipe.

    ``paper`` (every recipe value as published), ``differs: epochs 12 (paper 24), ...``,
    ``tiny profile``, or ``–`` when it cannot be told (no config.yaml, no recipe).
    """
    if not config:
        return "–"
    if config.get("profile") == "tiny":
        return "tiny profile"
    if recipe is None:
        return "–"
    diffs = differences(recipe, config, dataset)
    return "differs: " + ", ".join(diffs) if diffs else "paper"
