"""Training end to end on a few hundred real CIFAR-10 images with a tiny ViT."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitvit.checkpoint import CheckpointError, build_model, load_checkpoint, save_model
from bitvit.config import ConfigError, load_config
from bitvit.train import METRIC_COLUMNS, TrainingError, train

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
    assert header == ",".join(METRIC_COLUMNS + ["val_loss", "val_acc"])
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
    assert len(a) == len(b) == 5
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

    import bitvit.checkpoint

    train_module = importlib.import_module("bitvit.train")  # bitvit.train is also the function

    calls = {"n": 0}

    def poisoned(config):
        model = bitvit.checkpoint.build_model(config)
        forward = model.forward

        def forward_with_nan(x):
            calls["n"] += 1
            out = forward(x)
            return out * float("nan") if calls["n"] > 15 and model.training else out

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
    with pytest.raises(ConfigError, match="quantization method 'b2'"):
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
