"""The context recipes: ITA, MoRe and PGIM, as identity heads with context presets.

These methods add no fusion layers: the encoder reads the tweet together with a context
text and a CRF tags the tweet's words. What they add lives outside the head, because
every head may use it: the context text (``train.context``, :mod:`mner.train.context`),
the pair encoding (:mod:`mner.train.data`) and ITA's cross-view KL
(:class:`mner.train.model.Tagger`). Choosing one of these models selects its context
defaults (``mner.train.config.CONTEXT_PRESETS``); the head returns the encoder states
unchanged, like ``bert_crf``.

* ``ita``: Wang, Gui, Jiang, Jia, Bach, Wang, Huang, Huang and Tu, "ITA: Image-Text
  Alignments for Multi-Modal Named Entity Recognition", NAACL 2022: object tags, an
  image caption and OCR text as context, plus cross-view alignment.
* ``more_text`` / ``more_image``: Wang et al., "Named Entity and Relation Extraction
  with Multi-Modal Retrieval", Findings of EMNLP 2022: passages retrieved from a
  knowledge corpus by the text or by the image, given as a context file.
* ``pgim``: Li et al., "Prompting ChatGPT in MNER: Enhanced Multimodal Named Entity
  Recognition with Auxiliary Refined Knowledge", Findings of EMNLP 2023: auxiliary
  knowledge an LLM wrote for each tweet, given as a context file.

BibTeX for all three: docs/papers.md.
"""

from __future__ import annotations

from mner.train.heads.base import FusionHead, HeadInput, HeadOutput, register


class ContextRecipeHead(FusionHead):
    """Identity head: ``hidden`` (B, T, D), already conditioned on the context, as is."""

    needs = ()

    def forward(self, batch: HeadInput) -> HeadOutput:
        """Return the encoder states of the tweet's positions unchanged."""
        return HeadOutput(hidden=batch.hidden)


@register
class ItaHead(ContextRecipeHead):
    name = "ita"
    summary = "ITA: text encoder + CRF reading tags, caption and OCR as context, cross-view KL"


@register
class MoreTextHead(ContextRecipeHead):
    name = "more_text"
    summary = "MoRe (text retrieval): text encoder + CRF reading retrieved passages (--context-file)"


@register
class MoreImageHead(ContextRecipeHead):
    name = "more_image"
    summary = "MoRe (image retrieval): text encoder + CRF reading retrieved passages (--context-file)"


@register
class PgimHead(ContextRecipeHead):
    name = "pgim"
    summary = "PGIM: text encoder + CRF reading LLM-written knowledge (--context-file)"
