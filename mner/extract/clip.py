"""CLIP image features (``clip``) and the CLIP text teacher (``clip_text``).

One open_clip model serves ``clip``, ``clip_text`` and ``crops``. Paper profile:
``ViT-B-32`` with ``pretrained="openai"`` through open_clip's own pretrained mechanism
and preprocessing. Tiny profile: a seeded random ViT built from :data:`TINY_CLIP`
(patch 32 at 224 px, so the same 7x7 + 1 token layout as ViT-B/32) with open_clip's
bundled BPE tokenizer, which needs no network.

Image outputs: the projected image embedding (``image_embed``, not L2-normalised) and
the final-layer tokens after ``ln_post`` (``patch_tokens``, class token first, width
Wc, unprojected), from open_clip's ``forward_intermediates``. Text outputs: the
projected embedding of each sentence and of each gold entity span, not normalised.

Per-layer tokens (:meth:`ClipBackbone.encode_layers`, the ``crop_layers`` feature):
the hidden states of chosen depths of the ViT (0 = the embeddings after ``ln_pre``,
i = the output of block i, raw residual stream), for MGIPS-CL's layer-wise mutual
attention (its eq. 2 reads the image encoder's layer l in text layer l+1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image

from mner.extract import weights as W
from mner.extract.base import ByteTransform, Extractor, freeze
from mner.extract.config import ExtractConfig

#: Architecture of the tiny profile's CLIP (open_clip ``CLIP`` constructor arguments).
TINY_CLIP: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 224, "patch_size": 32, "width": 192, "layers": 3, "head_width": 64,
                   "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2,
                 "layers": 2},
}
TINY_NAME = "mner-tiny-clip"


class ClipBackbone:
    """The loaded open_clip model, its preprocessing and tokenizer (shared by extractors).

    Args:
        cfg: Extraction settings (profile, model, tag, weights_dir, seed).
        device: Where the model runs.
    """

    def __init__(self, cfg: ExtractConfig, device: torch.device):
        self.device = device
        if cfg.profile == "paper":
            self.name = cfg.clip_model
            path, self.source = W.open_clip_file(cfg.clip_model, cfg.clip_pretrained, cfg.weights_dir)
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    cfg.clip_model, pretrained=str(path))
            except RuntimeError as exc:
                from mner.errors import WeightsError

                raise WeightsError(f"{path}: does not fit open_clip {cfg.clip_model} "
                                   f"({str(exc).splitlines()[0][:100]})") from None
            self.architecture: dict[str, Any] = open_clip.get_model_config(cfg.clip_model) or {}
            self.tokenizer = open_clip.get_tokenizer(cfg.clip_model)
        else:
            self.name = TINY_NAME
            path, self.source = W.tiny_source(cfg.seed, cfg.weights_dir, self.name, "clip")
            with W.seeded(cfg.seed, self.name):
                model = open_clip.model.CLIP(**TINY_CLIP)
            if path is not None:
                W.load_into(model, path, self.name)
            self.architecture = TINY_CLIP
            size = TINY_CLIP["vision_cfg"]["image_size"]
            preprocess = open_clip.image_transform(
                size, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                std=open_clip.OPENAI_DATASET_STD)
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(
                context_length=TINY_CLIP["text_cfg"]["context_length"])
        self.model = freeze(model).to(device)
        self.transform = ByteTransform(preprocess, device)
        visual = self.model.visual
        self.embed_dim = int(self.model.text_projection.shape[-1]
                             if hasattr(self.model, "text_projection") else visual.output_dim)
        self.width = int(visual.conv1.out_channels)
        self.image_size = int(visual.image_size[0] if isinstance(visual.image_size, tuple)
                              else visual.image_size)
        self.patch = int(visual.patch_size[0])
        self.mean = tuple(float(m) for m in getattr(visual, "image_mean", None)
                          or open_clip.OPENAI_DATASET_MEAN)
        self.std = tuple(float(s) for s in getattr(visual, "image_std", None)
                         or open_clip.OPENAI_DATASET_STD)

    def provenance(self) -> dict[str, Any]:
        """Attributes shared by the clip, clip_text and crops groups."""
        return {"model": self.name, "weights": self.source, "architecture": self.architecture}

    @staticmethod
    def encode_tokens(visual: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected embedding (B, Dc) and final-layer tokens (B, 1+P, Wc) of ``visual``."""
        out = visual.forward_intermediates(
            x, indices=1, normalize_intermediates=True, output_fmt="NLC", output_extra_tokens=True)
        tokens = torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], 1)
        return out["image_features"], tokens


    @staticmethod
    def encode_layers(visual: torch.nn.Module, x: torch.Tensor, depths: tuple[int, ...]
                      ) -> torch.Tensor:
        """Hidden states (B, L, 1+P, Wc) of ``visual`` at ``depths`` (class token first).

        Depth 0 is the input of the first block (patch embedding + class embedding +
        position embedding, ``ln_pre`` applied: the paper's V^e); depth i is the output
        of block i, before any ``ln_post``. Blocks past the deepest requested depth are
        not run.
        """
        h = visual._embeds(x)  # (B, 1+P, Wc), depth 0
        keep = {0: h} if 0 in depths else {}
        tr = visual.transformer
        if not getattr(tr, "batch_first", True):
            h = h.transpose(0, 1)
        for i, block in enumerate(tr.resblocks[: max(depths)], start=1):
            h = block(h)
            if i in depths:
                keep[i] = h if getattr(tr, "batch_first", True) else h.transpose(0, 1)
        return torch.stack([keep[d] for d in depths], 1)

    @property
    def depth(self) -> int:
        """Number of transformer blocks of the CLIP ViT."""
        return len(self.model.visual.transformer.resblocks)

    def clip_layers(self, cfg: ExtractConfig) -> tuple[int, ...]:
        """``cfg.clip_layers`` resolved (None = 0 .. depth-1) and checked against the ViT.

        Raises:
            ConfigError: a depth beyond the ViT's blocks.
        """
        layers = cfg.clip_layers if cfg.clip_layers is not None else tuple(range(self.depth))
        if max(layers) > self.depth:
            from mner.errors import ConfigError

            raise ConfigError(f"clip_layers {list(layers)}: {self.name} has {self.depth} blocks, "
                              f"so depths go from 0 to {self.depth}; e.g. -o clip_layers=null")
        return tuple(layers)


class ClipExtractor(Extractor):
    """``clip/image_embed`` (B, Dc) and ``clip/patch_tokens`` (B, P+1, Wc)."""

    group = "clip"

    def __init__(self, cfg: ExtractConfig, device: torch.device, backbone: ClipBackbone):
        super().__init__(cfg, device)
        self.bb = backbone

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """open_clip's own eval transform up to its ToTensor: (3, S, S) uint8."""
        return self.bb.transform(image)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Args: x (B, 3, S, S) uint8. Returns ``image_embed`` (B, Dc), ``patch_tokens`` (B, P+1, Wc)."""
        x = self.bb.transform.normalize(x)  # open_clip's ToTensor + Normalize, batched
        with self.autocast():
            emb, tok = self.bb.encode_tokens(self.bb.model.visual, x)
        return {"image_embed": emb.float().cpu().numpy(), "patch_tokens": tok.float().cpu().numpy()}

    def dims(self) -> dict[str, int]:
        grid = self.bb.image_size // self.bb.patch
        return {"Dc": self.bb.embed_dim, "Wc": self.bb.width, "P1": grid * grid + 1}

    def attrs(self) -> dict[str, Any]:
        return {**self.bb.provenance(),
                "preprocessing": {"transform": "open_clip image_transform (eval)",
                                  "image_size": self.bb.image_size, "mean": self.bb.mean,
                                  "std": self.bb.std},
                "dims": self.dims(),
                "tokens": "final block, ln_post applied, class token first, unprojected"}


class ClipTextExtractor(Extractor):
    """``clip_text``: projected text embeddings of sentences and gold entity spans."""

    group = "clip_text"

    def __init__(self, cfg: ExtractConfig, device: torch.device, backbone: ClipBackbone):
        super().__init__(cfg, device)
        self.bb = backbone

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """Projected CLIP text embeddings (len(texts), Dc), float32, not normalised.

        Texts longer than the context (77 BPE tokens) are truncated by the tokenizer.
        """
        if not texts:
            return np.zeros((0, self.bb.embed_dim), dtype=np.float32)
        tokens = self.bb.tokenizer(texts).to(self.device)
        with self.autocast():
            emb = self.bb.model.encode_text(tokens)
        return emb.float().cpu().numpy()

    def dims(self) -> dict[str, int]:
        return {"Dc": self.bb.embed_dim, "E": 1}

    def attrs(self) -> dict[str, Any]:
        return {**self.bb.provenance(),
                "preprocessing": {"sentence": "tokens joined by single spaces",
                                  "entities": "gold spans (mner.data.schemes.entities order), "
                                              "tokens joined by single spaces",
                                  "tokenizer": "open_clip SimpleTokenizer, context 77"},
                "dims": {"Dc": self.bb.embed_dim}}
