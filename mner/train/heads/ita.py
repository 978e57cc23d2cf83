"""ITA: the encoder reads the tweet with the image turned into text; no fusion layers.

Wang, Gui, Jiang, Jia, Bach, Wang, Huang, Huang and Tu, "ITA: Image-Text Alignments for
Multi-Modal Named Entity Recognition", NAACL 2022. ITA aligns the image into the
textual space (object tags, an image caption and OCR text), concatenates that text
with the tweet as one cross-modal input of a pretrained text encoder, tags with a CRF
over the tweet's words, and aligns the output distributions of the cross-modal view and
the tweet-only view with a KL term (cross-view alignment).

Everything ITA adds lives outside the head, because every head may use it: the context
text (``train.context``, :mod:`mner.train.context`), the pair encoding
(:mod:`mner.train.data`) and the cross-view KL (:class:`mner.train.model.Tagger`). This
head is the identity, like ``bert_crf``; choosing ``--model ita`` selects the recipe's
context and alignment defaults (``mner.train.config.CONTEXT_PRESETS``).
"""

from __future__ import annotations

from mner.train.heads.base import HeadInput, HeadOutput, register
from mner.train.heads.bert_crf import BertCrfHead


@register
class ItaHead(BertCrfHead):
    """Identity head of the ITA recipe: ``hidden`` (B, T, D) is returned as is."""

    name = "ita"
    summary = "ITA: text encoder + CRF reading tags, caption and OCR as context, cross-view KL"
    needs = ()

    def forward(self, batch: HeadInput) -> HeadOutput:
        """Return the encoder states (already conditioned on the context) unchanged."""
        return HeadOutput(hidden=batch.hidden)
