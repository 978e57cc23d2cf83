"""What every extractor shares: frozen eval-mode models, device placement, autocast.

An extractor owns one feature group of the cache. Its :meth:`Extractor.preprocess` runs
in DataLoader workers on a decoded PIL image; its ``__call__`` runs a batch on the
device under ``torch.inference_mode`` and returns numpy arrays keyed by the group's
dataset names (see :mod:`mner.cache.schema`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from mner.extract.config import ExtractConfig

#: ImageNet statistics used by torchvision classification and detection models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from mner.errors import ConfigError

        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device(device)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients: every extractor's models are frozen feature functions.

    Eval mode matters for BatchNorm: the UMT and MAF reference code runs ResNet in train
    mode, so their features depend on which images share a batch; here they do not.
    """
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class Extractor:
    """Base of the per-group extractors.

    Attributes:
        group: Cache group written (``"resnet"``, ``"clip"``, ...).
        device: Where the models run.
        amp: Whether float16 autocast is active (CUDA only).
    """

    group: str = ""

    def __init__(self, cfg: ExtractConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.amp = cfg.amp and device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision on CUDA; a no-op on CPU (CPU float16 kernels are slow)."""
        if self.amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def attrs(self) -> dict[str, Any]:
        """Group attributes: ``model``, ``weights``, ``preprocessing``, ``dims`` and extras."""
        raise NotImplementedError

    def dims(self) -> dict[str, int]:
        """Values of the symbolic dimensions of the group's shape templates."""
        raise NotImplementedError
