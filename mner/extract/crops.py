"""Object crops encoded by CLIP (``crops``), the visual input of MGIPS-CL.

MGIPS-CL crops the objects a visual-grounding model finds for the tweet's text and
encodes each crop with CLIP. No grounding model ships offline with open weights in the
libraries mner builds on, so this replaces it with the detector: the top ``num_crops``
boxes by score. Without a text query, the most confident detections are the salient
objects the text most likely talks about, and they are the same boxes the ``objects``
and ``relations`` features describe, so heads see one consistent set of regions.

Each crop is cut from the original image at its box, resized (bicubic, antialiased) to
``crop_size`` x ``crop_size`` (128) and normalised like CLIP's inputs. The CLIP ViT
runs at that size with its positional embedding interpolated by open_clip's own
``resize_pos_embed`` (bicubic over the patch grid; the class position is kept), so
ViT-B/32 yields 4x4 patches + the class token = 17 tokens of width Wc per crop.
Images with fewer detections are padded with zeros; ``count`` says how many are real.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from open_clip.model import resize_pos_embed
from torchvision.transforms import functional as TF

from mner.extract.base import Extractor, one_thread
from mner.extract.clip import ClipBackbone
from mner.extract.config import ExtractConfig


class CropExtractor(Extractor):
    """``crops/patch_tokens`` (B, K, T, Wc), ``crops/boxes`` (B, K, 4), ``crops/count`` (B,)."""

    group = "crops"

    def __init__(self, cfg: ExtractConfig, device: torch.device, backbone: ClipBackbone):
        super().__init__(cfg, device)
        self.bb = backbone
        size = cfg.crop_size
        if size % backbone.patch:
            from mner.errors import ConfigError

            raise ConfigError(f"crop_size {size} is not a multiple of the CLIP patch size "
                              f"{backbone.patch}; use e.g. -o crop_size={backbone.patch * 4}")
        grid = size // backbone.patch
        visual = copy.deepcopy(backbone.model.visual)
        sd = {"visual.positional_embedding": visual.positional_embedding.detach().cpu()}
        visual.grid_size = (grid, grid)
        resize_pos_embed(sd, SimpleNamespace(visual=visual))
        visual.positional_embedding = torch.nn.Parameter(
            sd["visual.positional_embedding"].to(device), requires_grad=False)
        visual.image_size = (size, size)
        self.visual = visual.eval()
        self.tokens = grid * grid + 1
        self.mean = torch.tensor(backbone.mean).view(3, 1, 1)
        self.std = torch.tensor(backbone.std).view(3, 1, 1)

    def crop(self, image: torch.Tensor, box: np.ndarray) -> torch.Tensor:
        """One normalised (3, S, S) crop of a (3, H, W) uint8 image at xyxy ``box``."""
        h, w = image.shape[-2:]
        x0 = int(np.clip(np.floor(box[0]), 0, w - 1))
        y0 = int(np.clip(np.floor(box[1]), 0, h - 1))
        x1 = int(np.clip(np.ceil(box[2]), x0 + 1, w))
        y1 = int(np.clip(np.ceil(box[3]), y0 + 1, h))
        s = self.cfg.crop_size
        c = TF.resized_crop(image.float(), y0, x0, y1 - y0, x1 - x0, [s, s],
                            interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        return (c.clamp_(0, 255) / 255 - self.mean) / self.std

    def _crops(self, images: list[torch.Tensor], boxes: np.ndarray, n: np.ndarray
               ) -> tuple[list[tuple[int, int]], torch.Tensor | None]:
        """The (image, crop) slots with a real box and their normalised crops (sumK, 3, S, S)."""
        crops, where = [], []
        with one_thread():  # bicubic resampling rounds by thread split (see one_thread)
            for i, im in enumerate(images):
                for j in range(n[i]):
                    crops.append(self.crop(im, boxes[i, j]))
                    where.append((i, j))
        return where, (torch.stack(crops).to(self.device) if crops else None)

    @torch.inference_mode()
    def __call__(self, images: list[torch.Tensor], boxes: np.ndarray, count: np.ndarray
                 ) -> dict[str, np.ndarray]:
        """Encode the top-K detections of each image.

        Args:
            images: B tensors (3, H, W) uint8.
            boxes: (B, O, 4) detector boxes in pixels, best first.
            count: (B,) valid detections per image.

        Returns:
            ``patch_tokens`` (B, K, T, Wc), ``boxes`` (B, K, 4), ``count`` (B,).
        """
        k = self.cfg.num_crops
        b = len(images)
        n = np.minimum(count, k).astype(np.int32)
        out = {"patch_tokens": np.zeros((b, k, self.tokens, self.bb.width), np.float32),
               "boxes": np.zeros((b, k, 4), np.float32), "count": n}
        where, x = self._crops(images, boxes, n)
        for i, j in where:
            out["boxes"][i, j] = boxes[i, j]
        if x is not None:
            with self.autocast():
                _, tok = self.bb.encode_tokens(self.visual, x)  # (sumK, T, Wc)
            tok = tok.float().cpu().numpy()
            for (i, j), t in zip(where, tok, strict=True):
                out["patch_tokens"][i, j] = t
        return out

    def dims(self) -> dict[str, int]:
        return {"K": self.cfg.num_crops, "T": self.tokens, "Wc": self.bb.width}

    def attrs(self) -> dict[str, Any]:
        return {**self.bb.provenance(),
                "preprocessing": {"boxes": "top detections by score (replaces visual grounding)",
                                  "crop_size": self.cfg.crop_size, "interpolation": "bicubic",
                                  "pos_embed": "open_clip resize_pos_embed (bicubic)",
                                  "mean": self.bb.mean, "std": self.bb.std},
                "dims": self.dims()}


class CropLayersExtractor(CropExtractor):
    """``crop_layers/tokens`` (B, K, L, Pc, Wc): each crop's patch states at CLIP depths.

    The same crops as ``crops`` (same boxes, resize and interpolated position
    embedding), run through the frozen CLIP ViT with the hidden states of the depths
    ``cfg.clip_layers`` kept (:meth:`ClipBackbone.encode_layers`). Each crop's own
    class token is dropped (MGIPS-CL's visual sequence is one class embedding + the
    3 x 16 patches, section 3.1.2), so Pc = T - 1 (16 at 128 px / patch 32).
    """

    group = "crop_layers"

    def __init__(self, cfg: ExtractConfig, device: torch.device, backbone: ClipBackbone):
        super().__init__(cfg, device, backbone)
        self.layers = backbone.clip_layers(cfg)

    @torch.inference_mode()
    def __call__(self, images: list[torch.Tensor], boxes: np.ndarray, count: np.ndarray
                 ) -> dict[str, np.ndarray]:
        """Args as :meth:`CropExtractor.__call__`. Returns ``tokens`` (B, K, L, Pc, Wc)."""
        k = self.cfg.num_crops
        n = np.minimum(count, k).astype(np.int32)
        out = np.zeros((len(images), k, len(self.layers), self.tokens - 1, self.bb.width), np.float32)
        where, x = self._crops(images, boxes, n)
        if x is not None:
            with self.autocast():
                hid = self.bb.encode_layers(self.visual, x, self.layers)  # (sumK, L, T, Wc)
            hid = hid[:, :, 1:].float().cpu().numpy()
            for (i, j), h in zip(where, hid, strict=True):
                out[i, j] = h
        return {"tokens": out}

    def dims(self) -> dict[str, int]:
        return {"K": self.cfg.num_crops, "Lc": len(self.layers), "Pc": self.tokens - 1,
                "Wc": self.bb.width}

    def attrs(self) -> dict[str, Any]:
        base = super().attrs()
        return {**base,
                "preprocessing": {**base["preprocessing"], "clip_layers": list(self.layers),
                                  "depth_0": "embeddings after ln_pre",
                                  "depth_i": "output of block i, no ln_post",
                                  "class_token": "dropped (patches only)"},
                "dims": self.dims()}
