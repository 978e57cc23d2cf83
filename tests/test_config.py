"""The strict config loader every stage's frozen dataclass goes through."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from mner.config import build, configure, load_section, load_yaml, merge, parse_overrides, to_dict
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


# --- values as users write them, in params.yaml and -o alike (issue 12.9, 13.2) ---------


@dataclass(frozen=True)
class Opt:
    lr: float = 0.1
    threads: int | None = 4
    name: str | None = "x"
    amp: Literal["auto", "off", "on"] = "auto"
    flag: bool = False
    seeds: tuple[int, ...] = (1,)
    features: tuple[str, ...] = ("a",)


def from_params(tmp_path, text: str) -> Opt:
    p = tmp_path / "params.yaml"
    p.write_text("opt:\n" + "".join(f"  {line}\n" for line in text.splitlines()))
    return configure(Opt, "opt", params=p)


def from_o(*items: str) -> Opt:
    return configure(Opt, "opt", overrides=list(items))


@pytest.mark.parametrize("text, value", [
    ("1e-3", 1e-3), ("-1e-5", -1e-5), ("5E-5", 5e-5), ("+2e3", 2000.0), ("1.0e-3", 1e-3),
    ("0.001", 1e-3), ("3", 3.0), (".5", 0.5), ("-.5", -0.5),
])
def test_numbers_in_scientific_notation(tmp_path, text, value):
    assert from_o(f"lr={text}").lr == value
    assert from_params(tmp_path, f"lr: {text}").lr == value
    assert isinstance(from_o(f"lr={text}").lr, float)


def test_scientific_notation_does_not_change_other_yaml(tmp_path):
    assert load_yaml("a: 1e-3\nb: 12\nc: abc1e3\nd: '1e-3'\ne: 1.5\n") == {
        "a": 1e-3, "b": 12, "c": "abc1e3", "d": "1e-3", "e": 1.5}
    assert yaml.safe_load("a: 1e-3") == {"a": "1e-3"}  # PyYAML's own loader is untouched


@pytest.mark.parametrize("word", ["null", "none", "None", "NULL", "~"])
def test_null_words_unset_an_optional_field(tmp_path, word):
    assert from_o(f"threads={word}").threads is None
    assert from_o(f"name={word}").name is None
    assert from_params(tmp_path, f"threads: {word}").threads is None


def test_null_words_are_refused_for_a_required_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^-o lr: expected a number, got None$"):
        from_o("lr=null")
    with pytest.raises(ConfigError, match=r"^-o lr: expected a number, got 'none'$"):
        from_o("lr=none")


def test_off_on_and_true_false(tmp_path):
    assert from_o("amp=off").amp == "off" and from_o("amp=on").amp == "on"
    assert from_params(tmp_path, "amp: off").amp == "off"
    assert from_o("flag=true").flag is True and from_o("flag=false").flag is False
    assert from_params(tmp_path, "flag: true").flag is True
    with pytest.raises(ConfigError, match=r"^-o flag: expected true or false, got 'maybe'$"):
        from_o("flag=maybe")


def test_comma_lists_and_single_values(tmp_path):
    assert from_o("seeds=1,2,3").seeds == (1, 2, 3)
    assert from_o("seeds=1, 2").seeds == (1, 2)
    assert from_o("seeds=[4, 5]").seeds == (4, 5)
    assert from_o("seeds=7").seeds == (7,)
    assert from_params(tmp_path, "seeds: 1,2").seeds == (1, 2)
    assert from_params(tmp_path, "features: b").features == ("b",)
    assert configure(Opt, "opt", flags={"seeds": "3,4"}).seeds == (3, 4)
    assert configure(Opt, "opt", flags={"seeds": "9"}).seeds == (9,)


@pytest.mark.parametrize("text, message", [
    ("1,,2", "--seeds: '1,,2' has an empty item; write values separated by commas, e.g. 1,2,3"),
    ("1,2,", "--seeds: '1,2,' has an empty item; write values separated by commas, e.g. 1,2,3"),
    ("", "--seeds: '' has an empty item; write values separated by commas, e.g. 1,2,3"),
    ("1,a", "--seeds[1]: expected an integer, got 'a'"),
])
def test_bad_comma_lists_are_one_line_errors(text, message):
    with pytest.raises(ConfigError) as err:
        configure(Opt, "opt", flags={"seeds": text})
    assert str(err.value) == message
    with pytest.raises(ConfigError) as err:
        from_o(f"seeds={text}")
    assert "-o seeds" in str(err.value) and "\n" not in str(err.value)


# --- configure: the one path from params section, flags and -o ------------------------


def test_configure_order_is_params_then_flags_then_overrides(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("opt:\n  lr: 0.5\n  threads: 2\n  name: fromfile\n")
    cfg = configure(Opt, "opt", params=p, flags={"threads": 3, "name": None},
                    overrides=["threads=5"])
    assert (cfg.lr, cfg.threads, cfg.name) == (0.5, 5, "fromfile")
    cfg = configure(Opt, "opt", params=p, flags={"threads": 3})
    assert cfg.threads == 3
    assert configure(Opt, "opt", params=tmp_path / "absent.yaml") == Opt()


def test_configure_errors_name_the_source(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("opt:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=rf"^{p}:opt\.lr: expected a number, got 'fast'$"):
        configure(Opt, "opt", params=p, overrides=["lr=1e-3"])
    p.write_text("opt:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=rf"^{p}:opt: unknown key lrr; valid keys: amp, "):
        configure(Opt, "opt", params=p)
    with pytest.raises(ConfigError, match=r"^-o: unknown key lrr; valid keys: amp, "):
        configure(Opt, "opt", overrides=["lrr=1"])
    with pytest.raises(ConfigError, match=r"^--threads: expected int \| None, got 'x'$"):
        configure(Opt, "opt", flags={"threads": "x"})
    with pytest.raises(ConfigError, match=r"^-o 'lr': expected key=value"):
        configure(Opt, "opt", overrides=["lr"])


def test_configure_cross_field_errors_name_the_merged_sources(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("cfg:\n  n: 1\n")
    with pytest.raises(ConfigError, match=r"^cfg \(params \+ flags \+ -o\): n must be >= 0$"):
        configure(Cfg, "cfg", params=p, flags={"name": "y"}, overrides=["n=-1"])
    p.write_text("cfg:\n  n: -1\n")
    with pytest.raises(ConfigError, match=rf"^{p}:cfg: n must be >= 0$"):
        configure(Cfg, "cfg", params=p)
