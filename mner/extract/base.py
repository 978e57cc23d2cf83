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
from PIL import Image
from torch import nn
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor

from mner import devices
from mner.devices import autocast
from mner.extract.config import ExtractConfig

#: ImageNet statistics used by torchvision classification and detection models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ByteTransform:
    """An eval transform ending in ``ToTensor`` + ``Normalize``, split at the ``ToTensor``.

    Workers run the PIL steps and ship uint8 tensors (a quarter of the float32 bytes
    through the DataLoader's shared memory, and later to the GPU); :meth:`normalize`
    then applies the same float32 operations as ``ToTensor`` + ``Normalize`` to the
    whole batch on the device, so the values are bit-identical to the unsplit transform.

    Args:
        transform: A ``Compose`` whose last two steps are a to-tensor step and ``Normalize``.
        device: Where :meth:`normalize` puts the batch.
    """

    def __init__(self, transform: T.Compose, device: torch.device):
        *pil_steps, to_tensor, norm = transform.transforms
        if not isinstance(norm, T.Normalize) or "ToTensor" not in type(to_tensor).__name__:
            raise TypeError(f"expected a transform ending in ToTensor, Normalize; got {transform}")
        self.pil = T.Compose(pil_steps)
        self.mean = torch.tensor(norm.mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.std = torch.tensor(norm.std, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.device = device

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, S, S) uint8 tensor (resized and cropped)."""
        return pil_to_tensor(self.pil(image))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> normalised float32 on the device (ToTensor + Normalize)."""
        return x.to(self.device, non_blocking=True).float().div_(255).sub_(self.mean).div_(self.std)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``fp16`` on CUDA, ``bf16`` on a CPU with native bfloat16, else ``fp32``.

    Explicit values pass through: a cache's recorded precision is reproduced exactly by
    ``mner predict`` whatever machine it runs on.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if devices.cpu_has_bf16() else "fp32"


def recorded_precision(extract_config: dict, device: torch.device) -> str:
    """The resolved precision a cache was made with, from its ``extract_config``.

    Caches written before ``precision`` existed recorded ``amp``: float16 autocast on
    CUDA when true, float32 on CPU.
    """
    if "precision" in extract_config:
        return str(extract_config["precision"])
    return "fp16" if device.type == "cuda" and extract_config.get("amp", True) else "fp32"


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
        precision: Resolved autocast dtype name (``fp32``, ``bf16`` or ``fp16``).
    """

    group: str = ""

    def __init__(self, cfg: ExtractConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.precision = resolve_precision(cfg.precision, device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the resolved precision; a no-op for ``fp32``."""
        return autocast(self.device, self.precision)

    def attrs(self) -> dict[str, Any]:
        """Group attributes: ``model``, ``weights``, ``preprocessing``, ``dims`` and extras."""
        raise NotImplementedError

    def dims(self) -> dict[str, int]:
        """Values of the symbolic dimensions of the group's shape templates."""
        raise NotImplementedError
