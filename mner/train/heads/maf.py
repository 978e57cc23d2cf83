"""MAF: a general Matching and Alignment Framework for MNER (Xu et al., WSDM 2022).

Paper: Bo Xu, Shizhou Huang, Chaofeng Sha and Hongya Wang, "MAF: A General Matching
and Alignment Framework for Multimodal Named Entity Recognition", WSDM 2022,
doi:10.1145/3488560.3498475 (docs/papers.md); reference code: github.com/xubodhu/MAF,
``mybert/gate_cl_modeling.py``. Tags are BIOES as in the paper (section 2.1).

Inputs (section 3.1): ``hidden`` = the BERT token states T (B, T, Dt), position 0 is
[CLS]; ``resnet/grid`` = the 7x7 ResNet regions J (B, R=49, Dv); ``resnet/pooled`` =
the global image vector V_g (B, Dv). D = Dt = d in the paper (768; 128 for ``tiny``).

Equation map (paper -> code):

* 3.1.1  T_s = tanh(W t_0 + b), the sentence vector: "we feed t_0 to a fully connected
  layer with an activation function", following BERT [4], i.e. BERT's pretrained
  pooler. mner uses the encoder's own pooler
  (``HeadInput.pooled``, :meth:`MafHead.adopt_encoder_pooler`; BERT, RoBERTa and XLM-R
  have one, trained with the encoder's learning rate) -> ``t_s``. Only an encoder
  without a pooler gets a new, randomly initialised Linear + Tanh (``self.pooler``).
* 3.1.2  V = W_j^T J, regions projected to d                -> ``self.region_proj``, ``v``
* 3.2 CA (cross-modal alignment), switch ``no_ca``:
  two one-hidden-layer ReLU MLPs T_s -> T_c, V_g -> V_c     -> ``self.ca_text``, ``self.ca_image``
  (1) L^(V_c->T_c), (2) L^(T_c->V_c): InfoNCE with cosine similarity and temperature
  tau; (3) L_ca = lambda_c L^(V->T) + (1 - lambda_c) L^(T->V)   -> ``l_ca`` (losses.info_nce)
* 3.3 CI (cross-modal interaction), tokens attend to the 49 regions:
  one layer of the shared :class:`~mner.train.heads.layers.CrossModalLayer`, ``self.ci``:
  (4)-(6) m-head attention, queries T, keys/values V        -> ``self.ci.attn``
  (7) V' = LN(T + CV)                                        -> ``self.ci.norm1``
  (8) C = LN(V' + FFN(V'))                    -> ``self.ci.ffn``, ``self.ci.norm2``, ``c``
* 3.4 CM (cross-modal matching), switch ``no_cm``:
  swap the images (C rows) of 2k pairs in training  -> ``_swap``, ``c_swap``, ``y_m``
  (9) F_i = Flatten([T; C]) over the fixed length n+2 = ``max_len``
  (10) y^_m = sigmoid(W_f^T F_i)                             -> ``self.match``, ``p_match``
  (11) L_cm = binary cross-entropy                           -> ``l_cm``
  (12) M = y^_m * C                                          -> ``m``
* 3.5 CF (cross-modal fusion):
  (13) g = sigmoid(W_gt T + W_gm M)     -> ``self.gate_text``, ``self.gate_visual``, ``g``
  (14) R = g * M, then H = [T; R] (B, T, 2D)                 -> ``r``, output ``hidden``
* (18) L = alpha L_ca + beta L_cm + (1 - alpha - beta) L_mner. The trainer adds
  ``aux_losses`` to the CRF NLL with weight 1, so this head returns eq. (18) divided by
  (1 - alpha - beta): ``ca = alpha/(1-alpha-beta) L_ca`` and ``cm = beta/(1-alpha-beta)
  L_cm`` (same minimiser and relative weights; the overall scale is a learning-rate factor).
  Reductions as written: eqs. (3) and (11) are 1/N means over the batch and eq. (17)
  L_mner = -1/|D_mner| sum_j log P is a mean, so the CRF loss is the batch mean
  (``crf_reduction = "mean"``) and alpha, beta are eq. (18)'s weights as printed.

Choices where the paper is silent or ambiguous, and why:

* The CM swap. In training, ``round(swap_fraction * N / 2)`` = k random pairs of rows
  with an image exchange their C (the paper's k = 15 of N = 64, so ``swap_fraction``
  = 2k/N = 0.46875 keeps the paper's balance of negatives for any batch size); these
  generated examples train eqs. (9)-(11). Eq. (12) scales "the text-aware image
  representation of the input", so by default the fusion uses each tweet's own C and
  y^_m of that true pair, in training as at evaluation. The reference code instead
  fuses the swapped examples (NER loss on mismatched images for ~47% of the batch);
  ``fuse_swapped=true`` reproduces that. On the generated sample it typed the
  image-dependent entities much worse (test F1 42 vs 62, head lr 5e-4, one seed).
* Eq. (10) is linear in the flattened [T; C], so its logit is a sum of a text term and
  an image term: CM learns how much a text (and an image) tends to need the image,
  not the identity of the pair. Kept as published.
* Eq. (9) flattens a fixed-length sequence, so ``max_len`` must cover the longest
  window (``train.max_length``, 128 like the paper). Padded positions are zeroed before
  flattening, so padding never changes y^_m.
* Missing images (``image_mask`` False): their rows never enter the contrastive loss,
  the swap or the BCE, and M is zeroed for them, so R = 0 and H = [T; 0]: no image,
  no visual information (the text half is untouched).
* The auxiliary losses are computed in training mode only (eq. 18 is a training
  objective; at evaluation CM has no negatives).
* The attention head count defaults to D // 64 (the paper's m = 12 at D = 768).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mner.errors import ConfigError
from mner.train.heads.base import FusionHead, HeadInput, HeadOutput, register
from mner.train.heads.layers import CrossModalLayer, attention_heads, masked_mean
from mner.train.losses import info_nce
from mner.train.recipes import BEST_DEV, DEVLIN, Recipe


@dataclass(frozen=True)
class MafConfig:
    """MAF hyperparameters (paper section 4.3) and ablation switches (Table 4).

    Attributes:
        temperature: tau of the CA contrastive losses (eqs. 1-2).
        lambda_c: weight of the image-to-text direction in L_ca (eq. 3).
        alpha: weight of L_ca in eq. (18).
        beta: weight of L_cm in eq. (18).
        heads: m, attention heads of CI (eqs. 4-6); None = D // 64 (12 at D = 768),
            lowered to a divisor of D.
        ca_hidden: hidden size of the CA projection MLPs; None = D (768 in the paper).
        ffn_dim: inner size of the CI feed-forward network (eq. 8); None = 4 D.
        swap_fraction: 2k / N, the fraction of image rows whose images are swapped for
            CM negatives (paper: k = 15, N = 64).
        max_len: n + 2, the fixed sequence length flattened by CM (eq. 9).
        dropout: dropout in CI attention and feed-forward network.
        fuse_swapped: in training, fuse the swapped (negative) examples as the reference
            code does, instead of each tweet's own image (eq. 12's "C of the input").
        no_ca: ablation "w/o CA": no alignment module, no ``ca`` loss, no pooled input.
        no_cm: ablation "w/o CM": no matching module, M = C, no ``cm`` loss.
    """

    temperature: float = 0.102
    lambda_c: float = 0.7
    alpha: float = 0.2
    beta: float = 0.2
    heads: int | None = None
    ca_hidden: int | None = None
    ffn_dim: int | None = None
    swap_fraction: float = 30 / 64
    max_len: int = 128
    dropout: float = 0.1
    fuse_swapped: bool = False
    no_ca: bool = False
    no_cm: bool = False

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.lambda_c <= 1.0:
            raise ValueError(f"lambda_c must be in [0, 1], got {self.lambda_c}")
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta >= 1:
            raise ValueError(
                f"alpha and beta must be >= 0 with alpha + beta < 1 (eq. 18), "
                f"got {self.alpha} and {self.beta}"
            )
        if not 0.0 < self.swap_fraction < 1.0:
            raise ValueError(f"swap_fraction must be in (0, 1), got {self.swap_fraction}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("heads", "ca_hidden", "ffn_dim"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {v}")


@register
class MafHead(FusionHead):
    """MAF fusion head: alignment (CA), interaction (CI), matching (CM), gated fusion (CF).

    ``out_dim`` is 2 * text_dim (H = [T; R], section 3.5).

    Distributed training: under DDP the alignment loss (CA, eqs. 1-3) gathers the
    pooled text and image embeddings of every rank (``losses.info_nce``), so each image
    meets the negatives of the whole global batch as in one process, and gradients
    reach the rank that owns each row. The matching loss (CM) swaps images between
    random pairs of rows within each rank's share of the batch (k from the share's
    size), so its negatives and random draws are per rank: with CM on, a DDP run
    agrees with one process in distribution, not step for step (with ``no_cm`` and no
    dropout it agrees up to float summation order).
    """

    name = "maf"
    recipe = Recipe(
        "Xu et al. (2022), MAF, section 4.3; released code xubodhu/MAF",
        encoder=("bert-base-cased", "sec. 4.3: BERT-base; run_gate_cl.py: --bert_model bert-base-cased"),
        batch_size=(64, "sec. 4.3: batch size N is 64 (the alignment's negatives come from the batch)"),
        epochs=(24, "sec. 4.3: 24 epochs; run_gate_cl.py: 24 for twitter2015"),
        patience=(0, "run_gate_cl.py: " + BEST_DEV),
        lr_encoder=(5e-5, "sec. 4.3: learning rate 5e-5 in the entire network"),
        lr_head=(5e-5, "sec. 4.3: learning rate 5e-5 in the entire network"),
        warmup_ratio=(0.1, "not given in the paper: run_gate_cl.py --warmup_proportion 0.1"),
        max_length=(128, "sec. 4.3: maximum length of the input text 128"),
        dropout=(0.1, DEVLIN + " (BERT's hidden dropout 0.1)"),
        datasets={"twitter2017": {"epochs": (
            23, "run_gate_cl.py: 23 epochs for twitter2017 (the paper's sec. 4.3 says 24 for both)")}},
    )
    summary = "MAF (WSDM'22): contrastive alignment, token-region attention, matching, gate"
    needs = ("resnet/grid", "resnet/pooled")
    default_scheme = "bioes"
    Config = MafConfig
    crf_reduction = "mean"  # eq. (17): L_mner = -1/|D_mner| sum_j log P(y^j | S^j, I^j)
    # CI's layers were the head's own attributes before it used the shared layer.
    renamed_parameters = {"ci_attn.": "ci.attn.", "ci_norm1.": "ci.norm1.", "ci_ffn.": "ci.ffn.",
                          "ci_norm2.": "ci.norm2."}

    def __init__(self, cfg: MafConfig, text_dim: int, feature_dims):
        super().__init__(cfg, text_dim, feature_dims)
        d = text_dim
        heads = attention_heads(d, cfg.heads)
        dv = self.feature_dims["resnet/grid"]
        self.out_dim = 2 * d

        # 3.1.2: V = W_j^T J.
        self.region_proj = nn.Linear(dv, d)
        # 3.3, eqs. (4)-(8): the shared layer, with dropout inside the FFN.
        self.ci = CrossModalLayer(d, heads, cfg.ffn_dim or 4 * d, cfg.dropout, ffn_dropout=True)
        # 3.5, eq. (13).
        self.gate_text = nn.Linear(d, d)
        self.gate_visual = nn.Linear(d, d, bias=False)

        self.pooler = self.ca_text = self.ca_image = self.match = None
        if not cfg.no_ca:
            hid = cfg.ca_hidden or d
            dg = self.feature_dims["resnet/pooled"]
            # 3.1.1: T_s is BERT's pooler, a tanh layer over [CLS]. This stand-in is
            # dropped by adopt_encoder_pooler when the encoder has its pretrained one.
            self.pooler = nn.Sequential(nn.Linear(d, d), nn.Tanh())
            # 3.2: two different one-hidden-layer MLPs.
            self.ca_text = nn.Sequential(nn.Linear(d, hid), nn.ReLU(), nn.Linear(hid, d))
            self.ca_image = nn.Sequential(nn.Linear(dg, hid), nn.ReLU(), nn.Linear(hid, d))
        if not cfg.no_cm:
            # Eqs. (9)-(10): one logit from the flattened (max_len, 2D) pair.
            self.match = nn.Linear(cfg.max_len * 2 * d, 1)

    def adopt_encoder_pooler(self, encoder: nn.Module) -> bool:
        """Read T_s from the encoder's pretrained pooler (section 3.1.1) when it has one.

        Drops the head's stand-in Linear + Tanh; returns False (keeping the stand-in)
        for an encoder without a pooler, or under ``no_ca`` where T_s feeds nothing.
        """
        if self.pooler is None or getattr(encoder, "pooler", None) is None:
            return False
        self.pooler = None
        self.encoder_pooler = True
        return True

    @classmethod
    def required_features(cls, cfg: MafConfig) -> tuple[str, ...]:
        """``resnet/pooled`` only feeds CA, so "w/o CA" reads the grid alone."""
        return ("resnet/grid",) if cfg.no_ca else cls.needs

    def forward(self, batch: HeadInput) -> HeadOutput:
        """Fuse token states with the image regions (paper section 3).

        Args:
            batch: ``hidden`` (B, T, D), ``token_mask`` (B, T), ``visual["resnet/grid"]``
                (B, 49, Dv), ``visual["resnet/pooled"]`` (B, Dv) unless ``no_ca``,
                ``image_mask`` (B,).

        Returns:
            ``hidden`` H = [T; R] (B, T, 2D); ``aux_losses`` ``ca`` and ``cm`` (training
            mode only, each present unless switched off, already weighted by eq. 18);
            ``diagnostics`` ``maf_match_prob`` (B,) y^_m used to scale C (0 without an
            image; 1 under ``no_cm``) and ``maf_visual_gate`` (B,) mean of g over real
            tokens (0 without an image).
        """
        cfg = self.cfg
        t = batch.hidden  # (B, T, D)
        B, T, _ = t.shape
        tok = batch.token_mask  # (B, T)
        img = batch.image_mask  # (B,)
        aux: dict[str, torch.Tensor] = {}
        scale = 1.0 / (1.0 - cfg.alpha - cfg.beta)  # eq. (18) divided by (1 - alpha - beta)

        # ---- 3.2 cross-modal alignment (CA), eqs. (1)-(3).
        if not cfg.no_ca and self.training:
            t_s = self._sentence_vector(batch)  # (B, D)
            t_c = self.ca_text(t_s)  # (B, D)
            v_c = self.ca_image(batch.visual["resnet/pooled"].to(t.dtype))  # (B, D)
            l_v2t = info_nce(v_c, t_c, cfg.temperature, "a2b", valid=img)  # eq. (1)
            l_t2v = info_nce(v_c, t_c, cfg.temperature, "b2a", valid=img)  # eq. (2)
            l_ca = cfg.lambda_c * l_v2t + (1.0 - cfg.lambda_c) * l_t2v  # eq. (3)
            aux["ca"] = cfg.alpha * scale * l_ca

        # ---- 3.3 cross-modal interaction (CI), eqs. (4)-(8).
        v = self.region_proj(batch.visual["resnet/grid"].to(t.dtype))  # (B, R, D)
        c = self.ci(t, v)  # eqs. (4)-(8): C = LN(V' + FFN(V')), V' = LN(T + CV): (B, T, D)

        # ---- 3.4 cross-modal matching (CM), eqs. (9)-(12).
        if cfg.no_cm:
            p_match = torch.ones(B, dtype=t.dtype, device=t.device)
            m = c
        else:
            if T > cfg.max_len:
                raise ConfigError(
                    f"a batch has windows of {T} sub-tokens but MAF's matching layer "
                    f"(eq. 9) flattens head.max_len={cfg.max_len}; set -o head.max_len={T} "
                    f"or lower train.max_length"
                )
            if self.training:
                # The generated examples: 2k rows get another row's C, label 0.
                c_swap, y_m = self._swap(c, torch.ones(B, dtype=t.dtype, device=t.device), img)
                logit_swap = self._match_logit(t, c_swap, tok)
                if img.any():
                    l_cm = F.binary_cross_entropy_with_logits(logit_swap[img], y_m[img])  # (11)
                else:
                    l_cm = logit_swap.sum() * 0.0
                aux["cm"] = cfg.beta * scale * l_cm
                if cfg.fuse_swapped:  # the reference code fuses the generated examples
                    c, logit = c_swap, logit_swap
                else:
                    logit = self._match_logit(t, c, tok)
            else:
                logit = self._match_logit(t, c, tok)
            p_match = torch.sigmoid(logit)  # eq. (10): (B,)
            m = p_match.view(B, 1, 1) * c  # eq. (12)

        # No image: nothing visual is retained (rows are zeros in the cache).
        img_f = img.to(t.dtype)
        m = m * img_f.view(B, 1, 1)

        # ---- 3.5 cross-modal fusion (CF), eqs. (13)-(14).
        g = torch.sigmoid(self.gate_text(t) + self.gate_visual(m))  # eq. (13): (B, T, D)
        r = g * m  # eq. (14)
        h = torch.cat([t, r], dim=-1)  # (B, T, 2D)

        diagnostics = {
            "maf_match_prob": (p_match * img_f).detach(),
            "maf_visual_gate": (masked_mean(g, tok).mean(-1) * img_f).detach(),
        }
        return HeadOutput(hidden=h, aux_losses=aux, diagnostics=diagnostics)

    def _sentence_vector(self, batch: HeadInput) -> torch.Tensor:
        """T_s (B, D): the encoder's pooler output, or the stand-in over [CLS]."""
        if self.pooler is not None:
            return self.pooler(batch.hidden[:, 0])
        if batch.pooled is None:
            raise ValueError("MAF adopted the encoder's pooler but HeadInput.pooled is None")
        return batch.pooled.to(batch.hidden.dtype)

    def _match_logit(self, t: torch.Tensor, c: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """W_f^T Flatten([T; C]) of eqs. (9)-(10), before the sigmoid.

        Args:
            t: (B, T, D) token states.
            c: (B, T, D) text-aware image representations.
            tok: (B, T) bool real-token mask.

        Returns:
            (B,) logits.
        """
        keep = tok.unsqueeze(-1).to(t.dtype)
        f_i = torch.cat([t * keep, c * keep], dim=-1)  # eq. (9): (B, T, 2D)
        # Flatten + linear over a zero-padded max_len sequence == the first T rows of the
        # weight; padded positions are zeroed so they add nothing.
        w_f = self.match.weight.view(self.cfg.max_len, -1)[: t.shape[1]]  # (T, 2D)
        return torch.einsum("btd,td->b", f_i, w_f) + self.match.bias

    def _swap(
        self, c: torch.Tensor, y_m: torch.Tensor, img: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Make CM negatives: k random pairs of image rows exchange their C (section 3.4).

        Args:
            c: (B, T, D) text-aware image representations.
            y_m: (B,) match labels, all 1 on entry.
            img: (B,) bool, rows that have an image (only these are swapped).

        Returns:
            ``c`` with the rows of the 2k chosen examples exchanged pairwise, and ``y_m``
            with 0 at those rows.
        """
        rows = img.nonzero().flatten()
        n = rows.numel()
        # At least one positive stays: 2k <= n - 1.
        k = min(round(self.cfg.swap_fraction * n / 2), (n - 1) // 2) if n else 0
        if k < 1:
            return c, y_m
        chosen = rows[torch.randperm(n, device=rows.device)[: 2 * k]]
        first, second = chosen[:k], chosen[k:]
        src = torch.arange(c.shape[0], device=c.device)
        src[first], src[second] = second, first
        y_m = y_m.clone()
        y_m[chosen] = 0.0
        return c[src], y_m
