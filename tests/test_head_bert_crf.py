"""The text-only bert_crf head: an identity with no parameters and no visual input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mner.config import build
from mner.errors import ConfigError
from mner.train.heads import HEADS, HeadInput, get_head
from mner.train.heads.bert_crf import BertCrfHead


def test_registered_text_only_and_parameter_free():
    cls = get_head("bert_crf")
    assert cls is BertCrfHead and HEADS["bert_crf"] is cls
    assert cls.needs == () and cls.required_features(cls.Config()) == ()
    assert not cls.needs_text_teacher and cls.default_scheme == "bio2"
    assert cls.summary and "\n" not in cls.summary
    head = cls(cls.Config(), 16, {})
    assert head.out_dim == 16
    assert list(head.parameters()) == []
    assert dataclasses.fields(cls.Config) == ()


def test_returns_hidden_unchanged_with_gradient_and_ignores_images():
    head = BertCrfHead(BertCrfHead.Config(), 8, {})
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    batch = HeadInput(hidden=hidden, token_mask=torch.ones(2, 5, dtype=torch.bool),
                      image_mask=torch.tensor([True, False]),
                      labels=torch.zeros(2, 5, dtype=torch.long), label_names=("O",))
    out = head(batch)
    assert out.hidden is hidden
    assert out.aux_losses == {} and out.diagnostics == {}
    out.hidden.sum().backward()
    assert torch.equal(hidden.grad, torch.ones_like(hidden))


def test_has_no_options():
    with pytest.raises(ConfigError, match="unknown key"):
        build(BertCrfHead.Config, {"esd": True}, where="train.head")
