"""What every ``objects`` backend shares: the :class:`Detector` base and the padding.

Kept apart from the backends so that :mod:`mner.extract.objects` (torchvision) and
:mod:`mner.extract.detectron2_backend` both build on it without importing each other.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from mner.extract.base import Extractor


def pad_detections(images: list[torch.Tensor], dets: list[dict[str, np.ndarray]], o: int,
                   region_dim: int, scale: float) -> dict[str, np.ndarray]:
    """The padded ``objects`` arrays of a batch from per-image detections (best first).

    Args:
        images: B tensors (3, H_b, W_b), for the sizes that normalise the boxes.
        dets: per image ``boxes`` (N, 4) xyxy pixels, ``scores`` (N,), ``labels`` (N,),
            ``features`` (N, Do).
        o: O, detections kept per image.
        region_dim: Do.
        scale: Factor applied to the region features (``output_scale``).

    Returns:
        ``boxes`` (B, O, 4), ``boxes_norm`` (B, O, 4), ``scores`` (B, O), ``labels``
        (B, O) int32, ``features`` (B, O, Do), ``count`` (B,); zeros past ``count``.
    """
    b = len(images)
    out = {"boxes": np.zeros((b, o, 4), np.float32), "boxes_norm": np.zeros((b, o, 4), np.float32),
           "scores": np.zeros((b, o), np.float32), "labels": np.zeros((b, o), np.int32),
           "features": np.zeros((b, o, region_dim), np.float32), "count": np.zeros((b,), np.int32)}
    for i, (im, det) in enumerate(zip(images, dets, strict=True)):
        n = min(len(det["scores"]), o)
        h, w = im.shape[-2:]
        out["boxes"][i, :n] = det["boxes"][:n]
        out["boxes_norm"][i, :n] = det["boxes"][:n] / np.array([w, h, w, h], np.float32)
        out["scores"][i, :n] = det["scores"][:n]
        out["labels"][i, :n] = det["labels"][:n]
        out["features"][i, :n] = det["features"][:n] * scale
        out["count"][i] = n
    return out


class Detector(Extractor):
    """What every ``objects`` backend shares; subclasses implement ``_run`` and ``attrs``.

    ``_run(images)`` returns per image ``boxes`` (N, 4) xyxy pixels, ``scores``,
    ``labels`` and ``features`` (N, Do), best first; ``__call__`` pads them to the
    ``objects`` arrays (O = ``max_objects``, zeros past ``count``): ``boxes`` (B, O, 4),
    ``boxes_norm`` (B, O, 4), ``scores`` (B, O), ``labels`` (B, O) int32, ``features``
    (B, O, Do), ``count`` (B,). Subclasses set ``arch``, ``region_dim`` and ``scale``.
    """

    group = "objects"
    arch: str = ""
    region_dim: int = 0
    scale: float = 1.0

    @staticmethod
    def preprocess(image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, H, W) uint8 tensor (the backend resizes it itself)."""
        return pil_to_tensor(image)

    def _run(self, images: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        raise NotImplementedError

    def _calibrate(self, image: torch.Tensor) -> float:
        """Fixed scale putting random region features near unit size (float16-safe).

        Computed on a fixed synthetic ``image``, so it is a pure function of the weights;
        recorded in the group's ``output_scale`` attribute.
        """
        feats = self._run([image])[0]["features"]
        std = float(np.asarray(feats).std()) or 1.0
        return float(f"{1.0 / std:.4g}")

    def __call__(self, images: list[torch.Tensor]) -> dict[str, np.ndarray]:
        """Detect and pool a batch.

        Args:
            images: B tensors (3, H_b, W_b) uint8 RGB, original resolution.

        Returns:
            The padded ``objects`` arrays (see the class docstring).
        """
        return pad_detections(images, self._run(images), self.cfg.max_objects, self.region_dim, self.scale)

    def dims(self) -> dict[str, int]:
        return {"O": self.cfg.max_objects, "Do": self.region_dim}
