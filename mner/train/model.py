"""The tagger: encoder + fusion head + dropout + emission layer + CRF.

The CRF runs over words, not sub-tokens: the head's states at each word's first
sub-token are gathered into (B, W, H) before the emission layer. Tags are defined per
word (continuation sub-tokens carry none), so a sub-token CRF would have to learn
transitions across unlabeled positions and its decoding could disagree within a word;
at word level each transition is between two consecutive labeled words, exactly the
BIO/BIOES constraint the CRF is there to learn, and Viterbi gives one tag per word.

With context (see :mod:`mner.train.data`) the encoder reads the pair ``tweet +
context``, and the head receives the encoder's states of the tweet part only (the first
``tweet_len`` positions, laid out exactly as a window without context: [CLS], the
tweet's sub-tokens, [SEP], padding), so every head works unchanged and the CRF covers
the tweet's words only. The *tweet view* is the same tagger reading the tweet part
alone. ITA's cross-view alignment (Wang et al., NAACL 2022, Sec. "Cross-View
Alignment") trains both views and adds ``KL(q_context || q_tweet)`` summed over the
words, where ``q`` are the CRF's posterior marginals per word (forward-backward) and the
context view is the teacher (no gradient flows into it through the KL).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torchcrf import CRF

from mner.train import distributed
from mner.train.crf import log_marginals
from mner.train.data import Batch
from mner.train.heads.base import FusionHead, HeadInput, HeadOutput


def build_head(cfg, enc: nn.Module, feature_dims: dict) -> FusionHead:
    """The head ``cfg`` (a ``TrainConfig``) names, sized for the encoder ``enc``.

    Heads whose layers are BERT layers (``ffn_follows_encoder``) get the encoder's
    intermediate size when their ``ffn_dim`` is None, as the papers' code builds them;
    heads with an ``encoder_layers`` option left None get the encoder's layer count.
    The encoder's pretrained pooler stays only when the head reads it
    (:meth:`FusionHead.adopt_encoder_pooler`, MAF's T_s); otherwise it is removed, so it
    is neither in the run's weights nor an unused parameter of the optimizer.
    Training and reloading a run both build heads here, so the two always agree.
    """
    head_cls = cfg.head_class()
    head_cfg = cfg.head_config()
    inner = getattr(enc.config, "intermediate_size", None)
    if head_cls.ffn_follows_encoder and inner and head_cfg.ffn_dim is None:
        head_cfg = dataclasses.replace(head_cfg, ffn_dim=int(inner))
    # Heads that fuse inside the encoder build one module per encoder layer.
    if getattr(head_cfg, "encoder_layers", 0) is None:
        head_cfg = dataclasses.replace(head_cfg, encoder_layers=int(enc.config.num_hidden_layers))
    head = head_cls(head_cfg, enc.config.hidden_size, feature_dims)
    if getattr(enc, "pooler", None) is not None and not head.adopt_encoder_pooler(enc):
        enc.pooler = None
    return head


def _pooler_moved(module, state_dict, prefix, *args) -> None:
    """Load-time hook: a MAF run written before T_s read the encoder's pooler kept the
    same Linear + Tanh in its head (``head.pooler.0``); it becomes the encoder's."""
    old, new = prefix + "head.pooler.0.", prefix + "encoder.pooler.dense."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[new + key[len(old):]] = state_dict.pop(key)


class Tagger(nn.Module):
    """Encoder + head + emissions + CRF.

    Args:
        encoder: a ``transformers`` encoder returning ``last_hidden_state`` (B, T, Dt).
        head: a :class:`FusionHead` built for ``encoder.config.hidden_size``.
        tag_names: the CRF's tag vocabulary (``TagSet.names``).
        dropout: dropout on the head's output before the emission layer.
    """

    def __init__(
        self, encoder: nn.Module, head: FusionHead, tag_names, dropout: float, *,
        cross_view_weight: float = 0.0, decode_view: str = "context",
    ):
        super().__init__()
        #: Weight of ITA's cross-view KL (0: the tweet view is not trained).
        self.cross_view_weight = float(cross_view_weight)
        #: The view :meth:`decode` reads: ``context`` or ``tweet``.
        self.decode_view = decode_view
        self.encoder = encoder
        self.head = head
        self.tag_names = tuple(tag_names)
        self.dropout = nn.Dropout(dropout)
        self.emissions = nn.Linear(head.out_dim, len(self.tag_names))
        self.crf = CRF(len(self.tag_names), batch_first=True)
        if getattr(head, "encoder_pooler", False):
            self.register_load_state_dict_pre_hook(_pooler_moved)

    def encode(
        self, batch: Batch, view: str = "context"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Encoder states of the tweet part of each window, for the head.

        A head that fuses inside the encoder's layers (``fuses_in_encoder``, MGIPS-CL)
        runs the layers itself; every other head reads the encoder's output.

        Args:
            batch: the batch.
            view: ``context`` reads the whole input (tweet + context, if any);
                ``tweet`` reads the tweet part alone.

        Returns:
            ``(hidden, token_mask, pooled)``: (B, Tt, Dt) states and (B, Tt) bool mask of
            the tweet part, laid out as a window without context ([CLS] tweet [SEP]), and
            the encoder's pooler output (B, Dt), or None when it has none.
        """
        tweet_len = getattr(batch, "tweet_len", None)
        types = getattr(batch, "token_type_ids", None)
        if tweet_len is None:  # a batch built without context support: the plain model
            inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask.long()}
            enc, pooled = self._run_encoder(batch, inputs)
            return enc, batch.attention_mask, pooled
        T = batch.input_ids.shape[1]
        Tt = int(tweet_len.max())
        pos = torch.arange(Tt, device=batch.input_ids.device)
        tweet_mask = pos.unsqueeze(0) < tweet_len.unsqueeze(1)  # (B, Tt)
        if Tt == T and types is None:
            view = "tweet"  # no window reads a context: both views are the plain model
        if view == "tweet":
            pad = int(getattr(self.encoder.config, "pad_token_id", None) or 0)
            ids = batch.input_ids[:, :Tt].masked_fill(~tweet_mask, pad)
            enc, pooled = self._run_encoder(batch, {"input_ids": ids, "attention_mask": tweet_mask.long()})
            return enc, tweet_mask, pooled
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask.long()}
        if types is not None:
            inputs["token_type_ids"] = types
        enc, pooled = self._run_encoder(batch, inputs)  # (B, T, Dt)
        return enc[:, :Tt], tweet_mask, pooled

    def _run_encoder(self, batch: Batch, inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(last hidden states (B, T, Dt), pooler output (B, Dt) or None)`` of ``inputs``."""
        if getattr(self.head, "fuses_in_encoder", False):
            # The head runs the encoder's layers itself (fusion inside them, MGIPS-CL).
            hidden = self.head.encode(self.encoder, inputs, batch.visual, batch.visual_masks,
                                      batch.image_mask)
            return hidden, None
        out = self.encoder(**inputs)
        return out.last_hidden_state, getattr(out, "pooler_output", None)

    def forward(self, batch: Batch, view: str = "context") -> tuple[torch.Tensor, HeadOutput]:
        """Emission scores per word.

        Args:
            batch: the batch.
            view: ``context`` (the input as built, with its context if any) or
                ``tweet`` (the tweet part alone); see :meth:`encode`.

        Returns:
            ``(emissions, head_output)``: emissions (B, W, K) in float32, and what the
            head returned (aux losses, diagnostics).
        """
        enc, token_mask, pooled = self.encode(batch, view)  # (B, Tt, Dt)
        Tt = enc.shape[1]
        labels = batch.sub_labels[:, :Tt] if batch.sub_labels is not None else None
        # HeadInput keeps the contract's masks (bool token_mask, an image_mask even for a
        # batch without images), so no head re-defaults them.
        out = self.head(
            HeadInput(
                hidden=enc,
                token_mask=token_mask,
                visual=batch.visual,
                visual_masks=batch.visual_masks,
                image_mask=batch.image_mask,
                labels=labels,
                label_names=self.tag_names,
                entity_spans=batch.entity_spans,
                entity_mask=batch.entity_mask,
                text_teacher=batch.text_teacher,
                pooled=pooled,  # (B, Dt) or None
            )
        )
        h = out.hidden  # (B, T, H)
        idx = batch.word_pos.unsqueeze(-1).expand(-1, -1, h.shape[-1])  # (B, W, H)
        words = torch.gather(h, 1, idx)
        # The CRF's log-sum-exp over long sequences is sensitive to half precision.
        if self.head.emission_dropout:  # else the head dropped out its input (UMT's code)
            words = self.dropout(words)
        em = self.emissions(words).float()  # (B, W, K)
        if out.emission_prior is not None:
            k = out.emission_prior.shape[-1]
            prior = torch.gather(out.emission_prior.float(), 1, batch.word_pos.unsqueeze(-1).expand(-1, -1, k))
            em = (1.0 - out.prior_weight) * em + out.prior_weight * prior
        return em, out

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """CRF negative log-likelihood plus the head's aux losses.

        The NLL is reduced over the batch as the head's paper writes its NER loss
        (``head.crf_reduction``: ``"mean"`` by default, ``"sum"`` for MGC's eq. 19 and
        HamLearning's eq. 17), so a head's loss weights keep the paper's meaning.

        Returns:
            ``(total, parts)`` where parts maps ``"crf"`` and each aux name to floats.
        """
        emissions, out = self(batch)
        nll = -self.crf(emissions, batch.word_tags, mask=batch.word_mask, reduction=self.head.crf_reduction)
        if self.head.crf_reduction == "sum":  # under DDP: this rank's share of the global sum
            nll = nll * distributed.local_sum_scale()
        total = nll
        parts = {"crf": float(nll.detach())}
        for name, value in out.aux_losses.items():
            total = total + value.float()
            parts[name] = float(value.detach())
        if self.cross_view_weight > 0 and self.reads_context(batch):
            # ITA: the tweet view is trained too (its own CRF NLL), and pulled towards the
            # context view's per-word marginals, which act as a fixed teacher.
            em_tweet, _ = self(batch, view="tweet")
            nll_tweet = -self.crf(em_tweet, batch.word_tags, mask=batch.word_mask, reduction="mean")
            kl = cross_view_kl(self.crf, emissions.detach(), em_tweet, batch.word_mask)
            total = total + nll_tweet + self.cross_view_weight * kl
            parts["crf_tweet"] = float(nll_tweet.detach())
            parts["cross_view_kl"] = float(kl.detach())
        return total, parts

    @staticmethod
    def reads_context(batch: Batch) -> bool:
        """True when some window of the batch reads a context."""
        tweet_len = getattr(batch, "tweet_len", None)
        if tweet_len is None:
            return False
        return getattr(batch, "token_type_ids", None) is not None or int(tweet_len.max()) < batch.input_ids.shape[1]

    @torch.no_grad()
    def decode(self, batch: Batch) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        """Viterbi tag ids per window (one per word) and the head's diagnostics (B,).

        The view decoded is :attr:`decode_view` (``context`` unless set otherwise).
        """
        emissions, out = self(batch, view=self.decode_view)
        paths = self.crf.decode(emissions, mask=batch.word_mask)
        return paths, {k: v.detach().float().cpu() for k, v in out.diagnostics.items()}


def cross_view_kl(crf: CRF, teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ITA's cross-view alignment: ``sum_i KL(q_teacher(y_i) || q_student(y_i))``, batch mean.

    Args:
        crf: the tagger's CRF.
        teacher: (B, W, K) emissions of the tweet+context view (detached by the caller).
        student: (B, W, K) emissions of the tweet-only view.
        mask: (B, W) bool word mask.

    Returns:
        A scalar: the KL summed over each window's words, averaged over the batch (the
        reduction of the CRF negative log-likelihood it is added to).
    """
    log_t = log_marginals(crf, teacher, mask).detach()
    log_s = log_marginals(crf, student, mask)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, W)
    return (kl * mask.float()).sum() / mask.shape[0]


def param_groups(model: Tagger, lr_encoder: float, lr_head: float, weight_decay: float):
    """AdamW parameter groups: encoder vs. the rest, each with and without weight decay.

    Biases and LayerNorm weights get no decay (the BERT fine-tuning convention: decaying
    them only shrinks normalisation scales and shifts).
    """
    groups = {
        (True, True): [],
        (True, False): [],
        (False, True): [],
        (False, False): [],
    }
    norm_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d))
        or "LayerNorm" in type(m).__name__
        or "RMSNorm" in type(m).__name__
        for p in m.parameters(recurse=False)
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_enc = name.startswith("encoder.")
        decay = not (p.dim() < 2 or name.endswith(".bias") or id(p) in norm_ids)
        groups[(is_enc, decay)].append(p)
    out = []
    for (is_enc, decay), params in groups.items():
        if params:
            out.append(
                {
                    "params": params,
                    "lr": lr_encoder if is_enc else lr_head,
                    "weight_decay": weight_decay if decay else 0.0,
                }
            )
    return out
