"""Bulk prediction throughput: ``mner predict --input --out`` against a loop of single-post calls.

Measures, in one run, on the same posts and the same loaded model:

* single: ``predictor(text, image)`` once per post (the Python API in a loop: each call
  decodes its image, runs the vision models on one image and tags one post);
* bulk: :func:`mner.apps.bulk.predict_file` (batches of ``--batch-size`` posts: one
  batched extraction and one batched tagging per batch, output streamed to a file).

Model loading is excluded from both. Prints posts/s of each and the bulk/single ratio
(target on a 2-core CPU: >= 5x). ``benchmarks/scale.py`` runs it as its bulk-prediction
section; alone::

    .venv/bin/python benchmarks/scale_predict.py --predict-run runs/sample/umt/seed1 \\
        --predict-data data/sample/test.txt --predict-images data/sample/images

Without ``--predict-run`` it builds what it needs in a temporary folder (the small sample, a
tiny ResNet cache, a one-epoch tiny UMT run), which takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This section's options, all prefixed ``--predict-`` so that ``scale.py`` can hold every
    section's options in one parser."""
    parser.add_argument("--predict-run", type=Path, default=None, help="a trained run (default: train a tiny one)")
    parser.add_argument("--predict-data", type=Path, default=None, help="CoNLL file whose tweets are the posts")
    parser.add_argument("--predict-images", type=Path, default=None, help="images folder of --predict-data")
    parser.add_argument("--predict-posts", type=int, default=128, help="posts to predict")
    parser.add_argument("--predict-batch-size", type=int, default=64, help="posts per bulk batch")
    parser.add_argument("--predict-device", default="cpu", help="device of the model and the vision models")
    parser.add_argument("--predict-threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def _setup(tmp: Path) -> tuple[Path, Path, Path]:
    """A tiny run, its test file and images, built in ``tmp``."""
    import mner
    from mner.data.sample import SampleConfig, generate

    data = tmp / "data"
    generate(SampleConfig(seed=0, n_train=120, n_valid=40, n_test=160), data)
    mner.extract(images=data / "images", out=tmp / "cache.h5", data=data, profile="tiny",
                 features=["resnet"], device="cpu", progress=False)
    run = tmp / "umt"
    mner.train(data=data, features=tmp / "cache.h5", out=run, model="umt", profile="tiny",
               epochs=1, seeds=[1])
    return run, data / "test.txt", data / "images"


def _posts(conll: Path, images: Path, n: int, out: Path) -> list[tuple[str, Path | None]]:
    """``n`` posts (text, image) from a CoNLL file (repeated if it is shorter), also as JSON lines."""
    from mner.data.conll import read_conll
    from mner.data.images import find_image

    tweets = read_conll(conll)
    posts = []
    with out.open("w", encoding="utf-8") as f:
        for i in range(n):
            t = tweets[i % len(tweets)]
            text = " ".join(t.tokens)
            posts.append((text, find_image(images, t.image_id)))
            f.write(json.dumps({"id": str(i), "text": text, "image_id": t.image_id}) + "\n")
    return posts


def run(args: argparse.Namespace) -> list[str]:
    """Measure and return the report lines."""
    import warnings

    import torch

    import mner
    from mner.apps.bulk import predict_file

    # Broken sample images are part of the workload; their warnings are not the report.
    warnings.filterwarnings("ignore", message=r"text \d+: image ")

    if args.predict_threads:
        torch.set_num_threads(args.predict_threads)
    with tempfile.TemporaryDirectory(prefix="mner-bench-") as tmp:
        tmp = Path(tmp)
        if args.predict_run is None:
            run_dir, conll, images = _setup(tmp)
        else:
            run_dir, conll, images = args.predict_run, args.predict_data, args.predict_images
            if conll is None or images is None:
                raise SystemExit("--predict-run needs --predict-data (a CoNLL file) and --predict-images")
        posts = _posts(conll, images, args.predict_posts, tmp / "posts.jsonl")
        tagger = mner.load(run_dir, device=args.predict_device)
        tagger(*posts[0])  # warm-up: builds the extractors, first-call allocations
        t0 = time.perf_counter()
        for text, image in posts:
            tagger(text, image)
        single = time.perf_counter() - t0
        t0 = time.perf_counter()
        predict_file(tagger, tmp / "posts.jsonl", tmp / "out.jsonl", images=images,
                     batch_size=args.predict_batch_size, progress=False, echo=lambda m: None)
        bulk = time.perf_counter() - t0
        n = len(posts)
        model = tagger.loaded.cfg.model
    return [
        f"Bulk prediction ({model}, {n} posts, device {args.predict_device}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}):",
        f"  single-post loop  {n / single:8.1f} posts/s",
        f"  bulk (batch {args.predict_batch_size:>3})  {n / bulk:8.1f} posts/s",
        f"  bulk / single     {single / bulk:8.1f}x   (target >= 5x)",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    for line in run(parser.parse_args(argv)):
        print(line)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
