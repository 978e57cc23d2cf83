"""The optional detectron2 backend of the ``objects`` extractor (``-o detector=detectron2``).

``mner.extract.objects.build_detector(cfg, device)`` returns a :class:`Detectron2Extractor` when
``cfg.detector == "detectron2"`` (see :func:`mner.extract.objects.detectron2_detector`);
it has the same interface and writes the same ``objects`` datasets, so ``relations`` and
``crops`` are built from its boxes. This module imports detectron2 only inside the
extractor, so mner works without it.

What the user chooses (``ExtractConfig`` fields):

- ``d2_config``: a detectron2 yaml config file, or a model-zoo name such as
  ``COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml`` (default). For a zoo name,
  ``MODEL.WEIGHTS`` becomes the zoo's trained checkpoint, as ``model_zoo.get_config(name,
  trained=True)`` does. Any ``GeneralizedRCNN`` with ``StandardROIHeads`` (FPN, and the
  last stage of cascades) or ``Res5ROIHeads`` (C4, like the Visual Genome
  bottom-up-attention models HamLearning uses) works; masks and keypoints are switched
  off since they are not stored.
- ``d2_weights``: a local ``.pth`` / ``.pkl`` checkpoint or a URL / ``detectron2://`` path,
  loaded with detectron2's ``DetectionCheckpointer`` (which converts Detectron1 / Caffe2
  pickles by name matching). Every model parameter must be found in it (extra entries,
  e.g. an attribute head, are ignored). Default: ``--weights-dir``'s ``<config stem>.pkl``
  / ``.pth``, else the config's ``MODEL.WEIGHTS`` (paper) or seeded random weights (tiny).
  A URL is used from detectron2's download cache (``$FVCORE_CACHE`` or
  ``~/.torch/iopath_cache``) and downloaded only when not cached and not offline.
- ``d2_classes``: a text file of class names, one per line in class-id order (e.g. the
  1600 Visual Genome objects); default: ``thing_classes`` of the config's first
  ``DATASETS.TEST`` dataset (the COCO names for the zoo's COCO models).

Per image (the model's own steps, as ``DefaultPredictor`` and ``GeneralizedRCNN.inference``):
RGB -> ``cfg.INPUT.FORMAT`` channel order, ``ResizeShortestEdge`` to the test sizes
(bilinear), normalised and padded by ``preprocess_image``; backbone, RPN and ROI heads with
``SCORE_THRESH_TEST = score_threshold`` and ``DETECTIONS_PER_IMAGE = max_objects`` (per-class
NMS, then the top-O by score); boxes scaled back to the original image and clipped, empty
ones dropped, as ``detector_postprocess`` does. One region feature per kept box from the
same backbone pass: FPN models pool the box with the ROI heads' ``box_pooler`` (7x7 over
the FPN levels) and, with ``region_pool="box_head"``, run the box head (1024-d, what the
classifier scores); C4 models run ``_shared_roi_transform`` (pooler + res5) and average
the map (2048-d, the bottom-up-attention feature). ``region_pool="mean"`` averages the
pooled map instead (FPN width 256, or res4's 1024 for C4). Labels are detectron2's
0-based class ids, indices into ``class_names`` (no background entry).

As in the torchvision extractor, only images of the same resized size share a forward
pass, so an image's detections do not depend on its batch-mates' padding. The tiny
profile builds the config's architecture with seeded random weights, a small test size
(shortest edge 224, longest 320) and fewer proposals, score threshold 0 (so a random
detector still returns ``max_objects`` boxes) and a calibrated ``output_scale``; its
frozen batch norms take their statistics from a fixed synthetic image (see
:meth:`Detectron2Extractor._normalise_random`), without which a random detectron2 ResNet
saturates and detects nothing.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from mner.errors import ConfigError, DataError, WeightsError
from mner.extract import weights as W
from mner.extract.base import freeze
from mner.extract.config import ExtractConfig
from mner.extract.detector import Detector
from mner.provenance import sha256_file

#: Model-zoo config used when ``d2_config`` is not set.
DEFAULT_CONFIG = "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"

#: Tiny profile: ResizeShortestEdge test sizes and RPN proposals kept at test time.
TINY_MIN_SIZE, TINY_MAX_SIZE = 224, 320
TINY_RPN_PRE_NMS, TINY_RPN_POST_NMS = 100, 20

#: Where detectron2 resolves ``detectron2://`` paths (``detectron2.utils.file_io``).
D2_URL_PREFIX = "https://dl.fbaipublicfiles.com/detectron2/"


def read_class_names(path: Path) -> list[str]:
    """Class names from a text file, one per line in class-id order.

    Trailing blank lines are ignored; a blank line before the last name would shift every
    later id, so it is an error.

    Raises:
        DataError: Missing file, no names, or a blank line between names.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the class-name file ({type(exc).__name__}); "
                        "check -o d2_classes") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    for i, name in enumerate(names, start=1):
        if not name:
            raise DataError(f"{path}:{i}: blank line between class names (it would shift the "
                            "class ids after it); remove it")
    if not names:
        raise DataError(f"{path}: no class names; write one name per line in class-id order")
    return names


def url_cache_path(url: str) -> Path:
    """Where detectron2's ``PathManager`` caches a downloaded ``url`` (iopath's layout)."""
    from iopath.common.file_io import get_cache_dir

    if url.startswith("detectron2://"):
        url = D2_URL_PREFIX + url[len("detectron2://"):]
    parsed = urlparse(url)
    return Path(get_cache_dir()) / os.path.dirname(parsed.path.lstrip("/")) / url.split("/")[-1]


def synthetic_image() -> torch.Tensor:
    """A fixed (3, 240, 320) uint8 image with photo-like statistics, for tiny-model set-up.

    Smooth colour regions (8x10 random colours, bilinearly upsampled) plus mild pixel
    noise: random nets calibrated on pure pixel noise see very different activations on
    real (mostly smooth) images.
    """
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, 8, 10, generator=g) * 255
    img = torch.nn.functional.interpolate(coarse, size=(240, 320), mode="bilinear", align_corners=False)[0]
    img = img + (torch.rand(3, 240, 320, generator=g) - 0.5) * 20
    return img.clamp(0, 255).to(torch.uint8)


def _config_sha256(d2cfg: Any) -> str:
    """Hash of the effective (merged and overridden) config, as detectron2 dumps it."""
    return hashlib.sha256(d2cfg.dump().encode()).hexdigest()


class Detectron2Extractor(Detector):
    """A detectron2 R-CNN as the ``objects`` extractor; interface of ``ObjectExtractor``.

    Output arrays of ``__call__`` (O = ``max_objects``, padded with zeros past ``count``):
    ``boxes`` (B, O, 4) xyxy pixels, ``boxes_norm`` (B, O, 4), ``scores`` (B, O),
    ``labels`` (B, O) int32, ``features`` (B, O, Do), ``count`` (B,).

    Attributes:
        arch: Model name recorded in the cache (``detectron2:<config>``).
        cfg: The :class:`ExtractConfig`.
        d2cfg: The effective detectron2 ``CfgNode`` (frozen).
        model: The frozen ``GeneralizedRCNN`` on ``device``.
        class_names: Names indexed by the stored labels.
        region_dim: Do, the region feature size.
        scale: Factor applied to the region features (``output_scale``; 1 in paper).
    """

    group = "objects"

    def __init__(self, cfg: ExtractConfig, device: torch.device):
        super().__init__(cfg, device)
        import detectron2
        import detectron2.data.transforms as T
        from detectron2.modeling import build_model
        from detectron2.modeling.meta_arch import META_ARCH_REGISTRY, GeneralizedRCNN

        self.version = detectron2.__version__
        self.config_name = cfg.d2_config or DEFAULT_CONFIG
        d2cfg, self.zoo, stem = self._load_config(self.config_name)
        self.arch = f"detectron2:{self.config_name if self.zoo else Path(self.config_name).name}"
        try:
            meta_cls = META_ARCH_REGISTRY.get(d2cfg.MODEL.META_ARCHITECTURE)
        except KeyError:
            meta_cls = None
        if meta_cls is None or not issubclass(meta_cls, GeneralizedRCNN):
            raise ConfigError(f"d2_config {self.config_name}: META_ARCHITECTURE "
                              f"{d2cfg.MODEL.META_ARCHITECTURE} has no ROI box head to pool "
                              "regions from; choose a Faster / Mask R-CNN config")
        if d2cfg.MODEL.LOAD_PROPOSALS:
            raise ConfigError(f"d2_config {self.config_name}: MODEL.LOAD_PROPOSALS needs "
                              "precomputed proposals; set it to False (the RPN proposes boxes)")
        if d2cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ConfigError(f"d2_config {self.config_name}: INPUT.FORMAT {d2cfg.INPUT.FORMAT} "
                              "is not supported; use a model whose INPUT.FORMAT is RGB or BGR")
        self.class_names = self._class_names(d2cfg)
        path, self.source = self._weights(d2cfg, stem)  # WeightsError before anything heavy

        try:
            with W.seeded(cfg.seed, self.arch):
                model = build_model(d2cfg)
        except KeyError as exc:  # a component name no registry knows (e.g. a project's heads)
            what = str(exc).strip(chr(34)).rstrip("!")[:160]
            raise ConfigError(f"d2_config {self.config_name}: {what}; mner builds detectron2's own "
                              "components only: use their names in the config (e.g. "
                              "ROI_HEADS.NAME Res5ROIHeads)") from None
        d2cfg.freeze()
        self.d2cfg = d2cfg
        self.aug = T.ResizeShortestEdge([d2cfg.INPUT.MIN_SIZE_TEST] * 2, d2cfg.INPUT.MAX_SIZE_TEST)
        self.model = freeze(model)
        self._set_region_head()
        if path is not None:
            self._load_weights(model, path)
        else:
            self._normalise_random(model)
        model.to(device)
        self.scale = 1.0
        if cfg.profile == "tiny":
            self.scale = self._calibrate(synthetic_image())

    # -- building -------------------------------------------------------------------

    def _load_config(self, name: str) -> tuple[Any, bool, str]:
        """``(cfg, from_zoo, stem)`` with mner's test-time settings applied."""
        from detectron2 import model_zoo
        from detectron2.config import get_cfg

        d2cfg = get_cfg()
        if name.endswith(".py"):
            raise ConfigError(f"d2_config {name}: LazyConfig .py files are not supported; "
                              "use a yaml config")
        zoo = not Path(name).is_file()
        try:
            if zoo:
                try:
                    file = model_zoo.get_config_file(name)
                except RuntimeError:
                    raise ConfigError(
                        f"d2_config {name}: no such file, nor a detectron2 model-zoo config; pass a "
                        f"yaml path or a zoo name such as {DEFAULT_CONFIG}") from None
                d2cfg.merge_from_file(file)
                try:  # a zoo name means the zoo's trained model, as model_zoo.get(trained=True)
                    d2cfg.MODEL.WEIGHTS = model_zoo.get_checkpoint_url(name)
                except RuntimeError:  # zoo config without a trained checkpoint: keep its own
                    pass
            else:
                d2cfg.merge_from_file(name)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - yaml, unknown key, _BASE_ not found: one remedy
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"d2_config {name}: not a valid detectron2 config ({msg[:160]}); "
                              "fix the yaml file") from None
        d2cfg.MODEL.DEVICE = "cpu"  # built on CPU (seeded init), then moved to the device
        d2cfg.MODEL.MASK_ON = False  # masks / keypoints are not stored
        d2cfg.MODEL.KEYPOINT_ON = False
        d2cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(self.cfg.threshold)
        d2cfg.TEST.DETECTIONS_PER_IMAGE = int(self.cfg.max_objects)
        if self.cfg.profile == "tiny":
            d2cfg.INPUT.MIN_SIZE_TEST, d2cfg.INPUT.MAX_SIZE_TEST = TINY_MIN_SIZE, TINY_MAX_SIZE
            d2cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = TINY_RPN_PRE_NMS
            d2cfg.MODEL.RPN.POST_NMS_TOPK_TEST = TINY_RPN_POST_NMS
        return d2cfg, zoo, Path(name).stem

    def _class_names(self, d2cfg: Any) -> list[str]:
        from detectron2.data import MetadataCatalog

        n = int(d2cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        if self.cfg.d2_classes is not None:
            names, where = read_class_names(self.cfg.d2_classes), str(self.cfg.d2_classes)
        else:
            datasets = list(d2cfg.DATASETS.TEST)
            names = list(getattr(MetadataCatalog.get(datasets[0]), "thing_classes", None) or []) if datasets else []
            if not names:
                why = (f"dataset {datasets[0]} has no registered thing_classes" if datasets
                       else "DATASETS.TEST is empty")
                raise ConfigError(f"d2_config {self.config_name}: no class names ({why}); pass "
                                  "-o d2_classes=FILE with one name per line")
            where = f"thing_classes of {datasets[0]}"
        if len(names) != n:
            raise ConfigError(f"{where}: {len(names)} class names, but the model has "
                              f"ROI_HEADS.NUM_CLASSES {n}; pass -o d2_classes=FILE with {n} names "
                              "(no background line)")
        return names

    def _weights(self, d2cfg: Any, stem: str) -> tuple[Path | None, dict]:
        """The checkpoint to load and its provenance record, resolved before any work."""
        cfg = self.cfg
        if cfg.d2_weights is not None:
            return self._resolve(cfg.d2_weights, "d2_weights")
        if cfg.weights_dir is not None:
            names = [f"{stem}.pkl", stem, os.path.basename(str(d2cfg.MODEL.WEIGHTS))]
            path = W.find_local(Path(cfg.weights_dir), [n for n in names if n])
            if path is None:
                raise WeightsError(f"objects: {cfg.weights_dir} has no {stem}.pkl / {stem}.pth; put "
                                   "the detectron2 checkpoint there, pass -o d2_weights=FILE, or "
                                   "drop --weights-dir")
            return path, {"source": "local", "name": self.arch, "file": path.name,
                          "sha256": sha256_file(path)}
        if cfg.profile == "tiny":
            return None, {"source": "seeded-random", "name": self.arch, "seed": cfg.seed}
        if not d2cfg.MODEL.WEIGHTS:
            raise WeightsError(f"objects: d2_config {self.config_name} sets no MODEL.WEIGHTS; pass "
                               "-o d2_weights=FILE (a .pth / .pkl checkpoint)")
        return self._resolve(str(d2cfg.MODEL.WEIGHTS), f"MODEL.WEIGHTS of {self.config_name}")

    def _resolve(self, spec: str, what: str) -> tuple[Path, dict]:
        """A local file, or a URL from detectron2's download cache (downloaded if allowed)."""
        if "://" not in spec:
            path = Path(spec).expanduser()
            if not path.is_file():
                raise WeightsError(f"objects: {what} {spec}: no such file; pass -o d2_weights=FILE "
                                   "with a detectron2 .pth / .pkl checkpoint")
            return path, {"source": "local", "name": self.arch, "file": path.name,
                          "sha256": sha256_file(path)}
        path = url_cache_path(spec)
        if not path.is_file():
            if W.offline():
                raise WeightsError(
                    f"objects: {what} {spec} is not in detectron2's cache {path.parent} and "
                    f"downloads are off (HF_HUB_OFFLINE); copy {path.name} there, pass -o "
                    "d2_weights=FILE, or use --profile tiny")
            from detectron2.utils.file_io import PathManager

            old = socket.getdefaulttimeout()
            socket.setdefaulttimeout(W.DOWNLOAD_TIMEOUT_S)
            try:
                path = Path(PathManager.get_local_path(spec))
            except Exception as exc:  # noqa: BLE001 - no network, proxy, disk: same remedy
                raise WeightsError(
                    f"objects: cannot download {spec} ({type(exc).__name__}: {str(exc)[:80]}); copy "
                    f"{path.name} into {path.parent}, pass -o d2_weights=FILE, or use --profile "
                    "tiny") from None
            finally:
                socket.setdefaulttimeout(old)
        return path, {"source": "detectron2", "name": spec, "file": path.name,
                      "sha256": sha256_file(path)}

    def _load_weights(self, model: torch.nn.Module, path: Path) -> None:
        """Load with ``DetectionCheckpointer``; every model parameter must be in the file."""
        from detectron2.checkpoint import DetectionCheckpointer

        ck = DetectionCheckpointer(model)
        try:
            # load() only logs mismatches; its two steps return them, so they can be errors.
            incompatible = ck._load_model(ck._load_file(str(path)))
        except Exception as exc:  # noqa: BLE001 - pickle / zip / key errors: same remedy
            raise WeightsError(f"{path}: not a readable detectron2 checkpoint ({type(exc).__name__}: "
                               f"{str(exc)[:80]}); use a .pth / .pkl saved by detectron2") from None
        shapes = {k: (tuple(a), tuple(b)) for k, a, b in getattr(incompatible, "incorrect_shapes", [])}
        missing = list(incompatible.missing_keys)
        if missing:
            first = missing[0]
            why = f"{first} has shape {shapes[first][0]}, the model {shapes[first][1]}" \
                if first in shapes else f"{first} is missing"
            raise WeightsError(f"{path}: does not fit d2_config {self.config_name} ({len(missing)} "
                               f"parameters not loaded; {why}); use the config these weights were "
                               "trained with")

    @torch.no_grad()
    def _normalise_random(self, model: torch.nn.Module) -> None:
        """Seeded random weights: set every batch norm's statistics from what reaches it.

        detectron2's ResNets use ``FrozenBatchNorm2d``, an identity until trained statistics
        are loaded, so a random residual net's activations grow by orders of magnitude and
        the classifier's softmax saturates: every foreground score is exactly 0 and nothing
        is detected. One inference pass over a fixed synthetic image sets each norm's mean
        and variance from its input, in forward order, as trained statistics would, and
        divides the box predictors' weights by the size of their input (logits near their
        initialisation scale, so the softmax does not saturate either); the result is still
        a pure function of the seed.
        """
        from detectron2.layers import FrozenBatchNorm2d

        seen: set[int] = set()

        def set_stats(mod: torch.nn.Module, args: tuple) -> None:
            x = args[0].float()
            if id(mod) in seen or x.numel() == 0:
                return
            mod.running_mean.copy_(x.mean(dim=(0, 2, 3)))
            mod.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
            seen.add(id(mod))

        def scale_weights(mod: torch.nn.Module, args: tuple) -> None:
            x = args[0].float()
            if id(mod) in seen or x.numel() == 0:
                return
            mod.weight.div_(float(x.pow(2).mean().sqrt()) or 1.0)
            seen.add(id(mod))

        norms = [m for m in model.modules() if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))]
        heads = [m for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("cls_score", "bbox_pred")]
        hooks = [m.register_forward_pre_hook(set_stats) for m in norms]
        hooks += [m.register_forward_pre_hook(scale_weights) for m in heads]
        try:
            img = synthetic_image()
            model.inference([{"image": self._input(img), "height": 240, "width": 320}],
                            do_postprocess=False)
        finally:
            for h in hooks:
                h.remove()

    def _set_region_head(self) -> None:
        """Pick the ROI heads' pooling path and the region size Do."""
        from detectron2.modeling.roi_heads import Res5ROIHeads, StandardROIHeads

        rh = self.model.roi_heads
        out_shape = self.model.backbone.output_shape()
        pool_mean = self.cfg.region_pool == "mean"
        if isinstance(rh, Res5ROIHeads):
            self.head_kind = "res5"
            self.in_features = list(rh.in_features)
            self.region_dim = (int(out_shape[self.in_features[0]].channels) if pool_mean
                               else int(rh.res5[-1].out_channels))
        elif isinstance(rh, StandardROIHeads):
            self.head_kind = "box_head"
            self.in_features = list(rh.box_in_features)
            # Cascade heads hold one box head per stage; the last stage's boxes are returned.
            head = rh.box_head[-1] if isinstance(rh.box_head, torch.nn.ModuleList) else rh.box_head
            pred = rh.box_predictor[-1] if isinstance(rh.box_predictor, torch.nn.ModuleList) else rh.box_predictor
            self.box_head = head
            self.region_dim = (int(out_shape[self.in_features[0]].channels) if pool_mean
                               else int(pred.cls_score.in_features))
        else:
            raise ConfigError(f"d2_config {self.config_name}: ROI_HEADS.NAME {type(rh).__name__} "
                              "is not supported; use StandardROIHeads (FPN) or Res5ROIHeads (C4)")

    # -- running --------------------------------------------------------------------

    def _input(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 RGB -> (3, H', W') float32 in ``INPUT.FORMAT``, test-resized."""
        hwc = image.permute(1, 2, 0).cpu().numpy()
        if self.d2cfg.INPUT.FORMAT == "BGR":
            hwc = hwc[:, :, ::-1]
        hwc = np.ascontiguousarray(hwc)
        resized = self.aug.get_transform(hwc).apply_image(hwc)
        return torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))

    def _run(self, images: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        # Only same-size inputs share a forward pass: preprocess_image pads a batch to its
        # largest image, which would change the features near the border (and, with
        # near-tied scores, the detections) depending on the batch-mates.
        inputs = [self._input(im) for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(inputs):
            groups.setdefault(tuple(x.shape[-2:]), []).append(i)
        out: list[dict[str, np.ndarray] | None] = [None] * len(images)
        for idx in groups.values():
            res = self._run_same_size([inputs[i] for i in idx],
                                      [tuple(images[i].shape[-2:]) for i in idx])
            for i, r in zip(idx, res, strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _run_same_size(self, inputs: list[torch.Tensor], sizes: list[tuple[int, int]]
                       ) -> list[dict[str, np.ndarray]]:
        from detectron2.structures import Boxes

        model, rh = self.model, self.model.roi_heads
        batched = [{"image": x, "height": h, "width": w} for x, (h, w) in zip(inputs, sizes, strict=True)]
        with self.autocast():
            il = model.preprocess_image(batched)  # normalise + pad to size_divisibility
            feats = model.backbone(il.tensor)
            proposals, _ = model.proposal_generator(il, feats, None)
            dets, _ = model.roi_heads(il, feats, proposals, None)
            boxes = [d.pred_boxes for d in dets]  # in the resized frame, for pooling
            levels = [feats[f] for f in self.in_features]
            if self.head_kind == "res5":
                if self.cfg.region_pool == "mean":
                    region = rh.pooler(levels, boxes).mean(dim=(2, 3))  # (sumO, C4)
                else:
                    region = rh._shared_roi_transform(levels, boxes).mean(dim=(2, 3))  # (sumO, 2048)
            else:
                pooled = rh.box_pooler(levels, boxes)  # (sumO, C, 7, 7)
                region = (pooled.mean(dim=(2, 3)) if self.cfg.region_pool == "mean"
                          else self.box_head(pooled))  # (sumO, Do)
        region = region.float().cpu().split([len(b) for b in boxes])
        out = []
        for d, r, (h, w) in zip(dets, region, sizes, strict=True):
            # detector_postprocess: scale to the original image, clip, drop empty boxes.
            b = Boxes(d.pred_boxes.tensor.float().cpu().clone())
            b.scale(w / d.image_size[1], h / d.image_size[0])
            b.clip((h, w))
            keep = b.nonempty().numpy()
            out.append({"boxes": b.tensor.numpy()[keep], "scores": d.scores.float().cpu().numpy()[keep],
                        "labels": d.pred_classes.cpu().numpy()[keep], "features": r.numpy()[keep]})
        return out

    def attrs(self) -> dict[str, Any]:
        c = self.d2cfg
        region = ("res5 (pooler + res5), mean over 7x7" if self.head_kind == "res5"
                  else "box_pooler 7x7 + box_head")
        if self.cfg.region_pool == "mean":
            region = "pooler 7x7, mean"
        return {
            "model": self.arch,
            "weights": self.source,
            "preprocessing": {"input": f"RGB uint8 -> {c.INPUT.FORMAT} 0-255, ResizeShortestEdge "
                                       "(bilinear), (x - PIXEL_MEAN) / PIXEL_STD, padded to "
                                       "size_divisibility (detectron2's own)",
                              "format": c.INPUT.FORMAT,
                              "min_size": int(c.INPUT.MIN_SIZE_TEST),
                              "max_size": int(c.INPUT.MAX_SIZE_TEST),
                              "pixel_mean": [float(v) for v in c.MODEL.PIXEL_MEAN],
                              "pixel_std": [float(v) for v in c.MODEL.PIXEL_STD],
                              "score_threshold": self.cfg.threshold,
                              "nms_threshold": float(c.MODEL.ROI_HEADS.NMS_THRESH_TEST),
                              "max_objects": self.cfg.max_objects,
                              "region_pool": self.cfg.region_pool,
                              "region": region,
                              "config_sha256": _config_sha256(c)},
            "dims": self.dims(),
            "architecture": {"builder": "detectron2.modeling.build_model",
                             "config": self.config_name, "model_zoo": self.zoo,
                             "meta_architecture": c.MODEL.META_ARCHITECTURE,
                             "backbone": c.MODEL.BACKBONE.NAME,
                             "resnet_depth": int(c.MODEL.RESNETS.DEPTH),
                             "roi_heads": c.MODEL.ROI_HEADS.NAME,
                             "num_classes": int(c.MODEL.ROI_HEADS.NUM_CLASSES),
                             "rpn_pre_nms_topk_test": int(c.MODEL.RPN.PRE_NMS_TOPK_TEST),
                             "rpn_post_nms_topk_test": int(c.MODEL.RPN.POST_NMS_TOPK_TEST),
                             "detections_per_image": int(c.TEST.DETECTIONS_PER_IMAGE),
                             "config_sha256": _config_sha256(c)},
            "class_names": list(self.class_names),
            "output_scale": self.scale,
            "detectron2": self.version,
        }
