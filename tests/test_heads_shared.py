"""The heads' shared building blocks (mner/train/heads/layers.py) and contract (base.py):
one attention-head rule, one mask convention, the masks every head may rely on, one
name per shared option, and old parameter names of saved checkpoints."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import mner.train.heads as heads_pkg
from mner.errors import ConfigError
from mner.train.heads import HEADS, HeadInput
from mner.train.heads.base import SHARED_OPTIONS
from mner.train.heads.layers import CrossModalLayer, attention_heads
from mner.train.heads.maf import MafConfig, MafHead

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_attention_heads_one_rule():
    assert attention_heads(768, None) == 12  # BERT's head size 64: the papers' value
    assert attention_heads(128, None) == 2  # the tiny profile
    assert attention_heads(200, None) == 2  # 200 // 64 = 3 does not divide 200
    assert attention_heads(32, None) == 1
    # A head's own paper value (HamLearning's 12) is lowered to a divisor the same way.
    assert attention_heads(128, None, default=12) == 8
    assert attention_heads(768, None, default=12) == 12
    assert attention_heads(128, 4) == 4
    with pytest.raises(ConfigError) as exc:
        attention_heads(32, 5)
    assert str(exc.value) == (
        "train.head.heads: 5 does not divide the hidden size 32; "
        "set -o head.heads to a divisor of 32, or null for the default"
    )


@pytest.mark.parametrize("ffn_dropout", [False, True])
def test_cross_modal_layer_mask_true_means_real(ffn_dropout):
    torch.manual_seed(0)
    layer = CrossModalLayer(16, 2, 32, 0.1, ffn_dropout=ffn_dropout).eval()
    q, mem = torch.randn(3, 4, 16), torch.randn(3, 5, 16)
    real = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = layer(q, mem, real)
    garbage = torch.where(real.unsqueeze(-1), mem, torch.full_like(mem, 1e3))
    assert torch.allclose(layer(q, garbage, real), out, atol=1e-5)
    # Row 0 with only its real items is the same computation.
    assert torch.allclose(layer(q[:1], mem[:1, :3], real[:1, :3]), out[:1], atol=1e-5)
    # None means every item is real.
    assert torch.equal(layer(q, mem), layer(q, mem, torch.ones(3, 5, dtype=torch.bool)))
    # Without ffn_dropout the FFN is BERT's (two linear layers), with it nn.Transformer's.
    assert [type(m) for m in layer.ffn] == [nn.Linear, nn.GELU] + [nn.Dropout] * ffn_dropout + [nn.Linear]


def test_head_input_guarantees_its_masks():
    hidden = torch.randn(2, 3, 4)
    batch = HeadInput(hidden=hidden, token_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert batch.token_mask.dtype == torch.bool
    assert batch.image_mask.dtype == torch.bool and batch.image_mask.tolist() == [True, True]
    given = HeadInput(hidden=hidden, token_mask=batch.token_mask, image_mask=torch.tensor([1, 0]))
    assert given.image_mask.tolist() == [True, False]
    with pytest.raises(ValueError, match=r"image_mask is \(3,\), expected \(2,\)"):
        HeadInput(hidden=hidden, token_mask=batch.token_mask, image_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"token_mask is \(2, 4\), expected \(2, 3\)"):
        HeadInput(hidden=hidden, token_mask=torch.ones(2, 4, dtype=torch.bool))
    # item_mask: the batch's mask where the dataset has one, else every item is real.
    objects = torch.randn(2, 5, 7)
    with_mask = HeadInput(hidden=hidden, token_mask=batch.token_mask, visual={"objects/features": objects},
                          visual_masks={"objects/features": torch.tensor([[1, 1, 0, 0, 0], [0] * 5])})
    assert with_mask.item_mask("objects/features").tolist() == [[True, True, False, False, False], [False] * 5]
    without = HeadInput(hidden=hidden, token_mask=batch.token_mask, visual={"objects/features": objects})
    assert without.item_mask("objects/features").tolist() == [[True] * 5] * 2


def _config_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls.Config)}


def test_shared_options_have_one_name_and_old_names_point_to_fields():
    known_old = {"num_heads", "ma_heads", "hidden", "no_contrastive", "contrastive_weight"}
    for name, cls in HEADS.items():
        fields = _config_fields(cls)
        # Every attention-head option is called ``heads``.
        assert not fields & known_old, name
        renamed = getattr(cls.Config, "renamed_options", {})
        for old, new in renamed.items():
            assert old not in fields and new in fields and new in SHARED_OPTIONS, (name, old)
    assert HEADS["hamlearning"].Config.renamed_options == {"num_heads": "heads"}
    assert HEADS["mgips_cl"].Config.renamed_options == {"ma_heads": "heads"}
    assert HEADS["bfcl"].Config.renamed_options == {"hidden": "hidden_dim"}
    assert HEADS["mgc"].Config.renamed_options == {"no_contrastive": "no_cl", "contrastive_weight": "cl_weight"}
    for name in ("umt", "mgc", "maf", "bfcl", "mgips_cl", "hamlearning"):
        assert "heads" in _config_fields(HEADS[name]), name


@pytest.mark.parametrize(
    ("model", "old", "new"),
    [("hamlearning", "num_heads", "heads"), ("mgips_cl", "ma_heads", "heads"), ("bfcl", "hidden", "hidden_dim"),
     ("mgc", "no_contrastive", "no_cl")],
)
def test_old_option_name_gives_one_line_naming_the_new_one(model, old, new):
    from mner.train.config import make_train_config

    for over in ([f"head.{old}=4"], [f"{old}=4"]):
        with pytest.raises(ConfigError) as exc:
            make_train_config({"model": model, "profile": "tiny"}, over)
        assert str(exc.value) == f"train.head: {old} was renamed to {new}; write {new} instead of {old}"
    # The same for a saved config.yaml's head section.
    with pytest.raises(ConfigError, match=f"{old} was renamed to {new}"):
        make_train_config({"model": model, "profile": "tiny", "head": {old: 4}})


def test_maf_checkpoint_with_old_parameter_names_loads():
    torch.manual_seed(0)
    cfg = MafConfig(max_len=8)
    new = MafHead(cfg, 16, {"resnet/grid": 8, "resnet/pooled": 8})
    old_names = {
        k.replace("ci.attn.", "ci_attn.").replace("ci.norm1.", "ci_norm1.")
        .replace("ci.ffn.", "ci_ffn.").replace("ci.norm2.", "ci_norm2."): v
        for k, v in new.state_dict().items()
    }
    assert "ci_attn.in_proj_weight" in old_names and "ci_ffn.3.weight" in old_names
    # As a saved Tagger holds it: under the "head." prefix, loaded strictly.
    holder = nn.Module()
    torch.manual_seed(1)
    holder.head = MafHead(cfg, 16, {"resnet/grid": 8, "resnet/pooled": 8})
    assert not torch.equal(holder.head.ci.attn.in_proj_weight, new.ci.attn.in_proj_weight)
    holder.load_state_dict({f"head.{k}": v for k, v in old_names.items()}, strict=True)
    for k, v in new.state_dict().items():
        assert torch.equal(holder.head.state_dict()[k], v), k


def test_heads_import_only_the_contract_and_the_shared_blocks():
    """A head module never imports another head (MGC used to import UMT's internals)."""
    folder = Path(heads_pkg.__file__).parent
    head_modules = {p.stem for p in folder.glob("*.py")} - {"__init__", "base", "layers"}
    assert {"umt", "mgc", "maf", "bfcl", "mgips_cl", "hamlearning", "bert_crf"} <= head_modules
    for stem in head_modules:
        tree = ast.parse((folder / f"{stem}.py").read_text(encoding="utf-8"))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        siblings = {m.rsplit(".", 1)[-1] for m in imported if m.startswith("mner.train.heads.")}
        assert siblings <= {"base", "layers"}, (stem, siblings)


def test_every_head_cites_its_paper_without_a_path_outside_the_repository():
    import sys

    papers = (Path(__file__).parents[1] / "docs" / "papers.md").read_text(encoding="utf-8")
    for name, cls in HEADS.items():
        doc = sys.modules[cls.__module__].__doc__
        assert "docs/papers.md" in doc, name
        assert "../" not in doc and ".txt" not in doc, name
        assert f"| `{name}` |" in papers, name
    assert papers.count("@inproceedings{") + papers.count("@article{") + papers.count("@misc{") >= 7
