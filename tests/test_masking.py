"""mner.train.heads.layers: masked means, attention masks, missing images, span pooling."""

from __future__ import annotations

import torch
from torch import nn

from mner.train.heads.layers import key_padding_mask, masked_mean, replace_missing, span_mean


def test_masked_mean_counts_only_real_positions():
    x = torch.tensor([[[1.0, 10.0], [3.0, 30.0], [100.0, 100.0]],
                      [[2.0, 4.0], [6.0, 8.0], [10.0, 12.0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    got = masked_mean(x, mask)
    assert torch.equal(got, torch.tensor([[2.0, 20.0], [0.0, 0.0]]))  # empty row: zeros


def test_masked_mean_keeps_dtype_and_gradient():
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, False], [True, True, True, True]])
    out = masked_mean(x, mask)
    assert out.dtype == torch.float64 and out.shape == (2, 3)
    out.sum().backward()
    assert torch.equal(x.grad[0, :, 0], torch.tensor([0.5, 0.0, 0.5, 0.0], dtype=torch.float64))
    assert torch.allclose(x.grad[1, :, 0], torch.full((4,), 0.25, dtype=torch.float64))


def test_key_padding_mask_inverts_and_keeps_one_key_for_empty_rows():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    ignore = key_padding_mask(mask)
    assert torch.equal(ignore, torch.tensor([[False, False, True], [False, True, True]]))
    assert torch.equal(mask, torch.tensor([[True, True, False], [False, False, False]]))  # untouched
    # Without the kept key, attention over an all-padded row would be NaN.
    attn = nn.MultiheadAttention(4, 2, batch_first=True)
    q = torch.randn(2, 5, 4)
    kv = torch.randn(2, 3, 4)
    out, _ = attn(q, kv, kv, key_padding_mask=key_padding_mask(mask))
    assert torch.isfinite(out).all()
    naive, _ = attn(q, kv, kv, key_padding_mask=~mask)
    assert torch.isnan(naive[1]).all()


def test_key_padding_mask_accepts_integer_masks():
    assert torch.equal(key_padding_mask(torch.tensor([[1, 0]])), torch.tensor([[False, True]]))


def test_replace_missing_substitutes_rows_and_trains_the_embedding():
    x = torch.randn(3, 4, 5)
    x[1] = float("nan")  # whatever sits in a missing row must not leak
    no_image = torch.arange(5, dtype=torch.float32).requires_grad_()
    image_mask = torch.tensor([True, False, True])
    out = replace_missing(x, image_mask, no_image)
    assert out.shape == x.shape
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert torch.equal(out[1], no_image.detach().expand(4, 5))
    out.sum().backward()
    assert torch.equal(no_image.grad, torch.full((5,), 4.0))  # 4 items of the one missing row


def test_replace_missing_on_vectors_and_half_precision():
    x = torch.ones(2, 3, dtype=torch.float16)
    out = replace_missing(x, torch.tensor([False, True]), torch.tensor([7.0, 8.0, 9.0]))
    assert out.dtype == torch.float16
    assert out.tolist() == [[7.0, 8.0, 9.0], [1.0, 1.0, 1.0]]


def test_span_mean_pools_half_open_spans():
    hidden = torch.arange(12, dtype=torch.float32).view(1, 6, 2)  # token t = (2t, 2t+1)
    spans = torch.tensor([[[1, 3], [4, 5], [0, 0], [2, 6]]])
    span_mask = torch.tensor([[True, True, True, False]])
    got = span_mean(hidden, spans, span_mask)
    assert got.shape == (1, 4, 2)
    assert torch.equal(got[0, 0], torch.tensor([3.0, 4.0]))  # mean of tokens 1 and 2
    assert torch.equal(got[0, 1], torch.tensor([8.0, 9.0]))  # token 4
    assert torch.equal(got[0, 2], torch.zeros(2))  # empty span
    assert torch.equal(got[0, 3], torch.zeros(2))  # padded span


def test_span_mean_per_row_spans_and_gradient():
    hidden = torch.randn(2, 5, 3, requires_grad=True)
    spans = torch.tensor([[[0, 2]], [[3, 5]]])
    out = span_mean(hidden, spans, torch.ones(2, 1, dtype=torch.bool))
    assert torch.allclose(out[0, 0], hidden[0, :2].mean(0))
    assert torch.allclose(out[1, 0], hidden[1, 3:].mean(0))
    out.sum().backward()
    assert torch.equal(hidden.grad[0, :, 0], torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0]))
