"""ResNet grid features: the last conv map as 7x7 = 49 regions plus its global average.

Paper profile: torchvision ResNet-152 with ``ResNet152_Weights.IMAGENET1K_V1`` (the
original Caffe-era weights UMT/MAF used) or ``IMAGENET1K_V2`` (recorded in the cache).
Tiny profile: a seeded random ResNet-18 (a random ResNet-152's activations overflow
float16 and it runs ~3x slower on CPU).

BatchNorm runs in eval mode (running statistics). The UMT and MAF repositories run the
ResNet in train mode, so their features depend on the other images in the batch; these
features are a function of the image alone, identical whatever the batch size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms as T

from mner.extract import weights as W
from mner.extract.base import IMAGENET_MEAN, IMAGENET_STD, ByteTransform, Extractor, freeze
from mner.extract.config import ExtractConfig

#: Input side; the last conv map is then 7x7.
SIZE = 224


class ResNetExtractor(Extractor):
    """``resnet/grid`` (B, 49, Dr) and ``resnet/pooled`` (B, Dr)."""

    group = "resnet"

    def __init__(self, cfg: ExtractConfig, device: torch.device):
        super().__init__(cfg, device)
        if cfg.profile == "paper":
            self.arch = "resnet152"
            enum = getattr(torchvision.models.ResNet152_Weights, cfg.resnet_weights)
            path, self.source = W.torchvision_file(enum, cfg.weights_dir, self.arch, "resnet")
        else:
            self.arch = "resnet18"
            path, self.source = W.tiny_source(cfg.seed, cfg.weights_dir, self.arch, "resnet")
        with W.seeded(cfg.seed, self.arch):
            net = torchvision.models.get_model(self.arch, weights=None)
        if path is not None:
            W.load_into(net, path, f"torchvision {self.arch}")
        self.full = net  # kept for saving tiny weights (tests) and provenance
        # Everything up to layer4; the classifier is not needed.
        body = nn.Sequential(*list(net.children())[:-2])
        # Channels-last on every device: oneDNN's CPU convolutions and cuDNN's tensor-core
        # kernels both prefer NHWC (about 2x for batched CPU inference here).
        self.body = freeze(body).to(device, memory_format=torch.channels_last)
        self.width = net.fc.in_features
        # Short side to 224 (small images go up, never dropped), centre 224x224 crop.
        self.transform = ByteTransform(T.Compose([
            T.Resize(SIZE, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(SIZE),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]), device)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, 224, 224) uint8 tensor, resized and cropped."""
        return self.transform(image)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Run a batch.

        Args:
            x: (B, 3, 224, 224) uint8 images from :meth:`preprocess`.

        Returns:
            ``grid`` (B, 49, Dr) and ``pooled`` (B, Dr), float32 numpy.
        """
        x = self.transform.normalize(x).contiguous(memory_format=torch.channels_last)
        with self.autocast():
            fmap = self.body(x)  # (B, Dr, 7, 7)
        fmap = fmap.float()
        grid = fmap.flatten(2).transpose(1, 2)  # (B, 49, Dr), regions row-major
        pooled = fmap.mean(dim=(2, 3))
        return {"grid": grid.cpu().numpy(), "pooled": pooled.cpu().numpy()}

    def dims(self) -> dict[str, int]:
        return {"Dr": self.width}

    def attrs(self) -> dict[str, Any]:
        return {
            "model": self.arch,
            "weights": self.source,
            "preprocessing": {"resize_short_side": SIZE, "interpolation": "bilinear",
                              "center_crop": SIZE, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                              "batchnorm": "eval"},
            "dims": self.dims(),
            "architecture": {"builder": f"torchvision.models.{self.arch}"},
            "layer": "layer4 output (before avgpool), 7x7 regions row-major",
        }
