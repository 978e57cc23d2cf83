"""Training speed: what caching the visual features saves, and what a fusion head costs.

Measures, in one run, the seconds per training epoch of

  (a) ``bert_crf`` (text only),
  (b) ``umt`` reading ResNet grids from the feature cache (``mner train``'s way),
  (c) ``umt`` computing ResNet-152 grids per batch from the image files, the way the UMT
      repository trains: decode + resize/crop/normalise + a ResNet-152 forward pass
      inside the training loop (the CNN frozen, as in UMT),

  (d) ``bert_crf`` reading a context (the sample's ``knowledge.jsonl``, a PGIM-style
      context file) as the second sentence of a pair, and (e) the same with ITA's
      cross-view alignment (the tweet-only view trained too, plus the KL term),

all with the tiny encoder, and prints c/b (what the cache saves; target >= 3) and b/a
(the head's own cost; target <= 1.15); for (d) and (e) it prints the epoch cost against
(a) beside the measured ratio of sub-tokens per window (context windows / plain ones),
which is what a context costs. It also times (a) and (b) with a BERT-base-sized
encoder (random weights, ``BertConfig()`` defaults) so GPU runs can be compared later, and
with it two cheaper UMT variants (no span detection; MGC section 2.4's layout) to show where
the head's cost goes. Every configuration trains with ``--amp`` (default ``auto``, as
``mner train``: bfloat16 on CPUs with native bfloat16).

With ``--mgips`` it instead times MGIPS-CL's layer-wise fusion (``head.fusion=layerwise``,
the paper's mutual attention inside every encoder layer over cached per-depth CLIP crop
states) against the head before it (``head.fusion=late``: one mutual-attention layer
after the encoder), with the tiny and the BERT-base-sized encoder, and prints the ratio.

Usage::

    python benchmarks/train.py [--data DIR --features CACHE.h5] [--device cpu|cuda]
        [--amp auto|off|bf16|fp16] [--max-batches N] [--base-batches N] [--threads N]
        [--mgips]

Without ``--data`` the sample dataset is generated (300/80/80 tweets) and its
ResNet features extracted with the tiny profile into a temporary folder. Epoch times
are extrapolated from the first ``--max-batches`` batches when given (the ratios do not
depend on it); ``--base-batches`` does the same for the BERT-base rows (default 8). Each
configuration runs ``--repeat`` times, alternating with the others; medians are printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import torch  # noqa: E402


def _setup_data(args, features=("resnet",)) -> tuple[Path, Path]:
    if args.data is not None:
        return Path(args.data), Path(args.features)
    from mner.data.sample import SampleConfig, generate
    from mner.extract.config import ExtractConfig
    from mner.extract.runner import run_extract

    tmp = Path(tempfile.mkdtemp(prefix="mner-bench-train-"))
    generate(SampleConfig(seed=13, n_train=300, n_valid=80, n_test=80), tmp / "sample")
    cache = tmp / "sample.h5"
    run_extract(
        ExtractConfig(profile="tiny", device="cpu", features=tuple(features)),
        images=tmp / "sample" / "images",
        data=None,
        out=cache,
        progress=False,
    )
    return tmp / "sample", cache


class ResNetPerBatch:
    """UMT-repository style: decode, preprocess and run ResNet-152 for every batch.

    ``__call__`` is a ``batch_hook`` for ``train_epoch``: it fills
    ``batch.visual["resnet/grid"]`` (B, 49, 2048) and ``batch.image_mask`` from the
    image files of the batch's tweets.
    """

    def __init__(self, dataset, images_dir: Path, device: torch.device):
        import torchvision
        from torchvision import transforms as T

        self.dataset, self.images_dir, self.device = dataset, images_dir, device
        net = torchvision.models.resnet152(weights=None).eval().to(device)
        self.trunk = torch.nn.Sequential(*list(net.children())[:-2])  # up to layer4
        self.tf = T.Compose([
            T.Resize(224), T.CenterCrop(224), T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])

    def __call__(self, batch):
        from PIL import Image

        from mner.data.images import find_image

        xs, ok = [], []
        for wi in batch.windows:
            iid = self.dataset.image_ids[self.dataset.windows[wi].item]
            path = find_image(self.images_dir, iid)
            try:
                with Image.open(path) as im:
                    xs.append(self.tf(im.convert("RGB")))
                ok.append(True)
            except Exception:  # missing or broken files, like the cache's status
                xs.append(torch.zeros(3, 224, 224))
                ok.append(False)
        with torch.no_grad():
            fmap = self.trunk(torch.stack(xs).to(self.device))  # (B, 2048, 7, 7)
        batch.visual = {"resnet/grid": fmap.flatten(2).transpose(1, 2).cpu()}  # (B, 49, 2048)
        batch.image_mask = torch.tensor(ok)
        return batch


def epoch_seconds(model_name, enc, tok, tweets, cache, device, max_batches=0, hook_images=None,
                  dims=None, overrides=(), amp="auto", contexts=None):
    """Wall and process-CPU seconds of one training epoch (extrapolated from ``max_batches``).

    CPU seconds are reported too because on a shared machine wall time mostly measures
    the other jobs; process CPU time (all threads) is far less sensitive to them.
    """
    from transformers import get_linear_schedule_with_warmup

    from mner.devices import resolve_precision
    from mner.train.config import make_train_config
    from mner.train.data import NerDataset, TagSet, VisualStore, bucket_batches
    from mner.train.trainer import build_model, make_optimizer, train_epoch

    cfg = make_train_config({"model": model_name, "profile": "tiny"}, list(overrides))
    precision = resolve_precision(amp, device, what="--amp")
    needs = tuple(cfg.head_class().required_features(cfg.head_config()))
    tagset = TagSet("bio2")
    ids = [t.image_id for t in tweets]
    visual = VisualStore(cache, needs, ids) if (needs and hook_images is None) else None
    ds = NerDataset([t.tokens for t in tweets], ids, tok, cfg.max_length, tagset,
                    [t.labels for t in tweets], visual, contexts=contexts,
                    context_max_length=cfg.context_max_length)
    feature_dims = dims if dims is not None else {n: cache.dims(n) for n in needs}
    model = build_model(cfg, 1, enc, tagset, feature_dims).to(device)
    opt = make_optimizer(model, cfg)
    batches = bucket_batches(ds.lengths(), cfg.batch_size, cfg.bucket_size,
                             torch.Generator().manual_seed(0))
    full = len(batches)
    sched = get_linear_schedule_with_warmup(opt, 0, full * 2)
    hook = ResNetPerBatch(ds, hook_images, device) if hook_images is not None else None
    # One untimed batch: first-call allocations and lazy inits are not epoch cost.
    train_epoch(model, ds, batches[:1], opt, sched, None, device, precision, cfg.grad_clip,
                desc="warmup", batch_hook=hook)
    timed = batches[:max_batches] if max_batches else batches
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    train_epoch(model, ds, timed, opt, sched, None, device, precision, cfg.grad_clip,
                desc=model_name, batch_hook=hook)
    if device.type == "cuda":
        torch.cuda.synchronize()
    scale = full / len(timed)
    return (time.perf_counter() - t0) * scale, (time.process_time() - c0) * scale


#: UMT variants timed with the BERT-base-sized encoder to show where the head's cost
#: goes: (key, label, head overrides).
UMT_VARIANTS = (
    ("base_b", "umt, cached features, BERT-base-sized encoder", ()),
    ("base_b_noesd", "  umt esd=false (no span-detection layer)", ("head.esd=false",)),
    ("base_b_24", "  umt as MGC sec. 2.4 (text_layer=false esd=false)", ("head.esd=false", "head.text_layer=false")),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="dataset folder (default: generate the sample)")
    ap.add_argument("--features", help="its tiny/paper cache with resnet/grid")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                    help="train.amp for every configuration (default auto, as mner train)")
    ap.add_argument("--max-batches", type=int, default=0)
    ap.add_argument("--base-batches", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="alternating rounds (medians printed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mgips", action="store_true",
                    help="time MGIPS-CL layer-wise vs late fusion instead (cache needs crops, crop_layers)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.mgips:
        mgips_main(args, device)
        return

    from transformers import BertConfig, BertModel

    from mner.cache.reader import FeatureCache
    from mner.data.dataset import load_splits
    from mner.devices import resolve_precision
    from mner.train import encoder as encoders

    data, features = _setup_data(args)
    tweets = load_splits(data)["train"]
    cache = FeatureCache(features)
    words = [t.tokens for t in tweets]

    def tiny():
        return encoders.build_tiny(words, seed=1)

    from mner.train.context import build_contexts, read_context_file
    from mner.train.data import make_windows

    knowledge = read_context_file(data / "knowledge.jsonl") if (data / "knowledge.jsonl").is_file() else None
    contexts = build_contexts(("file",), tweets, context_file=knowledge)[0] if knowledge else None
    ctx_words = words + [c.split() for c in contexts or [] if c]
    # The context rows' tiny vocabulary also learns the context words, as mner train's does.
    ctx_file = [f"context_file={data / 'knowledge.jsonl'}"]

    def run_tiny(key):
        if key in ("d", "e"):
            enc, tok = encoders.build_tiny(ctx_words, seed=1)
            return epoch_seconds("bert_crf", enc, tok, tweets, cache, device, args.max_batches, amp=args.amp,
                                 contexts=contexts, overrides=ctx_file + (["cross_view=true"] if key == "e" else []))
        enc, tok = tiny()
        if key == "a":
            return epoch_seconds("bert_crf", enc, tok, tweets, cache, device, args.max_batches, amp=args.amp)
        if key == "b":
            return epoch_seconds("umt", enc, tok, tweets, cache, device, args.max_batches, amp=args.amp)
        return epoch_seconds("umt", enc, tok, tweets, cache, device, args.max_batches,
                             hook_images=data / "images", dims={"resnet/grid": 2048}, amp=args.amp)

    _, tok = tiny()
    base_cfg = BertConfig(vocab_size=max(len(tok), 30522))
    variants = {key: overrides for key, _, overrides in UMT_VARIANTS}

    precision = resolve_precision(args.amp, device, what="--amp")
    # The same BERT-base bert_crf in float32, when --amp picked a lower precision: what
    # mixed precision buys, measured in this run.
    fp32_row = ("base_a_fp32",) if precision != "fp32" else ()

    def run_base(key):
        torch.manual_seed(0)
        enc = BertModel(base_cfg, add_pooling_layer=False)
        if key in ("base_a", "base_a_fp32"):
            return epoch_seconds("bert_crf", enc, tok, tweets, cache, device, args.base_batches,
                                 amp="off" if key == "base_a_fp32" else args.amp)
        return epoch_seconds("umt", enc, tok, tweets, cache, device, args.base_batches,
                             overrides=variants[key], amp=args.amp)

    # Alternate the configurations and keep each one's median over --repeat rounds, so
    # a burst of other load on a shared machine hits one round, not one configuration.
    # (c) is slow and its ratio far from the target: one round.
    rounds: dict[str, list[tuple[float, float]]] = {}
    for r in range(args.repeat):
        ctx_keys = ("d", "e") if contexts else ()
        for key in ("a", "b", *ctx_keys, "base_a", *variants, *fp32_row) + (("c",) if r == 0 else ()):
            rounds.setdefault(key, []).append(run_base(key) if key.startswith("base") else run_tiny(key))
    res = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in rounds.items()}

    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, torch threads {args.threads}, "
          f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"amp {args.amp} -> {precision}")
    print(f"train tweets: {len(tweets)}; cache: {features}")
    rows = [
        ("a", "(a) bert_crf, tiny encoder"),
        ("b", "(b) umt, cached features, tiny encoder"),
        ("c", "(c) umt, ResNet-152 per batch from images, tiny"),
        *((("d", "(d) bert_crf + context file, tiny"), ("e", "(e) bert_crf + context + cross-view KL, tiny"))
          if contexts else ()),
        ("base_a", "bert_crf, BERT-base-sized encoder"),
        *((key, label) for key, label, _ in UMT_VARIANTS),
        *((key, "bert_crf, BERT-base-sized encoder, amp off (fp32)") for key in fp32_row),
    ]
    print(f"seconds per training epoch:{'':28}{'wall':>9}{'cpu':>9}{'/ bert_crf':>12}")
    for key, label in rows:
        base = res["base_a" if key.startswith("base") else "a"][0]
        print(f"  {label:52}{res[key][0]:9.2f}{res[key][1]:9.2f}{res[key][0] / base:12.2f}")
    if contexts:
        _, ctok = encoders.build_tiny(ctx_words, seed=1)
        sents = [t.tokens for t in tweets]
        plain = make_windows(sents, ctok, 128)
        ctx = make_windows(sents, ctok, 128, contexts=contexts, context_max_length=128)
        ratio = sum(len(w.input_ids) for w in ctx) / sum(len(w.input_ids) for w in plain)
        print(f"context: sub-tokens per window {ratio:.2f}x the tweet's alone; epoch cost (wall) "
              f"d/a = {res['d'][0] / res['a'][0]:.2f}, e/a = {res['e'][0] / res['a'][0]:.2f}")
    for i, kind in enumerate(("wall", "cpu")):
        print(f"{kind}: ratio c/b = {res['c'][i] / res['b'][i]:.2f} (target >= 3), "
              f"b/a = {res['b'][i] / res['a'][i]:.2f} (target <= 1.15), "
              f"b/a BERT-base-sized = {res['base_b'][i] / res['base_a'][i]:.2f}"
              + (f", fp32/{precision} BERT-base = {res['base_a_fp32'][i] / res['base_a'][i]:.2f}" if fp32_row else ""))


def mgips_main(args, device: torch.device) -> None:
    """MGIPS-CL: seconds per epoch of ``fusion=layerwise`` against ``fusion=late``."""
    from transformers import BertConfig, BertModel

    from mner.cache.reader import FeatureCache
    from mner.data.dataset import load_splits
    from mner.devices import resolve_precision
    from mner.train import encoder as encoders

    data, features = _setup_data(args, ("crops", "crop_layers"))
    tweets = load_splits(data)["train"]
    cache = FeatureCache(features)
    words = [t.tokens for t in tweets]
    _, tok = encoders.build_tiny(words, seed=1)
    base_cfg = BertConfig(vocab_size=max(len(tok), 30522))

    def run(key):
        base = key.startswith("base")
        if base:
            torch.manual_seed(0)
            enc = BertModel(base_cfg, add_pooling_layer=False)
        else:
            enc, _ = encoders.build_tiny(words, seed=1)
        fusion = key.rsplit("_", 1)[-1]
        return epoch_seconds("mgips_cl", enc, tok, tweets, cache, device,
                             args.base_batches if base else args.max_batches,
                             overrides=(f"head.fusion={fusion}",), amp=args.amp)

    keys = ("tiny_late", "tiny_layerwise", "base_late", "base_layerwise")
    rounds: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.repeat):
        for key in keys:
            rounds.setdefault(key, []).append(run(key))
    res = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in rounds.items()}
    precision = resolve_precision(args.amp, device, what="--amp")
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, torch threads {args.threads}, device {device}, "
          f"amp {args.amp} -> {precision}")
    print(f"train tweets: {len(tweets)}; cache: {features} "
          f"(crop_layers/tokens {cache.shape('crop_layers/tokens')[1:]})")
    print(f"mgips_cl seconds per training epoch:{'':19}{'wall':>9}{'cpu':>9}{'/ late':>9}")
    for key in keys:
        late = res[key.rsplit("_", 1)[0] + "_late"]
        label = f"{'BERT-base-sized' if key.startswith('base') else 'tiny'} encoder, fusion={key.rsplit('_', 1)[-1]}"
        print(f"  {label:52}{res[key][0]:9.2f}{res[key][1]:9.2f}{res[key][1] / late[1]:9.2f}")


if __name__ == "__main__":
    main()
