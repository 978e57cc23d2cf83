"""What every extractor shares: frozen eval-mode models, device placement, autocast.

An extractor owns one feature group of the cache. Its :meth:`Extractor.preprocess` runs
in DataLoader workers on a decoded PIL image; its ``__call__`` runs a batch on the
device under ``torch.inference_mode`` and returns numpy arrays keyed by the group's
dataset names (see :mod:`mner.cache.schema`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one torch intra-op thread (restored after).

    torch's CPU resampling kernels (``interpolate``: the detector's resize, the crops'
    bicubic resize) round the last bit differently depending on how the work is split
    between threads. A random or near-tied detector turns that bit into other boxes, so
    these cheap steps run single-threaded: the cache is then the same whatever
    ``threads`` is (the convolutions and sorts after them do not depend on it).
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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

    The run resolves ``cfg.precision`` once (:func:`mner.devices.resolve_precision`, or
    :func:`mner.devices.replay_precision` for a cache's recorded one) and passes a config
    holding the resolved value; an extractor built directly from an ``auto`` config
    resolves it by the same policy.

    Attributes:
        group: Cache group written (``"resnet"``, ``"clip"``, ...).
        device: Where the models run.
        precision: Resolved autocast dtype name (``fp32``, ``bf16`` or ``fp16``).
    """

    group: str = ""

    def __init__(self, cfg: ExtractConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.precision = (cfg.precision if cfg.precision != "auto"
                          else devices.resolve_precision("auto", device, what="extract.precision"))

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the resolved precision; a no-op for ``fp32``."""
        return autocast(self.device, self.precision)

    def attrs(self) -> dict[str, Any]:
        """Group attributes: ``model``, ``weights``, ``preprocessing``, ``dims`` and extras."""
        raise NotImplementedError

    def dims(self) -> dict[str, int]:
        """Values of the symbolic dimensions of the group's shape templates."""
        raise NotImplementedError
