"""Profiles and weight loading: library caches, a local folder, or seeded random weights.

Where weights come from, in order:

1. ``--weights-dir DIR``: a local file named after the recorded model name, with any of
   the extensions ``.pth``, ``.pt``, ``.bin``, ``.safetensors`` (a plain state dict;
   open_clip also accepts its own checkpoints). Expected names:

   =================  ==========================================================
   resnet             ``resnet152.pth`` (paper; torchvision's own file name
                      ``resnet152-b121ed2d.pth`` / ``resnet152-f82ba261.pth`` works
                      too) or ``resnet18.pth`` (tiny)
   clip, clip_text,   ``ViT-B-32.pt`` (paper: open_clip's ``openai`` checkpoint, or
   crops              any state dict of that architecture) or ``mner-tiny-clip.pth``
   objects,           ``fasterrcnn_resnet50_fpn_v2.pth`` / ``maskrcnn_resnet50_fpn_v2.pth``
   relations, crops   (paper; torchvision's ``..._coco-....pth`` names work too) or
                      ``fasterrcnn_mobilenet_v3_large_320_fpn.pth`` (tiny)
   =================  ==========================================================

   With ``--weights-dir`` every model must be found there (no silent fallback).
2. ``paper`` profile: each library's mechanism (torchvision weight enums in the torch hub
   cache ``$TORCH_HOME/hub/checkpoints``; open_clip pretrained tags in the Hugging Face
   cache), checked *before* any image is touched. A download is attempted only when the
   file is not cached and ``HF_HUB_OFFLINE`` / ``MNER_OFFLINE`` are unset, with a short
   socket timeout; any failure becomes one :class:`WeightsError` line with the remedy.
3. ``tiny`` profile: seeded random initialisation (:func:`seeded`), one independent
   stream per model, so a model's weights do not depend on which other models are built.
"""

from __future__ import annotations

import contextlib
import os
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mner.errors import WeightsError
from mner.provenance import sha256_file

#: Extensions tried for ``<weights_dir>/<model>``.
LOCAL_EXTENSIONS: tuple[str, ...] = (".pth", ".pt", ".bin", ".safetensors")

#: Seconds a download may stall before it counts as "offline".
DOWNLOAD_TIMEOUT_S = 15.0


@contextlib.contextmanager
def seeded(seed: int, model: str) -> Iterator[None]:
    """Seed torch's CPU generator for building ``model``, restoring the outer state after.

    The stream depends on ``seed`` and the model name only, so ``extract_arrays`` can
    rebuild identical tiny weights from a cache's provenance.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + zlib.crc32(model.encode()))
        yield


def offline() -> bool:
    """True when downloads must not be attempted."""
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "MNER_OFFLINE"))


def find_local(weights_dir: Path, names: list[str]) -> Path | None:
    """First existing ``weights_dir/<name><ext>`` (or exact file name) among ``names``."""
    for name in names:
        if (weights_dir / name).is_file():
            return weights_dir / name
        for ext in LOCAL_EXTENSIONS:
            p = weights_dir / f"{name}{ext}"
            if p.is_file():
                return p
    return None


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (weights only, no pickled code).

    Raises:
        WeightsError: If the file cannot be read as weights.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure has the same remedy
        raise WeightsError(f"{path}: not a readable weights file ({type(exc).__name__}); "
                           "replace it with a state dict saved by torch.save") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: holds a {type(sd).__name__}, not a state dict; "
                           "save model.state_dict() instead")
    return sd


def load_into(module: torch.nn.Module, path: Path, what: str) -> None:
    """Load a state dict file into ``module`` strictly, with a one-line error on mismatch."""
    sd = load_state_dict(path)
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise WeightsError(f"{path}: does not fit {what} ({first[:120]}); "
                           "use weights saved from that architecture") from None


def torchvision_file(weights: Any, weights_dir: Path | None, model: str, what: str) -> tuple[Path, dict]:
    """Materialise a torchvision weight enum member as a local file, before any work.

    Args:
        weights: A torchvision ``WeightsEnum`` member (e.g. ``ResNet152_Weights.IMAGENET1K_V1``).
        weights_dir: Optional local folder (tried first, and exclusively when given).
        model: The model name recorded in the cache (also the local file name).
        what: The feature name for messages (``"resnet"``).

    Returns:
        ``(path, source)`` with ``source`` the provenance record
        ``{"source", "name", "file", "sha256"}``.

    Raises:
        WeightsError: Not in the folder / cache and no download possible.
    """
    fname = os.path.basename(weights.url)
    enum_name = f"{type(weights).__name__}.{weights.name}"
    if weights_dir is not None:
        path = find_local(Path(weights_dir), [model, fname])
        if path is None:
            raise WeightsError(
                f"{what}: {weights_dir} has no {model}.pth (nor {fname}); put the {enum_name} "
                "state dict there or drop --weights-dir"
            )
        return path, {"source": "local", "name": enum_name, "file": path.name,
                      "sha256": sha256_file(path)}
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    path = hub / fname
    if not path.is_file():
        if offline():
            raise WeightsError(
                f"{what}: {enum_name} is not in {hub} and downloads are off (HF_HUB_OFFLINE); "
                f"copy {fname} there, pass --weights-dir DIR with {model}.pth, or use --profile tiny"
            )
        _download(weights.url, path, what, enum_name, model)
    return path, {"source": "torchvision", "name": enum_name, "file": fname,
                  "sha256": sha256_file(path)}


def _download(url: str, path: Path, what: str, name: str, model: str) -> None:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except Exception as exc:  # noqa: BLE001 - no network, proxy, disk: same remedy
        raise WeightsError(
            f"{what}: cannot download {name} ({type(exc).__name__}: {str(exc)[:80]}); copy "
            f"{os.path.basename(url)} into {path.parent} or pass --weights-dir DIR with "
            f"{model}.pth (or use --profile tiny)"
        ) from None
    finally:
        socket.setdefaulttimeout(old)


def open_clip_file(model: str, tag: str, weights_dir: Path | None) -> tuple[Path, dict]:
    """Materialise an open_clip pretrained checkpoint (``model``, ``tag``) as a local file.

    Returns:
        ``(path, source)`` like :func:`torchvision_file`.

    Raises:
        WeightsError: Unknown tag, or not cached and no download possible.
    """
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    name = f"{model}/{tag}"
    if weights_dir is not None:
        path = find_local(Path(weights_dir), [model, f"{model}-{tag}", "open_clip_pytorch_model"])
        if path is None:
            raise WeightsError(f"clip: {weights_dir} has no {model}.pt; put the open_clip "
                               f"{name} checkpoint there or drop --weights-dir")
        return path, {"source": "local", "name": name, "file": path.name, "sha256": sha256_file(path)}
    cfg = get_pretrained_cfg(model, tag)
    if not cfg:
        tags = ", ".join(t for m, t in open_clip.list_pretrained() if m == model) or "none"
        raise WeightsError(f"clip: open_clip has no pretrained tag {tag!r} for {model} "
                           f"(known: {tags}); set -o clip_pretrained=...")
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        path = download_pretrained(cfg)
    except Exception as exc:  # noqa: BLE001 - offline hub raises several types
        raise WeightsError(
            f"clip: open_clip {name} is not in the Hugging Face cache and cannot be downloaded "
            f"({type(exc).__name__}); run once online, or pass --weights-dir DIR with {model}.pt, "
            "or use --profile tiny"
        ) from None
    finally:
        socket.setdefaulttimeout(old)
    if not path:
        raise WeightsError(f"clip: open_clip returned no file for {name}; pass --weights-dir DIR "
                           f"with {model}.pt or use --profile tiny")
    path = Path(path)
    return path, {"source": "open_clip", "name": name, "file": path.name, "sha256": sha256_file(path)}


def tiny_source(seed: int, weights_dir: Path | None, model: str, what: str) -> tuple[Path | None, dict]:
    """Tiny profile: a local file when ``weights_dir`` is given, else seeded random weights."""
    if weights_dir is None:
        return None, {"source": "seeded-random", "name": model, "seed": seed}
    path = find_local(Path(weights_dir), [model])
    if path is None:
        raise WeightsError(f"{what}: {weights_dir} has no {model}.pth; save the tiny model's "
                           "state dict there or drop --weights-dir")
    return path, {"source": "local", "name": model, "file": path.name, "sha256": sha256_file(path)}
