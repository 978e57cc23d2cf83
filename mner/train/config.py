"""``TrainConfig``: the one frozen config of stage two (section ``train`` of params.yaml).

Defaults that depend on the profile: ``paper`` applies the selected head's paper recipe
(its ``recipe`` class attribute, see :mod:`mner.train.recipes`: encoder, batch size,
epochs, learning rates, warmup, max length, dropout, per dataset where the paper or its
code differs); ``tiny`` (a seeded random small BERT tuned so the test suite and the demo
learn the sample data in seconds) takes :data:`PROFILE_DEFAULTS`. A field left at
``None`` takes its profile's value when the config is built, so ``config.yaml`` in a run
folder always shows the values actually used, and its ``recipe`` record says which
recipe filled them and which of them the user set.

Head options live in ``head`` (a mapping validated against the head's own ``Config``
dataclass and stored with its defaults filled in). On the command line they are set as
``-o head.no_cm=true``; a bare ``-o no_cm=true`` is accepted when ``no_cm`` is not a
``TrainConfig`` field but is a field of the selected head's config (see
:func:`route_head_options`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mner.config import build, configure, merge, to_dict
from mner.errors import ConfigError
from mner.train.recipes import RECIPE_FIELDS, Recipe, dataset_key, mark, recipe_of

#: The tiny profile's defaults (the paper profile's come from each head's recipe, see
#: :mod:`mner.train.recipes`). Tiny values were tuned so that on the generated 300-tweet
#: sample a multimodal head clearly beats the text-only baseline within a few CPU
#: seconds per epoch.
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {
        "encoder": "tiny",
        "epochs": 12,
        "batch_size": 16,
        "lr_encoder": 2e-3,
        "lr_head": 1e-3,
        "warmup_ratio": 0.1,
        "patience": 6,
        "max_length": 128,
        "dropout": 0.1,
    },
}

#: Context defaults of the models that are context recipes (fields left at None take
#: them; see ``mner/train/heads/ita.py``): ``ita`` reads the image as text (object tags,
#: caption, OCR; Wang et al., NAACL 2022) with cross-view alignment; MoRe and PGIM read
#: a context file (retrieved passages; LLM-written knowledge), so they need one.
CONTEXT_PRESETS: dict[str, dict[str, Any]] = {
    "ita": {"context": ("tags", "caption", "ocr"), "cross_view": True},
    "more_text": {"context": ("file",)},
    "more_image": {"context": ("file",)},
    "pgim": {"context": ("file",)},
}

#: Size of the seeded random BERT built for ``encoder: tiny``.
TINY_BERT = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "vocab_size": 3000,  # upper bound for the WordPiece trainer
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``mner train`` needs besides the data and cache paths.

    Attributes:
        model: head name from the registry (``mner models`` lists them).
        profile: ``paper`` or ``tiny``; must match the feature cache's profile.
        encoder: Hugging Face model name or local folder, or ``tiny`` for a seeded
            random small BERT with a WordPiece tokenizer trained on the training text.
            An uncased encoder (HamLearning's ``bert-base-uncased``) lower-cases through
            its own tokenizer.
        max_length: maximum sub-tokens per window, [CLS] and [SEP] included; longer
            sentences are split into consecutive windows at word boundaries.
        scheme: tagging scheme the CRF learns: ``auto`` (the head's default), ``bio2``
            or ``bioes``. Outputs are always written and scored as BIO2.
        epochs: maximum epochs.
        batch_size: training windows per batch.
        eval_batch_size: windows per batch at evaluation.
        lr_encoder: AdamW learning rate of the encoder.
        lr_head: AdamW learning rate of head, emission layer and CRF.
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm).
        warmup_ratio: fraction of the total steps with linear warmup.
        grad_clip: max gradient norm (0 disables clipping).
        patience: stop after this many epochs without a better dev F1; 0 trains every
            epoch (the paper recipes: the papers test the best dev epoch of a fixed
            number). Either way the model kept is the best dev epoch's.
        dropout: dropout before the emission layer.
        seeds: one run per seed, in ``RUN/seed_<k>/``.
        deterministic: deterministic algorithms and cuBLAS workspace config.
        amp: mixed precision (autocast) for training and scoring: ``auto`` is bf16 on
            CUDA devices that support it, else fp16, and bf16 on CPUs with native
            bfloat16 (AVX512-BF16, AMX), else off; ``bf16``, ``fp16`` (CUDA only) or
            ``off`` force one. The resolved value is recorded in provenance.json.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:i]``.
        num_workers: DataLoader worker processes (0 loads batches in the main process).
        threads: torch intra-op threads while training (restored after); None leaves
            torch's setting. On a busy or shared CPU (several DVC stages at once) 1 per
            run is often much faster than competing for every core.
        bucket_size: length bucketing: sort windows by length within chunks of
            ``bucket_size * batch_size`` before cutting batches, so padding is small.
        dataset_name: name recorded in provenance.json; default the data folder's name.
            With the paper profile it also picks the recipe's per-dataset values
            (``twitter2015`` / ``twitter2017``, see :func:`mner.train.recipes.dataset_key`);
            when unset, ``mner train`` fills it with the data folder's name.
        min_image_coverage: a model that reads visual features stops before training
            when fewer than this share of the train tweets have an ``ok`` image in the
            cache (a cache made for another dataset); 0 disables the check.
        parallel: what several torchrun ranks do: ``ddp`` (train each seed together with
            DistributedDataParallel), ``seeds`` (seed-parallel: each rank trains its own
            seeds) or ``auto`` (``seeds`` for several seeds, else ``ddp``); ignored in
            one process. See mner.train.distributed.
        global_batch: under DDP, ``batch_size`` is the batch of all ranks together
            (each rank takes its share) instead of each rank's (effective batch
            ``batch_size x ranks``); true gives the one-process run's steps.
        head: the head's options (its ``Config`` fields), filled with defaults.
        context: ordered context sources (``tags``, ``caption``, ``ocr``, ``file``)
            joined into one text the encoder reads after the tweet as a sentence pair
            (see :mod:`mner.train.context`); None = the model's preset
            (:data:`CONTEXT_PRESETS`), else none. Empty = the plain model.
        context_file: JSON-lines context file (``--context-file``); implies ``file``.
        context_max_length: sub-token budget of the context on top of the tweet's
            window (the context is cut to it; the tweet is never cut for context).
        cross_view: ITA's cross-view alignment: also train the tweet-only view and add
            the KL term from the tweet+context view's CRF marginals to the tweet-only
            view's; None = the model's preset, else off.
        cross_view_weight: weight of that KL term.
        decode_view: the view decoded at evaluation/prediction: ``context`` (the
            tweet+context input, ITA's default) or ``tweet`` (the tweet alone).
        recipe: written by mner, not a setting: ``name`` (the head whose paper recipe
            filled the unset fields, or ``tiny``), ``dataset`` (whose per-dataset values
            applied; null for none) and ``user`` (the recipe fields the user set, whose
            values won). A config.yaml read back keeps its record.

    Fields a recipe sets (``encoder``, ``batch_size``, ``epochs``, ``patience``,
    ``lr_encoder``, ``lr_head``, ``warmup_ratio``, ``max_length``, ``dropout``) are
    ``None`` until the profile fills them.
    """

    model: str = "bert_crf"
    profile: Literal["paper", "tiny"] = "paper"
    encoder: str | None = None
    max_length: int | None = None
    scheme: Literal["auto", "bio2", "bioes"] = "auto"
    epochs: int | None = None
    batch_size: int | None = None
    eval_batch_size: int = 64
    lr_encoder: float | None = None
    lr_head: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float | None = None
    grad_clip: float = 1.0
    patience: int | None = None
    dropout: float | None = None
    seeds: tuple[int, ...] = (1,)
    deterministic: bool = True
    amp: Literal["auto", "off", "fp16", "bf16"] = "auto"
    device: str = "auto"
    num_workers: int = 0
    threads: int | None = None
    bucket_size: int = 8
    dataset_name: str | None = None
    min_image_coverage: float = 0.5
    parallel: Literal["auto", "ddp", "seeds"] = "auto"
    global_batch: bool = False
    head: dict[str, Any] = field(default_factory=dict)
    context: tuple[str, ...] | None = None
    context_file: str | None = None
    context_max_length: int = 128
    cross_view: bool | None = None
    cross_view_weight: float = 1.0
    decode_view: Literal["context", "tweet"] = "context"
    recipe: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        defaults, name, dataset = dict(PROFILE_DEFAULTS["tiny"]), "tiny", None
        if self.profile == "paper":
            name, recipe = paper_recipe(self.model)
            key = dataset_key(self.dataset_name)
            defaults, dataset = recipe.values(key), key if key in recipe.datasets else None
        user = [k for k in RECIPE_FIELDS if getattr(self, k) is not None]
        for key, value in defaults.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if not self.recipe:
            # A config.yaml read back keeps its record (every field is set by then).
            object.__setattr__(self, "recipe", {"name": name, "dataset": dataset, "user": user})
        elif set(self.recipe) != {"name", "dataset", "user"}:
            raise ValueError("recipe is the record mner writes to config.yaml (name, dataset, user), "
                             "not a setting; remove it and set the values themselves, e.g. epochs=24")
        self._resolve_context()
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {self.max_length}")
        for key in ("epochs", "batch_size", "eval_batch_size", "bucket_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.patience < 0 or self.num_workers < 0:
            raise ValueError("patience and num_workers must not be negative")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed, e.g. seeds=[1]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {list(self.seeds)}")
        if not 0.0 <= self.warmup_ratio < 1.0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("warmup_ratio and dropout must be in [0, 1)")
        if not 0.0 <= self.min_image_coverage <= 1.0:
            raise ValueError(f"min_image_coverage must be in [0, 1], got {self.min_image_coverage}")
        # Validate the head options against the head's own Config and store them with
        # defaults filled in, so config.yaml records every ablation switch used.
        head_cfg = build(self.head_class().Config, self.head, where="train.head")
        object.__setattr__(self, "head", to_dict(head_cfg))

    def _resolve_context(self) -> None:
        from mner.train.context import check_sources

        preset = CONTEXT_PRESETS.get(self.model, {})
        for key in ("context", "cross_view"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, preset.get(key, () if key == "context" else False))
        object.__setattr__(self, "context", check_sources(self.context, self.context_file))
        if self.context_max_length < 1:
            raise ValueError(f"context_max_length must be at least 1, got {self.context_max_length}")
        if self.cross_view_weight < 0:
            raise ValueError(f"cross_view_weight must not be negative, got {self.cross_view_weight}")
        if self.cross_view and not self.context:
            raise ValueError("cross_view aligns the tweet+context view with the tweet view: set context "
                             "(e.g. -o context=tags,caption,ocr or --context-file FILE)")

    @property
    def uses_context(self) -> bool:
        """True when the encoder reads a context after the tweet."""
        return bool(self.context)

    def head_class(self):
        """The registered head class named by ``model`` (ConfigError if unknown)."""
        from mner.train.heads.base import get_head

        return get_head(self.model)

    def head_config(self):
        """The head's frozen ``Config`` instance built from :attr:`head`."""
        return build(self.head_class().Config, self.head, where="train.head")

    def resolved_scheme(self) -> str:
        """``bio2`` or ``bioes``: the scheme the CRF is trained on."""
        return self.head_class().default_scheme if self.scheme == "auto" else self.scheme

    def for_dataset(self, name: str | None) -> TrainConfig:
        """This config for training on data named ``name`` (the data folder's name).

        With the paper profile and no ``dataset_name`` set, the config is rebuilt with
        ``dataset_name=name`` so the recipe's per-dataset values apply (the values the
        user set still win); otherwise it is returned unchanged.
        """
        if self.profile != "paper" or self.dataset_name is not None or not name:
            return self
        values = to_dict(self)
        user = set(self.recipe.get("user", RECIPE_FIELDS))
        values.update({k: None for k in RECIPE_FIELDS if k not in user})
        values.update(dataset_name=name, recipe={})
        return build(TrainConfig, values, where="train")

    @property
    def is_tiny_encoder(self) -> bool:
        """True when the encoder is the seeded random small BERT."""
        return self.encoder == "tiny"


def paper_recipe(model: str) -> tuple[str, Recipe]:
    """``(name, recipe)``: the paper recipe ``--profile paper`` applies to ``model``.

    A head that declares no recipe (a user's own) gets the BERT-CRF baseline's, and
    ``name`` says so (``bert_crf``). ConfigError for an unknown model.
    """
    from mner.train.heads.base import get_head

    cls = get_head(model)
    if recipe_of(cls) is None:
        cls = get_head("bert_crf")
    return cls.name, cls.recipe


def recipe_mark(config: Mapping[str, Any], dataset: str | None = None) -> str:
    """A run's settings against its paper recipe, for the report: ``paper``,
    ``differs: batch_size 16 (paper 64), ...``, ``tiny profile`` or ``–``.

    Args:
        config: the run's ``config.yaml`` as a mapping (values compared as recorded).
        dataset: the run's dataset name when config.yaml has no ``dataset_name``.
    """
    try:
        recipe = paper_recipe(str(config.get("model", TrainConfig.model)))[1] if config else None
    except ConfigError:
        recipe = None
    return mark(recipe, config, dataset)


def make_train_config(
    section: Mapping[str, Any] | None = None,
    overrides: list[str] | None = None,
    *,
    where: str = "params.yaml:train",
    **flags: Any,
) -> TrainConfig:
    """Build a :class:`TrainConfig` from a params section, CLI flags and ``-o`` overrides.

    A thin wrapper of :func:`mner.config.configure` (the one config path) with
    :func:`route_head_options` as its override hook. Precedence: ``section`` <
    ``flags`` (named CLI options, ``None`` = not given) < ``overrides``.

    Args:
        section: the ``train`` section of params.yaml (may be empty).
        overrides: ``key=value`` strings from ``-o``.
        where: where ``section`` came from, for error messages.
        **flags: CLI options such as ``model="umt"``; ``None`` values are ignored.

    Returns:
        The validated config.
    """
    return configure(
        TrainConfig, "train", values=section or {}, values_where=where, flags=flags,
        overrides=overrides, route=route_head_options,
    )


def route_head_options(over: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Send bare ``-o`` keys of the selected head's ``Config`` into ``head``.

    ``-o no_cm=true`` is ``-o head.no_cm=true`` when ``no_cm`` is not a ``TrainConfig``
    field but is a field of the head's config; any other unknown key is a ConfigError.

    Args:
        over: the parsed overrides.
        base: the params section and flags merged so far (to find the model).

    Returns:
        ``over`` with the bare head options moved under ``head``.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bare = {k: v for k, v in over.items() if k not in fields}
    if not bare:
        return over
    model = over.get("model", base.get("model", TrainConfig.model))
    from mner.train.heads.base import get_head

    head_config = get_head(model).Config
    # Renamed head options go on to the head's Config, whose build names the new name.
    head_fields = {f.name for f in dataclasses.fields(head_config)} | set(
        getattr(head_config, "renamed_options", {})
    )
    unknown = sorted(set(bare) - head_fields)
    if unknown:
        raise ConfigError(
            f"-o {unknown[0]}: not a train option nor an option of head {model!r}; "
            f"train options: {', '.join(sorted(fields - {'head'}))}; head options: "
            f"{', '.join(sorted(head_fields)) or '(none)'}"
        )
    routed = {k: v for k, v in over.items() if k in fields}
    routed["head"] = merge(over.get("head", {}), bare)
    return routed
