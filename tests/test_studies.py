"""Sweeps (naming, skip, resume), the statistics against hand formulas, compare and report."""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error
from scipy import stats

from bitvit.cli import main
from bitvit.studies.figures import plot_dots, plot_groups
from bitvit.studies.report import (
    compare,
    compare_groups,
    compare_markdown,
    write_report,
)
from bitvit.studies.runs import devices, find_run_dirs, group_runs, load_run
from bitvit.studies.schedule import SMALL_FILES, _train_in_process, run_sweep
from bitvit.studies.stats import summarize, welch_difference
from bitvit.studies.sweep import (
    RUNS_ROOT_ENV,
    SweepError,
    load_sweep,
    plan_sweep,
    run_name,
    sweep_config,
)
from bitvit.training import rundir
from bitvit.training.config import load_config, save_config
from bitvit.training.rundir import METRIC_COLUMNS, read_metrics, write_metrics

ROOT = Path(__file__).resolve().parents[1]
PAPER = str(ROOT / "configs/paper.yaml")


def write_sweep(path: Path, **fields) -> Path:
    raw = {"base": PAPER, "out": str(path.parent / "out"), **fields}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def fake_run(run_dir: Path, overrides: list[str], test_acc: list[float], status: str = "finished",
             epochs: int | None = None, device: str = "cpu (test, 2 threads)",
             train_acc: list[float] | None = None, test_loss: list[float] | None = None,
             weights: bool = False) -> Path:
    """A run folder as train() writes it, with the given per-epoch numbers."""
    n = len(test_acc)
    config = load_config(PAPER, [f"train.epochs={epochs or n}", *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    train_acc = train_acc or [a + 0.1 for a in test_acc]
    test_loss = test_loss or [2.0 - a for a in test_acc]
    rows = [{"epoch": e + 1, "train_loss": 2.0 - train_acc[e], "train_acc": train_acc[e],
             "test_loss": test_loss[e], "test_acc": test_acc[e], "lr": 1e-3, "seconds": 10.0}
            for e in range(n)]
    write_metrics(run_dir / "metrics.csv", rows, METRIC_COLUMNS)
    (run_dir / "run.json").write_text(json.dumps(
        {"command": ["bitvit", "train"], "device": device, "status": status,
         "wall_seconds": 10.0 * n}))
    if weights:
        (run_dir / "last").mkdir()
        (run_dir / "last/model.safetensors").write_bytes(b"x")
        (run_dir / "last/state.pt").write_bytes(b"x")
    return run_dir


# --- sweep files and names ----------------------------------------------------------------------


def test_sweep_points_and_names(tmp_path):
    sweep = load_sweep(write_sweep(
        tmp_path / "s.yaml", overrides=["train.epochs=3"],
        runs=[{"quant.method": ["fp", "b158"]},
              {"quant.method": ["sign", "xnor"], "quant.where": ["all", "mlp", "attn"],
               "quant.act_bits": [None, 1]}],
        grid={"train.seed": [0, 1, 2]}))
    names = list(sweep.run_dirs())
    assert len(names) == (2 + 2 * 3 * 2) * 3
    assert names[:2] == ["method=fp_seed=0", "method=b158_seed=0"]  # grid-major: seeds outer
    assert "method=sign_where=mlp_act_bits=1_seed=2" in names
    assert "method=xnor_where=attn_act_bits=none_seed=0" in names
    # Keys sharing a last part are spelled out; odd characters become '-'.
    assert run_name({"train.seed": 1, "data.seed": 2}) == "train-seed=1_data-seed=2"
    assert run_name({"data.path": "a/b c"}) == "path=a-b-c"
    assert run_name({"model.dropout": 0.1, "quant.method": "b158"}) == "dropout=0.1_method=b158"


def test_a_runs_entry_replaces_the_grid_values_of_the_keys_it_sets(tmp_path):
    # One method gets an extra learning rate without the others being crossed with it.
    sweep = load_sweep(write_sweep(
        tmp_path / "s.yaml",
        runs=[{"quant.method": ["fp", "b158"]}, {"quant.method": "fp", "train.lr": 3e-5}],
        grid={"train.lr": [1e-4, 1e-3], "train.seed": [0, 1]}))
    names = list(sweep.run_dirs())
    assert len(names) == (2 * 2 + 1) * 2
    assert names[:5] == ["method=fp_lr=0.0001_seed=0", "method=b158_lr=0.0001_seed=0",
                         "method=fp_lr=3e-05_seed=0", "method=fp_lr=0.0001_seed=1",
                         "method=b158_lr=0.0001_seed=1"]
    assert [p["train.lr"] for p in sweep.points if p["quant.method"] == "fp"].count(3e-5) == 2


@pytest.mark.parametrize("fields, message", [
    ({"grid": {"quant.method": ["fp"]}, "gird": {}}, "unknown key 'gird'"),
    ({"grid": {"method": ["fp"]}}, "expected section.key"),
    ({"grid": {"quant.method": []}}, "empty list"),
    ({"runs": [{"quant.method": "fp"}, {"quant.method": "fp"}]}, "more than once"),
    ({}, "no grid"),
    ({"grid": {"train.seed": [0]}, "full_epochs": True}, "'full_epochs' must be a positive"),
    ({"grid": {"train.seed": [0]}, "out": ""}, "'out' must be a path"),
])
def test_bad_sweep_files(tmp_path, fields, message):
    with pytest.raises(SweepError, match=message):
        load_sweep(write_sweep(tmp_path / "s.yaml", **fields))


def test_every_committed_sweep_file_loads_and_builds_its_configs():
    files = sorted((ROOT / "studies").glob("*.yaml"))
    assert len(files) >= 6
    for path in files:
        sweep = load_sweep(path)
        for point in sweep.points:
            sweep_config(sweep, point)  # raises on a bad key or value
    s2 = load_sweep(ROOT / "studies/study2-cpu.yaml")
    assert len(s2.points) == 48  # (fp, b158, b158c, twn, 2 methods x 3 places x 2 acts) x 3 seeds


# --- sweep bookkeeping --------------------------------------------------------------------------


@pytest.fixture
def fake_train(monkeypatch):
    """Replace train() with one that records its call and writes a finished run folder."""
    calls = []

    def train(config, out=None, resume=None, quiet=False, command=None, teacher_loader=None):
        run_dir = Path(resume or out)
        calls.append((run_dir.name, "resume" if resume else "new", command))
        fake_run(run_dir, [f"quant.method={config.quant.method}",
                           f"train.seed={config.train.seed}"], [0.5] * config.train.epochs)

    # bitvit.train is also the name of the function in the package, so patch the module itself.
    monkeypatch.setattr(importlib.import_module("bitvit.training.loop"), "train", train)
    return calls


def test_sweep_skips_finished_resumes_interrupted_restarts_the_rest(tmp_path, fake_train):
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", overrides=["train.epochs=2"],
                                   grid={"quant.method": ["fp", "b158"], "train.seed": [0, 1]}))
    out = sweep.out
    fake_run(out / "method=fp_seed=0", ["train.seed=0"], [0.5, 0.5])
    fake_run(out / "method=fp_seed=1", ["train.seed=1"], [0.5], status="interrupted",
             epochs=2, weights=True)
    stale = fake_run(out / "method=b158_seed=0", ["quant.method=b158"], [0.5],
                     status="interrupted", epochs=2)  # no last/: start again
    states = {r.name: r.state for r in plan_sweep(sweep)}
    assert states == {"method=fp_seed=0": "finished", "method=fp_seed=1": "resume",
                      "method=b158_seed=0": "restart", "method=b158_seed=1": "new"}

    run_sweep(sweep, dry_run=True, log=lambda *_: None)
    assert fake_train == [] and not (out / "sweep.yaml").exists()

    run_sweep(sweep, argv=["bitvit", "sweep", "s.yaml"], log=lambda *_: None)
    assert [(name, how) for name, how, _ in fake_train] == [
        ("method=fp_seed=1", "resume"), ("method=b158_seed=0", "new"),
        ("method=b158_seed=1", "new")]
    assert stale.exists() and len(load_run(stale).rows) == 2
    # What the restarted folder held is moved aside, not deleted.
    [aside] = out.glob("method=b158_seed=0.restart-*")
    assert len(load_run(aside).rows) == 1
    # The recorded command trains exactly that run.
    _, _, command = fake_train[2]
    assert command[:2] == ["bitvit", "train"] and '"b158"' in " ".join(command)
    assert (out / "sweep.yaml").is_file()
    assert (out / "commands.txt").read_text() == "bitvit sweep s.yaml\n"
    # A line that records the same command with environment settings counts as recorded.
    (out / "commands.txt").write_text("# note\nOMP_NUM_THREADS=1 bitvit sweep s.yaml\n")
    from bitvit.studies.schedule import _record_sweep
    _record_sweep(sweep, ["bitvit", "sweep", "s.yaml"])
    assert (out / "commands.txt").read_text() == "# note\nOMP_NUM_THREADS=1 bitvit sweep s.yaml\n"
    _record_sweep(sweep, ["bitvit", "sweep", "s.yaml", "--parallel", "2"])
    assert (out / "commands.txt").read_text().endswith("\nbitvit sweep s.yaml --parallel 2\n")

    fake_train.clear()
    run_sweep(sweep, log=lambda *_: None)  # everything finished now
    assert fake_train == []

    # More epochs extend finished runs; a changed experiment is refused.
    states = {r.name: r.state for r in plan_sweep(sweep, ["train.epochs=3"])}
    assert states.pop("method=fp_seed=1") == "resume"  # the one run with a last/ checkpoint
    assert set(states.values()) == {"restart"}
    with pytest.raises(SweepError, match="model.dropout"):
        plan_sweep(sweep, ["model.dropout=0.2"])
    with pytest.raises(SweepError, match="holds 2 epochs"):
        plan_sweep(sweep, ["train.epochs=1"])


def test_sweep_skips_a_run_another_sweep_is_training(tmp_path, fake_train):
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", overrides=["train.epochs=1"],
                                   grid={"train.seed": [0]}))
    run = sweep.out / "seed=0"
    run.mkdir(parents=True)
    # Another process holds the run folder's lock, as a `bitvit train` into it does.
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert plan_sweep(sweep)[0].state == "running"
        lines = []
        run_sweep(sweep, log=lines.append)
    finally:
        holder.kill()
        holder.wait()
    assert fake_train == [] and any(line.startswith("running") for line in lines)
    # Taking the lock between the plan and the claim: busy, named by the holder's pid.
    plan = plan_sweep(sweep)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lines = []
        _train_in_process(plan[0], sweep, lines.append)
    finally:
        holder.kill()
        holder.wait()
    assert fake_train == [] and lines == [f"busy      {run} (pid {holder.pid} is training it)"]


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_sweep_cli_resumes_a_real_run_to_more_epochs(real_env, tmp_path, monkeypatch):
    tiny = ["model.dim=32", "model.depth=2", "model.heads=4", "model.patch_size=8",
            "data.limit_train=500", "data.limit_test=200", "train.batch_size=50"]
    path = write_sweep(tmp_path / "s.yaml", overrides=[*tiny, "train.epochs=1"],
                       grid={"quant.method": ["b158"], "train.seed": [0]})
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(path)]) == 0
    run = tmp_path / "out/method=b158_seed=0"
    assert load_run(run).finished and (run / "last/state.pt").is_file()
    assert main(["sweep", str(path), "train.epochs=2"]) == 0  # extends: resumes from last/
    result = load_run(run)
    assert [r["epoch"] for r in result.rows] == [1, 2] and result.finished
    assert result.info["command"][:3] == ["bitvit", "train", "--resume"]
    assert result.info["resumed_from"][0]["status"] == "finished"


def test_a_sweep_with_a_runs_root_trains_outside_and_copies_the_small_files(
        real_env, tmp_path, monkeypatch):
    tiny = ["model.dim=32", "model.depth=1", "model.heads=2", "model.patch_size=8",
            "data.limit_train=300", "data.limit_test=100", "train.batch_size=50"]
    path = write_sweep(tmp_path / "s.yaml", overrides=[*tiny, "train.epochs=2"],
                       runs_root=str(tmp_path / "root"), grid={"train.seed": [0]})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(RUNS_ROOT_ENV, raising=False)
    assert main(["sweep", str(path)]) == 0
    run, copy = tmp_path / "root/out/seed=0", tmp_path / "out/seed=0"
    assert (run / "last/model.safetensors").is_file()  # weights stay in the runs root ...
    assert sorted(p.name for p in copy.iterdir()) == sorted(SMALL_FILES)  # ... not here
    for name in SMALL_FILES:
        assert (copy / name).read_bytes() == (run / name).read_bytes()
    assert load_run(copy).finished and (tmp_path / "out/commands.txt").is_file()
    reference = (copy / "metrics.csv").read_text()

    # The runs root is gone (a new machine): the committed finished run stands, untrained ...
    shutil.rmtree(tmp_path / "root")
    [planned] = plan_sweep(load_sweep(path))
    assert (planned.state, planned.run_dir) == ("finished", copy)
    assert main(["sweep", str(path)]) == 0
    assert not (tmp_path / "root").exists() and (copy / "metrics.csv").read_text() == reference
    # ... and one it holds unfinished (asked for a third epoch) trains again from epoch 1, to
    # the same numbers.
    assert [r.state for r in plan_sweep(load_sweep(path), ["train.epochs=3"])] == ["new"]
    assert main(["sweep", str(path), "train.epochs=3"]) == 0
    assert _without_seconds(copy / "metrics.csv")[:3] == _without_seconds_text(reference)
    assert len(_without_seconds(copy / "metrics.csv")) == 4 and load_run(copy).finished

    # --sync copies without training; $BITVIT_RUNS_ROOT moves the root.
    (copy / "run.json").unlink()
    assert main(["sweep", str(path), "--sync"]) == 0 and (copy / "run.json").is_file()
    monkeypatch.setenv(RUNS_ROOT_ENV, str(tmp_path / "elsewhere"))
    assert load_sweep(path).run_dir("seed=0") == tmp_path / "elsewhere/out/seed=0"


def test_a_sweep_names_the_other_torch_or_cpu_its_earlier_runs_were_trained_under(
        real_env, tmp_path, monkeypatch):
    tiny = ["model.dim=32", "model.depth=1", "model.heads=2", "model.patch_size=8",
            "data.limit_train=300", "data.limit_test=100", "train.batch_size=50"]
    path = write_sweep(tmp_path / "s.yaml", overrides=[*tiny, "train.epochs=1"],
                       grid={"train.seed": [0, 1]})
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(path)]) == 0
    lines: list[str] = []
    run_sweep(load_sweep(path), ["train.epochs=2"], dry_run=True, log=lines.append)
    assert not any(line.startswith("TORCH") for line in lines)  # the same torch: nothing said
    info_file = tmp_path / "out/seed=1/run.json"
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), "torch": "1.0.0"}))
    lines.clear()
    run_sweep(load_sweep(path), ["train.epochs=2"], dry_run=True, log=lines.append)
    import torch

    assert lines[-1] == (f"TORCH     1 run(s) of this sweep were trained under torch 1.0.0, this "
                         f"is {torch.__version__}: runs trained now will not reproduce theirs")
    lines.clear()
    run_sweep(load_sweep(path), dry_run=True, log=lines.append)  # nothing to train: not said
    assert not any(line.startswith("TORCH") for line in lines)

    # Another CPU, where run.json names it (fp32 rounds otherwise there), is said the same way.
    from bitvit.training.record import cpu_name

    here = cpu_name(torch.device("cpu"))
    assert json.loads((tmp_path / "out/seed=0/run.json").read_text())["cpu"] == here
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()),
                                     "torch": torch.__version__, "cpu": "Other CPU (AVX2)"}))
    lines.clear()
    run_sweep(load_sweep(path), ["train.epochs=2"], dry_run=True, log=lines.append)
    assert not any(line.startswith("TORCH") for line in lines)
    assert lines[-1] == (f"CPU       1 run(s) of this sweep were trained on Other CPU (AVX2), "
                         f"this is {here}: runs trained now will not reproduce theirs")


def test_sync_drops_an_earlier_attempts_files_the_restarted_run_has_not_written(tmp_path):
    from bitvit.studies.schedule import sync_results

    path = write_sweep(tmp_path / "s.yaml", overrides=["train.epochs=3"],
                       runs_root=str(tmp_path / "root"), grid={"train.seed": [0]})
    sweep = load_sweep(path)
    copy = fake_run(sweep.out / "seed=0", [], [0.4, 0.5], status="running", epochs=3)
    run = sweep.run_dir("seed=0")  # the restart, before its first epoch ends
    run.mkdir(parents=True)
    for name in ("config.yaml", "run.json"):
        shutil.copy(copy / name, run / name)
    (run / "run.json").write_text(json.dumps({**json.loads((run / "run.json").read_text()),
                                              "start": "2026-12-06T20:00:00+00:00"}))
    (copy / "curves.png").write_bytes(b"old")
    assert sync_results(sweep) == ["seed=0"]
    assert sorted(p.name for p in copy.iterdir()) == ["config.yaml", "run.json"]
    assert (copy / "run.json").read_bytes() == (run / "run.json").read_bytes()
    assert load_run(copy).rows == []


def test_sync_keeps_a_finished_copy_and_another_experiments_copy(tmp_path):
    from bitvit.studies.schedule import sync_results

    path = write_sweep(tmp_path / "s.yaml", overrides=["train.epochs=2"],
                       runs_root=str(tmp_path / "root"), grid={"train.seed": [0]})
    sweep = load_sweep(path)
    copy = fake_run(sweep.out / "seed=0", ["train.seed=0"], [0.4, 0.5])  # finished, committed
    stale = fake_run(sweep.run_dir("seed=0"), ["train.seed=0"], [0.4], status="interrupted",
                     epochs=2, weights=True)  # an older attempt put back in the runs root
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    assert sync_results(sweep) == []
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    [planned] = plan_sweep(sweep)  # the finished copy stands: not trained again
    assert (planned.state, planned.run_dir) == ("finished", copy)
    # A runs-root folder of another experiment (the sweep file changed) is not copied over it.
    shutil.rmtree(stale)
    fake_run(sweep.run_dir("seed=0"), ["train.seed=0", "train.lr=0.5"], [0.4, 0.6])
    assert sync_results(sweep) == []
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    # A stale attempt that finished a shorter run (its own config: 1 epoch) is no more.
    shutil.rmtree(sweep.run_dir("seed=0"))
    fake_run(sweep.run_dir("seed=0"), ["train.seed=0"], [0.4])
    assert sync_results(sweep) == [] and plan_sweep(sweep)[0].state == "finished"
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    # The finished run itself, in the runs root: copied as before; extended, its third epoch too.
    shutil.rmtree(sweep.run_dir("seed=0"))
    shutil.copytree(copy, sweep.run_dir("seed=0"))
    assert sync_results(sweep) == ["seed=0"]
    fake_run(sweep.run_dir("seed=0"), ["train.seed=0"], [0.4, 0.5, 0.6], status="running",
             epochs=4)
    assert sync_results(sweep, ["train.epochs=4"]) == ["seed=0"]
    assert len(load_run(copy).rows) == 3


def test_a_run_folder_moved_aside_while_synced_is_left_for_the_next_sync(tmp_path,
                                                                         monkeypatch):
    from bitvit.studies.schedule import sync_results

    path = write_sweep(tmp_path / "s.yaml", overrides=["train.epochs=2"],
                       runs_root=str(tmp_path / "root"), grid={"train.seed": [0]})
    sweep = load_sweep(path)
    fake_run(sweep.run_dir("seed=0"), ["train.seed=0"], [0.4], status="running", epochs=2)
    read_bytes = Path.read_bytes

    def gone(self):
        if self.name == "metrics.csv" and sweep.runs_root in self.parents:
            raise FileNotFoundError(self)
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", gone)
    assert sync_results(sweep) == [] and not (sweep.out / "seed=0").exists()
    monkeypatch.undo()
    assert sync_results(sweep) == ["seed=0"]


def test_a_run_folder_of_another_seed_is_not_the_run_a_sweep_asks_for(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", overrides=["train.epochs=2", "train.seed=7"],
                       grid={"quant.method": ["b158"]})
    fake_run(tmp_path / "out/method=b158", ["quant.method=b158", "train.seed=1"], [0.4, 0.5])
    with pytest.raises(SweepError, match="holds a run with train.seed=1 but the sweep asks "
                                         "train.seed=7"):
        plan_sweep(load_sweep(path))


def test_sync_and_dry_run_together_are_refused(tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml", runs_root=str(tmp_path / "root"),
                       grid={"train.seed": [0]})
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(path), "--sync", "--dry-run"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_sync_needs_a_runs_root(tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml", grid={"train.seed": [0]})
    assert main(["sweep", str(path), "--sync"]) == 2
    assert "needs a sweep file with runs_root" in capsys.readouterr().err


def _without_seconds_text(text: str) -> list[list[str]]:
    rows = [line.split(",") for line in text.strip().splitlines()]
    drop = rows[0].index("seconds")
    return [[c for i, c in enumerate(r) if i != drop] for r in rows]


def _without_seconds(path: Path) -> list[list[str]]:
    return _without_seconds_text(path.read_text())


# --- statistics ---------------------------------------------------------------------------------


def test_summary_uses_sample_std():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert (s.n, s.mean, s.min, s.max) == (4, 2.5, 1.0, 4.0)
    assert s.std == pytest.approx(math.sqrt(5 / 3))
    assert math.isnan(summarize([1.0]).std)


def test_welch_difference_matches_hand_formulas():
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]  # means 2, 4; variances 1, 4
    d = welch_difference(a, b, margin=0.5)
    se = math.sqrt(1 / 3 + 4 / 3)
    df = (5 / 3) ** 2 / ((1 / 3) ** 2 / 2 + (4 / 3) ** 2 / 2)
    assert df == pytest.approx(50 / 17)
    assert d.diff == pytest.approx(-2.0) and d.df == pytest.approx(df)
    half = stats.t.ppf(0.975, df) * se
    assert (d.ci_low, d.ci_high) == (pytest.approx(-2 - half), pytest.approx(-2 + half))
    assert d.p_value == pytest.approx(2 * stats.t.sf(2 / se, df))
    tost = max(stats.t.sf((-2 + 0.5) / se, df), stats.t.cdf((-2 - 0.5) / se, df))
    assert d.tost_p == pytest.approx(tost)
    assert d.verdict == "inconclusive"  # p ~ 0.2: no evidence either way with 3 seeds


def test_tost_verdict_flips_with_the_margin():
    fp, q = [0.500, 0.510, 0.490], [0.502, 0.497, 0.506]
    wide, narrow = welch_difference(q, fp, margin=0.05), welch_difference(q, fp, margin=0.001)
    assert wide.equivalent and wide.verdict == "equivalent" and wide.tost_p < 0.05
    assert not narrow.equivalent and narrow.verdict == "inconclusive"
    far = welch_difference([0.60, 0.61, 0.62], fp, margin=0.01)
    assert far.significant and not far.equivalent and far.verdict == "differs"
    assert far.ci_low > 0


def test_difference_needs_two_seeds_per_group():
    d = welch_difference([0.5], [0.4, 0.45], margin=0.01)
    assert not d.available and d.verdict == "n/a" and "2 seeds" in d.reason
    assert d.diff == pytest.approx(0.075)


# --- grouping, table and figure -----------------------------------------------------------------


def study1(tmp_path: Path) -> Path:
    """fp and b158, 3 seeds each (one b158 run unfinished), plus one bitnet run."""
    out = tmp_path / "study"
    for seed, acc in enumerate([0.49, 0.50, 0.51]):
        fake_run(out / f"method=fp_seed={seed}", [f"train.seed={seed}"], [0.3, acc])
    for seed, acc in enumerate([0.52, 0.53]):
        fake_run(out / f"method=b158_seed={seed}", ["quant.method=b158", f"train.seed={seed}",
                                                    "quant.act_bits=8"], [0.3, acc])
    fake_run(out / "method=b158_seed=2", ["quant.method=b158", "train.seed=2"], [0.3],
             status="interrupted", epochs=2)
    fake_run(out / "method=bitnet_seed=0", ["quant.method=bitnet"], [0.3, 0.4])
    return out


def test_groups_labels_and_unfinished_runs(tmp_path):
    runs = [load_run(p) for p in find_run_dirs([study1(tmp_path)])]
    groups = {g.label: g for g in group_runs(runs)}
    assert list(groups) == ["fp", "b158", "bitnet"]  # fp first; act_bits default == 8
    assert [r.seed for r in groups["b158"].runs] == [0, 1]
    assert [r.path.name for r in groups["b158"].unfinished] == ["method=b158_seed=2"]
    assert len(group_runs(runs, include_unfinished=True)[1].runs) == 3

    where = [load_run(fake_run(tmp_path / n, ov, [0.4])) for n, ov in [
        ("a", ["quant.method=sign", "quant.where=mlp", "quant.act_bits=1"]),
        ("b", ["quant.method=sign", "quant.where=mlp", "quant.act_bits=none"]),
        ("c", ["quant.method=sign", "quant.where=attn", "quant.act_bits=none"]),
        ("d", ["quant.where=attn"])]]  # fp: where does nothing
    assert [g.label for g in group_runs(where)] == ["fp", "sign attn act-fp", "sign mlp act-fp",
                                                    "sign mlp act1"]


def test_a_group_refuses_one_seed_twice_and_times_its_epochs(tmp_path):
    import shutil

    out = study1(tmp_path)
    copy = shutil.copytree(out / "method=fp_seed=1", tmp_path / "elsewhere" / "fp1")
    runs = [load_run(p) for p in find_run_dirs([out])]
    with pytest.raises(SweepError, match=r"fp1: both are seed 1 of group 'fp'; a group's runs "
                                         "must be different seeds"):
        group_runs([*runs, load_run(copy)])
    # The time of the epochs kept, whatever run.json says (a killed invocation writes none).
    info = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**info, "wall_seconds": None}))
    assert load_run(copy).epoch_seconds == 20.0  # two epochs of 10 s
    from bitvit.studies.tables import fmt

    assert (fmt(20.0, "epoch_seconds"), fmt(2.34, "epoch_seconds")) == ("0.3 min", "2.3 s")
    rows = read_metrics(copy / "metrics.csv")
    rows[0]["seconds"] = math.nan
    write_metrics(copy / "metrics.csv", rows, METRIC_COLUMNS)
    assert math.isnan(load_run(copy).epoch_seconds)
    write_metrics(copy / "metrics.csv", rows, [c for c in METRIC_COLUMNS if c != "train_loss"])
    with pytest.raises(SweepError, match="no train_loss column"):
        load_run(copy)


def test_compare_writes_table_and_figure(tmp_path):
    out = tmp_path / "cmp"
    groups, text = compare([study1(tmp_path)], out=out, full_epochs=100)
    assert (out / "compare.png").stat().st_size > 10_000
    assert (out / "compare.md").read_text() == text
    assert "cpu (test, 2 threads)" in text and "2 of 100 epochs" in text
    # test acc over the last 5 epochs (both of these runs' 2), then at the final epoch.
    assert "| fp | 0, 1, 2 | 40.00 ± 0.50 | 50.00 ± 1.00 |" in text
    assert "| b158 (1 unfinished) | 0, 1 | 41.25 ± 0.35 | 52.50 ± 0.71 |" in text
    assert "bitnet | 0 | 35.00 (1 seed) | 40.00 (1 seed)" in text
    assert "method=b158_seed=2: 1 of 2 epochs, status interrupted" in text
    assert "left out of the statistics" in text
    b158 = next(g for g in groups if g.label == "b158")
    d = b158.vs_fp["final_test_acc"]
    raw = welch_difference([0.52, 0.53], [0.49, 0.50, 0.51], 0.01)
    assert (d.diff, d.ci_low, d.ci_high, d.p_value) == (raw.diff, raw.ci_low, raw.ci_high,
                                                        raw.p_value)
    assert f"| b158 | test acc, final | +2.50 [{d.ci_low * 100:+.2f}, {d.ci_high * 100:+.2f}] " \
           f"| {d.p_value:.3g} | {d.p_adjusted:.3g} |" in text
    assert ("| bitnet | test acc, final | -10.00 | n/a | n/a | n/a | n/a | n/a | n/a: needs at "
            "least 2 seeds") in text
    assert "margin of ±1 accuracy points and ±0.05 loss" in text


def test_compare_cli(tmp_path, capsys):
    study = study1(tmp_path)
    assert main(["compare", str(study / "method=fp_seed=0"), str(study / "method=fp_seed=1"),
                 "--margin", "0.02"]) == 0
    assert "| fp | 0, 1 |" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "nothing")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_report_from_a_small_results_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies/one.yaml").write_text(yaml.safe_dump({
        "title": "Study one", "question": "Is b158 as good as fp?", "base": PAPER,
        "overrides": ["train.epochs=2"], "full_epochs": 100, "out": "results/one",
        "grid": {"quant.method": ["fp", "b158"], "train.seed": [0, 1]}}))
    (tmp_path / "studies/later.yaml").write_text(yaml.safe_dump({
        "title": "Study later", "base": PAPER, "out": "results/later",
        "grid": {"train.seed": [0]}}))
    for seed in (0, 1):
        fake_run(tmp_path / f"results/one/method=fp_seed={seed}", [f"train.seed={seed}"],
                 [0.3, 0.5 + seed / 100])
    fake_run(tmp_path / "results/one/method=b158_seed=0", ["quant.method=b158"], [0.3, 0.52])
    (tmp_path / "results/one/commands.txt").write_text("bitvit sweep studies/one.yaml\n")

    path = write_report("results", "studies")
    text = path.read_text()
    assert text.startswith("# Results")
    assert "## Study one" in text and "Question: Is b158 as good as fp?" in text
    assert "bitvit sweep studies/one.yaml\n" in text
    assert "2 of 100 epochs" in text and "| fp | 0, 1 | 40.25 ± 0.35 | 50.50 ± 0.71 |" in text
    assert "Not run (1 of 4): `method=b158_seed=1`." in text
    assert "![loss and accuracy per epoch](one/compare.png)" in text
    assert "![every seed's test accuracy, last 5 epochs, per group](one/compare-dots.png)" in text
    assert (tmp_path / "results/one/compare.png").is_file()
    assert (tmp_path / "results/one/compare-dots.png").is_file()
    assert "## Study later" in text and "bitvit sweep studies/later.yaml   # not run yet" in text
    assert "Not run: all 1 planned runs (`bitvit sweep studies/later.yaml --dry-run`" in text
    assert write_report("results", "studies").read_text() == text  # regenerates the same
    assert main(["report"]) == 0


def test_unfinished_runs_counted_only_when_asked(tmp_path):
    study = study1(tmp_path)
    runs = [load_run(p) for p in find_run_dirs([study])]
    groups = compare_groups(group_runs(runs, include_unfinished=True))
    b158 = next(g for g in groups if g.label == "b158")
    assert b158.stats["final_test_acc"].n == 3
    text = compare_markdown(groups, runs)
    assert "counted at their last epoch" in text


def test_difference_without_any_spread():
    same = welch_difference([0.1, 0.1, 0.1], [0.1, 0.1], margin=0.01)
    assert same.p_value == 1.0 and same.equivalent and same.diff == pytest.approx(0)
    apart = welch_difference([0.3, 0.3], [0.1, 0.1], margin=0.01)
    assert apart.p_value == 0.0 and not apart.equivalent and apart.verdict == "differs"


FAKE_CLI = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_studies import fake_run
args = sys.argv[1:]
assert args[0] == "train"
run_dir = Path(args[args.index("--out") + 1])
seed = [a for a in args if a.startswith("train.seed=")][0]
if seed == "train.seed=1":
    sys.exit("boom")
fake_run(run_dir, [seed], [0.5])
print("trained", run_dir)
"""


def test_more_parallel_runs_than_cores_is_refused_before_anything_starts(tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml", overrides=["train.epochs=1"],
                       grid={"train.seed": list(range(50))})
    cores = len(os.sched_getaffinity(0))  # the cores this process may use
    err = one_line_error(capsys, "sweep", str(path), "--parallel", str(cores + 1))
    assert f"--parallel {cores + 1}: more than the {cores} CPU cores this process may use" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_parallel_sweep_runs_subprocesses_and_reports_failures(tmp_path, monkeypatch):
    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE_CLI.format(tests=str(ROOT / "tests")))
    monkeypatch.setattr("bitvit.studies.schedule._python_bitvit",
                        lambda: [sys.executable, str(script)])
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", overrides=["train.epochs=1"],
                                   grid={"train.seed": [0, 1, 2]}))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    lines: list[str] = []
    with pytest.raises(SweepError, match="1 run\\(s\\) failed: seed=1"):
        run_sweep(sweep, parallel=2, log=lines.append)
    cores = len(os.sched_getaffinity(0))
    assert any(line.startswith(f"threads   OMP_NUM_THREADS={max(1, cores // 2)} for each of 2 "
                               "runs") for line in lines)
    assert load_run(sweep.out / "seed=0").finished and load_run(sweep.out / "seed=2").finished
    assert "trained" in (sweep.out / "seed=0/train.log").read_text()
    assert "boom" in (sweep.out / "seed=1/train.log").read_text()


def test_a_child_that_does_not_stop_is_told_again_then_killed(monkeypatch):
    import subprocess

    from bitvit.studies import schedule

    monkeypatch.setattr(schedule, "STOP_SECONDS", 1)
    # Ignores SIGTERM (as when Python drops the KeyboardInterrupt it raised) and sleeps on.
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                             "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True);"
                             " time.sleep(60)"], stdout=subprocess.PIPE)
    proc.stdout.readline()  # its handler is set
    proc.terminate()
    start = time.monotonic()
    schedule._stop(proc)
    assert proc.returncode == -9 and time.monotonic() - start < 10


def test_a_run_config_bitvit_did_not_write_is_one_error_naming_it(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", overrides=["train.epochs=2"],
                                   grid={"train.seed": [0]}))
    run = fake_run(sweep.out / "seed=0", [], [0.5], epochs=2)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for quant in (5, {**saved["quant"], "method": "b158", "act_bits": 4}):
        (run / "config.yaml").write_text(yaml.safe_dump({**saved, "quant": quant}))
        with pytest.raises(SweepError, match=f"^{run / 'config.yaml'}: not a run config "
                                             "bitvit wrote \\("):
            plan_sweep(sweep)


def test_a_run_that_is_training_right_now_is_left_alone(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", overrides=["train.epochs=2"],
                                   grid={"train.seed": [0]}))
    run = fake_run(sweep.out / "seed=0", [], [0.5], status="running", epochs=2)
    assert plan_sweep(sweep)[0].state == "running"
    old = 3 * 3600
    for f in run.iterdir():
        os.utime(f, (f.stat().st_atime - old, f.stat().st_mtime - old))
    assert plan_sweep(sweep)[0].state == "restart"  # killed long ago: start again


def _age(run_dir: Path, seconds: float = 3 * 3600) -> None:
    for f in run_dir.iterdir():
        os.utime(f, (f.stat().st_atime - seconds, f.stat().st_mtime - seconds))


def test_a_running_run_whose_process_died_is_resumed_at_once(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", overrides=["train.epochs=2"],
                                   grid={"train.seed": [0]}))
    run = fake_run(sweep.out / "seed=0", [], [0.5], status="running", epochs=2, weights=True)

    def mark(**keys):  # what `bitvit train` writes into run.json at its start
        info = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**info, **keys}))

    def state():
        return plan_sweep(sweep)[0].state

    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True)
    here, now = socket.gethostname(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    mark(pid=int(exited.stdout), host=here, start=now)
    assert state() == "resume"  # killed (SIGKILL, OOM): no waiting for the folder to age
    mark(pid=os.getpid())
    _age(run)
    assert state() == "running"  # its process is alive, however long since it wrote anything
    if Path(f"/proc/{os.getpid()}/stat").is_file():
        mark(start="2000-01-01T00:00:00+00:00")
        assert state() == "resume"  # the pid now belongs to a younger process: reused
    # A pid from another machine says nothing here: the folder's age decides.
    mark(pid=int(exited.stdout), host=f"not-{here}", start=now)
    assert state() == "running"
    _age(run)
    assert state() == "resume"
    with rundir.locked(run):  # as the sweep looks again before it trains: the lock it just
        assert state() == "resume"  # wrote is not the run's activity


RECORDING_CLI = """
import json
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_studies import fake_run
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
run_dir = Path(args[args.index("--resume" if "--resume" in args else "--out") + 1])
fake_run(run_dir, [a for a in args if a.startswith("train.seed=")], [0.5] * 3)
"""


def test_parallel_and_one_at_a_time_sweeps_run_the_same_commands(tmp_path, monkeypatch,
                                                                 fake_train, capsys):
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", overrides=["train.epochs=2"],
                                   grid={"train.seed": [0, 1]}))
    extra = ["data.path=/elsewhere/cifar", "train.epochs=3"]

    def interrupted():  # seed=0 stopped after one epoch with a checkpoint; seed=1 not started
        shutil.rmtree(sweep.out, ignore_errors=True)
        fake_run(sweep.out / "seed=0", ["train.seed=0"], [0.5], status="interrupted",
                 epochs=2, weights=True)

    interrupted()
    run_sweep(sweep, extra, log=lambda *_: None)
    in_process = sorted(command[1:] for _, _, command in fake_train)

    interrupted()
    log = tmp_path / "argv.jsonl"
    script = tmp_path / "recording_cli.py"
    script.write_text(RECORDING_CLI.format(tests=str(ROOT / "tests"), log=str(log)))
    monkeypatch.setattr("bitvit.studies.schedule._python_bitvit",
                        lambda: [sys.executable, str(script)])
    run_sweep(sweep, extra, parallel=2, log=lambda *_: None)
    in_subprocesses = sorted(json.loads(line) for line in log.read_text().splitlines())

    assert in_process == in_subprocesses
    # The resume carries the moved data and the longer budget; the new run gets every override.
    assert ["train", "--resume", str(sweep.out / "seed=0"), "--epochs", "3", "--quiet",
            "--data", "/elsewhere/cifar"] in in_process
    new = next(c for c in in_process if "--out" in c)
    assert new[-3:] == ["data.path=/elsewhere/cifar", "train.epochs=3", "train.seed=1"]

    # A setting a resume cannot change is refused before anything trains, in both modes.
    interrupted()
    fake_train.clear()
    log.unlink()
    message = (r"seed=0: a resumed run keeps its own train.device='auto' .* but the sweep asks "
               r"train.device='cpu'")
    for parallel in (1, 2):
        with pytest.raises(SweepError, match=message):
            run_sweep(sweep, ["train.device=cpu"], parallel=parallel, log=lambda *_: None)
    assert fake_train == [] and not log.exists()
    assert main(["sweep", str(sweep.path), "train.device=cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.device='cpu'" in err and len(err.splitlines()) == 1


def test_the_figure_says_device_and_budget(tmp_path, monkeypatch):
    study = study1(tmp_path)
    fake_run(study / "method=fp_seed=3", ["train.seed=3"], [0.3, 0.5], device="cuda (H100)")
    runs = [load_run(p) for p in find_run_dirs([study])]
    groups = compare_groups(group_runs(runs))
    assert devices(runs) == ["cpu (test, 2 threads)", "cuda (H100)"]
    # The CPU, where run.json names it, since fp32 rounds otherwise on another.
    runs[0].info["cpu"] = "AMD EPYC (AVX-512 VNNI)"
    assert devices(runs) == ["cpu (test, 2 threads)", "cpu (test, 2 threads) on AMD EPYC "
                             "(AVX-512 VNNI)", "cuda (H100)"]
    runs[0].info.pop("cpu")

    def title(fig) -> str:
        return "\n".join(t.get_text() for t in fig.texts)

    text = title(plot_groups(groups, tmp_path / "a.png", "Study one", full_epochs=100))
    assert text.splitlines()[:2] == [
        "Study one", "device: cpu (test, 2 threads); cuda (H100); 2 of 100 epochs"]
    assert "device: cpu (test, 2 threads); cuda (H100); 2 epochs\n" in title(
        plot_groups(groups, tmp_path / "b.png"))

    # `bitvit compare --out` (no title) draws it too, with the budget it is given.
    figures = []
    monkeypatch.setattr("bitvit.studies.report.plot_groups",
                        lambda *a, **k: figures.append(plot_groups(*a, **k)))
    assert main(["compare", str(study), "--out", str(tmp_path / "cmp"), "--full-epochs", "15"]
                ) == 0
    assert title(figures[0]).startswith("device: cpu (test, 2 threads); cuda (H100); "
                                        "2 of 15 epochs\n")


def study2(tmp_path: Path) -> Path:
    """Seven groups on 40 training images: fp and b158, sign and xnor at two placements and two
    activation widths; sign collapses. Two seeds each, 3 epochs."""
    out = tmp_path / "study2"
    points = [("fp", [], 0.37), ("b158", ["quant.method=b158"], 0.40)]
    points += [(f"{m}_{w}_{a}", [f"quant.method={m}", f"quant.where={w}", f"quant.act_bits={a}"],
                0.2 if m == "sign" else 0.39)
               for m in ("sign", "xnor") for w, a in (("all", "none"), ("all", "1"), ("mlp", "1"))]
    for name, overrides, acc in points:
        for seed in (0, 1):
            fake_run(out / f"{name}_seed={seed}", [*overrides, f"train.seed={seed}",
                                                    "data.limit_train=40"],
                     [0.1, acc - 0.01 * seed, acc + 0.01 * seed])
    return out


def figure_text(fig) -> str:
    return "\n".join(t.get_text() for t in fig.texts)


def test_many_groups_get_a_panel_per_method(tmp_path):
    groups = compare_groups(group_runs([load_run(p) for p in find_run_dirs([study2(tmp_path)])]))
    assert len(groups) == 8
    fig = plot_groups(groups, tmp_path / "many.png", "Study two", full_epochs=100)
    assert (tmp_path / "many.png").stat().st_size > 10_000
    text = figure_text(fig)
    assert "Study two" in text and "3 of 100 epochs" in text
    assert "training images: 40 (class-balanced subset); test images: full test set" in text
    acc_row = fig.axes[:3]
    assert [ax.get_title() for ax in acc_row] == ["fp, b158", "sign", "xnor"]
    assert acc_row[0].get_ylabel() == "test accuracy (%)"
    sign = {line.get_label(): line for line in acc_row[1].get_lines()}
    # Placements and activation widths as lines in the method's panel, fp as the reference.
    assert set(sign) == {"all act-fp (n=2)", "all act1 (n=2)", "mlp act1 (n=2)",
                         "fp mean (reference)"}
    assert list(sign["all act1 (n=2)"].get_ydata()) == pytest.approx([10, 19.5, 20.5])  # in %
    assert list(sign["fp mean (reference)"].get_ydata()) == pytest.approx([10, 36.5, 37.5])
    assert acc_row[1].get_shared_y_axes().joined(acc_row[1], acc_row[2])  # panels compare

    # Up to four groups: one pair of panels, accuracy in % and the data size in the title.
    few = compare_groups(group_runs([load_run(p) for p in find_run_dirs([study1(tmp_path)])]))
    fig = plot_groups(few, tmp_path / "few.png")
    assert len(fig.axes) == 2 and fig.axes[0].get_ylabel() == "accuracy (%)"
    assert max(max(line.get_ydata()) for line in fig.axes[0].get_lines()) > 40
    assert "training images: full training set; test images: full test set" in figure_text(fig)


def test_dot_plot_has_a_dot_per_seed_sorted_by_mean(tmp_path):
    groups = compare_groups(group_runs([load_run(p) for p in find_run_dirs([study2(tmp_path)])]))
    fig = plot_dots(groups, tmp_path / "dots.png", "Study two", full_epochs=100, last_k=2)
    assert (tmp_path / "dots.png").stat().st_size > 10_000
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    # Worst at the bottom (y = 0), best on top; a scatter collection per group, a dot per seed.
    assert labels[-1] == "b158 all act8 (n=2)" and labels[0].startswith("sign")
    assert len(ax.collections) == len(groups) == len(labels)
    for y, dots in enumerate(ax.collections):
        group = next(g for g in groups if f"{g.label} (n=2)" == labels[y])
        xs = sorted(dots.get_offsets()[:, 0])
        assert xs == pytest.approx(sorted(100 * v for v in group.values("last_test_acc", 2)))
    fp_line = next(line for line in ax.get_lines() if line.get_label().startswith("fp mean"))
    assert list(fp_line.get_xdata()) == pytest.approx([37, 37])  # mean over seeds of epochs 2-3
    text = figure_text(fig)
    assert "training images: 40 (class-balanced subset)" in text and "3 of 100 epochs" in text

    # compare --out writes it beside the curves and links it from the table text.
    _, md = compare([study2(tmp_path)], out=tmp_path / "cmp")
    assert (tmp_path / "cmp/compare-dots.png").is_file()
    assert "![every seed's test accuracy, last 5 epochs, per group](compare-dots.png)" in md


def test_each_committed_study_ran_on_one_torch_device_and_process_count():
    """Every attempt of every run of a committed study (run.json and its resumed_from) records
    the same torch, device (with threads) and process count: another torch trains the same
    config to other numbers (b158 seed 1's epoch 1 under torch 2.14.1), so a study mixing them
    could not be reproduced from its commands.txt."""
    studies = sorted(p for p in (ROOT / "results").glob("*/") if p.is_dir())
    if not studies:
        pytest.skip("no committed results")
    for study in studies:
        seen: dict[tuple, str] = {}
        for info_file in sorted(study.glob("*/run.json")):
            info = json.loads(info_file.read_text())
            for attempt in [*info.get("resumed_from", []), info]:
                setup = tuple(attempt.get(k) for k in ("torch", "device", "processes"))
                seen.setdefault(setup, f"{info_file.parent.name} (started {attempt['start']})")
        assert len(seen) == 1, f"{study.name} mixes {seen}"


def test_committed_results_are_what_their_run_folders_give(tmp_path, monkeypatch):
    """results/README.md and each study's compare.md are regenerated from the committed run
    folders alone: a table edited by hand, or left stale after a run changed, fails here."""
    import shutil
    import subprocess

    try:
        tracked = subprocess.run(["git", "ls-files", "results", "studies", "configs"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    if "results/README.md" not in tracked:
        pytest.skip("no committed results")
    for rel in tracked:
        if not rel.endswith(".png"):
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, tmp_path / rel)
    monkeypatch.chdir(tmp_path)
    write_report("results", "studies")
    stale = [rel for rel in tracked if rel.endswith(".md") and rel.startswith("results/")
             and (tmp_path / rel).read_text() != (ROOT / rel).read_text()]
    assert not stale, f"regenerate with `bitvit report` and commit: {stale}"
