"""Image captions (``caption``): a Hugging Face image-to-text model, BLIP by default.

ITA (Wang et al., NAACL 2022) gives the text encoder a caption of the image. Paper
profile: ``BlipForConditionalGeneration`` with its ``BlipProcessor``, loaded the way
transformers loads models (``-o caption_model=`` a Hugging Face id, default
``Salesforce/blip-image-captioning-base``, from the Hugging Face cache, or a local folder
saved with ``save_pretrained``); offline without a local copy is one
:class:`~mner.errors.WeightsError` line with the remedy, before any image is read. Tiny
profile: a seeded random tiny BLIP of the same class (a 64 px ViT, one-layer text
decoder) with a small lower-case WordPiece vocabulary built here
(:func:`tiny_vocabulary`), unless ``caption_model`` is a local folder.

Decoding is greedy (``num_beams=1``, no sampling) for at most ``caption_max_tokens`` new
tokens, unconditional (no text prompt), so a caption is a function of the image and the
weights. The sha256 of the weights file is recorded in the group attributes.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mner.errors import WeightsError
from mner.extract import weights as W
from mner.extract.base import Extractor, freeze
from mner.extract.config import ExtractConfig
from mner.provenance import sha256_file

#: Name (and seed stream) of the tiny profile's random model.
TINY_NAME = "mner-tiny-blip"

#: Side of the tiny model's input image.
TINY_SIDE = 64

#: Whole words of the tiny vocabulary (besides characters and ``##`` continuations).
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "with", "and", "at", "is", "man", "woman", "people",
    "person", "group", "photo", "picture", "sign", "street", "club", "team", "logo", "bottle",
    "product", "field", "sky", "city", "building", "red", "blue", "green", "grey", "white",
    "yellow", "text", "board", "standing", "sitting", "holding", "front", "top",
)  # fmt: skip

#: Special tokens: BERT's, plus BLIP's decoder start token ``[DEC]``.
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")

#: Files holding a transformers model's weights, in the order tried.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def tiny_vocabulary() -> list[str]:
    """The tiny profile's WordPiece vocabulary: special tokens, every lower-case letter
    and digit (as a word start and as a ``##`` continuation, so no word is unknown) and
    :data:`TINY_WORDS`. Fixed, so the tiny model needs no data to be built."""
    chars = list(string.ascii_lowercase + string.digits)
    return list(SPECIAL) + chars + [f"##{c}" for c in chars] + [w for w in TINY_WORDS if w not in chars]


def build_tiny(seed: int) -> tuple[Any, Any]:
    """A seeded random tiny ``BlipForConditionalGeneration`` and its ``BlipProcessor``.

    Returns:
        ``(model, processor)``; save both with ``save_pretrained(folder)`` to load them
        back with ``-o caption_model=folder``.
    """
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = tiny_vocabulary()
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, bos_token="[DEC]")
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": TINY_SIDE, "width": TINY_SIDE}),
                         tokenizer=tok)
    ids = {"bos_token_id": tok.bos_token_id, "sep_token_id": tok.sep_token_id,
           "pad_token_id": tok.pad_token_id, "eos_token_id": tok.sep_token_id}
    cfg = BlipConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "encoder_hidden_size": 32,
                     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 64, **ids},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": TINY_SIDE, "patch_size": 16},
        projection_dim=32,
    )
    with W.seeded(seed, TINY_NAME):
        model = BlipForConditionalGeneration(cfg)
    return model, proc


def load_blip(name_or_dir: str) -> tuple[Any, Any, dict[str, Any]]:
    """Load a captioning model and its processor from a Hugging Face id or a local folder.

    Returns:
        ``(model, processor, source)`` with ``source`` the provenance record
        (``source``, ``name``, ``file``, ``sha256`` of the weights file).

    Raises:
        WeightsError: One line with the remedy: not cached and offline, a folder without
            a model, or a model that is not an image-to-text BLIP.
    """
    from transformers import BlipForConditionalGeneration, BlipProcessor
    from transformers.utils import cached_file

    local = Path(name_or_dir).is_dir()
    try:
        proc = BlipProcessor.from_pretrained(name_or_dir)
        model = BlipForConditionalGeneration.from_pretrained(name_or_dir)
        weights = None
        for fname in WEIGHT_FILES:
            path = Path(name_or_dir) / fname if local else cached_file(
                name_or_dir, fname, _raise_exceptions_for_missing_entries=False)
            if path is not None and Path(path).is_file():
                weights = Path(path)
                break
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"caption: cannot load {name_or_dir!r} ({first[:160]}); download it once while online "
            f"(huggingface-cli download {name_or_dir}), or pass a local copy with -o "
            "caption_model=DIR (a folder saved with save_pretrained), or use --profile tiny"
        ) from None
    source = {"source": "local" if local else "huggingface", "name": str(name_or_dir)}
    if weights is not None:
        source.update(file=weights.name, sha256=sha256_file(weights))
    return model, proc, source


class CaptionExtractor(Extractor):
    """BLIP captioning as the ``caption`` extractor.

    Args:
        cfg: ``profile``, ``caption_model``, ``caption_max_tokens``, ``seed``.
        device: Where the model runs.
    """

    group = "caption"

    def __init__(self, cfg: ExtractConfig, device: torch.device):
        super().__init__(cfg, device)
        if cfg.profile == "tiny" and not Path(cfg.caption_model).is_dir():
            model, self.processor = build_tiny(cfg.seed)
            self.name = TINY_NAME
            self.source: dict[str, Any] = {"source": "seeded-random", "name": TINY_NAME, "seed": cfg.seed}
        else:
            model, self.processor, self.source = load_blip(cfg.caption_model)
            self.name = str(cfg.caption_model)
        self.net = freeze(model).to(device)
        ip = self.processor.image_processor
        self.size = ip.size
        self.mean, self.std = list(ip.image_mean), list(ip.image_std)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, S, S) float32 pixel values (the processor's resize + normalize)."""
        return self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> dict[str, np.ndarray]:
        """Caption a batch.

        Args:
            pixel_values: (B, 3, S, S) from :meth:`preprocess`.

        Returns:
            ``{"text": (B,) object array of str}`` (stripped; ``""`` when the model
            generates nothing).
        """
        x = pixel_values.to(self.device, non_blocking=True)
        with self.autocast():
            ids = self.net.generate(pixel_values=x, max_new_tokens=self.cfg.caption_max_tokens,
                                    do_sample=False, num_beams=1)
        texts = self.processor.batch_decode(ids.cpu(), skip_special_tokens=True)
        return {"text": np.array([" ".join(t.split()) for t in texts] or [], dtype=object)}

    def attrs(self) -> dict[str, Any]:
        return {"model": f"transformers.BlipForConditionalGeneration {self.name}",
                "weights": self.source,
                "preprocessing": {"size": dict(self.size), "mean": self.mean, "std": self.std,
                                  "decoding": "greedy", "prompt": None,
                                  "max_new_tokens": self.cfg.caption_max_tokens},
                "dims": self.dims()}

    def dims(self) -> dict[str, int]:
        return {}
