"""Extraction throughput: the batched pipeline against a naive one-image-at-a-time loop.

For each extractor (resnet, clip, objects, relations, crops) this measures, in one run
on the same images:

* naive: decode + preprocess + model call per image, in the main process (batch 1);
* batched: ``mner extract``'s pipeline (DataLoader workers decoding, batched inference);
* model-only: the batched model calls on already preprocessed batches (no decoding),
  which on a GPU shows how much the input pipeline costs end to end.

Usage::

    .venv/bin/python benchmarks/extract.py                     # tiny profile, CPU, sample images
    .venv/bin/python benchmarks/extract.py --device cuda --profile paper --images DIR

Prints images/s per mode (medians over ``--repeat`` alternating repetitions) and the
batched/naive ratio (target on a 2-core CPU: >= 2x). The naive loop runs float32 by
default, as a plain PyTorch loop would; the batched pipeline runs ``--precision``
(``auto``: bfloat16 on a CPU with native bfloat16, float16 on CUDA).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from mner.devices import (
    resolve_device,  # noqa: E402
    resolve_precision,  # noqa: E402
)
from mner.extract.config import ExtractConfig  # noqa: E402
from mner.extract.dataset import ImageItems, collate  # noqa: E402
from mner.extract.runner import IMAGE_SUFFIXES, build_extractors, run_batch  # noqa: E402

FEATURES = ("resnet", "clip", "objects", "relations", "crops")


def _inputs(feature: str, ex: dict) -> dict:
    if feature in ("resnet", "clip"):
        return {feature: ex[feature].preprocess}
    return {"raw": ex["detector"].preprocess}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive(feature: str, ex: dict, paths: list[Path], cfg: ExtractConfig, device) -> float:
    items = ImageItems(paths, list(range(len(paths))), _inputs(feature, ex), cfg.max_pixels)
    t = time.perf_counter()
    for i in range(len(paths)):
        b = collate([items[i]])
        run_batch(ex, b, {feature: list(b["ok"])})
    _sync(device)
    return len(paths) / (time.perf_counter() - t)


def batched(feature: str, ex: dict, paths: list[Path], cfg: ExtractConfig, device, workers: int
            ) -> tuple[float, float, float]:
    """Steady-state end-to-end images/s, model-only images/s, worker start-up seconds.

    The clock starts when the first batch is ready: starting the worker processes is a
    fixed cost per run (reported apart), not a per-image one, and on a few hundred small
    images it would otherwise dominate the rate.
    """
    items = ImageItems(paths, list(range(len(paths))), _inputs(feature, ex), cfg.max_pixels)
    loader = DataLoader(items, batch_size=cfg.batch_size, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    t_start = time.perf_counter()
    it = iter(loader)
    first = next(it)
    startup = time.perf_counter() - t_start
    run_batch(ex, first, {feature: list(first["ok"])})
    t = time.perf_counter()
    batches = [first]
    for b in it:
        run_batch(ex, b, {feature: list(b["ok"])})
        batches.append(b)
    _sync(device)
    counted = len(paths) - len(first["row"])
    end_to_end = counted / (time.perf_counter() - t)
    t = time.perf_counter()
    for b in batches[1:]:
        run_batch(ex, b, {feature: list(b["ok"])})
    _sync(device)
    return end_to_end, counted / (time.perf_counter() - t), startup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, help="image folder (default: a generated sample)")
    ap.add_argument("--n", type=int, default=256, help="images to use")
    ap.add_argument("--profile", default="tiny", choices=("tiny", "paper"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per mode (medians printed)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--features", default=",".join(FEATURES))
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="precision of the batched pipeline (mner extract -o precision=...)")
    ap.add_argument("--naive-precision", default="fp32", choices=("auto", "fp32", "bf16", "fp16"),
                    help="precision of the naive loop (fp32: what a plain PyTorch loop runs)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    images = args.images
    if images is None:
        from mner.data.sample import SampleConfig, generate

        tmp = tempfile.TemporaryDirectory()
        generate(SampleConfig(seed=13, n_train=args.n, n_valid=10, n_test=10), Path(tmp.name) / "s")
        images = Path(tmp.name) / "s" / "images"
    paths = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[: args.n]
    cfg = ExtractConfig(profile=args.profile, device=args.device, batch_size=args.batch_size,
                        precision=args.precision)
    device = resolve_device(args.device)
    ex = build_extractors(cfg, device)
    naive_cfg = dataclasses.replace(cfg, precision=args.naive_precision)
    ex_naive = build_extractors(naive_cfg, device)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
          + f"; profile {args.profile}; {len(paths)} images; batch {args.batch_size}; "
          f"workers {args.workers}; precision: naive {resolve_precision(args.naive_precision, device)}, "
          f"batched {resolve_precision(args.precision, device)}")
    print(f"{'feature':<10} {'naive img/s':>12} {'batched img/s':>14} {'ratio':>6} {'model-only img/s':>17} "
          f"{'e2e/model':>9} {'start-up s':>10}")
    for feature in args.features.split(","):
        # Warm-up at both batch sizes: lazy init, allocator, oneDNN primitive creation
        # (per input shape, expensive for bfloat16) must not be billed to either mode.
        for e, k in ((ex, min(len(paths), args.batch_size)), (ex_naive, 1), (ex_naive, 1)):
            warm = ImageItems(paths[:k], list(range(k)), _inputs(feature, e), cfg.max_pixels)
            run_batch(e, collate([warm[i] for i in range(k)]), {feature: list(range(k))})
        # Alternate the modes and keep each one's median: a burst of other load on a
        # shared machine then hits one repetition, not one mode.
        runs = [(naive(feature, ex_naive, paths, cfg, device),
                 *batched(feature, ex, paths, cfg, device, args.workers)) for _ in range(args.repeat)]
        nv, e2e, model, startup = (statistics.median(col) for col in zip(*runs, strict=True))
        print(f"{feature:<10} {nv:>12.1f} {e2e:>14.1f} {e2e / nv:>5.2f}x {model:>17.1f} "
              f"{e2e / model:>9.2f} {startup:>10.2f}", flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
