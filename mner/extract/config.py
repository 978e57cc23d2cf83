"""``ExtractConfig``: every setting of ``mner extract`` (params.yaml section ``extract``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mner.cache.schema import DEFAULT_FEATURES, FEATURES

#: The paper profile's captioning model (Hugging Face id; a local folder works too).
BLIP_BASE = "Salesforce/blip-image-captioning-base"


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of stage one. Field defaults are the project's only extraction defaults.

    Attributes:
        profile: ``paper`` (the published pretrained models) or ``tiny`` (seeded random
            models small enough for a 2-core CPU; tests and the demo).
        features: Feature groups to compute (default: the visual ones,
            :data:`mner.cache.schema.DEFAULT_FEATURES`; the text-from-image features
            ``tags``, ``ocr``, ``caption`` are asked for by name). ``relations`` and
            ``crops`` run the detector too (its outputs are stored only when ``objects``
            is listed). ``tags`` are derived from the stored ``objects``, so listing
            ``tags`` adds ``objects``: rows the cache already holds are not recomputed.
        device: ``auto`` picks CUDA when available.
        batch_size: Images per inference batch.
        workers: DataLoader processes decoding images; None = 4 on CUDA, on CPU 0 up
            to 2 cores (decoding between batches beats competing with the model for
            them), else min(2, cores - 2).
        weights_dir: Folder with local weight files ``<model>.pth`` (see
            :mod:`mner.extract.weights`); tried before any library cache or download.
        overwrite: Discard an existing cache (and partial file) instead of resuming.
        seed: Seed of the tiny profile's random weights.
        resnet_weights: torchvision weight enum member of ResNet-152 (paper profile).
        clip_model: open_clip model name (paper profile).
        clip_pretrained: open_clip pretrained tag (paper profile).
        detector: ``fasterrcnn`` / ``maskrcnn`` (torchvision, v2 weights) or
            ``detectron2`` (optional backend; needs detectron2 installed, see
            :mod:`mner.extract.detectron2_backend`).
        d2_config: detectron2 only: a yaml config file, or a model-zoo name such as
            ``COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml`` (whose trained checkpoint
            becomes ``MODEL.WEIGHTS``); None = that Faster R-CNN R50-FPN 3x config.
        d2_weights: detectron2 only: checkpoint loaded with its ``DetectionCheckpointer``:
            a local ``.pth`` / ``.pkl`` file, or a URL / ``detectron2://`` path (cached by
            detectron2); None = ``--weights-dir``'s ``<config stem>.pkl`` / ``.pth`` if
            given, else the config's ``MODEL.WEIGHTS`` (paper) or seeded random weights (tiny).
        d2_classes: detectron2 only: text file of class names, one per line in class-id
            order (e.g. Visual Genome's 1600 objects); None = ``thing_classes`` of the
            config's first ``DATASETS.TEST`` dataset.
        max_objects: Detections kept per image after NMS (O).
        score_threshold: Minimum detection score; None = 0.05 (paper) / 0.0 (tiny, so
            random detectors still return ``max_objects`` boxes).
        region_pool: ``box_head`` (RoIAlign 7x7 then the detector's box head to a
            vector) or ``mean`` (RoIAlign 7x7 averaged to the FPN width).
        num_crops: Object crops per image for MGIPS-CL (K).
        crop_size: Side of the square crop fed to CLIP, pixels.
        max_pixels: Decompression-bomb guard: larger images get status ``too_large``.
        precision: Autocast dtype of the frozen models: ``fp32`` (none), ``bf16``,
            ``fp16`` (CUDA only), or ``auto``, resolved once per run by
            :func:`mner.devices.resolve_precision` (the same rule as training): bfloat16
            on CUDA devices that support it, else float16; on CPU bfloat16 where the
            processor has native bfloat16 arithmetic (AVX512-BF16 / AMX; about 2x the
            float32 throughput for batched convolutions there), float32 elsewhere. The
            resolved dtype is recorded in the cache; resuming or extending continues in
            it and ``mner predict`` replays it (:func:`mner.devices.replay_precision`).
        threads: torch intra-op threads during the run (restored after); None leaves
            torch's setting. On a shared, busy CPU 1 is often several times faster than
            more, since every parallel op waits for its slowest thread. The cache does
            not depend on it (see :func:`mner.extract.base.one_thread`).
        follow_symlinks: Read image files that are symlinks resolving outside the images
            folder; by default they get status ``outside`` (symlinks within the folder,
            and a symlinked folder itself, always work).
        tags_threshold: ``tags``: minimum detection score of a label; None = 0.5 (paper)
            / the detection threshold (tiny, whose random detector scores low).
        ocr_min_score: ``ocr``: minimum recognition confidence of a kept string.
        ocr_max_strings: ``ocr``: strings kept per image (L), the first in reading order.
        ocr_threads: ``ocr``: onnxruntime intra-op threads; None = ``threads`` when set,
            else onnxruntime's default (all cores). The text does not depend on it.
        caption_model: ``caption`` (paper profile): a Hugging Face image-to-text model id
            or a local folder saved with ``save_pretrained`` (model and processor); the
            tiny profile builds a seeded random tiny BLIP unless this is a local folder.
        caption_max_tokens: ``caption``: most new tokens generated (greedy decoding).
    """

    profile: Literal["paper", "tiny"] = "paper"
    features: tuple[str, ...] = DEFAULT_FEATURES
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = 16
    workers: int | None = None
    weights_dir: Path | None = None
    overwrite: bool = False
    seed: int = 0
    resnet_weights: Literal["IMAGENET1K_V1", "IMAGENET1K_V2"] = "IMAGENET1K_V1"
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"
    detector: Literal["fasterrcnn", "maskrcnn", "detectron2"] = "fasterrcnn"
    d2_config: str | None = None
    d2_weights: str | None = None
    d2_classes: Path | None = None
    max_objects: int = 15
    score_threshold: float | None = None
    region_pool: Literal["box_head", "mean"] = "box_head"
    num_crops: int = 3
    crop_size: int = 128
    max_pixels: int = 89_478_485
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    threads: int | None = None
    follow_symlinks: bool = False
    tags_threshold: float | None = None
    ocr_min_score: float = 0.5
    ocr_max_strings: int = 32
    ocr_threads: int | None = None
    caption_model: str = BLIP_BASE
    caption_max_tokens: int = 20

    def __post_init__(self) -> None:
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise ValueError(f"unknown feature {', '.join(unknown)}; choose from {', '.join(FEATURES)}")
        if not self.features:
            raise ValueError("features is empty; choose from " + ", ".join(FEATURES))
        for name in ("batch_size", "max_objects", "num_crops", "crop_size", "max_pixels",
                     "ocr_max_strings", "caption_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ocr_threads is not None and self.ocr_threads < 1:
            raise ValueError(f"ocr_threads must be >= 1, got {self.ocr_threads}")
        if not 0.0 <= self.ocr_min_score <= 1.0:
            raise ValueError(f"ocr_min_score must be between 0 and 1, got {self.ocr_min_score}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        d2_set = [n for n in ("d2_config", "d2_weights", "d2_classes") if getattr(self, n) is not None]
        if d2_set and self.detector != "detectron2":
            raise ValueError(f"{d2_set[0]} is set but detector is {self.detector}; add "
                             f"-o detector=detectron2 or drop {d2_set[0]}")
        if self.num_crops > self.max_objects:
            raise ValueError(f"num_crops ({self.num_crops}) exceeds max_objects ({self.max_objects})")
        # Keep the canonical order so caches made with the same set compare equal.
        # Tags are read from the stored objects (see mner.extract.tags).
        wanted = set(self.features) | ({"objects"} if "tags" in self.features else set())
        object.__setattr__(self, "features", tuple(f for f in FEATURES if f in wanted))

    @property
    def threshold(self) -> float:
        """The effective detection score threshold."""
        if self.score_threshold is not None:
            return self.score_threshold
        return 0.0 if self.profile == "tiny" else 0.05

    @property
    def tag_threshold(self) -> float:
        """The effective score threshold of ``tags``."""
        if self.tags_threshold is not None:
            return self.tags_threshold
        return self.threshold if self.profile == "tiny" else 0.5

    @property
    def needs_detector(self) -> bool:
        """Whether any requested feature needs detections."""
        return bool({"objects", "relations", "crops"} & set(self.features))
