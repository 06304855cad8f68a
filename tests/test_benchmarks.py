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

from bitvit.nn.kernels import choose_kernel, cpu_isa, isa_summary

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "inference.py"
MACHINE_KEYS = ("isa", "kernel", "kernel_reason")
PRESET_KEYS = ("speedup_fp32_b1", "speedup_fp32_b256", "best_engine_b1", "best_engine_b256",
               "speedup_ort_int8_b256", "size_ratio_fp32", "auto_engine",
               "auto_speedup_fp32_b1", "auto_speedup_fp32_b256")  # and the same with _strong


def bench_module():
    # inference.py imports op_profile from beside it (on sys.path when run as a script).
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_inference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def profile_module():
    bench_module()  # puts benchmarks/ on sys.path
    return importlib.import_module("op_profile")


def run_script(*args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **env_vars}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_tiny_run_record_and_json_contract(tmp_path):
    engines = "fp32,int,fp,ort-fp32,ort-int8,ort-token,ort-tensor,auto"
    out = tmp_path / "record.txt"
    proc = run_script("--repeats", "1", "--warmup", "0", "--batches", "1", "--presets", "paper",
                      "--threads", "1", "--engines", engines, "--out", str(out), "--profile")
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
    assert f"BITVIT_INT_KERNEL={os.environ['BITVIT_INT_KERNEL']} " in header
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
    # auto: bitvit.load's default (conftest's $BITVIT_ENGINE=int reaches the script too), its
    # speedup over fp32 from its own img/s, not a candidate for the best engine.
    assert f"BITVIT_ENGINE={os.environ['BITVIT_ENGINE']} " in header
    assert result["auto_engine"] == os.environ["BITVIT_ENGINE"]
    assert result["auto_engine_reason"] == f"set by $BITVIT_ENGINE={os.environ['BITVIT_ENGINE']}"
    assert f"paper: auto runs {result['auto_engine']} (set by" in proc.stdout
    assert result["auto_speedup_fp32_b1"] == pytest.approx(
        result["auto_img_s_b1"] / result["fp32_img_s_b1"], rel=0.02)
    assert result["auto_speedup_fp32_b256"] is None
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
    check_profile_keys(result, proc.stdout, engines.split(","))


def check_profile_keys(result: dict, stdout: str, engines: list[str]) -> None:
    """--profile at batch 1: shares that sum to 1, matmul shares and the bound that follow."""
    assert sum(result["profile_int_b1"].values()) == pytest.approx(1, abs=0.01)
    assert 0.3 < result["matmul_share_fp32_b1"] <= 1  # fp32 is mostly matrix products
    assert "paper: torch fp32, batch 1: matrix products" in stdout
    bench = bench_module()
    for engine in (e for e in engines if e.startswith("ort-") and result[f"{e}_img_s_b1"]):
        shares = result[f"profile_{engine}_b1"]
        assert sum(shares.values()) == pytest.approx(1, abs=0.01)
        listed = sum(v for op, v in shares.items() if op in bench.ORT_MATMUL_OPS)
        matmul = result[f"matmul_share_{engine}_b1"]
        assert listed - 0.005 <= matmul <= listed + shares.get("other", 0) + 0.005
        assert 0 < matmul < 1 and f"paper: {engine}, batch 1, share of ONNX Runtime" in stdout
        bound = result[f"bound_free_matmul_{engine}_b1"]
        if not result["ort_in_speedups"]:
            assert bound is None
            continue
        # fp32 time / (engine time x (1 - share)), from the rounded img/s keys.
        expected = result[f"{engine}_img_s_b1"] / result["fp32_img_s_b1"] / (1 - matmul)
        assert bound == pytest.approx(expected, rel=0.03)


def test_ort_trace_shares_skip_warmup(tmp_path):
    bench = profile_module()

    def node(op: str | None, ts: int, dur: int) -> dict:
        return {"cat": "Node", "ph": "X", "name": "n_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op} if op else {}}

    trace = [
        {"cat": "Session", "ph": "X", "name": "session_initialization", "ts": 0, "dur": 50},
        {"cat": "Session", "ph": "X", "name": "model_run", "ts": 100, "dur": 90},
        node("MatMul", 110, 1000),  # warm-up run: left out
        {"cat": "Session", "ph": "X", "name": "model_run", "ts": 200, "dur": 90},
        node("DynamicQuantizeMatMul", 210, 50), node("Softmax", 220, 20),
        node(None, 230, 500),  # no op type: not a kernel
        {"cat": "Session", "ph": "X", "name": "model_run", "ts": 300, "dur": 90},
        node("DynamicQuantizeMatMul", 310, 10), node("Gelu", 320, 15), node("Add", 330, 5),
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    shares = bench.ort_op_shares(path, skip_runs=1)
    assert shares == {"DynamicQuantizeMatMul": 0.6, "Softmax": 0.2, "Gelu": 0.15, "Add": 0.05}
    assert list(shares) == ["DynamicQuantizeMatMul", "Softmax", "Gelu", "Add"]  # largest first
    assert bench.ort_op_shares(path)["MatMul"] == pytest.approx(1000 / 1100)  # warm-up counted
    assert bench.top_shares(shares, n=2) == {"DynamicQuantizeMatMul": 0.6, "Softmax": 0.2,
                                             "other": 0.2}
    assert bench.top_shares(shares, n=4) == shares  # nothing left: no "other"
    # fp32 1 s, engine 0.5 s of which 60% matrix products: at most 1 / (0.5 x 0.4) = 5x.
    assert bench.free_matmul_bound(1.0, 0.5, 0.6) == 5.0
    assert bench.free_matmul_bound(1.0, 0.5, 1.0) is None
    with pytest.raises(ValueError, match=r"trace\.json: not an ONNX Runtime profile trace with "
                       r"more than 3 runs"):
        bench.ort_op_shares(path, skip_runs=3)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"trace\.json: not an ONNX Runtime profile trace"):
        bench.ort_op_shares(path)


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


def run_onnx_ab(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "onnx_ab.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_onnx_ab_agrees_times_and_refuses_different_models(tmp_path):
    pytest.importorskip("onnxruntime")
    # The same weights twice (same seed), and another seed's.
    token, again, other = (tmp_path / f"{n}.onnx" for n in ("token", "again", "other"))
    for path, extra in ((token, ()), (again, ()), (other, ("--seed", "1"))):
        proc = run_onnx_ab("export", str(path), *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_onnx_ab("time", str(token), str(again), "--repeats", "2", "--warmup", "0",
                       "--batches", "1,4", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["1"],
                                                                                       ["4"])]
    assert [r[0] for r in rows] == ["1", "4"] and all(float(r[3]) > 0 for r in rows)
    # Another seed's weights: the logits differ, so nothing is timed.
    proc = run_onnx_ab("time", str(token), str(other), "--repeats", "1", "--threads", "1")
    assert proc.returncode == 1 and "DISAGREE" in proc.stdout and "B/A" not in proc.stdout
    assert run_onnx_ab("time", str(token), str(other), "--repeats", "0").returncode == 2


def test_ort_arena_times_the_capped_session_against_the_uncapped_one(tmp_path):
    """The two sessions give the same logits and the record says so, by batch, with the cap."""
    pytest.importorskip("onnxruntime")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "arena.txt"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ort_arena.py"),
                           "--repeats", "2", "--batches", "1,4", "--threads", "1", "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = out.read_text().splitlines()
    assert lines == proc.stdout.splitlines() and "; cap " in lines[2]
    assert "; cap 0 B;" not in lines[2]  # the cap took effect
    rows = [line.split() for line in lines[4:]]
    assert [r[0] for r in rows] == ["1", "4"] and all(float(r[3]) > 0 for r in rows)


def test_rescale_slabs_times_the_int_engine_both_ways(tmp_path):
    """Both ways give the same logits, and the record has a ratio per preset and batch."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "slabs.txt"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rescale_slabs.py"),
                           "--presets", "paper", "--repeats", "2", "--batches", "1,4",
                           "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = out.read_text().splitlines()
    assert lines == proc.stdout.splitlines()
    rows = [line.split() for line in lines[4:]]
    assert [r[:2] for r in rows] == [["paper", "1"], ["paper", "4"]]
    assert all(float(r[4]) > 0 for r in rows)


def test_inference_memory_measures_every_engine_in_its_own_process(tmp_path):
    """Each engine's row: the file, the torch tensors counted exactly (the b158 codes a quarter
    of fp32's weights: one byte against four), and positive resident memory."""
    pytest.importorskip("onnxruntime")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "memory.txt"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "inference_memory.py"),
                           "--presets", "paper", "--batches", "2", "--threads", "1", "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = out.read_text().splitlines()
    assert lines == proc.stdout.splitlines() and "resident memory" in lines[1]
    rows = {line.split()[0]: line.split()[1:] for line in lines[5:]}
    assert list(rows) == ["fp32", "int", "fp", "ort-token", "ort-fp32"]
    assert rows["ort-token"][1] == "n/a" and rows["fp32"][3] == "1.00"
    assert float(rows["int"][1]) < 0.3 * float(rows["fp32"][1])
    assert all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows.values())
