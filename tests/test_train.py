"""Training end to end on a few hundred real CIFAR-10 images with a tiny ViT."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitvit.cli import main as cli_main
from bitvit.data import DataError, balanced_subset, load_data
from bitvit.training.checkpoint import (
    CheckpointError,
    build_model,
    load_checkpoint,
    save_model,
    write_checksums,
)
from bitvit.training.config import ConfigError, load_config
from bitvit.training.evaluation import evaluate_model
from bitvit.training.loop import TrainingError, config_for_resume, flush_subnormals, train
from bitvit.training.rundir import METRIC_COLUMNS, TRAIN_EVAL_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.dim=32", "model.depth=2", "model.heads=4", "model.patch_size=8",
        "data.limit_test=200", "train.batch_size=50"]


def tiny(*overrides: str, limit_train: int = 500):
    return load_config(ROOT / "configs/paper.yaml",
                       [*TINY, f"data.limit_train={limit_train}", *overrides])


def metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def bitvit(*args: str, env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitvit", *args], env=env, capture_output=True,
                          text=True, **kw)


def test_training_run_writes_everything_and_loss_falls(real_env, tmp_path):
    run = tmp_path / "run"
    result = train(tiny("quant.method=b158", "train.epochs=4", "data.val_size=100"), out=run,
                   quiet=True)
    assert result.status == "finished"
    rows = metrics(run)
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert header == ",".join(METRIC_COLUMNS + ["val_loss", "val_acc"] + TRAIN_EVAL_COLUMNS)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) - 0.1
    assert float(rows[-1]["test_acc"]) > 0.15  # chance is 0.10
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["torch"] == torch.__version__
    assert {"command", "git_commit", "device", "start", "end", "wall_seconds"} <= set(info)
    assert (run / "curves.png").stat().st_size > 1000
    assert load_config(run / "config.yaml").quant.method == "b158"
    for folder in ("last", "best"):
        state = torch.load(run / folder / "state.pt", weights_only=True)
        assert {"optimizer", "scheduler", "torch_rng", "epoch"} <= set(state)
    assert torch.load(run / "last/state.pt", weights_only=True)["epoch"] == 4
    best_epoch = max(rows, key=lambda r: float(r["val_acc"]))["epoch"]
    assert torch.load(run / "best/state.pt", weights_only=True)["epoch"] == int(best_epoch)

    # bitvit eval reproduces the run's last test accuracy.
    out = bitvit("eval", str(run), env=real_env, check=True).stdout
    report = json.loads(out)
    assert report["accuracy"] == pytest.approx(float(rows[-1]["test_acc"]), abs=1e-6)
    assert report["loss"] == pytest.approx(float(rows[-1]["test_loss"]), rel=1e-4)
    assert report["n"] == 200 and len(report["confusion_matrix"]) == 10
    assert sum(map(sum, report["confusion_matrix"])) == 200

    # ... and so does the exported file, through either engine. Tolerance: fp16 parameters move
    # logits by ~1e-3, which can flip a near-tie; 2 of 200 images at most.
    exported = tmp_path / "model.safetensors"
    bitvit("export", str(run), "--out", str(exported), env=real_env, check=True)
    for engine in ("int", "fp"):
        out = bitvit("eval", str(exported), "--engine", engine, env=real_env, check=True).stdout
        assert json.loads(out)["accuracy"] == pytest.approx(report["accuracy"], abs=0.01)


def test_kill_and_resume_equals_uninterrupted(real_env, tmp_path):
    args = ["train", "--config", "configs/paper.yaml", "--quant", "b158", "--epochs", "5",
            "--limit-train", "1000", "--quiet", *TINY, "model.dropout=0.1",
            "data.random_crop=true", "data.horizontal_flip=true"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    bitvit(*args, "--out", str(full), env=real_env, cwd=ROOT, check=True)

    proc = subprocess.Popen([sys.executable, "-m", "bitvit", *args, "--out", str(killed)],
                            env=real_env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "last/state.pt").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics(killed)) if (killed / "metrics.csv").exists() else 0
    assert 1 <= done < 5, "the kill should land after epoch 1 and before the end"
    res = bitvit("train", "--resume", str(killed), "--quiet", env=real_env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    a, b = metrics(full), metrics(killed)
    assert len(a) == len(b) == 5 and set(TRAIN_EVAL_COLUMNS) <= set(a[0])
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k != "seconds"} == \
               {k: v for k, v in rb.items() if k != "seconds"}
    assert json.loads((killed / "run.json").read_text())["status"] == "finished"


def test_distributed_matches_single_process(real_env, tmp_path):
    # Dropout 0, no augmentation, 600 images = 12 global batches of 50: the same global steps.
    args = ["-m", "bitvit", "train", "--config", "configs/paper.yaml", "--quant", "b158",
            "--epochs", "2", "--limit-train", "600", "--quiet", *TINY]
    single, multi = tmp_path / "single", tmp_path / "ddp"
    env = {**real_env, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *args, "--out", str(single)], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", *args, "--out", str(multi)],
                         env=env, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((multi / "run.json").read_text())["processes"] == 2
    summary = [line for line in res.stdout.splitlines() if line.startswith('{"run_dir"')]
    assert len(summary) == 1 and json.loads(summary[0])["epoch"] == 2  # once, not per process
    # Tolerance: the same images per step, but gradients are averaged over two half batches
    # (float summation order differs), which int8 activation rounding can amplify slightly.
    for ra, rb in zip(metrics(single), metrics(multi), strict=True):
        for key in ("train_loss", "test_loss"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), abs=2e-3), key
        for key in ("train_acc", "test_acc"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), abs=0.02), key


def test_init_from_full_precision_checkpoint(real_env, tmp_path):
    train(tiny("train.epochs=1"), out=tmp_path / "fp", quiet=True)
    fp = load_file(str(tmp_path / "fp/last/model.safetensors"))
    train(tiny("quant.method=b158", "train.epochs=1", "train.lr=0.0",
               f"train.init_from={tmp_path / 'fp'}"), out=tmp_path / "qat", quiet=True)
    qat = load_checkpoint(tmp_path / "qat")
    assert qat.config.quant.method == "b158"
    for key, value in qat.model.state_dict().items():
        torch.testing.assert_close(value, fp[key])  # lr 0: exactly the full-precision weights


def test_non_finite_loss_stops_and_keeps_last_good_state(real_env, tmp_path, monkeypatch):
    import importlib

    import bitvit.training.checkpoint

    train_module = importlib.import_module("bitvit.training.loop")

    calls = {"n": 0}

    def poisoned(config):
        model = bitvit.training.checkpoint.build_model(config)
        forward = model.forward

        def forward_with_nan(x):  # counts training steps only (10 per epoch)
            calls["n"] += model.training
            out = forward(x)
            return out * float("nan") if calls["n"] > 14 and model.training else out

        model.forward = forward_with_nan
        return model

    monkeypatch.setattr(train_module, "build_model", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(TrainingError, match="loss is nan at epoch 2, step 5"):
        train(tiny("train.epochs=3"), out=run, quiet=True)
    assert torch.load(run / "last/state.pt", weights_only=True)["epoch"] == 1
    assert len(metrics(run)) == 1
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and "nan" in info["error"]


def test_bad_configs_give_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key train.lrr; valid keys in train: epochs"):
        load_config(ROOT / "configs/paper.yaml", ["train.lrr=1"])
    with pytest.raises(ConfigError, match="model.depth='six': expected int"):
        load_config(None, ["model.depth=six"])
    with pytest.raises(ConfigError, match="unknown section 'optim'"):
        load_config(None, ["optim.lr=1"])
    with pytest.raises(ConfigError, match="quant.method='b2': expected one of fp, b158"):
        load_config(None, ["quant.method=b2"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["lr=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_errors_are_one_line(tmp_path, real_env):
    res = bitvit("train", "--config", "configs/paper.yaml", "train.lrr=1", env=real_env, cwd=ROOT)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "unknown key train.lrr" in res.stderr
    res = bitvit("eval", str(tmp_path / "nothing"), env=real_env, cwd=ROOT)
    assert res.returncode == 2 and "no such checkpoint" in res.stderr


def test_checkpoint_from_another_model_or_corrupt(tmp_path):
    cfg = load_config(None, ["model.dim=32", "model.depth=2", "model.heads=4"])
    model = build_model(cfg)
    path = tmp_path / "model.safetensors"
    save_model(path, model, cfg, [str(i) for i in range(10)])
    assert load_checkpoint(path).config.model.dim == 32
    # Another model's weights under this config: the shapes disagree.
    other = build_model(load_config(None, ["model.dim=64", "model.depth=2", "model.heads=4"]))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file({k: v.contiguous() for k, v in other.state_dict().items()},
              str(tmp_path / "other.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="other.safetensors: checkpoint is from another"):
        load_checkpoint(tmp_path / "other.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        load_checkpoint(corrupt)
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match="no last/model.safetensors"):
        load_checkpoint(tmp_path / "run")


def test_existing_run_folder_is_not_overwritten(real_env, tmp_path):
    run = tmp_path / "run"
    train(tiny("train.epochs=1"), out=run, quiet=True)
    info = json.loads((run / "run.json").read_text())
    # bitvit sweep tells a killed run (status still "running") from a live one by pid and host.
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert info["data"] == str(Path(real_env["BITVIT_DATA"]).resolve())
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(tiny("train.epochs=1"), out=run, quiet=True)
    assert os.path.exists(run / "last/model.safetensors")


def test_bf16_autocast_runs_the_same_loop(real_env, tmp_path):
    result = train(tiny("quant.method=b158", "train.epochs=2", "train.precision=bf16"),
                   out=tmp_path / "bf16", quiet=True)
    rows = result.metrics
    assert result.status == "finished" and rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_compile_option_trains(real_env, tmp_path):
    result = train(tiny("quant.method=b158", "train.epochs=1", "train.compile=true"),
                   out=tmp_path / "compiled", quiet=True)
    assert result.status == "finished" and math.isfinite(result.final["train_loss"])
    assert load_checkpoint(tmp_path / "compiled").model.blocks[0].mlp.fc1.method == "b158"


def _flushing() -> bool:
    return (torch.tensor([1e-39]) * 1.0).item() == 0.0  # a subnormal times one


FLUSH_SUPPORTED = torch.set_flush_denormal(False)  # x86 with SSE3 (and recent ARM)


@pytest.mark.skipif(not FLUSH_SUPPORTED, reason="this CPU cannot flush subnormals")
def test_training_flushes_subnormals_and_restores_the_mode(real_env, tmp_path, monkeypatch):
    import bitvit.training.loop as loop

    seen, train_epoch = [], loop._train_epoch

    def spy(s, epoch, quiet):
        seen.append(_flushing())
        return train_epoch(s, epoch, quiet)

    monkeypatch.setattr(loop, "_train_epoch", spy)
    assert not _flushing()
    assert train(tiny("train.epochs=2"), out=tmp_path / "run", quiet=True).status == "finished"
    assert seen == [True, True] and not _flushing()  # every epoch flushed; IEEE again after
    with flush_subnormals():  # a caller's own setting survives a nested use
        with flush_subnormals():
            assert _flushing()
        assert _flushing()
    assert not _flushing()


def test_train_eval_columns_are_the_model_in_eval_mode_on_a_fixed_train_subset(
        real_env, tmp_path, monkeypatch):
    # With heavy dropout the running train-mode accuracy and the eval-mode one part ways; the
    # columns must be the last checkpoint evaluated (eval mode) on the seeded balanced subset.
    monkeypatch.setattr(_train_module(), "TRAIN_EVAL_SIZE", 120)
    config = tiny("train.epochs=2", "model.dropout=0.5", "data.seed=3", limit_train=300)
    result = train(config, out=tmp_path / "run", quiet=True)
    subset = balanced_subset(load_data(config.data).train, 120, 3)
    assert len(subset) == 120
    ckpt = load_checkpoint(tmp_path / "run")  # its config holds the resolved mean and std
    expected = evaluate_model(ckpt.model, subset, ckpt.config.data.mean, ckpt.config.data.std)
    last = result.metrics[-1]
    assert last["train_eval_acc"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert last["train_eval_loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert float(metrics(tmp_path / "run")[-1]["train_eval_acc"]) == pytest.approx(
        expected["accuracy"], abs=1e-5)


def test_a_run_folder_from_before_the_train_eval_columns_resumes_with_its_columns(
        real_env, tmp_path):
    from bitvit.training.rundir import read_metrics, write_metrics

    run = tmp_path / "run"
    train(tiny("train.epochs=1", limit_train=200), out=run, quiet=True)
    rows = read_metrics(run / "metrics.csv")
    assert list(rows[0]) == METRIC_COLUMNS + TRAIN_EVAL_COLUMNS  # new folders have them ...
    write_metrics(run / "metrics.csv", rows, METRIC_COLUMNS)  # ... folders from before do not
    result = train(config_for_resume(run, epochs=2), resume=run, quiet=True)
    assert result.status == "finished" and len(metrics(run)) == 2
    assert (run / "metrics.csv").read_text().splitlines()[0] == ",".join(METRIC_COLUMNS)


# --- never lose work: crash points, corrupt checkpoints, non-finite values, bad values ----------


class Killed(BaseException):
    """Stands in for SIGKILL at a chosen point (BaseException: nothing in train() catches it)."""


def _train_module():
    import importlib

    return importlib.import_module("bitvit.training.loop")


def _rows_without_seconds(run: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in metrics(run)]


def test_epoch_end_writes_metrics_and_best_before_last(real_env, tmp_path, monkeypatch):
    train_module = _train_module()
    real_atomic_dir, real_write_metrics = train_module.swap_folder, train_module.write_metrics
    events: list[str] = []

    def atomic_dir(target, write):
        events.append(target.name)
        if target.name == "last" and events.count("last") == 2:
            raise Killed  # epoch 2: killed just before last/ moves on
        real_atomic_dir(target, write)

    def write_metrics(path, rows, columns):
        events.append("metrics")
        real_write_metrics(path, rows, columns)

    monkeypatch.setattr(train_module, "swap_folder", atomic_dir)
    monkeypatch.setattr(train_module, "write_metrics", write_metrics)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(tiny("train.epochs=3", "data.val_size=100", limit_train=300), out=run, quiet=True)
    # Epoch 1 is always the best so far: its row and best/ are on disk before last/ moves.
    assert events[:3] == ["metrics", "best", "last"]
    # The kill lost nothing: epoch 2's row is written although last/ still holds epoch 1.
    assert [r["epoch"] for r in metrics(run)] == ["1", "2"]
    assert torch.load(run / "last/state.pt", weights_only=True)["epoch"] == 1
    epoch2 = _rows_without_seconds(run)[1]

    monkeypatch.setattr(train_module, "swap_folder", real_atomic_dir)
    result = train(config_for_resume(run), resume=run, quiet=True)
    assert result.status == "finished"
    rows = _rows_without_seconds(run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[1] == epoch2


def test_resume_recovers_from_a_kill_between_the_renames_of_last(real_env, tmp_path):
    run = tmp_path / "run"
    train(tiny("train.epochs=1", limit_train=200), out=run, quiet=True)
    # swap_folder renames last/ to .last.old, then .last.tmp to last/: a kill between the two.
    (run / "last").rename(run / ".last.old")
    (run / ".last.tmp").mkdir()
    assert load_checkpoint(run).path == run / ".last.old/model.safetensors"
    result = train(config_for_resume(run, epochs=2), resume=run, quiet=True)
    assert result.status == "finished" and [r["epoch"] for r in result.metrics] == [1, 2]
    assert torch.load(run / "last/state.pt", weights_only=True)["epoch"] == 2
    assert not (run / ".last.old").exists()


def _cli_error(capsys, *argv: str) -> str:
    """Run the CLI; it must fail with status 2 and exactly one line on stderr; return it."""
    capsys.readouterr()
    assert cli_main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err


def test_corrupt_or_mismatched_checkpoints_give_one_line_errors(real_env, tmp_path, capsys):
    base = tmp_path / "base"
    train(tiny("train.epochs=1", limit_train=200), out=base, quiet=True)

    def broken(name: str, file: str, content: bytes | dict) -> Path:
        run = tmp_path / name
        shutil.copytree(base, run)
        if isinstance(content, dict):
            torch.save(content, run / "last" / file)
        else:
            (run / "last" / file).write_bytes(content)
        # Recorded anew, so the loader's own checks are reached (the checksums are tested in
        # test_checkpoint_integrity.py).
        write_checksums(run / "last", ("model.safetensors", "state.pt"))
        return run

    run = broken("garbage_state", "state.pt", b"garbage" * 100)
    err = _cli_error(capsys, "train", "--resume", str(run), "--quiet")
    assert f"{run / 'last/state.pt'}: unreadable training state, expected a torch.save" in err
    assert "Weights only load failed" not in err

    run = broken("garbage_model", "model.safetensors", b"garbage" * 100)
    err = _cli_error(capsys, "train", "--resume", str(run), "--quiet")
    assert f"{run / 'last/model.safetensors'}: corrupt checkpoint" in err

    state = torch.load(base / "last/state.pt", weights_only=True)
    run = broken("no_epoch", "state.pt", {k: v for k, v in state.items()
                                          if k not in ("epoch", "best_acc")})
    err = _cli_error(capsys, "train", "--resume", str(run), "--quiet")
    assert f"{run / 'last/state.pt'}: not a bitvit training state: missing epoch, best_acc" in err

    run = broken("foreign_optimizer", "state.pt", {**state, "optimizer": {"state": {}}})
    err = _cli_error(capsys, "train", "--resume", str(run), "--quiet")
    assert f"{run / 'last/state.pt'}: training state does not fit" in err

    # --init-from a checkpoint of another model (dim 32, asked for dim 64): the architecture is
    # the source's, so the override is refused, naming both values; no run folder is left.
    out = tmp_path / "wider"
    err = _cli_error(capsys, "train", "--config", str(ROOT / "configs/paper.yaml"), *TINY,
                     "model.dim=64", "--limit-train", "100", "--init-from", str(base),
                     "--out", str(out), "--quiet")
    assert (f"model.dim=64 contradicts the source {base / 'last/model.safetensors'}, whose dim "
            "is 32") in err
    assert not out.exists()


@pytest.mark.parametrize("override, expected", [
    ("train.device=gpu", "train.device='gpu': expected auto, cpu, cuda or cuda:N"),
    ("train.device=cuda:x", "train.device='cuda:x': expected auto, cpu, cuda or cuda:N"),
    ("train.lr=-1", "train.lr=-1.0: expected a number >= 0"),
    ("train.lr=.nan", "train.lr=nan: expected a number >= 0"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1: expected a number >= 0"),
    ("train.betas=[0.9]", "train.betas=(0.9,): expected two numbers in [0, 1)"),
    ("train.betas=[0.9, 1.0]", "train.betas=(0.9, 1.0): expected two numbers in [0, 1)"),
    ("train.epochs=0", "train.epochs=0: expected an integer >= 1"),
    ("train.batch_size=-5", "train.batch_size=-5: expected an integer >= 1"),
    ("train.eval_batch_size=0", "train.eval_batch_size=0: expected an integer >= 1"),
    ("train.label_smoothing=1", "train.label_smoothing=1.0: expected a number in [0, 1)"),
    ("train.warmup_epochs=-1", "train.warmup_epochs=-1.0: expected a number >= 0"),
    ("train.min_lr=-0.001", "train.min_lr=-0.001: expected a number >= 0"),
    ("train.grad_clip=0", "train.grad_clip=0.0: expected null or a number > 0"),
    ("model.dropout=2", "model.dropout=2.0: expected a number in [0, 1)"),
    ("model.attn_dropout=-0.1", "model.attn_dropout=-0.1: expected a number in [0, 1)"),
    ("model.drop_path=1", "model.drop_path=1.0: expected a number in [0, 1)"),
    ("model.mlp_ratio=0", "model.mlp_ratio=0.0: expected a number > 0"),
    ("model.heads=0", "model.heads=0: expected an integer >= 1"),
    ("model.patch_size=0", "model.patch_size=0: expected an integer >= 1"),
    ("model.depth=0", "model.depth=0: expected an integer >= 1"),
    ("model.heads=3", "model.heads=3 must divide model.dim=256"),
    ("model.patch_size=5", "model.patch_size=5 must divide model.image_size=32"),
])
def test_bad_config_values_give_one_line_errors(override, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)) as info:
        load_config(ROOT / "configs/paper.yaml", [override])
    # The override is at fault, not the file it overrides.
    assert "\n" not in str(info.value) and str(info.value).startswith(f"override {expected}")


def test_a_bad_value_is_named_where_it_was_given(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: -1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: model.dim=-1: expected an integer")):
        load_config(bad, ["train.lr=0.01"])
    with pytest.raises(ConfigError, match=re.escape("override model.dim=-2: expected an integ")):
        load_config(bad, ["model.dim=-2"])  # the override replaced the file's value
    with pytest.raises(ConfigError, match=re.escape("override unknown key model.nope; valid")):
        load_config(bad, ["model.nope=1"])
    assert load_config(bad, ["model.dim=64"]).model.dim == 64  # an override mends the file
    # An override that clashes with the file's other keys names both sources.
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  heads: 8\n")
    with pytest.raises(ConfigError, match=re.escape(
            f"{good} with the overrides: model.heads=8 must divide model.dim=100")):
        load_config(good, ["model.dim=100"])


def test_bad_config_value_on_the_cli(capsys, tmp_path):
    err = _cli_error(capsys, "train", "--config", str(ROOT / "configs/paper.yaml"),
                     "train.betas=[0.9]", "--out", str(tmp_path / "run"))
    assert err == ("bitvit train: error: override train.betas=(0.9,): expected two numbers in "
                   "[0, 1)\n")
    assert not (tmp_path / "run").exists()


def test_train_without_a_config_says_what_it_runs(capsys, tmp_path, tiny_run):
    # Once the run is set up: an error before then is the one line printed.
    assert cli_main(["train", "--epochs", "3", "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert cli_main(["train", "--epochs", "1", "--data", str(tiny_run["images"]),
                     "--out", str(tmp_path / "run"), "model.image_size=16", "model.patch_size=4",
                     "model.dim=8", "model.depth=1", "model.heads=1", "model.num_classes=2",
                     "train.batch_size=4", "train.device=cpu"]) == 0
    assert capsys.readouterr().err.splitlines()[0] == (
        "bitvit train: no --config: the built-in defaults (configs/paper.yaml's run) with the "
        "options given: 1 epoch, quant.method=fp")


def test_cuda_requested_without_cuda_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _cli_error(capsys, "train", "--config", str(ROOT / "configs/paper.yaml"),
                     "train.device=cuda", "--out", str(tmp_path / "run"))
    assert "train.device='cuda': CUDA is not available on this machine" in err
    assert not (tmp_path / "run").exists()


def test_missing_data_leaves_no_run_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        train(tiny(f"data.path={tmp_path / 'nowhere'}"), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_non_finite_test_loss_in_the_first_epoch_stops_without_a_checkpoint(real_env, tmp_path,
                                                                             monkeypatch):
    train_module = _train_module()
    real_build = train_module.build_model

    def nan_when_evaluating(config):
        model = real_build(config)
        forward = model.forward
        model.forward = lambda x: forward(x) * (1.0 if model.training else float("nan"))
        return model

    monkeypatch.setattr(train_module, "build_model", nan_when_evaluating)
    run = tmp_path / "run"
    expected = ("test loss is nan after epoch 1: stopping; no checkpoint was saved "
                "(it happened in the first epoch)")
    with pytest.raises(TrainingError, match=re.escape(expected)):
        train(tiny("train.epochs=2", limit_train=100), out=run, quiet=True)
    assert not (run / "last").exists() and not (run / "metrics.csv").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "failed"


def test_non_finite_parameters_are_never_saved(real_env, tmp_path, monkeypatch):
    train_module = _train_module()
    real_optimizer = train_module.make_optimizer

    def poisoned_optimizer(model, cfg):
        optimizer = real_optimizer(model, cfg)
        steps = {"n": 0}

        def poison_after_step(optimizer, args, kwargs):
            steps["n"] += 1
            if steps["n"] == 4:  # the last step of epoch 2 (2 steps per epoch): losses stay finite
                with torch.no_grad():
                    model.head.weight[0, 0] = float("inf")

        optimizer.register_step_post_hook(poison_after_step)
        return optimizer

    monkeypatch.setattr(train_module, "make_optimizer", poisoned_optimizer)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=re.escape(
            f"parameters are not finite after epoch 2: stopping; {run / 'last'} keeps epoch 1")):
        train(tiny("train.epochs=3", limit_train=100), out=run, quiet=True)
    assert torch.load(run / "last/state.pt", weights_only=True)["epoch"] == 1
    assert all(v.isfinite().all() for v in load_file(str(run / "last/model.safetensors")).values())
    assert len(metrics(run)) == 1


def test_extending_a_cosine_run_says_its_schedule_changes(real_env, tmp_path, capsys):
    for schedule in ("cosine", "constant"):
        run = tmp_path / schedule
        train(tiny("train.epochs=1", f"train.schedule={schedule}", limit_train=100), out=run,
              quiet=True)
        capsys.readouterr()
        info = (run / "run.json").read_text()
        # Resuming a finished run trains nothing, says so and records no attempt.
        assert train(config_for_resume(run, epochs=1), resume=run, quiet=True).status == "finished"
        assert capsys.readouterr().err == (f"bitvit train: {run} has trained its 1 epoch "
                                           "already; nothing to do (--epochs N extends it)\n")
        assert (run / "run.json").read_text() == info
        # The Python API extending the run says it too, not only the CLI.
        config = config_for_resume(run)
        config.train = replace(config.train, epochs=2)
        assert train(config, resume=run, quiet=True).status == "finished"
        err = capsys.readouterr().err
        if schedule == "constant":
            assert err == ""
        else:
            assert err == (f"bitvit train: extending {run} from 1 to 2 epochs under "
                           "train.schedule=cosine: its lr now decays over 2 epochs, so the run "
                           "is not what 2 epochs from the start give\n")
    # Fewer epochs than the run holds: no notice, set-up refuses it in one line.
    with pytest.raises(ConfigError, match="holds 2 epochs"):
        train(config_for_resume(tmp_path / "cosine", epochs=1), resume=tmp_path / "cosine",
              quiet=True)
    assert capsys.readouterr().err == ""


def test_a_warmup_as_long_as_the_run_is_said(real_env, tmp_path, capsys):
    train(tiny("train.epochs=1", "train.warmup_epochs=1", limit_train=100), out=tmp_path / "run",
          quiet=True)
    assert capsys.readouterr().err == ("bitvit train: train.warmup_epochs=1 >= train.epochs=1: "
                                       "the lr rises all run, never reaching lr=0.001\n")


def test_the_lr_column_is_the_rate_each_epochs_last_step_used(real_env, tmp_path):
    """Warmup over epoch 1 then cosine, 2 steps an epoch: the rates of steps 1 and 3 (0-based),
    not those after them (the next epoch's first)."""
    from bitvit.training.loop import lr_factor

    run = tmp_path / "run"
    train(tiny("train.epochs=2", "train.schedule=cosine", "train.warmup_epochs=1",
               "train.min_lr=0.0001", limit_train=100), out=run, quiet=True)
    got = [float(row["lr"]) for row in metrics(run)]
    expected = [0.001 * lr_factor(step, 4, 2, "cosine", 0.1) for step in (1, 3)]
    assert got == pytest.approx(expected, rel=1e-5)
    assert got[0] < 0.001 and got[0] != pytest.approx(0.001 * lr_factor(2, 4, 2, "cosine", 0.1))


def test_a_resume_keeps_the_runs_own_config(real_env, tmp_path, capsys):
    """The Python API's resume refuses a config the run did not train with (it trained epoch 3
    under it and rewrote config.yaml as if the whole run had); neither API nor CLI shortens a
    run. The run's own config, extended, still resumes."""
    run = tmp_path / "run"
    train(tiny("train.epochs=2", limit_train=100), out=run, quiet=True)
    saved = (run / "config.yaml").read_text()
    for override, key in (("train.seed=7", "train.seed"), ("train.lr=0.5", "train.lr"),
                          ("data.limit_train=50", "data.limit_train")):
        changed = tiny("train.epochs=3", override, limit_train=100)
        with pytest.raises(ConfigError, match=rf"the run trained with {re.escape(key)}="):
            train(changed, resume=run, quiet=True)
    with pytest.raises(ConfigError, match="holds 2 epochs; train.epochs=1"):
        train(config_for_resume(run, epochs=1), resume=run, quiet=True)
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(run), "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot shorten a run" in err
    assert (run / "config.yaml").read_text() == saved and len(metrics(run)) == 2
    # The config the run was started from (data statistics still auto), now 3 epochs: resumes.
    result = train(tiny("train.epochs=3", limit_train=100), resume=run, quiet=True)
    assert result.status == "finished" and len(metrics(run)) == 3


def test_a_seed_at_the_top_of_its_range_trains(real_env, tmp_path):
    """train.seed and data.seed take [0, 2**63): the per-epoch seeds mixed from the top one
    overflowed torch's seed (a traceback, the run failed)."""
    top = 2**63 - 1
    run = tmp_path / "run"
    result = train(tiny("train.epochs=1", f"train.seed={top}", f"data.seed={top}",
                        limit_train=100), out=run, quiet=True)
    assert result.status == "finished" and len(metrics(run)) == 1
