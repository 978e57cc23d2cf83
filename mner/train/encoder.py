"""The text encoder: a pretrained BERT-style model, or a seeded random tiny BERT.

Pretrained encoders load through ``transformers`` (``AutoModel``/``AutoTokenizer``
``from_pretrained``), from a Hugging Face name (the local HF cache when offline) or a
local folder. The ``tiny`` encoder builds a WordPiece vocabulary from the training text
(a ``tokenizers`` WordPiece model) and builds a randomly initialised ``BertModel`` from a seed, so the
test suite and the demo run offline with no downloaded weights. Either way the run
folder keeps the tokenizer and config (``seed_<k>/encoder/``), and evaluation reloads
them with ``from_pretrained``; the weights themselves live in ``model.safetensors``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from mner.errors import WeightsError
from mner.train.config import TINY_BERT

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def load_pretrained(name_or_dir: str) -> tuple[nn.Module, object]:
    """Load a pretrained encoder and its fast tokenizer.

    Args:
        name_or_dir: a Hugging Face model name or a local folder with config, weights
            and tokenizer files.

    Returns:
        ``(model, tokenizer)``; the model returns ``last_hidden_state`` (B, T, D).

    Raises:
        WeightsError: when the weights cannot be found (offline with no local copy,
            or a folder without a model).
    """
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir, use_fast=True)
        model = AutoModel.from_pretrained(name_or_dir, add_pooling_layer=False)
    except TypeError:  # encoders without a pooler argument
        model = AutoModel.from_pretrained(name_or_dir)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"cannot load encoder {name_or_dir!r} ({first[:160]}); pass a local copy with "
            f"--encoder /path/to/{Path(name_or_dir).name} (or -o encoder=DIR), or download "
            f"it once while online (huggingface-cli download {name_or_dir}); "
            "`--profile tiny` needs no weights"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise WeightsError(
            f"encoder {name_or_dir!r} has no fast tokenizer (needed for word alignment); "
            "add a tokenizer.json to the folder"
        )
    return model, tokenizer


def train_wordpiece(texts: Iterable[list[str] | tuple[str, ...]], vocab_size: int):
    """Build a cased WordPiece tokenizer from the words of the training text.

    The vocabulary is the special tokens, every character seen (as a word start and as
    a ``##`` continuation, so any word built from seen characters can be encoded) and
    then the most frequent whole words (ties broken alphabetically) up to
    ``vocab_size``. It is computed here rather than with ``tokenizers``'
    ``WordPieceTrainer`` because that trainer is not deterministic (the same text gave
    vocabularies of different sizes from run to run), and a run must be reproducible
    from its seed.

    Args:
        texts: sentences as word sequences (the training split).
        vocab_size: upper bound on the vocabulary size (characters always fit).

    Returns:
        A ``transformers`` BERT fast tokenizer with the usual special tokens.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    # Cased like bert-base-cased: entity capitalisation is a strong cue in tweets.
    normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for words in texts:
        text = normalizer.normalize_str(" ".join(words))
        counts.update(piece for piece, _ in pre.pre_tokenize_str(text))
    chars = sorted({c for w in counts for c in w})
    vocab = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    seen = set(vocab)
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tok.decoder = decoders.WordPiece()
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        do_lower_case=False,
    )


def build_tiny(texts: Iterable[list[str] | tuple[str, ...]], seed: int, max_length: int = 512):
    """A seeded random small BERT and a WordPiece tokenizer trained on ``texts``.

    Args:
        texts: training sentences as word sequences.
        seed: initialises the weights (same seed, same model).
        max_length: position embeddings to allocate (at least the run's max_length).

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import BertConfig, BertModel

    tokenizer = train_wordpiece(texts, TINY_BERT["vocab_size"])
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_BERT["hidden_size"],
        num_hidden_layers=TINY_BERT["num_hidden_layers"],
        num_attention_heads=TINY_BERT["num_attention_heads"],
        intermediate_size=TINY_BERT["intermediate_size"],
        max_position_embeddings=max(512, max_length),
        pad_token_id=tokenizer.pad_token_id,
    )
    # Build on a private generator state so the weights depend on ``seed`` only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    return model, tokenizer


def load_saved(folder: Path) -> tuple[nn.Module, object]:
    """Rebuild an encoder (random weights) and its tokenizer from a run's ``encoder/``.

    The caller loads the trained weights from ``model.safetensors`` afterwards; only the
    architecture config and the tokenizer are stored here, so a bert-base run does not
    keep two copies of the encoder weights.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise WeightsError(f"{folder}: no config.json; is this a run folder written by `mner train`?")
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True)
    try:
        model = AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        model = AutoModel.from_config(config)
    return model, tokenizer


def save(model: nn.Module, tokenizer, folder: Path) -> None:
    """Write the encoder's config and tokenizer (not its weights) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
