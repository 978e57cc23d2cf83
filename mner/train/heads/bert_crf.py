"""BERT-CRF: the text-only baseline every multimodal head is compared against.

The encoder's sub-token states go unchanged to the emission layer and CRF, which the
trainer owns (see ``base.py``); the head adds no parameters, no auxiliary loss and reads
no cached visual feature. This is the "BERT-CRF" row of every paper's results table
(e.g. Table 1 of the MGC paper); BERT: Devlin, Chang, Lee and Toutanova, NAACL 2019,
doi:10.18653/v1/N19-1423 (docs/papers.md).
"""

from __future__ import annotations

from mner.train.heads.base import FusionHead, HeadInput, HeadOutput, register
from mner.train.recipes import BEST_DEV, DEVLIN, Recipe


@register
class BertCrfHead(FusionHead):
    """Identity head: ``hidden`` (B, T, D) is returned as is, so ``out_dim == text_dim``."""

    name = "bert_crf"
    recipe = Recipe(
        "the BERT-CRF baseline of Yu et al. (2020, UMT), trained as UMT's released code "
        "(jefferyYu/UMT) trains UMT; the papers give no recipe of their own for it",
        encoder=("bert-base-cased", "UMT code run_mtmner_crf.sh: --bert_model=bert-base-cased"),
        batch_size=(32, "UMT code run_mtmner_crf.sh: --train_batch_size=32"),
        epochs=(24, "UMT code run_mtmner_crf.py: 24 epochs for twitter2015"),
        patience=(0, "UMT code run_mtmner_crf.py: " + BEST_DEV),
        lr_encoder=(5e-5, "UMT code run_mtmner_crf.py: --learning_rate 5e-5 for every parameter"),
        lr_head=(5e-5, "UMT code run_mtmner_crf.py: --learning_rate 5e-5 for every parameter"),
        warmup_ratio=(0.1, "UMT code run_mtmner_crf.py: --warmup_proportion 0.1"),
        max_length=(128, "UMT code run_mtmner_crf.sh: --max_seq_length=128"),
        dropout=(0.1, DEVLIN + " (BERT's hidden dropout 0.1)"),
        datasets={"twitter2017": {"epochs": (22, "UMT code run_mtmner_crf.py: 22 epochs for twitter2017")}},
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
