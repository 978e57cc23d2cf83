"""BERT-CRF: the text-only baseline every multimodal head is compared against.

The encoder's sub-token states go unchanged to the emission layer and CRF, which the
trainer owns (see ``base.py``); the head adds no parameters, no auxiliary loss and reads
no cached visual feature. This is the "BERT-CRF" row of every paper's results table
(e.g. Table 1 of the MGC paper); BERT: Devlin, Chang, Lee and Toutanova, NAACL 2019,
doi:10.18653/v1/N19-1423 (docs/papers.md).
"""

from __future__ import annotations

import dataclasses

from mner.train.heads.base import FusionHead, HeadInput, HeadOutput, register
from mner.train.recipes import UMT_CODE


@register
class BertCrfHead(FusionHead):
    """Identity head: ``hidden`` (B, T, D) is returned as is, so ``out_dim == text_dim``."""

    name = "bert_crf"
    # No paper in the set says how its BERT-CRF row was trained: UMT's code's recipe, so
    # that the baseline and UMT differ only in the fusion head.
    recipe = dataclasses.replace(
        UMT_CODE,
        paper="the BERT-CRF baseline of Yu et al. (2020, UMT), trained as UMT's released code "
        "jefferyYu/UMT trains UMT (sources: that code's files)",
    )
    summary = "text-only baseline: BERT + CRF, no image"
    needs = ()

    def forward(self, batch: HeadInput) -> HeadOutput:
        """Return the encoder states unchanged.

        Args:
            batch: the batch; only ``hidden`` (B, T, D) is read.

        Returns:
            ``HeadOutput(hidden=batch.hidden)`` with no auxiliary losses or diagnostics.
        """
        return HeadOutput(hidden=batch.hidden)
