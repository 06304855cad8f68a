"""benchmarks/inference.py: its record's contract (header, JSON keys and their arithmetic) and
how it reports engines that fail, at a tiny size (timings themselves are not checked)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bitvit.kernels import choose_kernel, cpu_isa, isa_summary

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "inference.py"
MACHINE_KEYS = ("isa", "kernel", "kernel_reason")
PRESET_KEYS = ("speedup_fp32_b1", "speedup_fp32_b256", "best_engine_b1", "best_engine_b256",
               "speedup_ort_int8_b256", "size_ratio_fp32")  # and the same with _strong


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_inference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **env_vars}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_tiny_run_record_and_json_contract(tmp_path):
    engines = "fp32,int,fp,ort-fp32,ort-int8,ort-token,ort-tensor"
    out = tmp_path / "record.txt"
    proc = run_script("--repeats", "1", "--warmup", "0", "--batches", "1", "--presets", "paper",
                      "--threads", "1", "--engines", engines, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    header = lines[0]
    assert header.startswith("# ") and "benchmarks/inference.py" in header
    for part in ("commit ", "CPU ", "1 threads", "ISA ", "kernel "):
        assert part in header
    assert out.read_text().splitlines() == lines  # --out holds exactly the printed record
    result = json.loads(lines[-1])
    assert all(key in result for key in MACHINE_KEYS)
    # conftest fixes BITVIT_INT_KERNEL for the suite: the record names it and the choice.
    assert f"BITVIT_INT_KERNEL={os.environ['BITVIT_INT_KERNEL']} python " in header
    assert result["isa"] == isa_summary() and f"ISA {isa_summary()}," in header
    assert result["kernel"] == choose_kernel().name == os.environ["BITVIT_INT_KERNEL"]
    assert result["kernel_reason"] == choose_kernel().reason
    assert result["ort_in_speedups"] is (result["hardware_isa"] == result["isa"])
    for key in PRESET_KEYS:
        assert key in result and f"{key}_strong" in result
    assert result["threads"] == 1
    assert result["speedup_fp32_b256"] is None  # batch 256 not measured: null, not missing
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        assert result["failed"] == {}  # every engine asked for ran
    # Every engine has a row: timed, or failed with its reason in the JSON.
    for engine in engines.split(","):
        assert any(line.split()[2:3] == [engine] for line in lines[3:-1] if line[:5] == "paper")
        value = result[f"{engine}_img_s_b1"]
        assert (value is None) == (f"{engine}_b1" in result["failed"])
        assert value is None or value > 0
    # The best bitvit engine and the speedups follow from the img/s keys (rounded to 0.1 img/s).
    bitvit = {e: result.get(f"{e}_img_s_b1") for e in ("int", "int-c", "ort-token", "ort-tensor")}
    bitvit = {e: v for e, v in bitvit.items() if v}
    assert result["best_engine_b1"] == max(bitvit, key=bitvit.get)
    best = bitvit[result["best_engine_b1"]]
    assert result["speedup_fp32_b1"] == pytest.approx(best / result["fp32_img_s_b1"], rel=0.02)
    if result["ort-int8_img_s_b1"]:
        assert result["speedup_ort_int8_b1"] == pytest.approx(
            best / result["ort-int8_img_s_b1"], rel=0.02)
    # Sizes: the fp32 checkpoint holds 4 bytes per parameter (plus a small header); the ratio
    # is the exported file over it.
    bench = bench_module()
    n_params = sum(p.numel() for p in bench.VisionTransformer(bench.PRESETS["paper"]).parameters())
    assert 4 * n_params < result["fp32_bytes"] < 4 * n_params + 100_000
    assert result["size_ratio_fp32"] == pytest.approx(
        result["exported_bytes"] / result["fp32_bytes"], abs=1e-4)
    assert result["size_ratio_fp32"] < 0.1  # ternary codes packed, the rest fp16
    for engine, name in (("ort-fp32", "fp32"), ("ort-int8", "int8"), ("ort-token", "token")):
        if f"{engine}_b1" not in result["failed"]:
            assert result[f"onnx_{name}_bytes"] > 0
    if "ort-fp32_b1" not in result["failed"] and "ort-int8_b1" not in result["failed"]:
        assert result["onnx_int8_bytes"] < result["onnx_fp32_bytes"] / 2  # int8 weights


def test_failing_engine_is_reported_not_fatal():
    bench = bench_module()
    calls = {"ok": lambda: None, "broken": lambda: 1 / 0}
    times, failed = bench.time_interleaved(calls, repeats=3, warmup=1)
    assert list(times) == ["ok"] and len(times["ok"]) == 3
    assert failed == {"broken": "run: ZeroDivisionError: division by zero"}
    summary = bench.summarize(1, {"fp32": [0.5], "int": [0.25], "ort-int8": [0.2]}, "")
    assert summary["best_engine_b1"] == "int"
    assert summary["speedup_fp32_b1"] == 2.0
    assert summary["speedup_ort_int8_b1"] == 0.8
    assert bench.summarize(1, {"fp32": [0.5]}, "_strong")["speedup_fp32_b1_strong"] is None


def test_compile_fallback_counts_as_failure(monkeypatch):
    bench = bench_module()
    model = torch.nn.Linear(2, 2)

    def eager_fallback(m, example, **kwargs):
        warnings.warn("torch.compile failed (RuntimeError: no compiler); running eager",
                      stacklevel=2)
        return m

    monkeypatch.setattr(bench, "compile_model", eager_fallback)
    why = bench.compiled_or_why(model, torch.zeros(1, 2))
    assert why == "compile: torch.compile failed (RuntimeError: no compiler); running eager"


def test_bad_engine_name_exits_2():
    proc = run_script("--engines", "fp32,nope")
    assert proc.returncode == 2
    assert "--engines: 'nope' is not one of" in proc.stderr


def test_emulated_avx2_is_recorded(tmp_path):
    if not cpu_isa()["avx2"]:
        pytest.skip("not an x86 CPU with AVX2")
    env = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    proc = run_script("--repeats", "1", "--warmup", "0", "--batches", "1", "--presets", "paper",
                      "--engines", "fp32,int,ort-int8,ort-token", **env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, result = proc.stdout.splitlines()[0], json.loads(proc.stdout.splitlines()[-1])
    assert "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 " in header
    assert result["isa"].startswith("AVX2")  # the capped ISA, not the hardware's
    if result["hardware_isa"] != result["isa"]:
        # ONNX Runtime ignores the caps: its rows are shown but kept out of the speedups.
        assert result["ort_in_speedups"] is False
        assert "note: ONNX Runtime ignores the ISA caps" in proc.stdout
        assert result["best_engine_b1"] == "int"
        assert result["speedup_ort_int8_b1"] is None
        assert result["ort-token_img_s_b1"] > 0
