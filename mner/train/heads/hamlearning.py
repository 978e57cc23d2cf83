"""HamLearning: hierarchical aligned multimodal learning (Liu et al., AAAI 2024).

Paper: Peipei Liu, Hong Li, Yimo Ren, Jie Liu, Shuaizong Si, Hongsong Zhu and Limin Sun,
"Hierarchical Aligned Multimodal Learning for NER on Tweet Posts", AAAI 2024 (vol. 38,
no. 17), doi:10.1609/aaai.v38i17.29831, arXiv:2305.08372 (docs/papers.md).
Read its Method section next to :meth:`HamLearning.forward`,
which follows it top to bottom. Equations -> code:

* (1) h_i = BERT(x_i), then a textual Transformer -> h^T:
  ``batch.hidden`` -> ``text_encoder`` -> ``h_t`` (B, T, Dt); ``h_cls = h_t[:, 0]``.
* (2) v_[IMG] = L(ResNet(I)): ``img_proj(resnet/pooled)`` -> ``v_img`` (B, D). The text
  turns "the feature map from the last convolutional layer" into "a one-dimensional
  vector by linear function"; mner reads the cached average-pooled map (2048-d) and
  applies the linear map to it. A linear map of the flattened 7x7x2048 map would hold
  77M parameters per level of D=768; the pooled vector is the usual reading.
* (3) v_i = L(f_i) + W_e e^v_i: ``obj_proj`` (L), ``label_embed`` (E^v), ``label_proj``
  (W_e) -> ``v_obj`` (B, O, D); V = {v_[IMG], v_1..v_O} is ``V0`` (B, N, D).
* (4) {v^1_[IMG], v^1_i} = ViT(V): ``semantic_encoder`` -> ``v1_nodes`` (B, N, D).
* (5) v^{2,k'}_i = phi(sum_j W_{r(i<->j)} v^{2,k}_j + b): :class:`GatedRGCNLayer`
  ``message``, on ``v2_nodes`` (B, N, D+4) = [x_c, y_c, h, w, v] and ``adj`` (B, K, N, N).
* (6) lambda = sigmoid(W_gcn [v^{2,k'}, v^{2,k}]): :class:`GatedRGCNLayer` ``gate``.
* (7) v^{2,k+1} = v^{2,k} + lambda v^{2,k'}: :class:`GatedRGCNLayer` return value.
* (8) C^r = tanh(h^r_[CLS] W^r_TI v^r_[IMG]): :class:`RelevanceMeasure` ``w_ti``.
* (9) M^r = tanh(W^r_T h^r_[CLS] + W^r_I v^r_[IMG] C^r): :class:`RelevanceMeasure`
  ``w_t``, ``w_i``; M^1, M^2 are ``relevance_semantic`` / ``relevance_spatial``.
* (10), (11) v^r_i = L([M^r v^r_[IMG], v^r_i]), V^r = [v^r_1..v^r_N]: ``fuse_semantic`` /
  ``fuse_spatial`` (theta^M) in :meth:`HamLearning._integrate` -> ``V1`` / ``V2`` (B, N, D);
  then ``spatial_norm`` (a LayerNorm, mner's addition, see below) on ``V2``.
* (12) H = FFNN(h^T_1..h^T_M): ``ffnn`` -> ``H`` (B, T, D), wrapped as a Transformer
  sublayer ``ffnn_norm(h^T + FFNN(h^T))`` (see the decisions below).
* (13), (14) alpha = W^V s(W^V1 V^1 + W^V2 V^2), V = alpha V^1 + (1 - alpha) V^2:
  :class:`InteractionRound` ``gate_semantic`` (W^V1), ``gate_spatial`` (W^V2),
  ``gate_out`` (W^V).
* (15) H = Transformer(H, V; theta^FT), then V^1 and V^2 updated with H as keys:
  :class:`InteractionRound` ``text``, ``semantic``, ``spatial``; ``rounds`` holds L of them.
* (16)-(18) CRF over H: the trainer (emission layer + CRF), not this head. Eq. 17 sums
  the log-likelihood over the training tweets, so ``crf_reduction = "sum"``.

r = 1 is the semantic level (ViT over [IMG] + objects), r = 2 the spatial level (gated
R-GCN over the cached relation graph ``relations/labels``, whose node 0 is [IMG]).

Ablations (paper Table 3, Table 4), each a :class:`HamLearningConfig` field:

* ``no_rgcn`` ("w/o RGCN"): the whole spatial level (R-GCN, its relevance measure, its
  eq. 10 fusion, the eq. 13 gate and the V^2 updates) is not built; V = V^1. The cache's
  ``relations/labels`` and ``objects/boxes_norm`` are then not required.
* ``no_vit`` ("w/o ViT"): the whole semantic level is not built; V = V^2.
  Before the LayerNorm after eq. 10 (``spatial_norm``) this row trained to about 30
  test F1 on the sample: the un-normalised R-GCN output dominated the fused text states.
* ``no_rm`` ("w/o RM"): eqs. 8-9 are not built; eq. 10 uses M^r = 1.
* ``rounds`` (L, Table 4): number of cross-modal interaction rounds.

Re-checked on the generated sample (tiny profile, seed 1, one run each; test F1 overall
/ on the image-dependent entities; bert_crf: 78.0 / 34.6): full model 83.6 / 57.7,
w/o ViT 85.0 / 61.5, w/o RGCN 81.4 / 38.5, w/o RM 83.0 / 53.8. Every row now beats the
text-only baseline; one seed on 80 test tweets, so differences of a few points between
rows are noise, not the paper's Table 3 ordering. The full model without the LayerNorm
(``spatial_norm: false``) reached 89.6 / 76.9 on the same seed, so the LayerNorm is the
price of a meaningful w/o-ViT row, not a gain for the full model on this sample; with
the CRF loss averaged instead of summed (eq. 17) the full model reached 85.4 / 57.7.

Where the paper is silent or ambiguous, this implementation decides as follows (each
also noted where it happens):

* Sub-tokens are not summed into words (eq. 1): the head works on sub-tokens, as the
  trainer's CRF reads first sub-tokens.
* The textual Transformer's depth is not given: ``text_layers`` = 1.
* h^r_[CLS] (eqs. 8-9) is the textual Transformer's [CLS] state for both levels, with
  separate weights per level.
* M^r is a scalar per example (the paper calls it a "relevance score"); its batch of
  values (mean over the levels built) is the diagnostic ``hamlearning_relevance``.
* Eq. 5's sum is divided by the number of incident edges (the c_i of Schlichtkrull et
  al.'s R-GCN), so the message scale does not grow with the object count; phi is ReLU.
  Each (relation label, edge direction) pair has its own W; ``rgcn_bases`` switches
  to basis decomposition. The spatial states keep the 4 box numbers, so the R-GCN
  works at D + 4 dims and eq. 10 maps back to D.
* Eq. 10 also keeps the [IMG] node itself as item 0 of V^r: an image with no detected
  object then still offers one visual item to attend to.
* Eq. 12's FFNN gets a residual connection and a LayerNorm (a ``ffnn_skip`` projection
  when D differs from Dt): without them the randomly initialised 2-layer FFNN shrank
  the text states and the tiny profile learned several times slower.
* Eq. 13: s is tanh and alpha is squashed by a sigmoid so eq. 14 is a convex mix.
* Eq. 15: each round has its own parameters; the three parts of a round read the states
  of the previous round ("synchronous"). The last round's V^1/V^2 updates could not
  reach the output, so they are not built.
* Missing images (``image_mask`` False): v_[IMG] is a learned "no image" embedding, all
  their objects are masked, and their graph is the lone [IMG] node.

Letters in shape comments: B batch, T sub-tokens, O objects, N = O + 1 visual nodes
([IMG] first), K edge types, D dims (Dt text, Dv ResNet, Do object features).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mner.errors import ConfigError
from mner.train.heads.base import FusionHead, HeadInput, HeadOutput, register
from mner.train.heads.layers import (
    CrossModalLayer,
    attention_heads,
    key_padding_mask,
    masked_mean,
    replace_missing,
)
from mner.train.recipes import BEST_DEV, DEVLIN, Recipe

RESNET = "resnet/pooled"
OBJ_FEATURES = "objects/features"
OBJ_BOXES = "objects/boxes_norm"
OBJ_LABELS = "objects/labels"
RELATIONS = "relations/labels"

# The [IMG] super node covers the whole image: centre (0.5, 0.5), height 1, width 1.
_IMG_GEOMETRY = (0.5, 0.5, 1.0, 1.0)


@dataclass(frozen=True)
class HamLearningConfig:
    """HamLearning hyperparameters; defaults are the paper's (Implementation Details).

    Attributes:
        hidden_dim: D, the size of the visual states and of the output H; None = the
            encoder's size (768 in the paper, where it equals BERT-base's).
        heads: attention heads; None = the paper's 12, lowered to the largest divisor
            of D (and of the encoder size for the textual Transformer) below it, e.g. 8
            for the tiny profile's D=128. A number must divide both sizes.
        ffn_dim: feed-forward size inside every Transformer layer; None = 4 * D.
        text_layers: layers of the textual Transformer after BERT (not given; 1).
        semantic_layers: layers of the semantic visual Transformer ("ViT", eq. 4): 4.
        rgcn_layers: gated R-GCN layers (eqs. 5-7): 2.
        rgcn_bases: None = one weight matrix per (relation, direction), as eq. 5;
            an int = basis decomposition with that many shared bases.
        rounds: L, cross-modal interaction rounds (eqs. 13-15; Table 4 best: 3).
        ffnn_layers: linear layers of the text FFNN (eq. 12): 2.
        num_object_classes: size of the object label table E^v (91 = torchvision's
            COCO detectors, including the tiny profile's).
        num_relations: relation labels in ``relations/labels`` including 0 = no edge
            (12: none, inside, cover, overlap and 8 directions).
        label_dim: size of the object label embedding e^v; None = D.
        dropout: 0.1.
        no_rgcn: ablation "w/o RGCN": drop the spatial level.
        no_vit: ablation "w/o ViT": drop the semantic level.
        no_rm: ablation "w/o RM": drop relevance measuring (eqs. 8-9).
        spatial_norm: a LayerNorm on the spatial level's V^2 after eq. 10 (mner's
            addition; the paper's eq. 10 is a bare linear map). False = the text.
    """

    #: Old option names (saved configs, ``-o``) -> their names now.
    renamed_options: ClassVar[dict[str, str]] = {"num_heads": "heads"}

    hidden_dim: int | None = None
    heads: int | None = None
    ffn_dim: int | None = None
    text_layers: int = 1
    semantic_layers: int = 4
    rgcn_layers: int = 2
    rgcn_bases: int | None = None
    rounds: int = 3
    ffnn_layers: int = 2
    num_object_classes: int = 91
    num_relations: int = 12
    label_dim: int | None = None
    dropout: float = 0.1
    no_rgcn: bool = False
    no_vit: bool = False
    no_rm: bool = False
    spatial_norm: bool = True

    def __post_init__(self):
        for name in ("hidden_dim", "heads", "ffn_dim", "label_dim", "rgcn_bases"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or null, got {value}")
        for name in ("text_layers", "semantic_layers", "rgcn_layers", "rounds",
                     "ffnn_layers", "num_object_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_relations < 2:
            raise ValueError(f"num_relations counts 'no edge' plus at least one relation, got {self.num_relations}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.no_rgcn and self.no_vit:
            raise ValueError(
                "no_rgcn and no_vit together leave no visual encoder; for a text-only "
                "model use --model bert_crf"
            )


#: The paper's attention heads (Implementation Details), what ``heads: null`` stands for.
PAPER_HEADS = 12


class GatedRGCNLayer(nn.Module):
    """One layer of the paper's modified R-GCN (eqs. 5-7) with masked dense adjacency."""

    def __init__(self, dim: int, num_types: int, num_bases: int | None):
        """Args:
        dim: node state size (D + 4 here: box geometry + visual state).
        num_types: K, edge types (relation label x direction).
        num_bases: None for one (dim, dim) matrix per type; else basis decomposition.
        """
        super().__init__()
        self.weight = self.bases = self.coeff = None
        if num_bases is None:
            self.weight = nn.Parameter(torch.empty(num_types, dim, dim))  # W_r, eq. 5
            nn.init.xavier_uniform_(self.weight.view(num_types * dim, dim))
        else:
            self.bases = nn.Parameter(torch.empty(num_bases, dim, dim))
            self.coeff = nn.Parameter(torch.empty(num_types, num_bases))
            nn.init.xavier_uniform_(self.bases.view(num_bases * dim, dim))
            nn.init.xavier_uniform_(self.coeff)
        self.bias = nn.Parameter(torch.zeros(dim))  # b, eq. 5
        self.gate = nn.Linear(2 * dim, dim)  # W_gcn, eq. 6

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        """Args:
        x: (B, N, D) node states v^{2,k}.
        adj: (B, K, N, N) edge weights: adj[b, k, i, j] > 0 when j is a type-k
            neighbour of i, rows normalised by node i's edge count.

        Returns:
            (B, N, D) v^{2,k+1}.
        """
        weight = self.weight if self.weight is not None else torch.einsum("kc,cde->kde", self.coeff, self.bases)
        neighbours = adj @ x.unsqueeze(1)  # (B, K, N, D): per type, normalised sum over j
        message = F.relu(torch.einsum("bknd,kde->bne", neighbours, weight) + self.bias)  # eq. 5
        lam = torch.sigmoid(self.gate(torch.cat([message, x], dim=-1)))  # eq. 6
        return x + lam * message  # eq. 7


class RelevanceMeasure(nn.Module):
    """Eqs. 8-9: a scalar sentence-image relevance M^r in (-1, 1) per example."""

    def __init__(self, text_dim: int, vis_dim: int):
        super().__init__()
        self.w_ti = nn.Bilinear(text_dim, vis_dim, 1, bias=False)  # W_TI, eq. 8
        self.w_t = nn.Linear(text_dim, 1)  # W_T, eq. 9
        self.w_i = nn.Linear(vis_dim, 1, bias=False)  # W_I, eq. 9

    def forward(self, h_cls: torch.Tensor, v_img: torch.Tensor) -> torch.Tensor:
        """Args:
        h_cls: (B, Dt) sentence state; v_img: (B, Dv') [IMG] state of this level.

        Returns:
            (B,) M^r.
        """
        # float32: bilinear is on no autocast list, so under AMP its two inputs can
        # arrive in different dtypes (a linear layer's bf16 output and a float32 one).
        c = torch.tanh(self.w_ti(h_cls.float(), v_img.float()))  # (B, 1) eq. 8
        return torch.tanh(self.w_t(h_cls) + self.w_i(v_img) * c).squeeze(-1)  # eq. 9


class InteractionRound(nn.Module):
    """One of the L synchronous rounds of inter-modality learning (eqs. 13-15)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, *,
                 semantic: bool, spatial: bool, update_visual: bool):
        """Args:
        semantic / spatial: which visual levels exist (ablations remove one).
        update_visual: build the V^1 / V^2 updates (not for the last round, whose
            visual outputs could not reach H).
        """
        super().__init__()
        self.gate_semantic = self.gate_spatial = self.gate_out = None
        self.semantic = self.spatial = None
        if semantic and spatial:  # eq. 13; with one level there is nothing to mix
            self.gate_semantic = nn.Linear(dim, dim, bias=False)  # W^V1
            self.gate_spatial = nn.Linear(dim, dim)  # W^V2
            self.gate_out = nn.Linear(dim, dim)  # W^V
        # The shared layer with nn.TransformerEncoderLayer's FFN (dropout inside).
        self.text = CrossModalLayer(dim, heads, ffn_dim, dropout, ffn_dropout=True)  # theta^FT, eq. 15
        if update_visual and semantic:
            self.semantic = CrossModalLayer(dim, heads, ffn_dim, dropout, ffn_dropout=True)
        if update_visual and spatial:
            self.spatial = CrossModalLayer(dim, heads, ffn_dim, dropout, ffn_dropout=True)

    def forward(self, H, V1, V2, token_mask, node_mask):
        """Args:
        H: (B, T, D) text states; V1 / V2: (B, N, D) semantic / spatial items or None.
        token_mask: (B, T) bool; node_mask: (B, N) bool.

        Returns:
            (H, V1, V2, alpha) updated states; alpha (B, N, D) or None.
        """
        alpha = None
        if V1 is not None and V2 is not None:
            alpha = torch.sigmoid(self.gate_out(torch.tanh(self.gate_semantic(V1) + self.gate_spatial(V2))))  # eq. 13
            V = alpha * V1 + (1 - alpha) * V2  # eq. 14
        else:
            V = V1 if V1 is not None else V2
        H_new = self.text(H, V, node_mask)  # eq. 15: Q = H, K = V = V
        # The visual parts read the H of the previous round: the rounds are synchronous.
        if V1 is not None and self.semantic is not None:
            V1 = self.semantic(V1, H, token_mask)  # Q = V^1, K = V = H
        if V2 is not None and self.spatial is not None:
            V2 = self.spatial(V2, H, token_mask)  # Q = V^2, K = V = H
        return H_new, V1, V2, alpha


@register
class HamLearning(FusionHead):
    """HamLearning head: semantic (Transformer) + spatial (gated R-GCN) visual encodings,
    relevance-scaled global/local fusion, and L rounds of cross-modal Transformers."""

    name = "hamlearning"
    recipe = Recipe(
        "Liu et al. (2024), HamLearning, Implementation Details",
        encoder=("bert-base-uncased", "Implementation Details: the uncased BERT-base"),
        batch_size=(32, "Implementation Details: batch size 32 for training"),
        epochs=(60, "Implementation Details: 60 epochs"),
        patience=(0, "not given: " + BEST_DEV),
        lr_encoder=(3e-5, "Implementation Details: learning rate 3e-5"),
        lr_head=(3e-5, "Implementation Details: learning rate 3e-5 (one rate given)"),
        warmup_ratio=(0.1, DEVLIN),
        max_length=(128, "Implementation Details: maximum input length 128"),
        dropout=(0.1, "Implementation Details: dropout rate 0.1"),
        notes=("the same hyperparameters for both datasets (Implementation Details)",),
    )
    summary = ("HamLearning (Liu et al. 2024): ViT + gated R-GCN over objects, "
               "sentence-image relevance, iterative cross-modal Transformer")
    needs = (RESNET, OBJ_FEATURES, OBJ_BOXES, OBJ_LABELS, RELATIONS)
    Config = HamLearningConfig
    crf_reduction = "sum"  # eq. 17: Loss = sum_t log p(Y | H), a sum over the training tweets

    @classmethod
    def required_features(cls, cfg: HamLearningConfig) -> tuple[str, ...]:
        """Without the R-GCN neither the relation graph nor the boxes are read."""
        if cfg.no_rgcn:
            return (RESNET, OBJ_FEATURES, OBJ_LABELS)
        return cls.needs

    def __init__(self, cfg: HamLearningConfig, text_dim: int, feature_dims: Mapping[str, int]):
        super().__init__(cfg, text_dim, feature_dims)
        for name in (RESNET, OBJ_FEATURES):
            if name not in self.feature_dims:
                raise ConfigError(f"hamlearning needs the size of cached {name!r}; feature_dims has "
                                  f"{sorted(self.feature_dims)}")
        D = cfg.hidden_dim or text_dim
        heads = attention_heads(D, cfg.heads, default=PAPER_HEADS)
        text_heads = attention_heads(text_dim, cfg.heads, default=PAPER_HEADS)
        ffn = cfg.ffn_dim or 4 * D
        self.out_dim = D
        self.semantic_on = not cfg.no_vit
        self.spatial_on = not cfg.no_rgcn

        # (1) textual Transformer after BERT.
        self.text_encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(text_dim, text_heads, cfg.ffn_dim or 4 * text_dim, cfg.dropout,
                                       activation="gelu", batch_first=True),
            cfg.text_layers, enable_nested_tensor=False)
        # (2) global image vector, and the learned stand-in for missing images.
        self.img_proj = nn.Linear(self.feature_dims[RESNET], D)
        self.no_image = nn.Parameter(torch.randn(D) * 0.02)
        # (3) objects: region feature + class label embedding.
        self.obj_proj = nn.Linear(self.feature_dims[OBJ_FEATURES], D)
        self.label_embed = nn.Embedding(cfg.num_object_classes, cfg.label_dim or D)  # E^v
        self.label_proj = nn.Linear(cfg.label_dim or D, D, bias=False)  # W_e
        self.drop = nn.Dropout(cfg.dropout)

        self.semantic_encoder = self.relevance_semantic = self.fuse_semantic = None
        self.rgcn = self.relevance_spatial = self.fuse_spatial = None
        if self.semantic_on:
            # (4) semantic encoding over [IMG] + objects.
            self.semantic_encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(D, heads, ffn, cfg.dropout, activation="gelu", batch_first=True),
                cfg.semantic_layers, enable_nested_tensor=False)
            if not cfg.no_rm:
                self.relevance_semantic = RelevanceMeasure(text_dim, D)  # (8)-(9), r = 1
            self.fuse_semantic = nn.Linear(2 * D, D)  # theta^M, (10), r = 1
        if self.spatial_on:
            # (5)-(7) over states [x, y, h, w, v]: D + 4 dims. K = (labels - "none") x 2 directions.
            self.rgcn = nn.ModuleList(
                GatedRGCNLayer(D + 4, 2 * (cfg.num_relations - 1), cfg.rgcn_bases) for _ in range(cfg.rgcn_layers))
            if not cfg.no_rm:
                self.relevance_spatial = RelevanceMeasure(text_dim, D + 4)  # (8)-(9), r = 2
            self.fuse_spatial = nn.Linear(2 * (D + 4), D)  # theta^M, (10), r = 2
        # After eq. 10, r = 2: the R-GCN's residual updates (eq. 7) leave V^2 at a scale
        # far above the text's; unnormalised, it swamped the fused text states.
        self.spatial_norm = nn.LayerNorm(D) if self.spatial_on and cfg.spatial_norm else None

        # (12) FFNN bringing text into the visual space, as a Transformer FFN sublayer
        # (residual + LayerNorm): a bare stack of randomly initialised linear layers
        # shrinks the activations about 5x and trained several times slower.
        layers: list[nn.Module] = []
        for k in range(cfg.ffnn_layers):
            layers.append(nn.Linear(text_dim if k == 0 else D, D))
            if k < cfg.ffnn_layers - 1:
                layers += [nn.ReLU(), nn.Dropout(cfg.dropout)]
        self.ffnn = nn.Sequential(*layers)
        self.ffnn_skip = None
        if D != text_dim:
            self.ffnn_skip = nn.Linear(text_dim, D, bias=False)
        self.ffnn_norm = nn.LayerNorm(D)
        # (13)-(15) L synchronous rounds.
        self.rounds = nn.ModuleList(
            InteractionRound(D, heads, ffn, cfg.dropout, semantic=self.semantic_on, spatial=self.spatial_on,
                             update_visual=k < cfg.rounds - 1)
            for k in range(cfg.rounds))

    # ------------------------------------------------------------------ helpers

    def _check_ids(self, ids: torch.Tensor, valid: torch.Tensor, limit: int, what: str, field: str) -> None:
        """Refuse class / relation ids the embedding tables cannot hold (a cache made
        with another detector or relation set), naming the config field to change."""
        if valid.any():
            real = ids[valid]
            lo, hi = int(real.min()), int(real.max())
            if lo < 0 or hi >= limit:
                raise ConfigError(
                    f"hamlearning: the cache's {what} holds ids {lo}..{hi} but head.{field}={limit}; "
                    f"set -o head.{field}={max(hi + 1, limit)} (the count is in the cache attributes)"
                )

    def _relation_adjacency(self, rel: torch.Tensor, node_mask: torch.Tensor) -> torch.Tensor:
        """Dense per-type adjacency for eq. 5 from the cached relation labels.

        Args:
            rel: (B, N, N) long; rel[b, i, j] = r > 0 is an edge i -> j with label r.
            node_mask: (B, N) bool, real nodes.

        Returns:
            (B, K, N, N) float with K = 2 (R - 1): types 0..R-2 are out-edges of node i
            (i -> j, label k + 1), types R-1.. are in-edges (j -> i); each row i is
            divided by its number of edges.
        """
        R = self.cfg.num_relations
        pair = node_mask.unsqueeze(2) & node_mask.unsqueeze(1)  # (B, N, N)
        rel = torch.where(pair, rel, torch.zeros_like(rel))
        out_edges = F.one_hot(rel, R)[..., 1:]  # (B, N, N, R-1): [b, i, j, r]
        in_edges = F.one_hot(rel.transpose(1, 2), R)[..., 1:]  # [b, i, j, r] for edge j -> i
        adj = torch.cat([out_edges, in_edges], dim=-1).permute(0, 3, 1, 2).float()  # (B, K, N, N)
        degree = adj.sum(dim=(1, 3), keepdim=True).clamp(min=1.0)  # (B, 1, N, 1)
        return adj / degree

    # ------------------------------------------------------------------ forward

    def forward(self, batch: HeadInput) -> HeadOutput:
        """Args:
        batch: ``hidden`` (B, T, Dt), ``token_mask`` (B, T); ``visual`` with
            resnet/pooled (B, Dv), objects/features (B, O, Do), objects/labels (B, O)
            and, unless ``no_rgcn``, objects/boxes_norm (B, O, 4) and
            relations/labels (B, O+1, O+1); ``visual_masks["objects/features"]`` (B, O).

        Returns:
            HeadOutput with ``hidden`` (B, T, D), no auxiliary loss (the paper trains
            with the CRF likelihood only), and diagnostics (B,):
            ``hamlearning_relevance`` (mean M^r over the levels built; absent with
            ``no_rm``), ``hamlearning_relevance_semantic`` / ``_spatial`` per level, and
            ``hamlearning_semantic_gate`` (mean alpha of eq. 13 in the last round,
            when both levels exist).
        """
        cfg = self.cfg
        hidden, token_mask = batch.hidden, batch.token_mask
        B, dtype, device = hidden.shape[0], hidden.dtype, hidden.device
        image_ok = batch.image_mask  # (B,)
        feats = batch.visual[OBJ_FEATURES].to(dtype)  # (B, O, Do)
        obj_mask = batch.item_mask(OBJ_FEATURES) & image_ok.unsqueeze(1)  # (B, O); none of a missing image
        node_mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=device), obj_mask], dim=1)  # (B, N)

        # (1) textual Transformer over BERT states; [CLS] is the sentence feature.
        h_t = self.text_encoder(hidden, src_key_padding_mask=key_padding_mask(token_mask))  # (B, T, Dt)
        h_cls = h_t[:, 0]  # (B, Dt)

        # (2) v_[IMG]; a missing image gets the learned no-image embedding instead.
        v_img = replace_missing(self.img_proj(batch.visual[RESNET].to(dtype)), image_ok, self.no_image)  # (B, D)
        # (3) v_i = L(f_i) + W_e e_i; padded / missing objects take class 0 (masked anyway).
        labels = batch.visual[OBJ_LABELS].long()
        self._check_ids(labels, obj_mask, cfg.num_object_classes, "objects/labels", "num_object_classes")
        labels = torch.where(obj_mask, labels, torch.zeros_like(labels))
        v_obj = self.obj_proj(feats) + self.label_proj(self.label_embed(labels))  # (B, O, D)
        V0 = self.drop(torch.cat([v_img.unsqueeze(1), v_obj], dim=1))  # (B, N, D): {v_[IMG], v_1..v_O}

        diagnostics: dict[str, torch.Tensor] = {}
        relevances: list[torch.Tensor] = []
        V1 = V2 = None
        if self.semantic_on:
            # (4) semantic encoding.
            v1_nodes = self.semantic_encoder(V0, src_key_padding_mask=key_padding_mask(node_mask))  # (B, N, D)
            V1 = self._integrate(v1_nodes, h_cls, self.relevance_semantic,
                                 self.fuse_semantic, "semantic", diagnostics, relevances)
        if self.spatial_on:
            # (5)-(7) spatial encoding over [x_c, y_c, h, w, v] nodes of the relation graph.
            boxes = batch.visual[OBJ_BOXES].to(dtype)  # (B, O, 4) xyxy in [0, 1]
            geometry = torch.stack([(boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2,
                                    boxes[..., 3] - boxes[..., 1], boxes[..., 2] - boxes[..., 0]], dim=-1)
            img_geometry = torch.tensor(_IMG_GEOMETRY, dtype=dtype, device=device).expand(B, 1, 4)
            geometry = torch.cat([img_geometry, geometry], dim=1) * node_mask.unsqueeze(-1)  # (B, N, 4)
            rel = batch.visual[RELATIONS].long()  # (B, N, N)
            # A missing image's graph is its lone no-image node: none of its edges count.
            graph_mask = torch.cat([image_ok.unsqueeze(1), obj_mask], dim=1)  # (B, N)
            pair = graph_mask.unsqueeze(2) & graph_mask.unsqueeze(1)
            self._check_ids(rel, pair, cfg.num_relations, "relations/labels", "num_relations")
            adj = self._relation_adjacency(rel, graph_mask).to(dtype)  # (B, K, N, N)
            v2_nodes = torch.cat([geometry, V0], dim=-1)  # (B, N, D + 4): \hat v^2
            for layer in self.rgcn:
                v2_nodes = layer(v2_nodes, adj)
            V2 = self._integrate(v2_nodes, h_cls, self.relevance_spatial,
                                 self.fuse_spatial, "spatial", diagnostics, relevances)
            if self.spatial_norm is not None:
                V2 = self.spatial_norm(V2)  # (B, N, D)
        if relevances:
            diagnostics["hamlearning_relevance"] = torch.stack(relevances).mean(0).detach()

        # (12) text into the visual space, then (13)-(15) L rounds.
        skip = self.ffnn_skip(h_t) if self.ffnn_skip is not None else h_t
        H = self.ffnn_norm(skip + self.drop(self.ffnn(h_t)))  # (B, T, D)
        alpha = None
        for round_ in self.rounds:
            H, V1, V2, alpha = round_(H, V1, V2, token_mask, node_mask)
        if alpha is not None:
            per_node = alpha.mean(-1)  # (B, N)
            diagnostics["hamlearning_semantic_gate"] = masked_mean(per_node.unsqueeze(-1), node_mask).squeeze(-1).detach()
        return HeadOutput(hidden=H, aux_losses={}, diagnostics=diagnostics)

    @staticmethod
    def _integrate(nodes, h_cls, relevance, fuse, level, diagnostics, relevances):
        """Eqs. 8-11 for one level: scale v^r_[IMG] by M^r and fuse it into every item.

        Args:
            nodes: (B, N, Dr) encoded nodes, [IMG] first.
            h_cls: (B, Dt).
            relevance: the level's :class:`RelevanceMeasure`, or None under ``no_rm``
                (then M^r = 1).
            fuse: theta^M, Linear(2 Dr -> D).

        Returns:
            (B, N, D) V^r (item 0 is the [IMG] node itself, see the module docstring).
        """
        v_img = nodes[:, 0]  # (B, Dr)
        if relevance is not None:
            m = relevance(h_cls, v_img)  # (B,)
            diagnostics[f"hamlearning_relevance_{level}"] = m.detach()
            relevances.append(m)
            v_img = m.unsqueeze(-1) * v_img
        return fuse(torch.cat([v_img.unsqueeze(1).expand_as(nodes), nodes], dim=-1))  # (10), (11)
