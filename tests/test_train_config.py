"""TrainConfig: profile defaults, strict keys, head options and -o routing."""

from __future__ import annotations

import pytest
import yaml

from mner.config import build, to_dict
from mner.errors import ConfigError
from mner.train.config import PROFILE_DEFAULTS, TrainConfig, make_train_config


def test_profile_defaults_fill_unset_fields_only():
    tiny = TrainConfig(profile="tiny")
    assert tiny.encoder == "tiny" and tiny.epochs == PROFILE_DEFAULTS["tiny"]["epochs"]
    paper = TrainConfig(profile="paper", epochs=3)
    assert paper.encoder == "bert-base-cased"
    assert paper.epochs == 3  # an explicit value wins over the profile
    assert paper.lr_encoder == paper.head_class().recipe.lr_encoder[0]  # the head's paper recipe


def test_config_round_trips_through_yaml():
    cfg = make_train_config({"model": "bert_crf", "profile": "tiny"}, ["epochs=2", "seeds=[3,4]"])
    again = build(TrainConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg))), where="x")
    assert again == cfg
    assert again.seeds == (3, 4)


def test_unknown_and_mistyped_keys_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown key epoch"):
        make_train_config({"epoch": 3})
    with pytest.raises(ConfigError, match=r"batch_size: expected int"):
        make_train_config({}, ["batch_size=big"])
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        make_train_config({}, ["model=nope"])
    with pytest.raises(ConfigError, match="max_length must be at least 8"):
        make_train_config({}, ["max_length=4"])


def test_head_options_dotted_and_bare():
    cfg = make_train_config({"model": "maf"}, ["head.no_cm=true"])
    assert cfg.head["no_cm"] is True
    assert "temperature" in cfg.head  # head defaults are recorded
    bare = make_train_config({}, ["model=maf", "no_cm=true", "epochs=2"])
    assert bare.head == cfg.head and bare.epochs == 2
    with pytest.raises(ConfigError, match="not a train option nor an option of head 'maf'"):
        make_train_config({"model": "maf"}, ["no_such_switch=1"])
    with pytest.raises(ConfigError, match=r"train\.head\.no_cm: expected true or false"):
        make_train_config({"model": "maf"}, ["head.no_cm=3"])


def test_flags_override_section_and_overrides_override_flags():
    cfg = make_train_config({"epochs": 5, "profile": "tiny"}, ["epochs=7"], seeds=[2], epochs=6)
    assert cfg.epochs == 7 and cfg.seeds == (2,)


def test_resolved_scheme_follows_the_head():
    assert TrainConfig(model="maf").resolved_scheme() == "bioes"
    assert TrainConfig(model="maf", scheme="bio2").resolved_scheme() == "bio2"
    assert TrainConfig(model="bert_crf").resolved_scheme() == "bio2"
