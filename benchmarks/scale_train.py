"""Training across ranks: seconds per epoch at world size 1 and N (DDP under torchrun).

Trains the same run (text-only ``bert_crf`` by default; ``--model`` another head with
``--features``) once in one process and once with N DDP ranks (``mner train --nproc N``,
which runs torchrun), both with ``global_batch: true``, so the two do the same work:
the same global batches, the same optimizer steps. Prints the median seconds per epoch
of each (epochs after the first, which pays for warm-up), the speed-up and the scaling
efficiency (speed-up / N; target on a GPU machine >= 0.9).

Every rank, the one-process run's included, gets the same share of the machine: one GPU
each on CUDA, ``cores // N`` intra-op threads each on a CPU (``--train-threads``), so
world size N uses N times the hardware of world size 1, as with GPUs. (Giving the
one-process run every core instead measures intra-op threading against DDP; on a
contended CPU that mostly measures OpenMP threads waiting on each other.)

Used by ``benchmarks/scale.py`` (``add_arguments`` / ``run``), or alone::

    python benchmarks/scale_train.py [--nproc N] [--data DIR] [--model bert_crf]
        [--features CACHE.h5] [--epochs 3] [--batch-size 32] [--device cpu|cuda]
        [--profile tiny|paper]

Without ``--data`` the sample dataset (300/80/80 tweets) is generated into a temporary
folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def _add(parser: argparse.ArgumentParser, *names: str, **kw) -> None:
    """Add an option under the names ``parser`` does not have yet: inside scale.py the
    shared ``--nproc`` (and the short aliases) belong to scale.py itself."""
    free = [n for n in names if n not in parser._option_string_actions]
    if free:
        parser.add_argument(*free, **kw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training section's options (prefixed ``--train-`` where scale.py might clash)."""
    _add(parser, "--nproc", type=int, default=2, help="ranks of the DDP run (default 2)")
    _add(parser, "--train-data", "--data", dest="train_data", default=None,
                        help="dataset folder (default: generated sample)")
    _add(parser, "--train-model", "--model", dest="train_model", default="bert_crf")
    _add(parser, "--train-features", "--features", dest="train_features", default=None,
                        help="feature cache for a head that reads one")
    _add(parser, "--train-epochs", "--epochs", dest="train_epochs", type=int, default=3)
    _add(parser, "--train-batch-size", "--batch-size", dest="train_batch_size", type=int, default=32,
                        help="global batch (each of N ranks takes 1/N)")
    _add(parser, "--train-profile", "--profile", dest="train_profile", default="tiny")
    _add(parser, "--train-device", dest="train_device", default="auto")
    _add(parser, "--train-threads", dest="train_threads", type=int, default=None,
                        help="intra-op threads per rank on a CPU (default cores // nproc)")


def _sample(tmp: Path) -> Path:
    from mner.data.sample import SampleConfig, generate

    out = tmp / "sample"
    generate(SampleConfig(seed=13, n_train=300, n_valid=80, n_test=80), out)
    return out


def _train(args, data: Path, out: Path, nproc: int) -> list[float]:
    cmd = [sys.executable, "-m", "mner", "train", "--data", str(data), "--out", str(out),
           "--model", args.train_model, "--profile", args.train_profile, "--nproc", str(nproc),
           "-o", f"epochs={args.train_epochs}", "-o", f"batch_size={args.train_batch_size}",
           "-o", "global_batch=true", "-o", "patience=0", "-o", f"device={args.train_device}",
           "-o", f"threads={args.train_threads or max(1, (os.cpu_count() or 1) // args.nproc)}"]
    if args.train_features:
        cmd += ["--features", args.train_features]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"training with {nproc} rank(s) failed:\n{r.stderr[-2000:]}")
    history = json.loads((out / "seed_1" / "history.json").read_text())
    return [h["seconds"] for h in history]


def run(args) -> list[str]:
    """Train at world size 1 and N; the report lines."""
    n = args.nproc
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.train_data) if args.train_data else _sample(tmp)
        one = _train(args, data, tmp / "one", 1)
        many = _train(args, data, tmp / "many", n)
    # the first epoch pays for warm-up (allocator, DDP bucket building)
    s1 = statistics.median(one[1:] or one)
    sn = statistics.median(many[1:] or many)
    speed = s1 / sn
    return [
        f"training ({args.train_model}, {args.train_profile} profile, global batch "
        f"{args.train_batch_size}, {len(one)} epochs; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {args.train_threads or max(1, (os.cpu_count() or 1) // n)} thread(s) "
        "per rank):",
        f"  world size 1: {s1:.2f} s/epoch",
        f"  world size {n} (DDP): {sn:.2f} s/epoch",
        f"  speed-up {speed:.2f}x, scaling efficiency {speed / n:.2f} (target on GPUs >= 0.9)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    for line in run(parser.parse_args()):
        print(line)


if __name__ == "__main__":
    main()
