"""Detected objects (``objects``): boxes, scores, labels and one feature per box.

Paper profile: torchvision ``fasterrcnn_resnet50_fpn_v2`` (``COCO_V1`` weights), or
``maskrcnn_resnet50_fpn_v2`` with ``-o detector=maskrcnn`` (its box branch; the mask
branch is switched off since masks are not stored). Tiny profile:
``fasterrcnn_mobilenet_v3_large_320_fpn`` with random weights and score threshold 0, so
a random detector still returns ``max_objects`` boxes.

One backbone pass per batch serves detection and region features: the top-O detections
after NMS (torchvision's per-class NMS, then the score sort) are pooled with the
detector's own ``MultiScaleRoIAlign`` (7x7, from the FPN levels) and, with
``region_pool="box_head"`` (default), passed through the detector's box head
(``TwoMLPHead`` / ``FastRCNNConvFCHead``) to a 1024-d vector, the representation its
classifier scores; ``region_pool="mean"`` averages the 7x7 RoIAlign map to the FPN width
(256). The detector pads a batch to its largest image, which would make an image's
detections depend on its batch-mates; so only images of the same size share a forward
pass (see :meth:`ObjectExtractor._run`): results are a function of the image alone,
at the price of smaller batches on datasets of mixed sizes.

The optional detectron2 backend lives in :mod:`mner.extract.detectron2_backend`:
:func:`build_detector` returns its extractor (same interface) for ``detector=detectron2``
and an :class:`ObjectExtractor` otherwise; choosing it without detectron2 installed is a
one-line :class:`WeightsError` before any work.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchvision
from torchvision.models import detection as tvd

from mner.errors import ConfigError, WeightsError
from mner.extract import weights as W
from mner.extract.base import freeze, one_thread
from mner.extract.config import ExtractConfig
from mner.extract.detector import Detector, pad_detections  # noqa: F401 - public here too

#: COCO class names in torchvision's label order (index 0 is the background).
COCO_NAMES: tuple[str, ...] = tuple(tvd.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1.meta["categories"])

#: Fixed detector input side of the tiny profile.
TINY_SIDE = 224

_PAPER = {
    "fasterrcnn": ("fasterrcnn_resnet50_fpn_v2", tvd.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1),
    "maskrcnn": ("maskrcnn_resnet50_fpn_v2", tvd.MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1),
}
_TINY = {
    "fasterrcnn": "fasterrcnn_mobilenet_v3_large_320_fpn",
    "maskrcnn": "maskrcnn_resnet50_fpn_v2",  # no small Mask R-CNN in torchvision: slow on CPU
}


def detectron2_detector(cfg: ExtractConfig, device: torch.device) -> Any:
    """The detectron2 backend, kept apart so torchvision users never import it.

    Returns:
        A :class:`mner.extract.detectron2_backend.Detectron2Extractor` (the interface of
        :class:`ObjectExtractor`).

    Raises:
        WeightsError: detectron2 is not installed, or cannot be imported.
    """
    try:
        import detectron2  # noqa: F401
    except ImportError as exc:
        if exc.name not in (None, "detectron2"):  # installed, but one of its dependencies is not
            raise WeightsError(
                f"detector detectron2: detectron2 cannot be imported (no module {exc.name}); "
                f"pip install {exc.name.split('.')[0]}, or use -o detector=fasterrcnn"
            ) from None
        raise WeightsError(
            "detector detectron2: detectron2 is not installed; install it (see "
            "https://detectron2.readthedocs.io/en/latest/tutorials/install.html) or use "
            "-o detector=fasterrcnn"
        ) from None
    from mner.extract.detectron2_backend import Detectron2Extractor

    return Detectron2Extractor(cfg, device)


def build_detector(cfg: ExtractConfig, device: torch.device) -> Any:
    """The detector ``cfg.detector`` names: an :class:`ObjectExtractor` (torchvision) or
    the detectron2 backend's extractor, which has the same interface."""
    if cfg.detector == "detectron2":
        return detectron2_detector(cfg, device)
    return ObjectExtractor(cfg, device)


class ObjectExtractor(Detector):
    """torchvision's Faster / Mask R-CNN as the ``objects`` extractor (see :class:`Detector`)."""

    def __init__(self, cfg: ExtractConfig, device: torch.device):
        super().__init__(cfg, device)
        if cfg.detector not in _PAPER:
            raise ConfigError(f"ObjectExtractor is torchvision's; use build_detector for {cfg.detector}")
        kwargs: dict[str, Any] = {"box_score_thresh": cfg.threshold,
                                  "box_detections_per_img": cfg.max_objects, "num_classes": 91}
        if cfg.profile == "paper":
            self.arch, enum = _PAPER[cfg.detector]
            path, self.source = W.torchvision_file(enum, cfg.weights_dir, self.arch, "objects")
        else:
            self.arch = _TINY[cfg.detector]
            path, self.source = W.tiny_source(cfg.seed, cfg.weights_dir, self.arch, "objects")
            # Fewer proposals: a random RPN's proposals are arbitrary anyway, and the
            # per-class NMS over 90 classes dominates the tiny detector's CPU time.
            # Every image resized to one fixed 224x224 input (aspect not kept; recorded
            # in the preprocessing attributes): same-size inputs share one batched
            # forward pass (see _run), which is most of the tiny profile's speed.
            kwargs.update(rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20)
            if self.arch.endswith("_320_fpn"):
                kwargs.update(fixed_size=(TINY_SIDE, TINY_SIDE))
        self.architecture = {"builder": f"torchvision.models.detection.{self.arch}", **kwargs}
        with W.seeded(cfg.seed, self.arch):
            net = getattr(tvd, self.arch)(weights=None, weights_backbone=None, **kwargs)
        if path is not None:
            W.load_into(net, path, f"torchvision {self.arch}")
        self.full = net
        if getattr(net.roi_heads, "mask_head", None) is not None:
            net.roi_heads.mask_roi_pool = net.roi_heads.mask_head = net.roi_heads.mask_predictor = None
        self.net = freeze(net).to(device)
        self.out_channels = int(net.backbone.out_channels)
        self.region_dim = (int(net.roi_heads.box_predictor.cls_score.in_features)
                           if cfg.region_pool == "box_head" else self.out_channels)
        self.scale = 1.0
        if cfg.profile == "tiny":
            g = torch.Generator().manual_seed(0)
            self.scale = self._calibrate((torch.rand(3, 240, 320, generator=g) * 255).to(torch.uint8))

    def _run(self, images: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        # Images are batched only with images of the same size: the detector pads a
        # batch to its largest image, and padding changes the features (and, with
        # near-tied scores, the detections) near the border. Grouping keeps every
        # image's detections independent of what else is in its batch.
        fixed = self.net.transform.fixed_size is not None
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault((0, 0) if fixed else tuple(im.shape[-2:]), []).append(i)
        out: list[dict[str, np.ndarray] | None] = [None] * len(images)
        for idx in groups.values():
            for i, res in zip(idx, self._run_same_size([images[i] for i in idx]), strict=True):
                out[i] = res
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _run_same_size(self, images: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        net = self.net
        x = [im.to(self.device, non_blocking=True).float().div_(255) for im in images]
        sizes = [tuple(im.shape[-2:]) for im in images]
        with self.autocast():
            with one_thread():
                il, _ = net.transform(x)
            feats = net.backbone(il.tensors)
            proposals, _ = net.rpn(il, feats)
            dets, _ = net.roi_heads(feats, proposals, il.image_sizes)
            boxes_t = [d["boxes"] for d in dets]  # in the resized frame, for pooling
            pooled = net.roi_heads.box_roi_pool(feats, boxes_t, il.image_sizes)  # (sumO, C, 7, 7)
            if self.cfg.region_pool == "box_head":
                region = net.roi_heads.box_head(pooled)  # (sumO, Do)
            else:
                region = pooled.mean(dim=(2, 3))
        dets = net.transform.postprocess(dets, il.image_sizes, sizes)
        region = region.float().cpu().split([len(b) for b in boxes_t])
        return [{"boxes": d["boxes"].float().cpu().numpy(), "scores": d["scores"].float().cpu().numpy(),
                 "labels": d["labels"].cpu().numpy(), "features": r.numpy()}
                for d, r in zip(dets, region, strict=True)]

    def attrs(self) -> dict[str, Any]:
        return {
            "model": self.arch,
            "weights": self.source,
            "preprocessing": {"input": "RGB 0-1, the detector's own GeneralizedRCNNTransform",
                              "min_size": int(self.net.transform.min_size[0]),
                              "max_size": int(self.net.transform.max_size),
                              "fixed_size": self.net.transform.fixed_size,
                              "score_threshold": self.cfg.threshold,
                              "max_objects": self.cfg.max_objects,
                              "region_pool": self.cfg.region_pool},
            "dims": self.dims(),
            "architecture": self.architecture,
            "class_names": list(COCO_NAMES),
            "output_scale": self.scale,
            "torchvision": torchvision.__version__,
        }
