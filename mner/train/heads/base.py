"""The contract every fusion head follows, and the registry that finds heads by name.

A head sits between the text encoder and the emission layer + CRF:

    encoder (BERT) -> hidden (B, T, Dt) --+
    cached visual tensors ----------------+--> head -> HeadOutput.hidden (B, T, H) -> linear -> CRF

The trainer owns the encoder, the emission layer and the CRF; a head owns only its
fusion parameters. A head declares:

* ``name``: the registry key (``mner train --model NAME``);
* ``summary``: one line for ``mner models``;
* ``recipe``: its paper's training recipe (a ``mner.train.recipes.Recipe``), which
  ``--profile paper`` applies;
* ``needs``: the cached datasets it reads, as ``"group/dataset"`` names from
  ``mner.cache.schema`` (e.g. ``"resnet/grid"``); the trainer checks the cache has them
  and passes them in :attr:`HeadInput.visual` under the same keys;
* ``needs_text_teacher``: whether it reads the cached CLIP text-teacher embeddings;
* ``Config``: a frozen dataclass of its hyperparameters and ablation switches, with the
  paper's values as defaults (built strictly from ``train.head`` in params.yaml and
  ``-o key=value`` overrides). An option every head may have keeps one name across
  heads (:data:`SHARED_OPTIONS`); a renamed option is listed in the Config's
  ``renamed_options`` ClassVar (old name -> new name), so that an old name in a
  params file, a run folder's config.yaml or ``-o`` is refused with one line naming
  the new one.

Optional submodules (those an ablation switch removes) are set to ``None`` when they
are not built and tested with ``is not None``.

Letters in shape comments: B batch, T sub-tokens (including [CLS] at 0 and [SEP]),
R image regions, O objects, E entities, D dims.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from mner.errors import ConfigError


@dataclass
class HeadInput:
    """One batch as a head sees it. All tensors are on the model's device.

    Attributes:
        hidden: (B, T, Dt) encoder states; position 0 is [CLS].
        token_mask: (B, T) bool, True for real sub-tokens ([CLS] and [SEP] included).
        visual: cached tensors keyed ``"group/dataset"`` as listed in the head's
            ``needs``. Leading dim B. Rows of images whose status is not ok are zeros.
        visual_masks: bool masks for padded visual items, keyed like ``visual`` where
            the dataset has a variable count (e.g. ``"objects/features"``: (B, O);
            ``"relations/labels"``: (B, O+1)). Absent for fixed-size grids; read them
            through :meth:`item_mask`, which stands in an all-True mask.
        image_mask: (B,) bool, True when the tweet's image was read (status ok).
            Heads must not use the visual rows where it is False; they use a mask or a
            learned "no image" embedding instead. Always present: a batch built
            without it (a text-only head, a test) gets all-True.

    Every mask is True for a real item (see ``mner.train.heads.layers``). The contract
    is kept here, where every batch a head sees is built: ``token_mask`` and
    ``image_mask`` are bool tensors of shapes (B, T) and (B,), so heads neither
    re-default nor convert them.
        labels: (B, T) long tag ids at first sub-tokens, -100 elsewhere; None at
            prediction time. Heads with auxiliary tagging losses read it.
        label_names: the tag names indexed by ``labels`` (e.g. ``["O", "B-PER", ...]``).
        entity_spans: (B, E, 2) long [start, end) sub-token spans of the gold entities,
            in the order of the cached text-teacher entity embeddings; None when absent.
        entity_mask: (B, E) bool for ``entity_spans``.
        text_teacher: cached CLIP text embeddings when the head sets
            ``needs_text_teacher``: ``"sentence"`` (B, Dc) and ``"entities"`` (B, E, Dc).
        pooled: (B, Dt) the encoder's pretrained pooler output (BERT's tanh layer over
            [CLS]) when the head adopted the encoder's pooler
            (:meth:`FusionHead.adopt_encoder_pooler`); None otherwise.
    """

    hidden: torch.Tensor
    token_mask: torch.Tensor
    visual: dict[str, torch.Tensor] = field(default_factory=dict)
    visual_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    image_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    label_names: tuple[str, ...] = ()
    entity_spans: torch.Tensor | None = None
    entity_mask: torch.Tensor | None = None
    text_teacher: dict[str, torch.Tensor] = field(default_factory=dict)
    pooled: torch.Tensor | None = None

    def __post_init__(self) -> None:
        B, T = self.hidden.shape[:2]
        self.token_mask = self.token_mask.bool()
        if tuple(self.token_mask.shape) != (B, T):
            raise ValueError(f"token_mask is {tuple(self.token_mask.shape)}, expected {(B, T)}")
        if self.image_mask is None:
            self.image_mask = torch.ones(B, dtype=torch.bool, device=self.hidden.device)
        self.image_mask = self.image_mask.bool()
        if tuple(self.image_mask.shape) != (B,):
            raise ValueError(f"image_mask is {tuple(self.image_mask.shape)}, expected {(B,)}")

    def item_mask(self, key: str) -> torch.Tensor:
        """(B, N) bool "is real" mask of the N items of ``visual[key]``: the batch's
        ``visual_masks[key]``, or all True for a dataset without one."""
        mask = self.visual_masks.get(key)
        if mask is None:
            x = self.visual[key]
            return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return mask.bool()


@dataclass
class HeadOutput:
    """What a head returns.

    Attributes:
        hidden: (B, T, H) token representations; H must equal ``head.out_dim``.
        aux_losses: named scalar losses, already multiplied by their paper weights;
            the trainer adds them to the CRF negative log-likelihood and logs each.
        diagnostics: named per-example values (B,) for the report's histograms, e.g.
            MAF's matching probability or a mean visual gate.
        emission_prior: (B, T, K) scores over the CRF's tags (``label_names`` order)
            that the tagger mixes into its emissions, ``(1 - w) * E + w * prior`` with
            ``w = prior_weight``, in training and decoding alike (UMT's conversion of
            its span-detection scores); None for none.
        prior_weight: ``w`` above.
    """

    hidden: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)
    emission_prior: torch.Tensor | None = None
    prior_weight: float = 0.0


#: Options shared by several heads, one name each (what the value means is the same in
#: every head that has it).
SHARED_OPTIONS = {
    "heads": "attention heads of the head's transformer layers; null = the head's default "
    "(mner.train.heads.layers.attention_heads)",
    "hidden_dim": "width of the fused states when it may differ from the encoder's; null = the encoder's",
    "ffn_dim": "inner size of the transformer feed-forward layers; null = 4 D (or the encoder's)",
    "dropout": "dropout inside the head's layers",
    "temperature": "tau of the head's contrastive losses",
    "no_cl": "ablation: drop the head's image-text contrastive loss(es)",
    "cl_weight": "weight of the image-text contrastive loss(es) in the total loss",
}


@dataclass(frozen=True)
class NoConfig:
    """A head without hyperparameters."""


class FusionHead(nn.Module):
    """Base class of all heads. Subclasses set the class attributes and ``forward``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: The paper's training recipe (``mner.train.recipes.Recipe``); None: bert_crf's.
    recipe: ClassVar[Any] = None
    needs: ClassVar[tuple[str, ...]] = ()
    needs_text_teacher: ClassVar[bool] = False
    default_scheme: ClassVar[str] = "bio2"
    Config: ClassVar[type] = NoConfig
    #: The head's transformer layers are BERT layers built from the encoder's config (as
    #: UMT's code builds them), so its ``Config.ffn_dim=None`` means the encoder's
    #: intermediate size (the trainer fills it in; 3072 = 4 x 768 for BERT-base).
    ffn_follows_encoder: ClassVar[bool] = False
    #: Parameter-name prefixes that moved (old -> new, relative to the head), so that the
    #: checkpoints of run folders written before the move still load; the one place
    #: where an old name is mapped (see :meth:`_rename_old_parameters`).
    renamed_parameters: ClassVar[Mapping[str, str]] = {}
    #: How the tagger reduces the CRF negative log-likelihood over the batch, as the
    #: head's paper writes its NER loss: ``"mean"`` (1/B sum, the default) or ``"sum"``.
    crf_reduction: ClassVar[str] = "mean"

    def __init__(self, cfg, text_dim: int, feature_dims: Mapping[str, int]):
        """Args:
        cfg: an instance of ``self.Config``.
        text_dim: Dt, the encoder's hidden size.
        feature_dims: last-dim size of each cached dataset in ``needs``
            (e.g. ``{"resnet/grid": 2048}``), read from the cache's schema.
        """
        super().__init__()
        self.cfg = cfg
        self.text_dim = text_dim
        self.feature_dims = dict(feature_dims)
        self.out_dim = text_dim
        #: The tagger's dropout on the head output before the emission layer; a head
        #: whose paper drops out the encoder states instead (UMT's code) sets it False.
        self.emission_dropout = True
        if self.renamed_parameters:
            self.register_load_state_dict_pre_hook(self._rename_old_parameters)

    def _rename_old_parameters(self, module, state_dict, prefix, *args) -> None:
        """Load-time hook: rename ``prefix + old...`` keys of ``state_dict`` in place."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            for old, new in self.renamed_parameters.items():
                if rest.startswith(old):
                    state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                    break

    def adopt_encoder_pooler(self, encoder: nn.Module) -> bool:
        """Whether the head reads the encoder's pretrained pooler (``HeadInput.pooled``).

        Called once when the tagger is built, with the encoder. A head that uses BERT's
        pooler (MAF's T_s) returns True when ``encoder.pooler`` exists and drops its own
        stand-in; otherwise the tagger removes the encoder's pooler, which nothing reads.
        """
        return False

    @classmethod
    def required_features(cls, cfg) -> tuple[str, ...]:
        """The cached datasets this configuration reads (ablations may need fewer)."""
        return cls.needs

    def forward(self, batch: HeadInput) -> HeadOutput:  # pragma: no cover - abstract
        raise NotImplementedError


HEADS: dict[str, type[FusionHead]] = {}


def register(cls: type[FusionHead]) -> type[FusionHead]:
    """Class decorator: add a head to :data:`HEADS` under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} has no name")
    if cls.name in HEADS and HEADS[cls.name] is not cls:
        raise TypeError(f"two heads are named {cls.name!r}")
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"{cls.__qualname__}.Config must be a dataclass")
    HEADS[cls.name] = cls
    return cls


def get_head(name: str) -> type[FusionHead]:
    """The head class registered as ``name``; an unknown name lists the valid ones."""
    from mner.train import heads as _heads  # noqa: F401  (imports register every head)

    try:
        return HEADS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; valid models: {', '.join(sorted(HEADS))}"
        ) from None
