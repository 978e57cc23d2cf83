"""Every registered head trains and decodes under bfloat16 autocast (``train.amp``).

CPU autocast casts what CUDA autocast casts (linear layers, matmuls) and leaves other
ops in their input dtypes, so a head that mixes an autocast output with a float32
tensor in an op outside the autocast lists fails only under AMP: on a GPU, or on a CPU
whose ``amp: auto`` picks bf16. This runs each head's forward, loss, backward and
Viterbi decoding in bf16 on every machine (emulated where the CPU has no bf16).
"""

from __future__ import annotations

import pytest
import torch

from mner.cache.reader import FeatureCache
from mner.data.dataset import load_splits
from mner.devices import autocast
from mner.train import encoder as encoders
from mner.train.config import make_train_config
from mner.train.data import NerDataset, TagSet, VisualStore
from mner.train.heads import HEADS
from mner.train.trainer import build_model, feature_dims

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def train_tweets(sample_dir):
    return load_splits(sample_dir)["train"]


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_trains_and_decodes_under_bf16_autocast(name, train_tweets, tiny_cache):
    cfg = make_train_config({"model": name, "profile": "tiny"}, ["context=[]", "cross_view=false"])
    needs = tuple(cfg.head_class().required_features(cfg.head_config()))
    cache = FeatureCache(tiny_cache) if needs else None
    enc, tok = encoders.build_tiny([t.tokens for t in train_tweets], seed=1)
    types = {lab[2:] for t in train_tweets for lab in t.labels if lab != "O"}
    tagset = TagSet(cfg.resolved_scheme(), types)
    ids = [t.image_id for t in train_tweets]
    visual = VisualStore(cache, needs, ids) if needs else None
    ds = NerDataset([t.tokens for t in train_tweets], ids, tok, cfg.max_length, tagset,
                    [t.labels for t in train_tweets], visual)
    model = build_model(cfg, 1, enc, tagset, feature_dims(cfg, cache, needs) if needs else {})
    # 20 windows with their image and 4 whose image is missing or broken (the sample has both).
    picked = list(range(20))
    if visual is not None:
        status = ds.collate(list(range(len(ds)))).image_mask
        picked += [int(i) for i in torch.nonzero(~status).flatten()[:4]]
    batch = ds.collate(picked)
    if visual is not None:
        assert batch.image_mask.sum() == 20 and len(picked) == 24

    model.train()
    with autocast(CPU, "bf16"):
        loss, parts = model.loss(batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.emissions.weight.grad is not None
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    head_params = list(model.head.parameters())
    assert not head_params or any(p.grad is not None for p in head_params)

    model.eval()
    with torch.no_grad(), autocast(CPU, "bf16"):
        paths, _ = model.decode(batch)
    assert [len(p) for p in paths] == batch.word_mask.sum(1).tolist()
