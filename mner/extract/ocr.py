"""Text printed in the images (``ocr``): RapidOCR with the PP-OCRv4 models.

ITA (Wang et al., NAACL 2022) gives the text encoder the OCR text of the image as words.
The engine is ``rapidocr-onnxruntime``: PaddleOCR's PP-OCRv4 text detector and
recogniser (and the mobile v2.0 direction classifier) exported to ONNX and shipped inside
the wheel, so it runs offline with its real weights in every profile (tiny included) and
on every machine; onnxruntime runs it on the CPU (``ocr_threads`` intra-op threads). The
sha256 of the three model files is recorded in the group attributes like the other
vision weights.

Per image, the recognised strings scoring at least ``ocr_min_score`` are put in reading
order (:func:`reading_order`: lines top to bottom, each line left to right) and the first
``ocr_max_strings`` (L) are stored with their boxes, four ``(x, y)`` corners in pixels of
the original image (the detector's quadrilateral, clockwise from the top-left), and
their recognition confidences. The engine sees the decoded RGB image as the BGR array it
was trained on.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from mner.errors import WeightsError
from mner.extract.base import Extractor
from mner.extract.config import ExtractConfig
from mner.provenance import sha256_file

#: Model files of the engine, keyed by stage (from its own config.yaml).
STAGES: tuple[str, ...] = ("Det", "Cls", "Rec")


def reading_order(boxes: np.ndarray) -> list[int]:
    """Indices of text boxes in reading order: lines top to bottom, left to right within.

    A box joins the current line when its vertical centre lies within the line's vertical
    extent so far (boxes visited by top edge); lines are then read by their top edge and
    each line by the left edge of its boxes.

    Args:
        boxes: (N, 4, 2) quadrilaterals in pixels.

    Returns:
        A permutation of ``range(N)``.
    """
    if len(boxes) == 0:
        return []
    top, bottom = boxes[:, :, 1].min(1), boxes[:, :, 1].max(1)
    left = boxes[:, :, 0].min(1)
    centre = (top + bottom) / 2
    lines: list[tuple[float, float, list[int]]] = []  # (top, bottom, members)
    for i in sorted(range(len(boxes)), key=lambda k: (float(top[k]), float(left[k]))):
        for n, (t, b, members) in enumerate(lines):
            if t <= centre[i] <= b:
                members.append(i)
                lines[n] = (min(t, float(top[i])), max(b, float(bottom[i])), members)
                break
        else:
            lines.append((float(top[i]), float(bottom[i]), [i]))
    lines.sort(key=lambda line: line[0])
    return [i for _, _, members in lines for i in sorted(members, key=lambda k: float(left[k]))]


def _engine_files() -> tuple[Any, dict[str, Path], dict[str, Any]]:
    """The rapidocr package, its model file per stage and its default configuration.

    Raises:
        WeightsError: The package is not installed or its models are missing.
    """
    try:
        import rapidocr_onnxruntime as pkg
        import yaml
    except ImportError as exc:
        raise WeightsError(f"ocr: {exc.name} is not installed; pip install "
                           "rapidocr-onnxruntime==1.4.4, or drop ocr from --features") from None
    root = Path(pkg.__file__).parent
    cfg = yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8"))
    files = {s: root / cfg[s]["model_path"] for s in STAGES}
    lost = [str(p) for p in files.values() if not p.is_file()]
    if lost:
        raise WeightsError(f"ocr: rapidocr-onnxruntime lacks its model {lost[0]}; reinstall it "
                           "(pip install --force-reinstall rapidocr-onnxruntime==1.4.4)")
    return pkg, files, cfg


class OcrExtractor(Extractor):
    """RapidOCR (PP-OCRv4, ONNX) as the ``ocr`` extractor.

    Args:
        cfg: ``ocr_min_score``, ``ocr_max_strings``, ``ocr_threads`` (or ``threads``).
        device: Unused: onnxruntime runs on the CPU whatever ``--device`` is.
    """

    group = "ocr"

    def __init__(self, cfg: ExtractConfig, device: torch.device):
        super().__init__(cfg, device)
        pkg, self.files, engine_cfg = _engine_files()
        det = engine_cfg["Det"]
        self.engine_settings = {
            "det_limit_side_len": det["limit_side_len"], "det_limit_type": det["limit_type"],
            "det_box_thresh": det["box_thresh"], "det_unclip_ratio": det["unclip_ratio"],
            "use_cls": engine_cfg["Global"]["use_cls"]}
        self.threads = cfg.ocr_threads if cfg.ocr_threads is not None else cfg.threads
        kwargs: dict[str, Any] = {"print_verbose": False, "text_score": cfg.ocr_min_score}
        if self.threads is not None:
            kwargs["intra_op_num_threads"] = self.threads
        self.engine = pkg.RapidOCR(**kwargs)
        self.weights = {"source": "rapidocr-onnxruntime", "name": "PP-OCRv4",
                        "files": {s.lower(): {"file": p.name, "sha256": sha256_file(p)}
                                  for s, p in self.files.items()}}

    @staticmethod
    def preprocess(image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, H, W) uint8 tensor (the detector's ``raw`` input too)."""
        return pil_to_tensor(image)

    def read(self, image: torch.Tensor) -> list[tuple[np.ndarray, str, float]]:
        """OCR one image: ``[(box (4, 2), text, confidence), ...]`` in reading order.

        Args:
            image: (3, H, W) uint8 RGB.
        """
        bgr = np.ascontiguousarray(image.permute(1, 2, 0).numpy()[:, :, ::-1])
        result, _ = self.engine(bgr, text_score=self.cfg.ocr_min_score)
        found = [(np.asarray(box, np.float32).reshape(4, 2), str(text), float(score))
                 for box, text, score in (result or [])
                 if str(text).strip() and float(score) >= self.cfg.ocr_min_score]
        if not found:
            return []
        order = reading_order(np.stack([f[0] for f in found]))
        return [found[i] for i in order]

    def __call__(self, images: list[torch.Tensor]) -> dict[str, np.ndarray]:
        """Run a batch of decoded images.

        Args:
            images: (3, H, W) uint8 RGB tensors, any sizes.

        Returns:
            ``text`` (B, L) object array of str (``""`` padding), ``boxes`` (B, L, 4, 2)
            float32, ``scores`` (B, L) float32, ``count`` (B,) int32.
        """
        b, n = len(images), self.cfg.ocr_max_strings
        out = {"text": np.full((b, n), "", dtype=object), "boxes": np.zeros((b, n, 4, 2), np.float32),
               "scores": np.zeros((b, n), np.float32), "count": np.zeros(b, np.int32)}
        for i, im in enumerate(images):
            found = self.read(im)[:n]
            for j, (box, text, score) in enumerate(found):
                out["text"][i, j], out["boxes"][i, j], out["scores"][i, j] = text, box, score
            out["count"][i] = len(found)
        return out

    def attrs(self) -> dict[str, Any]:
        try:
            ort = _dist_version("onnxruntime")
        except PackageNotFoundError:  # pragma: no cover - rapidocr depends on it
            ort = "unknown"
        return {"model": "rapidocr-onnxruntime PP-OCRv4 (det, cls, rec)",
                "weights": self.weights,
                "preprocessing": {"input": "RGB decoded, passed as BGR uint8",
                                  "min_score": self.cfg.ocr_min_score,
                                  "max_strings": self.cfg.ocr_max_strings,
                                  "order": "lines top to bottom, left to right",
                                  "boxes": "4 (x, y) corners, pixels of the original image",
                                  "engine": self.engine_settings},
                "dims": self.dims(),
                "rapidocr_onnxruntime": _dist_version("rapidocr-onnxruntime"),
                "onnxruntime": ort}

    def dims(self) -> dict[str, int]:
        return {"L": self.cfg.ocr_max_strings}
