"""Fusion heads. Importing this package registers every head in ``base.HEADS``.

Add a head: write ``mner/train/heads/<name>.py`` with a ``@register`` class following
``base.FusionHead``, and add its module name to ``_HEAD_MODULES``.
"""

import importlib

from mner.train.heads.base import HEADS, FusionHead, HeadInput, HeadOutput, get_head, register

_HEAD_MODULES = ("bert_crf", "umt", "maf", "bfcl", "mgc", "mgips_cl", "hamlearning", "ita")

for _m in _HEAD_MODULES:
    importlib.import_module(f"{__name__}.{_m}")

__all__ = ["HEADS", "FusionHead", "HeadInput", "HeadOutput", "get_head", "register"]
