"""The command line and its Python twins: `bitvit eval` == `bitvit.evaluate`, the options that
reach `bitvit.load`, and the options that `train --resume` refuses."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

import bitvit
import bitvit.deploy.engine
import bitvit.deploy.export
from bitvit.cli import main
from bitvit.deploy.export import ExportError, export_model
from bitvit.training.checkpoint import CheckpointError, build_model
from bitvit.training.config import Config, ConfigError, load_config
from bitvit.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.dim=32", "model.depth=2", "model.heads=4", "model.patch_size=8",
        "quant.method=b158", "train.epochs=1", "train.batch_size=50", "data.limit_train=200",
        "data.limit_test=200"]


@pytest.fixture(scope="module")
def tiny_run(real_data, tmp_path_factory) -> dict[str, Path]:
    """A one-epoch b158 run on 200 real images (about a second) and its exported file."""
    folder = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in real_data.items():
            mp.setenv(key, value)
        train(load_config(ROOT / "configs/paper.yaml", TINY), out=folder / "run", quiet=True)
    exported = bitvit.export_checkpoint(folder / "run", folder / "model.safetensors")
    return {"run": folder / "run", "export": exported}


def cli_json(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def last_row(run: Path) -> dict[str, str]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))[-1]


# ---------------------------------------------------------------------------------------------
# bitvit.evaluate gives what bitvit eval prints
# ---------------------------------------------------------------------------------------------


def test_evaluate_a_run_folder_equals_the_cli(tiny_run, real_env, capsys):
    run = tiny_run["run"]
    report = bitvit.evaluate(run)
    assert report == cli_json(capsys, "eval", str(run))
    assert report["model"] == str(run / "last/model.safetensors")
    # The run's own last test accuracy and loss, on its 200-image test subset.
    row = last_row(run)
    assert report["accuracy"] == pytest.approx(float(row["test_acc"]), abs=1e-6)
    assert report["loss"] == pytest.approx(float(row["test_loss"]), rel=1e-4)
    assert report["n"] == 200 and sum(map(sum, report["confusion_matrix"])) == 200
    assert list(report["per_class_accuracy"]) == ["airplane", "automobile", "bird", "cat", "deer",
                                                  "dog", "frog", "horse", "ship", "truck"]
    # limit_test and data reach the data loading, as --limit-test and --data do.
    small = bitvit.evaluate(str(run), data=real_env["BITVIT_DATA"], limit_test=50)
    assert small == cli_json(capsys, "eval", str(run), "--data", real_env["BITVIT_DATA"],
                             "--limit-test", "50")
    assert small["n"] == 50


def test_evaluate_an_exported_file_equals_the_cli(tiny_run, real_env, capsys):
    exported = tiny_run["export"]
    for engine in ("int", "fp"):
        report = bitvit.evaluate(str(exported), engine=engine)
        assert report == cli_json(capsys, "eval", str(exported), "--engine", engine)
        assert report["model"] == str(exported) and report["n"] == 200
        # fp16 parameters move logits by ~1e-3, which can flip a near-tie: 2 of 200 at most.
        assert report["accuracy"] == pytest.approx(float(last_row(tiny_run["run"])["test_acc"]),
                                                   abs=0.01)
    # A model already loaded gives the same report as its file.
    assert bitvit.evaluate(bitvit.load(exported)) == bitvit.evaluate(exported)


def test_a_run_trained_on_data_it_found_evaluates_on_that_data(tiny_run, real_env, tmp_path,
                                                              monkeypatch):
    import bitvit.data.download

    assert load_config(tiny_run["run"] / "config.yaml").data.path is None  # found via the env
    monkeypatch.delenv("BITVIT_DATA")  # a new shell ...
    monkeypatch.setattr(bitvit.data.download, "DEFAULT_DATA", tmp_path / "nowhere")  # ... elsewhere
    got = bitvit.evaluate(tiny_run["run"], limit_test=50)
    assert got["n"] == 50
    with pytest.raises(bitvit.data.DataError, match="no data found"):
        bitvit.evaluate(tiny_run["export"], limit_test=50)  # an export records no run's data


def test_accuracies_are_exact_fractions_and_a_class_without_images_has_none():
    from bitvit.data import ImageSet
    from bitvit.training.evaluation import evaluate_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    images = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(20) % 2  # no image of class "c"
    got = evaluate_model(model, ImageSet(images, labels, ["a", "b", "c"]), (0.5,) * 3, (0.25,) * 3)
    right = sum(row[i] for i, row in enumerate(got["confusion_matrix"]))
    assert got["accuracy"] == right / 20  # exactly, not a float32 mean
    assert got["per_class_accuracy"]["c"] is None
    assert got["per_class_accuracy"]["a"] == got["confusion_matrix"][0][0] / 10


def test_evaluate_bad_sources_and_options(tiny_run, real_env, tmp_path):
    with pytest.raises(CheckpointError, match=r"no best/model.safetensors .*validation split"):
        bitvit.evaluate(tiny_run["run"], best=True)  # no validation split, so no best/
    with pytest.raises(ExportError, match=r"model.safetensors: an exported file has no best/"):
        bitvit.evaluate(tiny_run["export"], best=True)
    with pytest.raises(CheckpointError, match="nothing: no such checkpoint"):
        bitvit.evaluate(tmp_path / "nothing")
    model = build_model(load_config(None, ["model.dim=32", "model.depth=2", "model.heads=4"]))
    with pytest.raises(TypeError, match="needs data as an ImageSet"):
        bitvit.evaluate(model)
    with pytest.raises(TypeError, match="compile applies when evaluate loads the model"):
        bitvit.evaluate(bitvit.load(tiny_run["export"]), compile=True)
    for size in (0, -1, 2.5, True):  # a raw range() error and an IndexError before
        with pytest.raises(ConfigError, match=rf"batch_size={size!r}: expected an integer >= 1"):
            bitvit.evaluate(tiny_run["export"], batch_size=size)


def test_eval_compile_reaches_a_checkpoint(tiny_run, real_env, capsys, monkeypatch):
    """A training checkpoint has no bitvit.load: --compile goes through compile_model."""
    compiled = []

    def spy(model, example=None, **kw):
        compiled.append(example.shape)
        return model

    monkeypatch.setattr(bitvit.deploy.engine, "compile_model", spy)
    report = cli_json(capsys, "eval", str(tiny_run["run"]), "--compile")
    assert compiled == [(200, 3, 32, 32)]  # one batch (eval_batch_size 500 > 200 images)
    assert report == bitvit.evaluate(tiny_run["run"])


# ---------------------------------------------------------------------------------------------
# --engine and --compile reach bitvit.load
# ---------------------------------------------------------------------------------------------


class Reached(Exception):
    """Raised by the spy once `load` is called, to stop before any data is read."""


@pytest.fixture
def spied_load(tmp_path, monkeypatch) -> tuple[Path, list[dict]]:
    """A small exported file (no training) and the keyword arguments `load` is called with."""
    config = Config.from_dict({"model": {"image_size": 16, "patch_size": 4, "dim": 32,
                                         "depth": 1, "heads": 2, "num_classes": 3},
                               "quant": {"method": "b158"},
                               "data": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    path = export_model(build_model(config), config, ["a", "b", "c"], tmp_path / "m.safetensors")
    calls: list[dict] = []

    def spy(source, **kw):
        calls.append(kw)
        raise Reached

    monkeypatch.setattr(bitvit.deploy.export, "load", spy)
    return path, calls


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize(("flags", "engine", "compile"), [
    ([], "int", False), (["--engine", "fp"], "fp", False), (["--compile"], "int", True),
    (["--engine", "fp", "--compile"], "fp", True)])
def test_engine_and_compile_reach_load(spied_load, tmp_path, command, flags, engine, compile):
    path, calls = spied_load
    images = [str(tmp_path)] if command == "predict" else []
    with pytest.raises(Reached):
        main([command, str(path), *images, "--device", "cpu", *flags])
    assert len(calls) == 1
    assert calls[0]["engine"] == engine and calls[0]["compile"] is compile
    assert torch.device(calls[0]["device"]) == torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# train --resume refuses what it would ignore
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", [
    ["--config", "configs/paper.yaml"], ["--out", "elsewhere"], ["--download"],
    ["--quant", "fp"], ["--where", "mlp"], ["--act-bits", "8"], ["--seed", "0"],
    ["--limit-train", "100"], ["--limit-test", "0"], ["--init-from", "runs/fp"],
    ["train.lr=0.1"]])
def test_resume_refuses_options_it_would_ignore(tmp_path, capsys, given):
    # The run folder does not exist: the refusal must come before anything is read.
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "3", *given]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"bitvit train: error: {given[0]} cannot be given with --resume")
    assert "only --epochs N" in err


def test_resume_takes_epochs_data_and_quiet(tiny_run, real_env, tmp_path, capsys):
    run, moved = tmp_path / "run", tmp_path / "moved.tar.gz"
    shutil.copytree(tiny_run["run"], run)
    moved.symlink_to(real_env["BITVIT_DATA"])  # the same images, relocated
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet", "--data",
                 str(moved)]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])  # after the epoch's line
    assert out["status"] == "finished" and out["epoch"] == 2
    assert isinstance(out["epoch"], int)
    saved = load_config(run / "config.yaml")
    assert saved.data.path == str(moved) and saved.train.epochs == 2


def test_sigint_interrupts_even_when_started_ignored(tmp_path):
    """`nohup bitvit sweep ... &` inherits SIGINT ignored; `kill -INT` must still stop it."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
