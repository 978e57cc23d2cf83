"""BERT-CRF: the text-only baseline every multimodal head is compared against.

The encoder's sub-token states go unchanged to the emission layer and CRF, which the
trainer owns (see ``base.py``); the head adds no parameters, no auxiliary loss and reads
no cached visual feature. This is the "BERT-CRF" row of every paper's results table
(e.g. Table 1 of the MGC paper); BERT: Devlin, Chang, Lee and Toutanova, NAACL 2019,
doi:10.18653/v1/N19-1423 (docs/papers.md).
"""

from __future__ import annotations

from mner.train.heads.base import FusionHead, HeadInput, HeadOutput, register


@register
class BertCrfHead(FusionHead):
    """Identity head: ``hidden`` (B, T, D) is returned as is, so ``out_dim == text_dim``."""

    name = "bert_crf"
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
