"""Shared test setup: offline, deterministic, small.

Session fixtures build the generated sample dataset and a tiny-profile feature cache
once; tests that need them take ``sample_dir`` / ``tiny_cache`` as arguments.
"""

from __future__ import annotations

import os
import sys

# Before torch/transformers are imported anywhere: never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# Small enough for the suite to stay fast, large enough for the heads to learn the
# image-dependent types.
SAMPLE_SIZES = {"train": 300, "valid": 80, "test": 80}


@pytest.fixture
def mner_cli(monkeypatch, capsys):
    """Run ``mner ARGS`` in-process: ``mner_cli(*args) -> (exit code, stdout, stderr)``."""
    from mner.pipeline import cli

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["mner", *map(str, args)])
        code = 0
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    """A generated sample dataset (see mner.data.sample) in a session temp folder."""
    from mner.data.sample import SampleConfig, generate

    out = tmp_path_factory.mktemp("sample")
    # Without the OCR-dependent tweets (ocr_sample_dir has them): the heads' tests keep
    # the data they were tuned on.
    generate(SampleConfig(seed=13, ocr_dependent_share=0.0,
                          **{f"n_{k}": v for k, v in SAMPLE_SIZES.items()}), out)
    return out


@pytest.fixture(scope="session")
def ocr_sample_dir(tmp_path_factory):
    """A small generated sample with OCR-dependent tweets appended to each split (30/10/10;
    ``ocr_dependent.tsv``) and ``knowledge.jsonl``."""
    from mner.data.sample import SampleConfig, generate

    out = tmp_path_factory.mktemp("ocr_sample")
    generate(SampleConfig(seed=13, n_train=120, n_valid=40, n_test=40, ocr_dependent_share=0.25), out)
    return out


@pytest.fixture(scope="session")
def tiny_cache(sample_dir, tmp_path_factory):
    """A tiny-profile cache with every feature, extracted from ``sample_dir``."""
    from mner.extract.config import ExtractConfig
    from mner.extract.runner import run_extract

    out = tmp_path_factory.mktemp("cache") / "sample.h5"
    # One intra-op thread: several times faster than two on the shared 2-core CI CPU.
    cfg = ExtractConfig(profile="tiny", device="cpu", threads=1)
    run_extract(
        cfg,
        images=sample_dir / "images",
        data=[sample_dir / f"{s}.txt" for s in ("train", "valid", "test")],
        out=out,
    )
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module (restored after).

    Tiny tensors gain nothing from two threads, and on a 2-core machine shared with
    DataLoader workers or other jobs, two threads wait on each other. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def encoder_dir(sample_dir, tmp_path_factory):
    """A tiny BERT + WordPiece tokenizer saved as a Hugging Face folder (the real
    ``from_pretrained`` loading path, offline)."""
    from mner.data.conll import read_conll
    from mner.train import encoder as encoders

    words = [t.tokens for t in read_conll(sample_dir / "train.txt")]
    model, tok = encoders.build_tiny(words, seed=0)
    out = tmp_path_factory.mktemp("encoder")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
