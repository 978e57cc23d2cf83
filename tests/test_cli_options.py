"""One spelling of the shared options on every command, and values read the same way."""

from __future__ import annotations

import pytest
import typer

from mner.pipeline.cli import app


def commands(group=None, prefix=""):
    """(name, click command) for every leaf command of the ``mner`` app."""
    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from commands(cmd, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", cmd


def test_every_override_option_is_spelled_o_and_set():
    with_override = {}
    for name, cmd in commands():
        for p in cmd.params:
            if p.name == "override":
                with_override[name] = (p.opts, p.multiple)
            if p.name == "params":
                assert p.opts == ["--params"], name
    assert set(with_override) == {"sample", "data stats", "score", "extract", "train", "report"}
    assert all(v == (["-o", "--set"], True) for v in with_override.values()), with_override


def test_train_keeps_override_as_a_hidden_alias(mner_cli, tmp_path):
    train = dict(commands())["train"]
    alias = [p for p in train.params if "--override" in p.opts]
    assert len(alias) == 1 and alias[0].hidden
    code, out, _ = mner_cli("train", "--help")
    assert code == 0 and "--set" in out and "--override" not in out
    for spelling in ("-o", "--set", "--override"):
        code, _, err = mner_cli("train", "--data", tmp_path, "--out", tmp_path / "run",
                                "--profile", "tiny", spelling, "epochz=3")
        assert code == 2
        assert err.startswith("error: -o epochz: not a train option nor an option of head")
        assert err.count("\n") == 1


@pytest.mark.parametrize("seeds, message", [
    ("1,,2", "error: --seeds: '1,,2' has an empty item; write values separated by commas, "
             "e.g. 1,2,3\n"),
    ("", "error: --seeds: '' has an empty item; write values separated by commas, e.g. 1,2,3\n"),
    ("1,a", "error: --seeds[1]: expected an integer, got 'a'\n"),
    ("1,1", "error: train (flags): seeds must be distinct, got [1, 1]\n"),
])
def test_train_seeds_errors_are_one_line(mner_cli, tmp_path, seeds, message):
    code, _, err = mner_cli("train", "--data", tmp_path, "--out", tmp_path / "run",
                            "--seeds", seeds)
    assert (code, err) == (2, message)
    assert not (tmp_path / "run").exists()


def test_train_reads_scientific_notation_and_null(tmp_path):
    from mner.config import configure
    from mner.train.config import TrainConfig, route_head_options

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  profile: tiny\n  lr_head: 1e-3\n  threads: null\n")
    cfg = configure(TrainConfig, "train", params=params, flags={"seeds": "1,2,3"},
                    overrides=["lr_encoder=5E-5", "warmup_ratio=0", "encoder=none",
                               "model=maf", "no_cm=true"], route=route_head_options)
    assert (cfg.lr_head, cfg.lr_encoder, cfg.threads) == (1e-3, 5e-5, None)
    assert cfg.seeds == (1, 2, 3) and cfg.encoder == "tiny"  # none: the profile's encoder
    assert cfg.head["no_cm"] is True
