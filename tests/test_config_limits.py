"""Limits on what a config, a sweep file or an override may ask, each refused in one line (exit 2
through the CLI) before it takes unbounded time or memory: YAML alias bombs, nesting thousands
deep, sweeps of billions of runs, and numbers that overflow the sizes they multiply.

Every test is safe on code without these limits: bombs are small enough to expand, and the
sweep tests read the cap first (an AttributeError without it) before asking for a huge grid.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error

import bitvit.files as files
import bitvit.studies.sweep as sweep_module
from bitvit.nn.footprint import estimate
from bitvit.nn.model import ViTConfig
from bitvit.studies.sweep import SweepError, load_sweep
from bitvit.training.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
PAPER = str(ROOT / "configs/paper.yaml")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path_factory.getbasetemp() / "config-limits"))


def alias_bomb(levels: int) -> str:
    """A flow list of ``levels`` anchored lists, each of nine aliases of the one before: 9**levels
    values. Kept small here (levels <= 4), so that code without the limit expands it harmlessly."""
    parts = ["&a0 [x,x,x,x,x,x,x,x,x]"]
    parts += [f"&a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"[{', '.join(parts)}]"


def write_sweep(path: Path, grid_text: str) -> Path:
    path.write_text(f"base: {PAPER}\nout: {path.parent / 'out'}\ngrid:\n{grid_text}")
    return path


# --- YAML aliases ---------------------------------------------------------------------------------


def test_an_alias_bomb_in_a_config_is_refused_unexpanded(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"model:\n  dim: {alias_bomb(4)}\n")
    err = one_line_error(capsys, "train", "--config", str(bomb), "--out", str(tmp_path / "r"))
    assert err.endswith(f"{bomb}: YAML aliases of lists and mappings are not supported (anchor "
                        "&a0 at line 2); write the values out")
    assert not (tmp_path / "r").exists()
    # A merge key (<<: *name) aliases a mapping: refused too, through the library.
    merged = tmp_path / "merged.yaml"
    merged.write_text("model: &m {dim: 64}\ntrain: {<<: *m}\n")
    with pytest.raises(ConfigError, match="merged.yaml: YAML aliases of lists and mappings"):
        load_config(merged)


def test_an_alias_bomb_in_a_sweep_or_an_override_is_refused(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep.yaml", f"  train.seed: [{alias_bomb(3)}]\n")
    err = one_line_error(capsys, "sweep", "--dry-run", str(sweep))
    assert f"{sweep}: YAML aliases of lists and mappings are not supported" in err
    err = one_line_error(capsys, "profile", PAPER, f"model.dim={alias_bomb(3)}")
    assert "override model.dim=" in err and "YAML aliases of lists" in err and len(err) < 400


def test_aliases_of_single_values_still_load():
    # studies/kd-cpu.yaml names each teacher once (&teacher) and aliases it in several runs.
    assert files.load_yaml("a: &t runs/x\nb: [*t, *t]\n") == {
        "a": "runs/x", "b": ["runs/x", "runs/x"]}
    assert files.load_yaml("x: 1e-3\nd: 2024-01-02\n") == yaml.safe_load(
        "x: 1e-3\nd: 2024-01-02\n")  # otherwise yaml.safe_load's meaning


# --- nesting --------------------------------------------------------------------------------------


def test_a_config_nested_20000_deep_is_one_line(tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text("model:\n  dim: " + "[" * 20_000 + "]" * 20_000 + "\n")
    err = one_line_error(capsys, "train", "--config", str(deep), "--out", str(tmp_path / "r"))
    assert err.endswith(f"{deep}: nested too deeply (more than 100 levels of lists and mappings "
                        "at line 2)")
    sweep = write_sweep(tmp_path / "sweep.yaml", "  train.seed: " + "[" * 5_000 + "\n")
    assert f"{sweep}: nested too deeply" in one_line_error(capsys, "sweep", "--dry-run",
                                                           str(sweep))


def test_a_recursion_error_while_reading_is_one_line_too(tmp_path, capsys, monkeypatch):
    # MAX_YAML_DEPTH stops the composer first; without it, its recursion is still caught.
    monkeypatch.setattr(files, "MAX_YAML_DEPTH", 10**9)
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 20_000)
    err = one_line_error(capsys, "train", "--config", str(deep))
    assert err.endswith(f"{deep}: nested too deeply; expected a YAML config file")
    err = one_line_error(capsys, "profile", PAPER, "train.epochs=" + "[" * 20_000)
    assert err.endswith(": nested too deeply") and "override train.epochs='[[[" in err


def test_an_override_nested_5000_deep_is_one_line(capsys, tmp_path):
    err = one_line_error(capsys, "train", "--out", str(tmp_path / "r"),
                         "train.epochs=" + "[" * 5_000)
    assert err.startswith("bitvit train: error: override train.epochs='[[[")
    assert err.endswith(": nested too deeply (more than 100 levels of lists and mappings at "
                        "line 1)")
    assert len(err) < 300
    # Just within the limit: read, then refused as the wrong type, in a short line.
    with pytest.raises(ConfigError, match=r"train\.epochs=\[\[\[") as info:
        load_config(None, ["train.epochs=" + "[" * 99 + "]" * 99])
    assert len(str(info.value)) < 300


# --- values in messages ---------------------------------------------------------------------------


def test_messages_show_a_long_value_cut_short(tmp_path):
    long = tmp_path / "long.yaml"
    long.write_text(f"quant:\n  method: {'x' * 500_000}\n")
    with pytest.raises(ConfigError, match="quant.method='xxx") as info:
        load_config(long)
    assert len(str(info.value)) < 400
    long.write_text(f"? {'y' * 300_000}\n: 1\n")  # an explicit key: a plain one is <= 1024
    with pytest.raises(ConfigError, match="unknown section 'yyy") as info:
        load_config(long)
    assert len(str(info.value)) < 400
    with pytest.raises(ConfigError, match="data.mean=") as info:
        load_config(None, [("data.mean", [["z" * 1000] * 1000] * 1000)])
    assert len(str(info.value)) < 400


# --- sweep grids ----------------------------------------------------------------------------------


def test_a_sweep_of_a_billion_runs_is_refused_from_its_sizes(tmp_path, capsys):
    assert sweep_module.MAX_SWEEP_RUNS == 10_000  # (before anything big: absent, no cap)
    keys = ["train.seed", "train.lr", "train.epochs", "data.seed", "train.weight_decay",
            "train.batch_size", "train.warmup_epochs", "train.min_lr", "model.depth"]
    sweep = write_sweep(tmp_path / "big.yaml",
                        "".join(f"  {k}: [{', '.join(map(str, range(1, 11)))}]\n" for k in keys))
    start = time.perf_counter()
    err = one_line_error(capsys, "sweep", "--dry-run", str(sweep))
    assert time.perf_counter() - start < 5
    assert err.endswith(f"{sweep}: the grid and runs give 1,000,000,000 runs; a sweep file may "
                        "give at most 10,000 (split it into several)")
    # runs entries count too: 3 entries of 2 points, crossed with a grid of 2,000
    sweep.write_text(f"base: {PAPER}\nout: out\nruns: [{{quant.method: [fp, b158]}}, "
                     "{quant.method: [sign, xnor]}, {model.depth: [1, 2]}]\n"
                     f"grid: {{train.seed: [{', '.join(map(str, range(2_000)))}]}}\n")
    with pytest.raises(SweepError, match="give 12,000 runs; a sweep file may give at most"):
        load_sweep(sweep)


def test_ten_thousand_runs_load_in_linear_time(tmp_path):
    assert sweep_module.MAX_SWEEP_RUNS == 10_000  # (without the cap, this is minutes of work)
    values = ", ".join(map(str, range(10)))
    grid = "".join(f"  {k}: [{values}]\n" for k in ("train.seed", "data.seed", "train.epochs",
                                                      "model.depth"))
    start = time.perf_counter()
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", grid))
    assert time.perf_counter() - start < 3
    assert len(sweep.points) == len(sweep.run_dirs()) == 10_000
    # Duplicate values still collapse to one run, and twice the same name is still refused.
    sweep = load_sweep(write_sweep(tmp_path / "d.yaml", "  train.seed: [0, 0, [1], [1]]\n"))
    assert list(sweep.run_dirs()) == ["seed=0", "seed=1"]
    with pytest.raises(SweepError, match="gives run seed=1 more than once"):
        load_sweep(write_sweep(tmp_path / "e.yaml", "  train.seed: [1, '1']\n"))


def test_run_names_and_keys_are_bounded(tmp_path):
    long = write_sweep(tmp_path / "long.yaml", f"  data.path: [{'p' * 300}]\n"
                                               "  train.seed: [0, 1]\n")
    with pytest.raises(SweepError, match=r"long.yaml: run name 'path=ppp.*' is 312 bytes; a "
                                         r"folder name is at most 255") as info:
        load_sweep(long)
    assert len(str(info.value)) < 400
    many = write_sweep(tmp_path / "many.yaml", "".join(f"  k.k{i}: 0\n" for i in range(101)))
    with pytest.raises(SweepError, match="vary 101 keys; a sweep file may vary at most 100"):
        load_sweep(many)


# --- numbers that multiply sizes ------------------------------------------------------------------


@pytest.mark.parametrize("override, expected", [
    ("model.mlp_ratio=1e308", "model.mlp_ratio=1e+308: expected a number > 0 and <= 64"),
    ("model.mlp_ratio=65", "model.mlp_ratio=65.0: expected a number > 0 and <= 64"),
    ("model.dim=" + "9" * 400, "model.dim=999"),
    ("train.batch_size=10000000000001", "expected an integer >= 1 and <= 10**12"),
    ("model.depth=100000", "model.depth=100000: expected an integer >= 1 and <= 1000"),
    ("train.seed=" + "1" * 24, "expected an integer >= 0 and < 2**63"),
    ("train.seed=-1", "train.seed=-1: expected an integer >= 0 and < 2**63"),
    ("data.seed=" + "1" * 24, "expected an integer >= 0 and < 2**63"),
    ("data.crop_padding=100000", "data.crop_padding=100000: expected at most model.image_size"),
    # 256 * 0.001 = 0.256: a zero-wide MLP (profile divided by zero, training a traceback).
    ("model.mlp_ratio=0.001", "model.mlp_ratio=0.001: the MLP would be int(model.dim * "
                              "mlp_ratio) = 0 wide; expected at least 0.00390625"),
])
def test_sizes_that_would_overflow_are_refused_by_their_range(capsys, override, expected):
    err = one_line_error(capsys, "profile", PAPER, override)
    assert expected in err and len(err) < 300


def test_warmup_epochs_are_bounded():
    with pytest.raises(ConfigError, match=r"train.warmup_epochs=1e\+308: expected a number >= 0 "
                                          r"and <= 1000000"):
        load_config(None, ["train.warmup_epochs=1e308"])
    assert load_config(None, ["train.warmup_epochs=1000000"]).train.warmup_epochs == 1e6


def test_the_estimate_does_not_overflow_on_sizes_beyond_a_float():
    # The library's ViTConfig takes any size: the estimate is exact rather than an OverflowError.
    huge = ViTConfig(dim=10**400, heads=1, mlp_ratio=4.0)
    assert estimate(huge, 1, True).total > 10**800
    assert estimate(ViTConfig(mlp_ratio=1e308), 1, False).total > 10**300


def test_a_key_given_twice_is_refused_not_silently_the_last(tmp_path, capsys):
    config = tmp_path / "twice.yaml"
    config.write_text("train:\n  lr: 0.001\n  epochs: 3\n  lr: 0.1\n")
    err = one_line_error(capsys, "profile", str(config))
    assert err.endswith(f"{config}: key 'lr' given twice in one mapping (line 4)")
    sweep = write_sweep(tmp_path / "sweep.yaml", "  train.seed: [0, 1]\n  train.seed: [2]\n")
    err = one_line_error(capsys, "sweep", "--dry-run", str(sweep))
    assert f"{sweep}: key 'train.seed' given twice in one mapping (line 5)" in err
    # The same key in two mappings is two settings.
    assert files.load_yaml("a: {x: 1}\nb: {x: 2}\n") == {"a": {"x": 1}, "b": {"x": 2}}


def test_false_is_not_zero_but_zero_is_zero_point_zero(tmp_path):
    # 0 == 0.0 == False in Python. 0 and 0.0 configure the same run (kept once: two would be
    # one experiment counted as two seeds); false is another value, another run.
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", "  model.dropout: [0, 0.0, false]\n"))
    assert [p["model.dropout"] for p in sweep.points] == [0, False]
    assert [type(p["model.dropout"]) for p in sweep.points] == [int, bool]
