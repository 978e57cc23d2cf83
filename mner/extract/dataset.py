"""Decoding and preprocessing in DataLoader workers.

Each item is one image: decoded with :func:`mner.extract.images.load_image` (which
classifies bad files instead of raising) and turned into every tensor the requested
extractors need, so the main process only stacks tensors and runs models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from mner.data.images import ImageStatus, outside
from mner.extract.images import load_image


class ImageItems(Dataset):
    """Images to extract, with their cache rows.

    Args:
        paths: Image file per item (None when the id has no file).
        rows: Cache row per item.
        transforms: Extractor key -> callable mapping an RGB PIL image to its input.
        max_pixels: Decompression-bomb guard passed to ``load_image``.
        root: The images folder; files resolving outside it (symlinks) get status
            ``outside`` and are not read. None reads every path (symlinks followed).
    """

    def __init__(self, paths: Sequence[Path | None], rows: Sequence[int],
                 transforms: dict[str, Callable[[Image.Image], Any]], max_pixels: int,
                 root: Path | None = None):
        self.root = root
        self.paths = list(paths)
        self.rows = list(rows)
        self.transforms = transforms
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """``{"row", "status", "message", "size", <transform key>: tensor, ...}``."""
        path = self.paths[i]
        escape = outside(self.root, path) if self.root is not None and path is not None else None
        if escape is not None:
            return {"row": self.rows[i], "status": ImageStatus.OUTSIDE.value, "size": None,
                    "message": f"symlink to {escape}, outside the images folder; pass "
                               "-o follow_symlinks=true to read it"}
        dec = load_image(path, max_pixels=self.max_pixels)
        item: dict[str, Any] = {"row": self.rows[i], "status": dec.status.value,
                                "message": dec.message, "size": None}
        if dec.status is ImageStatus.OK and dec.image is not None:
            try:
                item["size"] = dec.image.size
                for key, fn in self.transforms.items():
                    item[key] = fn(dec.image)
            except Exception as exc:  # noqa: BLE001 - one bad image never stops a run
                item.update(status=ImageStatus.UNREADABLE.value, size=None,
                            message=f"preprocessing failed: {type(exc).__name__}: {exc}")
                for key in self.transforms:
                    item.pop(key, None)
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch: per-item metadata lists; stacked tensors of the items that loaded.

    Returns:
        ``rows``, ``status``, ``message``, ``size`` (lists over all items), ``ok`` (list
        of positions that loaded), and per transform key either a stacked tensor (B_ok,
        ...) for fixed-size inputs or a list of tensors (``raw`` images of varying size).
    """
    ok = [i for i, it in enumerate(items) if it["status"] == ImageStatus.OK.value]
    batch: dict[str, Any] = {k: [it[k] for it in items] for k in ("row", "status", "message", "size")}
    batch["ok"] = ok
    keys = [k for k in items[ok[0]] if k not in batch] if ok else []
    for k in keys:
        ts = [items[i][k] for i in ok]
        batch[k] = torch.stack(ts) if k != "raw" else ts
    return batch
