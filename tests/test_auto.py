"""engine="auto" (`bitvit.deploy.auto`): the fastest exact engine, measured once per machine and
model shape and cached; ONNX Runtime on the per-token graph built in memory; the command line
saying which engine ran and why. The measurement's outcome is forced (`measure_speeds`
monkeypatched): these tests time nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hide_module
from PIL import Image

import bitvit
from bitvit.cli import main
from bitvit.deploy import auto
from bitvit.deploy.export import ExportedModel, ExportError, export_model
from bitvit.deploy.onnx_runtime import OrtModel
from bitvit.training.checkpoint import build_model
from bitvit.training.config import Config

CLASSES = ["a", "b", "c", "d"]
ORT_FASTEST = {"int": 1.0, "fp": 0.6, "ort": 3.1}


def _config(depth: int = 2, method: str = "b158") -> Config:
    return Config.from_dict({
        "model": {"image_size": 16, "patch_size": 4, "dim": 32, "depth": depth, "heads": 2,
                  "mlp_ratio": 2, "num_classes": len(CLASSES)},
        "quant": {"method": method},
        "data": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    })


def _export(path: Path, depth: int = 2, seed: int = 0) -> Path:
    config = _config(depth)
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():  # spread the logits and the tokens, as training does
        model.head.weight.mul_(20)
        model.pos_embed.mul_(20)
    return export_model(model.eval(), config, CLASSES, path, float_dtype="fp32")


def _images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)


@pytest.fixture
def fresh(monkeypatch, tmp_path) -> Path:
    """auto itself (conftest fixes $BITVIT_ENGINE for the rest of the suite), a private cache
    folder, and an export; returns the export."""
    monkeypatch.delenv("BITVIT_ENGINE", raising=False)
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "cache"))
    return _export(tmp_path / "m.safetensors")


def _measured(monkeypatch, speed: dict[str, float]) -> list[list[str]]:
    """Make every measurement report ``speed`` (for the engines measured); returns the list
    of each measurement's engines."""
    calls: list[list[str]] = []

    def fake(models, shape, device="cpu"):
        calls.append(list(models))
        assert shape == (3, 16, 16)
        return {name: speed[name] for name in models}

    monkeypatch.setattr(auto, "measure_speeds", fake)
    return calls


def _cache(tmp: Path) -> dict:
    return json.loads((tmp / "cache" / "engines.json").read_text())


# ---------------------------------------------------------------------------------------------
# The choice and its cache.
# ---------------------------------------------------------------------------------------------


def test_auto_picks_ort_when_measured_fastest_and_caches_it(fresh, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    calls = _measured(monkeypatch, ORT_FASTEST)
    model = bitvit.load(fresh)
    assert calls == [["int", "fp", "ort"]]
    assert isinstance(model, OrtModel) and model.engine == "ort"
    assert model.path == fresh and model.classes == CLASSES
    assert model.engine_reason.startswith("fastest of ort 3.10x, int 1.00x, fp 0.60x")
    assert "measured now, saved to" in model.engine_reason
    data = _cache(fresh.parent)
    assert data["version"] == auto.CACHE_VERSION
    (key, entry), = data["entries"].items()
    assert entry["engine"] == "ort" and entry["speed"] == ORT_FASTEST
    assert f"{torch.get_num_threads()} threads" in key and f"torch {torch.__version__}" in key
    assert "onnxruntime " in key and "dim 32 depth 2" in key and "b158" in key
    # A new process reads the verdict: no second measurement.
    again = bitvit.load(fresh)
    assert len(calls) == 1 and again.engine == "ort" and isinstance(again, OrtModel)
    assert again.engine_reason.endswith(f"(batches 1 and 32; cached "
                                        f"{fresh.parent / 'cache' / 'engines.json'})")
    assert auto.choose_engine(fresh).name == "ort" and len(calls) == 1


@pytest.mark.parametrize("speed, engine", [({"int": 1.0, "fp": 1.4, "ort": 0.9}, "fp"),
                                           ({"int": 1.0, "fp": 1.0, "ort": 1.0}, "int")])
def test_auto_picks_a_torch_engine_when_it_is_fastest(fresh, monkeypatch, speed, engine):
    calls = _measured(monkeypatch, speed)
    model = bitvit.load(fresh)
    assert len(calls) == 1 and model.engine == engine  # a tie keeps int
    assert isinstance(model, ExportedModel) and not isinstance(model, OrtModel)
    assert {m.engine for m in model.modules() if hasattr(m, "kernel")} == {engine}


def test_auto_without_onnxruntime_measures_the_torch_engines(fresh, monkeypatch):
    hide_module(monkeypatch, "onnxruntime")
    calls = _measured(monkeypatch, {"int": 1.0, "fp": 0.7})
    model = bitvit.load(fresh)
    assert calls == [["int", "fp"]] and model.engine == "int"
    assert "ort not a candidate: onnx/onnxruntime not installed" in model.engine_reason
    (key,) = _cache(fresh.parent)["entries"]
    assert "onnxruntime none" in key


def test_an_ort_that_cannot_be_built_is_left_out_of_the_cache_not_measured_again(
        fresh, monkeypatch):
    pytest.importorskip("onnxruntime")

    def no_onnx(*args, **kwargs):
        raise auto.OnnxUnavailableError("onnx: broken install")

    monkeypatch.setattr(auto, "ort_model", no_onnx)
    calls = _measured(monkeypatch, {"int": 1.0, "fp": 0.7})
    model = bitvit.load(fresh)
    assert calls == [["int", "fp"]] and model.engine == "int"
    assert "ort not a candidate: its ONNX graph could not be built" in model.engine_reason
    (entry,) = _cache(fresh.parent)["entries"].values()
    assert entry["unavailable"] == ["ort"]
    assert bitvit.load(fresh).engine == "int" and len(calls) == 1  # cached, not measured again


def test_the_cache_is_keyed_by_model_shape_not_weights(fresh, monkeypatch, tmp_path):
    calls = _measured(monkeypatch, {"int": 1.0, "fp": 2.0, "ort": 0.5})
    bitvit.load(fresh)
    other_weights = _export(tmp_path / "other.safetensors", seed=3)
    assert bitvit.load(other_weights).engine == "fp" and len(calls) == 1
    deeper = _export(tmp_path / "deeper.safetensors", depth=3)
    bitvit.load(deeper)
    assert len(calls) == 2 and len(_cache(tmp_path)["entries"]) == 2
    # Every setting an engine computes otherwise is part of the key.
    base = auto.model_key(_config())
    for key, value in (("norm_eps", 1e-6), ("final_norm", "none"), ("qkv_bias", False),
                       ("gelu", "tanh"), ("pooling", "mean")):
        changed = Config.from_dict({**_config().to_dict(), "model": {
            **_config().to_dict()["model"], key: value}})
        assert auto.model_key(changed) != base, key


@pytest.mark.parametrize("content", [
    "{not json", "[1, 2]", '{"version": 1, "entries": 3}', '{"version": 99, "entries": {}}',
    '{"version": 1, "entries": {"KEY": {"engine": "int", "speed": {"int": "fast"}}}}',
    '{"version": 1, "entries": {"KEY": {"engine": "fp", "speed": {"fp": 2.0}}}}',
    '{"version": 1, "entries": {"KEY": {"engine": "int", "speed": {"int": 1, "fp": 1'
    + "0" * 400 + ', "ort": 1}}}}',
    '{"version": 1, "entries": {"KEY": {"engine": "int", "speed": {"int": 1.0}, '
    '"unavailable": ["int", "fp", "ort"]}}}',
])
def test_a_corrupt_cache_is_measured_again_and_rewritten(fresh, monkeypatch, tmp_path,
                                                         content):
    calls = _measured(monkeypatch, {"int": 1.0, "fp": 1.5, "ort": 0.5})
    bitvit.load(fresh)  # learn the key
    (key,) = _cache(tmp_path)["entries"]
    (tmp_path / "cache" / "engines.json").write_text(content.replace("KEY", key))
    model = bitvit.load(fresh)
    assert len(calls) == 2 and model.engine == "fp"
    data = _cache(tmp_path)
    assert data["version"] == 1 and data["entries"][key]["speed"]["fp"] == 1.5


def test_env_and_compile_decide_without_measuring(fresh, monkeypatch):
    calls = _measured(monkeypatch, ORT_FASTEST)
    monkeypatch.setenv("BITVIT_ENGINE", "fp")
    model = bitvit.load(fresh)
    assert model.engine == "fp" and model.engine_reason == "set by $BITVIT_ENGINE=fp"
    monkeypatch.setenv("BITVIT_ENGINE", "fast")
    with pytest.raises(ValueError, match=r"^\$BITVIT_ENGINE='fast': expected one of auto, int, "
                                         r"fp, ort$"):
        bitvit.load(fresh)
    monkeypatch.setenv("BITVIT_ENGINE", "auto")
    choice = auto._decide(fresh, torch.device("cpu"), compile=True)[0]
    assert choice.name == "int" and "compile" in choice.reason
    assert calls == []
    # Explicit engines are taken as given.
    assert bitvit.load(fresh, engine="fp").engine_reason == "given"
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        bitvit.load(fresh, engine="fast")


def test_ort_engine_refuses_what_it_cannot_do(fresh):
    for kwargs, words in (({"compile": True}, "compile (--compile) applies to the int and fp"),
                          ({"device": "cuda"}, "runs on the CPU; device cuda")):
        with pytest.raises(ExportError, match=re.escape(words)) as e:
            bitvit.load(fresh, engine="ort", **kwargs)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# The in-memory graph and the measurement.
# ---------------------------------------------------------------------------------------------


def test_in_memory_token_graph_predicts_as_the_int_engine(fresh):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    ort = bitvit.load(fresh, engine="ort")
    assert isinstance(ort, OrtModel) and ort.act_quant == "token" and ort.engine == "ort"
    assert ort.config.model.dim == 32 and ort.preprocessing.image_size == 16
    assert not (fresh.parent / "m.onnx").exists()  # nothing written
    int_model = bitvit.load(fresh, engine="int")
    images = _images(48)
    # The int engine's arithmetic: fp32 rounding order aside (tests/test_onnx.py's ATOL_TOKEN).
    torch.testing.assert_close(ort.logits(images), int_model.logits(images), rtol=0, atol=1e-4)
    for got, want in zip(ort.predict(images, 2), int_model.predict(images, 2), strict=True):
        assert [c for c, _ in got] == [c for c, _ in want]
        assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-5)


def test_measure_speeds_is_relative_to_int(monkeypatch):
    monkeypatch.setattr(auto, "BUDGET_S", 0.0)  # one round per batch size
    calls = {"int": 0, "slow": 0}

    class Model(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x):
            calls[self.name] += 1
            assert x.shape[1:] == (3, 8, 8) and x.shape[0] in auto.BATCHES
            return x

    speed = auto.measure_speeds({"int": Model("int"), "slow": Model("slow")}, (3, 8, 8))
    assert speed["int"] == 1.0 and speed["slow"] > 0
    assert calls == {"int": 2 * len(auto.BATCHES), "slow": 2 * len(auto.BATCHES)}


# ---------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------


def _image_folder(folder: Path, n: int = 3) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
    return folder


def test_predict_runs_the_exact_onnx_graph_when_fastest_and_says_so(fresh, monkeypatch,
                                                                     capsys, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    calls = _measured(monkeypatch, ORT_FASTEST)
    images = _image_folder(tmp_path / "images")
    assert main(["predict", str(fresh), str(images), "--json", "--top-k", "3"]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert len(rows) == 3 and len(calls) == 1
    assert {r["engine"] for r in rows} == {"ort"}
    assert rows[0]["engine_reason"].startswith("fastest of ort 3.10x, int 1.00x, fp 0.60x")
    assert out.err.startswith("bitvit predict: engine: ort (fastest of ort 3.10x")
    assert out.err.count("\n") == 1
    # The same predictions as the int engine, which the command line still runs when asked.
    assert main(["predict", str(fresh), str(images), "--json", "--top-k", "3",
                 "--engine", "int"]) == 0
    out = capsys.readouterr()
    ref = [json.loads(line) for line in out.out.splitlines()]
    assert {r["engine"] for r in ref} == {"int"} and "engine: int (given)" in out.err
    for a, b in zip(rows, ref, strict=True):
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
        assert [p["probability"] for p in a["predictions"]] == pytest.approx(
            [p["probability"] for p in b["predictions"]], abs=1e-5)
    # Plain output: the engine on stderr, after the predictions.
    assert main(["predict", str(fresh), str(images)]) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 3 and "engine: ort (fastest of" in out.err
    assert "cached" in out.err and len(calls) == 1


def test_eval_and_profile_name_the_engine(fresh, monkeypatch, capsys):
    from bitvit.data import ImageSet

    _measured(monkeypatch, {"int": 1.0, "fp": 1.3, "ort": 0.8})
    labels = torch.arange(12) % len(CLASSES)
    report = bitvit.evaluate(fresh, ImageSet(_images(12), labels, CLASSES))
    assert report["engine"] == "fp" and report["engine_reason"].startswith("fastest of fp 1.30x")
    assert main(["profile", str(fresh), "--json"]) == 0
    profile = json.loads(capsys.readouterr().out)
    assert profile["engine"] == "fp" and "cached" in profile["engine_reason"]
    assert main(["profile", str(fresh)]) == 0
    assert "Engine auto would run this file with: fp (fastest of fp 1.30x" in (
        capsys.readouterr().out)
