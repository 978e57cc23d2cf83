"""Running a BERT-family text encoder layer by layer, for heads that fuse inside it.

A head that sets ``fuses_in_encoder`` gets the encoder and its inputs from the tagger
(:class:`mner.train.model.Tagger`) and runs the layers itself with these functions, so
it can add the other modality's keys and values to each layer's self-attention
(MGIPS-CL's eq. 2). BERT, RoBERTa and XLM-R share the module layout used here. It imports
only ``mner.errors``, so heads can use it without an import cycle through the config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mner.errors import ConfigError


def bert_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The embeddings module and the transformer layers of a BERT-family encoder.

    BERT, RoBERTa and XLM-R (``transformers``) share this layout: ``model.embeddings``
    and ``model.encoder.layer[i]`` with ``attention.self`` (query/key/value),
    ``attention.output``, ``intermediate`` and ``output``.

    Raises:
        ConfigError: the encoder has another layout or relative position embeddings.
    """
    emb = getattr(model, "embeddings", None)
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    ok = emb is not None and layers is not None and all(
        hasattr(layer, "attention") and hasattr(layer.attention, "self")
        and hasattr(layer, "intermediate") and hasattr(layer, "output") for layer in layers)
    kind = getattr(model.config, "position_embedding_type", "absolute") if ok else None
    if not ok or kind not in (None, "absolute"):
        raise ConfigError(f"encoder {type(model).__name__} is not a BERT-style encoder with absolute "
                          "positions, so a head cannot fuse inside its layers; use "
                          "-o head.fusion=late")
    return emb, layers


def embed(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The embedding layer's output (B, T, D) for the encoder ``inputs`` (the keyword
    arguments the tagger passes to the encoder; ``attention_mask`` is not used here)."""
    emb, _ = bert_layers(model)
    return emb(**{k: inputs[k] for k in ("input_ids", "token_type_ids", "position_ids")
                  if inputs.get(k) is not None})


def run_layer(layer: nn.Module, h: torch.Tensor, mask: torch.Tensor,
              extra_k: torch.Tensor | None = None, extra_v: torch.Tensor | None = None,
              extra_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One BERT-family layer, optionally with extra keys/values in its self-attention.

    Without extras this is the layer's own forward (same weights, same result). With
    them, the layer's queries attend over ``[extra keys; its own keys]`` in one softmax,
    e.g. another modality's states (MGIPS-CL's eq. 2).

    Args:
        layer: ``model.encoder.layer[i]`` (see :func:`bert_layers`).
        h: (B, T, D) the previous layer's output.
        mask: (B, T) bool, True for real tokens.
        extra_k, extra_v: (B, M, D) keys and values already in the layer's key space.
        extra_mask: (B, M) bool, True for real extra items.

    Returns:
        (B, T, D) the layer's output.
    """
    sa = layer.attention.self
    B, T, _ = h.shape
    heads, size = sa.num_attention_heads, sa.attention_head_size
    k, v, mask = sa.key(h), sa.value(h), mask.bool()
    if extra_k is not None:
        k = torch.cat([extra_k.to(k.dtype), k], 1)  # (B, M+T, D)
        v = torch.cat([extra_v.to(v.dtype), v], 1)
        mask = torch.cat([extra_mask.bool(), mask], 1)

    def split(x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, heads, N, D/heads)
        return x.view(B, x.shape[1], heads, size).transpose(1, 2)

    p = sa.dropout.p if layer.training else 0.0
    ctx = F.scaled_dot_product_attention(split(sa.query(h)), split(k), split(v),
                                         attn_mask=mask[:, None, None, :], dropout_p=p)
    ctx = ctx.transpose(1, 2).reshape(B, T, heads * size)
    att = layer.attention.output(ctx, h)
    return layer.output(layer.intermediate(att), att)
