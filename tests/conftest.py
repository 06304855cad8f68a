"""Shared fixtures (the real CIFAR-10 tarball, decoded once per session into a private cache)
and helpers the tests import (`one_line_error`, `hide_module`, `write_pngs`,
`write_image_folder`, `TINY_16PX`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = (ROOT / "../shared/data/cifar-10-jpeg.tar.gz").resolve()
# One integer kernel for the whole suite, so that results (and resident bytes) do not hang on a
# micro-benchmark of a shared machine; BITVIT_INT_KERNEL=fp32 runs the suite on the other one.
# tests/test_kernels.py tests the choice itself.
os.environ.setdefault("BITVIT_INT_KERNEL", "int8")
# Likewise one engine for `bitvit.load`'s default (auto): int, unmeasured. tests/test_auto.py
# tests auto itself.
os.environ.setdefault("BITVIT_ENGINE", "int")


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> dict[str, str]:
    """Environment for runs on the real data: BITVIT_DATA and a warm, session-private cache."""
    if not REAL_DATA.exists():
        pytest.skip(f"real data not found at {REAL_DATA}")
    from bitvit.data import read_images

    cache = tmp_path_factory.mktemp("bitvit-cache")
    read_images(REAL_DATA, 32, 3, cache)  # decode all 60k images once (~12 s); later loads ~0.5 s
    return {"BITVIT_DATA": str(REAL_DATA), "BITVIT_CACHE": str(cache)}


@pytest.fixture
def real_env(real_data, monkeypatch) -> dict[str, str]:
    """real_data, also set in this process's environment; returns a full env for subprocesses."""
    for key, value in real_data.items():
        monkeypatch.setenv(key, value)
    return dict(os.environ)


def one_line_error(capsys, *argv: str) -> str:
    """Run the CLI: it must exit 2 with exactly one line on stderr; return that line."""
    from bitvit.cli import main

    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"bitvit {argv[0]}: error: "), err
    return err.strip()


def hide_module(monkeypatch, name: str) -> None:
    """Make ``import name`` fail, as it does where the package is not installed."""
    import builtins
    import sys

    real = builtins.__import__

    def fake(module, *args, **kwargs):  # noqa: ANN001, ANN202
        if module == name or module.startswith(name + "."):
            raise ImportError(f"No module named {name!r}")
        return real(module, *args, **kwargs)

    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(builtins, "__import__", fake)


def write_pngs(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """``n`` random RGB PNGs of ``size`` x ``size`` pixels, 0.png, 1.png, ... in ``folder``."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"{i}.png" for i in range(n)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return paths


def write_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    """train/ (4 per class) and test/ (2 per class) of 16x16 PNGs, one folder per class."""
    for s, (split, n) in enumerate((("train", 4), ("test", 2))):
        for k, c in enumerate(classes):
            write_pngs(root / split / c, n, 16, seed=10 * s + k)
    return root


# A tiny model for write_image_folder's 16x16 images: one epoch on 8 images takes well under a
# second.
TINY_16PX = ["model.image_size=16", "model.patch_size=4", "model.dim=32", "model.depth=1",
             "model.heads=2", "model.mlp_ratio=2", "model.num_classes=2", "quant.method=b158",
             "train.batch_size=4", "train.device=cpu"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """An image folder, a finished one-epoch run of TINY_16PX on it (its data cache beside it)
    and the run's export; one per test module, read-only (copy it to change it)."""
    from bitvit.cli import main

    folder = tmp_path_factory.mktemp("tiny_run")
    images = write_image_folder(folder / "images")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITVIT_CACHE", str(folder / "cache"))
        assert main(["train", "--data", str(images), "--out", str(folder / "run"),
                     "--epochs", "1", "--quiet", *TINY_16PX]) == 0
        assert main(["export", str(folder / "run"), "--out",
                     str(folder / "model.safetensors")]) == 0
    return {"images": images, "run": folder / "run", "export": folder / "model.safetensors",
            "cache": folder / "cache"}
