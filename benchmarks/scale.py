"""Scaling past one process: world size 1 against N, printed in one run.

Sections (each prints its own lines):

* extraction (this file): images/s of ``mner extract`` with one process and with
  ``--nproc N`` ranks (torchrun's launcher, shards merged into one cache), their ratio,
  and the scaling efficiency ``ratio / N``; the two caches are checked to be identical
  dataset checksum by dataset checksum;
* training (``benchmarks/scale_train.py``) and bulk prediction
  (``benchmarks/scale_predict.py``), when those files exist: each exposes
  ``add_arguments(parser)`` (its own options, prefixed ``--train-`` / ``--predict-``)
  and ``run(args) -> list[str]`` (the lines to print). The shared options are
  ``--nproc``, ``--device``, ``--profile``, ``--repeat`` and ``--only``.

Usage::

    .venv/bin/python benchmarks/scale.py                           # CPU, tiny, N=2
    .venv/bin/python benchmarks/scale.py --device cuda --nproc 8 --profile paper --images DIR

On a CPU the ranks share its cores (each gets cores // N intra-op threads, the one
process gets them all), so a ratio near 1 is the expected best; the GPU target is a
scaling efficiency >= 0.9 with N GPUs. Two clocks are printed: in-process seconds
(what the ranks report: models built, images extracted, shards merged) and wall
seconds of the whole command (including starting N interpreters and the rendezvous).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
#: Section modules of the other stages, imported when present.
SECTIONS = ("scale_train", "scale_predict")


def sections() -> dict[str, ModuleType]:
    """The section modules found beside this file (name -> module)."""
    found: dict[str, ModuleType] = {}
    for name in SECTIONS:
        path = HERE / f"{name}.py"
        if not path.is_file():
            continue
        spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        found[name] = mod
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the extraction section."""
    parser.add_argument("--images", type=Path, default=None,
                        help="Folder of images (default: --n-images generated ones).")
    parser.add_argument("--n-images", type=int, default=96)
    parser.add_argument("--features", default="resnet,clip,objects",
                        help="Comma list of image features to extract.")
    parser.add_argument("--batch-size", type=int, default=16)


def _generate(folder: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = int(rng.integers(96, 225)), int(rng.integers(96, 225))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i:05d}.jpg")
    return folder


def run_extraction(args: argparse.Namespace) -> list[str]:
    """images/s at world size 1 and ``args.nproc``, ratio, efficiency, identical checksums."""
    from mner.cache.inspect import summary
    from mner.extract.config import ExtractConfig
    from mner.extract.runner import run_extract

    tmp = Path(tempfile.mkdtemp(prefix="mner-scale-"))
    images = args.images or _generate(tmp / "images", args.n_images)
    cfg = ExtractConfig(profile=args.profile, device=args.device, batch_size=args.batch_size,
                        features=tuple(args.features.split(",")))
    n = args.nproc
    rows: dict[int, list[tuple[float, float]]] = {1: [], n: []}
    sums: dict[int, dict[str, str]] = {}
    for rep in range(args.repeat):
        for world in (1, n):  # alternating, so drifting machine load hits both alike
            out = tmp / f"w{world}-{rep}.h5"
            t0 = time.perf_counter()
            res = run_extract(cfg, images, None, out, progress=False, nproc=world)
            wall = time.perf_counter() - t0
            rows[world].append((res["seconds"], wall))
            sums[world] = {k: v["sha256"] for k, v in summary(out)["datasets"].items()}
            count = res["images"]
    same = sums[1] == sums[n]
    rate = {w: count / statistics.median(s for s, _ in rows[w]) for w in rows}
    wall = {w: count / statistics.median(x for _, x in rows[w]) for w in rows}
    ratio, wratio = rate[n] / rate[1], wall[n] / wall[1]
    lines = [f"## extraction ({count} images, features {args.features}, {args.profile}, "
             f"device {args.device}, batch {args.batch_size}, median of {args.repeat})",
             f"world size 1: {rate[1]:7.1f} img/s in-process, {wall[1]:7.1f} img/s wall",
             f"world size {n}: {rate[n]:7.1f} img/s in-process, {wall[n]:7.1f} img/s wall",
             f"ratio N/1: {ratio:.2f}x in-process, {wratio:.2f}x wall; scaling efficiency "
             f"{ratio / n:.2f} (GPU target >= 0.90)",
             f"caches identical dataset by dataset: {'yes' if same else 'NO'}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="World size N compared with 1.")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto.")
    parser.add_argument("--profile", default="tiny", help="tiny or paper.")
    parser.add_argument("--repeat", type=int, default=1, help="Alternating repetitions (median).")
    parser.add_argument("--only", default=None,
                        help="Comma list of sections to run: extract, " + ", ".join(SECTIONS))
    add_arguments(parser)
    mods = sections()
    for mod in mods.values():
        mod.add_arguments(parser)
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None

    import torch

    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, cuda devices {torch.cuda.device_count()}, N = {args.nproc}")
    runs = [("extract", run_extraction)] + [(name, mod.run) for name, mod in mods.items()]
    for name, run in runs:
        if only is not None and name not in only:
            continue
        for line in run(args):
            print(line)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
