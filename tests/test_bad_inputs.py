"""Bad input through the real command line: exit status 2 and one line on stderr naming the
culprit (the override's key, the file, the refused global), never a traceback."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_16PX, one_line_error, write_image_folder
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bitvit.cli import main
from bitvit.deploy.export import _digest, _metadata_digest
from bitvit.training.checkpoint import write_checksums
from bitvit.training.rundir import read_metrics


@pytest.fixture
def exported(tiny_run) -> Path:
    return tiny_run["export"]


# --- overrides ----------------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["train.betas=[0.9,",
                                      'train.betas=!!python/object/apply:os.system ["echo hi"]'])
@pytest.mark.parametrize("command", ["train", "profile"])
def test_override_that_is_not_valid_yaml(capsys, tmp_path, override, command):
    source = ["profile", str(Path(__file__).parents[1] / "configs/paper.yaml")]
    argv = ["train", "--out", str(tmp_path / "run")] if command == "train" else source
    err = one_line_error(capsys, *argv, override)
    assert "override train.betas=" in err and "not a valid YAML value" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("digits, words", [(400, "is too large for a float"),
                                            (5000, "a value YAML cannot read")])
def test_an_override_of_a_number_too_large_is_one_line(capsys, digits, words):
    config = str(Path(__file__).parents[1] / "configs/paper.yaml")
    err = one_line_error(capsys, "profile", config, "train.lr=1" + "0" * digits)
    assert "train.lr=" in err and words in err


def test_overrides_mixed_with_options_are_applied(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BITVIT_CACHE", str(tiny_run["cache"]))
    out = tmp_path / "run"
    assert main(["train", "model.dim=64", "--data", str(tiny_run["images"]), *TINY_16PX[:2],
                 "--epochs", "1", "train.lr=0.01", "--out", str(out), "--quiet",
                 "model.depth=1", *TINY_16PX[4:], "--seed", "3", "model.heads=4"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["dim"] == 64 and saved["model"]["heads"] == 4
    assert saved["train"]["lr"] == 0.01 and saved["train"]["epochs"] == 1
    assert saved["train"]["seed"] == 3
    # Still refused, before or after an option: what is not section.key=value.
    for argv in (["stray", "--epochs", "1"], ["--epochs", "1", "train.lr=0.1", "stray"],
                 ["train.lr=0.1", "--epochs", "1", "stray"]):
        err = one_line_error(capsys, "train", *argv)
        assert "override 'stray': expected section.key=value" in err
    with pytest.raises(SystemExit) as e:
        main(["train", "train.lr=0.1", "--epochs", "1", "--no-such-option"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        "bitvit train: error: unrecognized arguments: --no-such-option "
        "(see bitvit train --help)\n")
    # argparse's own errors are one line too (it printed its usage block first), with a pointer
    # to the help.
    for argv, expected in ((["train", "--epochs", "abc"], "bitvit train: error: argument "
                            "--epochs: invalid int value: 'abc' (see bitvit train --help)"),
                           (["predict", "m.safetensors", "x.png", "--engine", "foo"],
                            "argument --engine: invalid choice: 'foo'"),
                           (["nope"], "bitvit: error: argument command: invalid choice")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_overrides_after_options_in_sweep_and_profile(tmp_path, capsys):
    config = Path(__file__).parents[1] / "configs/paper.yaml"
    assert main(["profile", str(config), "--json", "model.depth=2", "--quant", "fp",
                 "model.dim=64"]) == 0
    mixed = capsys.readouterr().out
    assert main(["profile", str(config), "model.depth=2", "model.dim=64", "--json", "--quant",
                 "fp"]) == 0
    assert capsys.readouterr().out == mixed
    err = one_line_error(capsys, "profile", str(config), "--json", "model.depth=2",
                         "model.heads=3")
    assert "model.heads=3 must divide model.dim" in err
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": str(config), "out": str(tmp_path / "runs"),
                                     "grid": {"quant.method": ["fp"]}}))
    err = one_line_error(capsys, "sweep", str(sweep), "--dry-run", "model.heads=3")
    assert "model.heads=3 must divide model.dim" in err
    # A bad value in the grid names the sweep file (on its base), not the base alone.
    sweep.write_text(yaml.safe_dump({"base": str(config), "out": str(tmp_path / "runs"),
                                     "grid": {"model.dim": ["abc"]}}))
    err = one_line_error(capsys, "sweep", str(sweep), "--dry-run")
    assert err.startswith(f"bitvit sweep: error: {sweep} (base {config}): model.dim=")


# --- config and sweep files -----------------------------------------------------------------------


def test_config_that_is_a_folder_or_binary(tmp_path, capsys):
    err = one_line_error(capsys, "train", "--config", str(tmp_path))
    assert f"{tmp_path}: is a folder" in err
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    err = one_line_error(capsys, "train", "--config", str(binary))
    assert f"{binary}: not a text file" in err
    err = one_line_error(capsys, "sweep", str(binary))
    assert f"{binary}: not a text file" in err
    err = one_line_error(capsys, "sweep", str(tmp_path))
    assert f"{tmp_path}: is a folder" in err


@pytest.mark.parametrize("text", ["1: 2", "{model: [1], 2: x}"])
def test_config_with_odd_sections(tmp_path, capsys, text):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    err = one_line_error(capsys, "train", "--config", str(config), "model.dim=64")
    assert f"{config}: " in err and ("unknown section" in err or "must be a mapping" in err)


# --- predict: images --------------------------------------------------------------------------


def test_predict_decompression_bomb(exported, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 1-bit zeros: ~50 KB on disk, 400M pixels
    assert bomb.stat().st_size < 100_000
    err = one_line_error(capsys, "predict", str(exported), str(bomb), "--device", "cpu")
    assert f"{bomb}: not a readable image" in err and "decompression bomb" in err


@pytest.mark.parametrize("damage", ["truncated_png", "truncated_jpeg", "corrupt_png", "empty",
                                    "not_an_image"])
def test_predict_unreadable_images(exported, tmp_path, capsys, damage):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    good = tmp_path / ("good.jpg" if damage == "truncated_jpeg" else "good.png")
    Image.fromarray(pixels).save(good)
    data = good.read_bytes()
    bad = tmp_path / f"bad{good.suffix}"
    bad.write_bytes({"truncated_png": data[:len(data) // 2],
                     "truncated_jpeg": data[:len(data) // 2],
                     "corrupt_png": data[:100] + bytes(20) + data[120:],
                     "empty": b"",
                     "not_an_image": b"just some text\n"}[damage])
    err = one_line_error(capsys, "predict", str(exported), str(good), str(bad), "--device", "cpu")
    assert f"{bad}: not a readable image" in err


# --- predict: the export's preprocessing metadata -----------------------------------------------


def with_metadata(src: Path, dst: Path, **changes: str) -> Path:
    """A copy of a safetensors file with changed metadata entries (tensors intact)."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta = {**meta, **changes}
    meta["metadata_sha256"] = _metadata_digest(meta)  # consistent, as another writer's would be
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


def with_preprocessing(src: Path, dst: Path, **changes) -> Path:
    """A copy of an export with changed preprocessing metadata (tensors and checksum intact)."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    assert meta["sha256"] == _digest(load_file(str(src)))
    return with_metadata(src, dst, preprocessing=json.dumps(
        {**json.loads(meta["preprocessing"]), **changes}))


DEEP_JSON = "[" * 100_000 + "]" * 100_000  # past Python's recursion limit


@pytest.mark.parametrize("key", ["config", "classes", "preprocessing", "layers"])
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_export_metadata_nested_too_deeply(exported, tmp_path, capsys, key, command):
    bad = with_metadata(exported, tmp_path / "bad.safetensors", **{key: DEEP_JSON})
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    args = [str(image)] if command == "predict" else []
    err = one_line_error(capsys, command, str(bad), *args, "--device", "cpu")
    assert f"{bad}: bad export metadata" in err and "nested too deeply" in err


def test_export_metadata_of_a_model_too_big_to_build(exported, tmp_path, capsys):
    with safe_open(str(exported), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    config["model"].update(dim=1_000_000_000, heads=1)  # a 14 kB file claiming exabytes
    bad = with_metadata(exported, tmp_path / "bad.safetensors", config=json.dumps(config))
    err = one_line_error(capsys, "eval", str(bad), "--device", "cpu")
    assert str(bad) in err and "memory" in err


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("config", DEEP_JSON, "nested too deeply"),
    ("classes", '"5"', "classes is not a list of names"),
])
def test_checkpoint_metadata_that_is_not_what_it_should_be(tiny_run, tmp_path, capsys, key,
                                                           value, expected):
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    model = run / "last" / "model.safetensors"
    with_metadata(model, model, **{key: value})
    write_checksums(run / "last", ["model.safetensors", "state.pt"])  # intact, but wrong inside
    for command in (["export", str(run), "--out", str(tmp_path / "m.safetensors")],
                    ["eval", str(run), "--device", "cpu"]):
        err = one_line_error(capsys, *command)
        assert "bad checkpoint metadata" in err and expected in err, err


def test_checksums_json_nested_too_deeply(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    (run / "last" / "checksums.json").write_text(DEEP_JSON)
    err = one_line_error(capsys, "eval", str(run), "--device", "cpu")
    assert "checksums.json: unreadable" in err and "nested too deeply" in err


@pytest.mark.parametrize(("changes", "expected"), [
    ({"image_size": 0}, "preprocessing.image_size=0: expected model.image_size=16"),
    ({"image_size": "16"}, "preprocessing.image_size='16': expected an integer"),
    ({"channels": 1}, "preprocessing.channels=1: expected model.in_channels=3"),
    ({"mean": [0.5]}, r"preprocessing.mean=\[0.5\]: expected one number per channel \(3\)"),
    ({"std": [0.2, 0.0, 0.2]}, r"preprocessing.std=\[0.2, 0.0, 0.2\]: expected finite numbers > 0"),
    ({"std": [0.2, -1, 0.2]}, "preprocessing.std=.*: expected finite numbers > 0"),
    ({"mean": [0.5, float("nan"), 0.5]}, "preprocessing.mean=.*nan.*: expected finite numbers"),
    ({"interpolation": "nearest"}, "preprocessing.interpolation='nearest'"),
])
def test_predict_bad_preprocessing_metadata(exported, tmp_path, capsys, changes, expected):
    bad = with_preprocessing(exported, tmp_path / "bad.safetensors", **changes)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    err = one_line_error(capsys, "predict", str(bad), str(image), "--device", "cpu")
    assert f"{bad}: bad export metadata" in err and str(image) not in err
    assert re.search(expected, err), err


def test_predict_model_that_is_a_folder(tmp_path, capsys):
    err = one_line_error(capsys, "predict", str(tmp_path), str(tmp_path))
    assert f"{tmp_path}: is a folder; expected an exported .safetensors file" in err


# --- resume: a state.pt with a code payload -------------------------------------------------


class RunsCode:
    """Pickles as a call of os.system: what a malicious state.pt holds."""

    def __reduce__(self):
        return (os.system, ("true",))


def test_resume_refuses_data_with_other_classes(tiny_run, tmp_path, capsys, monkeypatch):
    # The same number of classes, other names: the head's rows would mean other labels.
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "cache"))
    other = write_image_folder(tmp_path / "other", classes=("cat", "emu"))
    err = one_line_error(capsys, "train", "--resume", str(run), "--epochs", "2", "--quiet",
                         "--data", str(other))
    assert "trained on the classes ['cat', 'dog'] but the data has ['cat', 'emu']" in err
    assert len(read_metrics(run / "metrics.csv")) == 1


def test_a_kept_head_of_other_classes_is_said(tiny_run, tmp_path, capsys, monkeypatch):
    # Starting from a run of cat/dog on cat/emu: the head fits, but its second row was "dog".
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "cache"))
    other = write_image_folder(tmp_path / "other", classes=("cat", "emu"))
    for data, said in ((other, True), (tiny_run["images"], False)):
        capsys.readouterr()
        assert main(["train", "--init-from", str(tiny_run["run"]), "--data", str(data),
                     "--out", str(tmp_path / f"run-{said}"), "--epochs", "1", "--quiet",
                     "quant.method=b158", "train.batch_size=4"]) == 0
        note = ("the head is the source's, whose rows are the classes ['cat', 'dog'], not the "
                "data's ['cat', 'emu']: each starts as another class's")
        assert (note in capsys.readouterr().err) == said


def test_resume_refuses_other_images_of_the_same_classes(tiny_run, tmp_path, capsys,
                                                       monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other"
    shutil.copytree(tiny_run["images"], other)
    first = sorted((other / "train/cat").iterdir())[0]
    Image.new("RGB", (16, 16), (255, 0, 0)).save(first)  # one image differs
    err = one_line_error(capsys, "train", "--resume", str(run), "--epochs", "2", "--quiet",
                         "--data", str(other))
    assert f"{run}: the data at {other} are not the images the run trained on" in err
    assert len(read_metrics(run / "metrics.csv")) == 1
    moved = tmp_path / "moved"  # the same images elsewhere: resumes
    shutil.copytree(tiny_run["images"], moved)
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet", "--data",
                 str(moved)]) == 0
    assert len(read_metrics(run / "metrics.csv")) == 2


def test_resume_refuses_a_state_with_a_code_payload(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BITVIT_CACHE", str(tiny_run["cache"]))
    evil = tmp_path / "evil"
    shutil.copytree(tiny_run["run"], evil)
    state = torch.load(tiny_run["run"] / "last/state.pt", weights_only=True)
    torch.save({**state, "epoch": RunsCode()}, evil / "last/state.pt")
    # The checksums are no signature: an attacker rewrites them too, and the loader must hold.
    write_checksums(evil / "last", ("model.safetensors", "state.pt"))
    err = one_line_error(capsys, "train", "--resume", str(evil), "--epochs", "2", "--quiet")
    assert f"{evil / 'last/state.pt'}: unreadable training state" in err
    # os.system is posix.system on Linux (its __module__): torch names that.
    assert f"refuses the global {os.system.__module__}.system" in err
    assert "weights_only" not in err and "trust" not in err


def test_a_run_json_nested_too_deeply_is_read_as_missing(tiny_run, tmp_path, capsys):
    from bitvit.training import rundir

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    (run / "run.json").write_text(DEEP_JSON)
    assert rundir.read_info(run) == {}
    assert main(["compare", str(run)]) == 0


@pytest.mark.parametrize(("var", "command"), [("BITVIT_ENGINE", "eval"),
                                              ("BITVIT_ENGINE", "predict"),
                                              ("BITVIT_INT_KERNEL", "eval")])
def test_a_bad_engine_or_kernel_variable_is_one_line(exported, tmp_path, capsys, monkeypatch,
                                                     var, command):
    from bitvit.nn import kernels

    monkeypatch.setattr(kernels, "_CHOICES", {})  # decided once per process: decide anew
    monkeypatch.setenv(var, "bogus")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    args = [str(image)] if command == "predict" else []
    err = one_line_error(capsys, command, str(exported), *args, "--device", "cpu",
                         *(["--engine", "int"] if var == "BITVIT_INT_KERNEL" else []))
    assert f"${var}='bogus': expected one of" in err


def test_only_commands_that_own_run_folders_turn_sigterm_into_an_interrupt(exported, capsys):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    try:
        main(["profile", str(exported)])  # stuck in native code, it must still die at a kill
        assert signal.getsignal(signal.SIGTERM) == before
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_path_with_a_newline_or_of_ten_thousand_characters_is_still_one_line(tmp_path,
                                                                                capsys):
    err = one_line_error(capsys, "eval", str(tmp_path / "run\nfolder"))
    assert "run folder" in err
    err = one_line_error(capsys, "eval", str(tmp_path / ("x" * 200)) * 50)
    assert len(err) <= 2100 and err.endswith("...")


def test_log_warnings_print_as_the_commands_own_one_line_notices(exported, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.delenv("BITVIT_ENGINE", raising=False)  # auto: reads the engine cache
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path))
    (tmp_path / "engines.json").write_text("{not json")
    assert main(["eval", str(exported), "--device", "cpu"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith("bitvit eval: ") for line in err), err
    assert any(line.startswith("bitvit eval: warning: engine cache") and "measuring again" in line
               for line in err), err


def test_a_class_name_with_a_newline_keeps_predict_at_one_line_per_image(exported, tmp_path,
                                                                          capsys):
    with safe_open(str(exported), framework="pt") as f:
        classes = json.loads(f.metadata()["classes"])
    named = with_metadata(exported, tmp_path / "m.safetensors",
                          classes=json.dumps(["first\nline", *classes[1:]]))
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    capsys.readouterr()
    assert main(["predict", str(named), str(image), "--top-k", str(len(classes)),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "first line" in out[0]


def test_an_export_never_overwrites_its_checkpoint_nor_takes_the_other_suffix(tiny_run,
                                                                             tmp_path, capsys):
    run = tiny_run["run"]
    model = run / "last/model.safetensors"
    before = model.read_bytes()
    for out in (model, run / "last/state.pt"):
        err = one_line_error(capsys, "export", str(run), "--out", str(out))
        assert f"{out}: is part of the checkpoint it exports" in err
    # Nor any other file of a run folder: its config, metrics, record, figure.
    files = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.csv",
                                                           "run.json", "curves.png")}
    for name in files:
        err = one_line_error(capsys, "export", str(run), "--out", str(run / name))
        assert f"{run / name}: is a file of the run folder {run}" in err
    assert all((run / name).read_bytes() == data for name, data in files.items())
    assert model.read_bytes() == before
    err = one_line_error(capsys, "export", str(run), "--out", str(tmp_path / "m.onnx"))
    assert "--format safetensors writes a name not ending in .onnx" in err
    err = one_line_error(capsys, "export", str(run), "--format", "onnx", "--out",
                         str(tmp_path / "m.safetensors"))
    assert "--format onnx writes .onnx" in err
    assert not list(tmp_path.iterdir())


def test_best_with_a_checkpoint_and_a_limit_below_one_are_one_line(tiny_run, capsys):
    run = tiny_run["run"]
    for src in (run / "last", run / "last/model.safetensors"):
        err = one_line_error(capsys, "export", str(src), "--best", "--out", "x.safetensors")
        assert "best" in err and str(src) in err
    err = one_line_error(capsys, "eval", str(run), "--limit-test", "0", "--device", "cpu")
    assert "limit_test=0: expected a positive number of test images (--limit-test)" in err
