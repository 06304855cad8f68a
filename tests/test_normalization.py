"""data.mean / data.std: auto resolves to CIFAR-10's published values on CIFAR-10, else to the
training split's statistics (computed once, cached); runs record the numbers they used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from test_data import make_arrays, make_tar, write_binary, write_folder, write_python

import bitvit.data as D
from bitvit.cli import main
from bitvit.data import CIFAR10_MEAN, CIFAR10_STD, DataConfig, DataError, load_data
from bitvit.data import sources as data_sources
from bitvit.deploy.export import ExportError, export_model
from bitvit.studies.sweep import SweepError, run_state
from bitvit.training.config import Config, ConfigError, load_config

GRAY_CLASSES = ["dark", "light", "mid"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("BITVIT_DATA", raising=False)
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "cache"))


def gray_folder(root: Path, per_class: int = 12) -> tuple[Path, np.ndarray]:
    """28x28 'L' PNGs, 3 classes of distinct brightness; returns the folder and its train pixels."""
    rng = np.random.default_rng(0)
    train = []
    for split, n in (("train", per_class), ("test", 4)):
        for c, (name, base) in enumerate(zip(GRAY_CLASSES, (20, 160, 60), strict=True)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                im = np.clip(base + rng.normal(0, 25 + 10 * c, (28, 28)), 0, 255).astype(np.uint8)
                Image.fromarray(im, mode="L").save(folder / f"{i:03d}.png")
                if split == "train":
                    train.append(im)
    return root, np.stack(train)


TINY_GRAY = ["model.in_channels=1", "model.image_size=28", "model.patch_size=7", "model.dim=32",
             "model.depth=1", "model.heads=2", "model.num_classes=3", "train.batch_size=12",
             "train.device=cpu"]


def test_grayscale_folder_trains_with_computed_statistics(tmp_path, capsys):
    src, pixels = gray_folder(tmp_path / "gray")
    expected_mean, expected_std = (pixels / 255.0).mean(), (pixels / 255.0).std()
    run = tmp_path / "run"
    assert main(["train", "--data", str(src), "--out", str(run), "--epochs", "1", "--quiet",
                 *TINY_GRAY]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert saved["mean"] == [pytest.approx(expected_mean, rel=1e-12)]
    assert saved["std"] == [pytest.approx(expected_std, rel=1e-12)]
    assert abs(expected_mean - 0.4914) > 0.05  # not CIFAR's numbers by chance

    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert "accuracy" in capsys.readouterr().out

    exported = tmp_path / "model.safetensors"
    assert main(["export", str(run), "--out", str(exported)]) == 0
    with safe_open(str(exported), framework="pt") as f:
        pre = json.loads(f.metadata()["preprocessing"])
        config = json.loads(f.metadata()["config"])
    assert pre["channels"] == 1
    assert pre["mean"] == saved["mean"] and pre["std"] == saved["std"]
    assert config["data"]["mean"] == saved["mean"]


@pytest.mark.parametrize("form", ["python", "binary", "folder", "folder.tar.gz"])
def test_auto_on_cifar10_gives_the_published_values(tmp_path, form):
    arrays = make_arrays(per_class_train=3, per_class_test=1)
    if form == "python":
        src = write_python(tmp_path, arrays)
    elif form == "binary":
        src = write_binary(tmp_path, arrays)
    else:
        src = write_folder(tmp_path / "cifar-10-jpeg", arrays)
        if form.endswith("tar.gz"):
            src = make_tar(src, tmp_path / "cifar.tar.gz")
    s = load_data(DataConfig(path=str(src)))
    assert (s.mean, s.std) == (CIFAR10_MEAN, CIFAR10_STD)
    # Random pixels: their own statistics are far from the published ones.
    x = arrays[0] / 255.0
    assert abs(x.mean() - CIFAR10_MEAN[0]) > 0.001
    # A grayscale model of CIFAR-10 computes its statistics.
    gray = load_data(DataConfig(path=str(src)), channels=1)
    assert gray.mean[0] == pytest.approx(gray.train.images.double().mean().item() / 255)


def test_cifar10_names_alone_are_not_cifar10(tmp_path):
    """Class folders named like CIFAR-10's but holding 28x28 images get computed statistics."""
    root = tmp_path / "lookalike"
    for split in ("train", "test"):
        for c in D.CIFAR10_CLASSES:
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (28, 28), (10, 20, 200)).save(root / split / c / "a.png")
            Image.new("RGB", (28, 28), (30, 20, 100)).save(root / split / c / "b.png")
    s = load_data(DataConfig(path=str(root)))
    assert s.mean == pytest.approx((20 / 255, 20 / 255, 150 / 255))
    assert s.std == pytest.approx((10 / 255, 1.0, 50 / 255))  # a constant channel gets std 1


def test_statistics_are_computed_once_from_the_full_training_split(tmp_path, monkeypatch):
    src, pixels = gray_folder(tmp_path / "gray")
    cfg = DataConfig(path=str(src), limit_train=9, val_size=3)
    first = load_data(cfg, image_size=28, channels=1)
    assert len(first.train) == 6
    assert first.mean[0] == pytest.approx((pixels / 255.0).mean(), rel=1e-12)  # all 36 images
    assert len(list((tmp_path / "cache").glob("*.stats.json"))) == 1

    monkeypatch.setattr(data_sources, "channel_statistics",
                        lambda images: pytest.fail("computed again"))
    monkeypatch.setattr(data_sources, "_decode", lambda *a: pytest.fail("decoded again"))
    again = load_data(cfg, image_size=28, channels=1)
    assert (again.mean, again.std) == (first.mean, first.std)
    # Another image size is another cache entry, with its own statistics.
    monkeypatch.undo()
    other = load_data(cfg, image_size=14, channels=1)
    assert other.mean != first.mean


def test_cifar10_verdict_is_cached_too(tmp_path, monkeypatch):
    tar = make_tar(write_binary(tmp_path / "b", make_arrays(2, 1)), tmp_path / "c.tar.gz")
    assert load_data(DataConfig(path=str(tar))).mean == CIFAR10_MEAN
    monkeypatch.setattr(data_sources, "_read_tar",
                        lambda p: pytest.fail("archive read on a cache hit"))
    assert load_data(DataConfig(path=str(tar))).std == CIFAR10_STD


def test_explicit_values_win(tmp_path, monkeypatch):
    src, pixels = gray_folder(tmp_path / "gray")
    monkeypatch.setattr(data_sources, "channel_statistics", lambda images: pytest.fail("computed"))
    s = load_data(DataConfig(path=str(src), mean=(0.5,), std=(0.25,)), image_size=28, channels=1)
    assert (s.mean, s.std) == ((0.5,), (0.25,))
    monkeypatch.undo()
    # One explicit, the other auto: the auto one is resolved on its own.
    s = load_data(DataConfig(path=str(src), mean=(0.5,)), image_size=28, channels=1)
    assert s.mean == (0.5,) and s.std[0] == pytest.approx((pixels / 255.0).std(), rel=1e-12)
    cfg = load_config(None, ["data.mean=[0.1, 0.2, 0.3]", "data.std=auto"])
    assert (cfg.data.mean, cfg.data.std) == ((0.1, 0.2, 0.3), "auto")
    assert Config().data.mean == "auto"


@pytest.mark.parametrize(("override", "message"), [
    ("data.mean=automatic", "data.mean must be auto or a list of numbers"),
    ("data.std=[0.2, x, 0.2]", "data.std"),
    ("data.mean=[0.5]", "data.mean has 1 entries but the model has 3"),
    ("data.std=[0.2, 0.0, 0.2]", "data.std entries must be finite and positive"),
    ("data.mean=[.nan, 0.5, 0.5]", "data.mean entries must be finite"),
])
def test_bad_values_are_one_line(tmp_path, capsys, override, message):
    src = write_binary(tmp_path, make_arrays(2, 1))
    assert main(["train", "--data", str(src), "--out", str(tmp_path / "run"), override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_export_refuses_unresolved_statistics(tmp_path):
    from bitvit.training.checkpoint import build_model

    config = load_config(None, ["model.dim=32", "model.depth=1", "model.heads=2"])
    with pytest.raises(ExportError, match="data.mean is 'auto'"):
        export_model(build_model(config), config, [str(i) for i in range(10)],
                     tmp_path / "m.safetensors")


def test_sweep_auto_matches_a_run_that_recorded_numbers(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    recorded = load_config(None, ["data.mean=[0.4914, 0.4822, 0.4465]",
                                  "data.std=[0.2470, 0.2435, 0.2616]"])
    (run / "config.yaml").write_text(yaml.safe_dump(recorded.to_dict()))
    assert run_state(run, Config()) == "restart"  # the sweep says auto: same experiment
    other = load_config(None, ["data.mean=[0.5, 0.5, 0.5]"])
    with pytest.raises(SweepError, match="data.mean"):
        run_state(run, other)


def test_config_error_is_one_line_from_load_config():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.mean=5x"])
    assert "\n" not in str(e.value) and "data.mean" in str(e.value)
    with pytest.raises(DataError, match="normalize needs numbers"):
        D.normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), "auto", (1.0, 1.0, 1.0))


def test_real_cifar10_image_folder_gives_the_published_values(real_env):
    s = load_data(DataConfig(limit_train=100, limit_test=10))
    assert (s.mean, s.std) == (CIFAR10_MEAN, CIFAR10_STD)


def test_evaluate_resolves_a_checkpoint_saved_with_auto(tmp_path):
    """A checkpoint whose config says auto (saved from the Python API) evaluates with the
    statistics auto resolves to on its data."""
    import bitvit
    from bitvit.training.checkpoint import build_model, save_model

    src, _ = gray_folder(tmp_path / "gray", per_class=4)
    config = load_config(None, [*TINY_GRAY, f"data.path={src}"])
    model = build_model(config)
    (tmp_path / "ckpt").mkdir()
    save_model(tmp_path / "ckpt" / "model.safetensors", model, config, GRAY_CLASSES)
    report = bitvit.evaluate(tmp_path / "ckpt", device="cpu")
    s = load_data(config.data, image_size=28, channels=1)
    direct = bitvit.evaluate(model.eval(), s.test, s.mean, s.std)
    assert report.pop("model") and direct.pop("model") is None
    assert report == direct
