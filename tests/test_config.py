"""The strict config loader every stage's frozen dataclass goes through."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mner.config import build, load_section, merge, parse_overrides, to_dict
from mner.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    k: int = 1


@dataclass(frozen=True)
class Cfg:
    n: int = 3
    lr: float = 1e-3
    name: str = "x"
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    seeds: tuple[int, ...] = (1,)
    out: Path = Path("o")
    maybe: int | None = None
    inner: Inner = field(default_factory=Inner)
    extra: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if self.n < 0:
            raise ValueError("n must be >= 0")


def test_defaults_and_conversions():
    cfg = build(Cfg, {"lr": 1, "seeds": [1, 2], "out": "runs/a", "inner": {"k": 5},
                      "maybe": None, "extra": {"a": 2}}, where="p:s")
    assert cfg.n == 3 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.seeds == (1, 2) and cfg.out == Path("runs/a") and cfg.inner == Inner(5)
    assert cfg.extra == {"a": 2}
    assert build(Cfg, {"seeds": "1,2,3"}, where="p").seeds == (1, 2, 3)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"nn": 1}, "p:s: unknown key nn; valid keys: extra, flag, inner"),
        ({"n": "3"}, "p:s.n: expected an integer, got '3'"),
        ({"n": True}, "p:s.n: expected an integer, got True"),
        ({"flag": 1}, "p:s.flag: expected true or false, got 1"),
        ({"mode": "c"}, "p:s.mode: 'c' is not one of 'a', 'b'"),
        ({"inner": {"z": 1}}, "p:s.inner: unknown key z"),
        ({"seeds": [1, "a"]}, "p:s.seeds[1]: expected an integer"),
        ({"n": -1}, "p:s: n must be >= 0"),
    ],
)
def test_errors_name_the_key_and_the_problem(data, message):
    with pytest.raises(ConfigError) as err:
        build(Cfg, data, where="p:s")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_are_yaml_scalars_and_nest():
    over = parse_overrides(["n=5", "flag=true", "name=abc", "inner.k=7", "seeds=[2, 3]"])
    assert over == {"n": 5, "flag": True, "name": "abc", "inner": {"k": 7}, "seeds": [2, 3]}
    merged = merge({"n": 1, "inner": {"k": 1}, "lr": 0.1}, over)
    assert merged["lr"] == 0.1 and merged["inner"] == {"k": 7}
    assert build(Cfg, merged, where="-o").inner.k == 7
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["epochs"])


def test_load_section_and_yaml_errors(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  epochs: 3\nsample: {}\n")
    assert load_section(p, "train") == {"epochs": 3}
    assert load_section(p, "sample") == {}
    assert load_section(p, "absent") == {}
    assert load_section(None, "train") == {}
    p.write_text("train:\n  epochs: [3\n")
    with pytest.raises(ConfigError, match=r"params.yaml:\d+: not valid YAML"):
        load_section(p, "train")
    p.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_section(p, "train")


def test_to_dict_round_trips():
    cfg = build(Cfg, {"seeds": [4], "out": "a/b", "inner": {"k": 2}}, where="p")
    d = to_dict(cfg)
    assert d["out"] == "a/b" and d["seeds"] == [4] and d["inner"] == {"k": 2}
    assert build(Cfg, d, where="p") == cfg


def test_yaml_off_and_on_stay_words_for_string_choices():
    @dataclass(frozen=True)
    class Switch:
        amp: Literal["auto", "off", "on"] = "auto"
        mode: Literal["a", "b"] = "a"

    assert build(Switch, parse_overrides(["amp=off"]), where="-o").amp == "off"
    assert build(Switch, {"amp": True}, where="p").amp == "on"
    with pytest.raises(ConfigError, match="False is not one of 'a', 'b'"):
        build(Switch, {"mode": False}, where="p")
