"""The integer product's kernels (bitvit.nn.kernels): exactness, the per-machine choice and its
cache, the ISA summary, and identical models under every kernel."""

from __future__ import annotations

import copy
import gc
import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from bitvit import VisionTransformer, ViTConfig, quantize_
from bitvit.deploy.engine import InferenceLinear, compile_model, convert_for_inference
from bitvit.deploy.profile import _bytes_held, profile_model
from bitvit.nn import kernels, quant
from bitvit.nn.kernels import (
    KERNELS,
    MAX_EXACT_K,
    PackedCodes,
    choose_kernel,
    int_matmul,
    isa_summary,
    pack_codes,
    packed_for,
    reset_choice,
    u8s8_available,
)
from bitvit.nn.quant import absmax_codes, absmax_int8, rescale

TINY = ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, heads=4, mlp_ratio=2.0)
needs_u8s8 = pytest.mark.skipif(not u8s8_available(), reason="no oneDNN quantized linear here")
RUNNABLE = tuple(k for k in KERNELS if k != "u8s8" or u8s8_available())  # on this build


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No decision yet, no kernel in the env, a private cache folder."""
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path))
    monkeypatch.delenv("BITVIT_INT_KERNEL", raising=False)
    reset_choice()
    yield tmp_path
    reset_choice()


def use_kernel(monkeypatch, name: str) -> None:
    monkeypatch.setenv("BITVIT_INT_KERNEL", name)
    reset_choice()


@pytest.fixture(autouse=True)
def _forget_choice():
    yield
    reset_choice()  # the next test decides again, under its own env


@pytest.fixture
def onednn(monkeypatch) -> dict[str, int]:
    """Counts of the u8s8 kernel's prepacks and oneDNN products (the u8s8 op's real work)."""
    counts = {"prepack": 0, "product": 0}
    for name, fn in (("prepack", kernels._prepack), ("product", kernels._qlinear)):
        monkeypatch.setattr(kernels, f"_{'prepack' if name == 'prepack' else 'qlinear'}",
                            lambda *a, fn=fn, name=name: counts.__setitem__(name, counts[name] + 1)
                            or fn(*a))
    return counts


def _codes(m: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    return q, torch.randint(-1, 2, (k, n), dtype=torch.int8, generator=g)


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", RUNNABLE)
@pytest.mark.parametrize("m,k,n", [(1, 13, 7), (33, 256, 24), (4, 20_000, 5)])
def test_kernels_are_exact_on_random_codes(kernel, m, k, n):
    q, codes_t = _codes(m, k, n, seed=m + k + n)
    reference = q.double() @ codes_t.double()  # float64 holds these sums exactly
    acc = int_matmul(q, codes_t, kernel)
    assert acc.dtype == (torch.int32 if kernel == "int8" else torch.float32)
    assert torch.equal(acc.double(), reference)


@pytest.mark.parametrize("kernel", RUNNABLE)
def test_kernels_are_exact_at_the_bound(kernel):
    # The largest sums fp32 must hold: 127 * K just below 2**24, and partial sums that climb
    # to it from both signs (fp32 would round an odd integer above 2**24).
    k = MAX_EXACT_K
    assert k * 127 < 2**24 <= (k + 1) * 127
    q = torch.full((3, k), 127, dtype=torch.int8)
    q[1] = -127
    q[2, ::2] = -127
    codes_t = torch.ones(k, 2, dtype=torch.int8)
    codes_t[::3, 1] = -1
    reference = q.double() @ codes_t.double()
    assert reference.abs().max() == 127 * k
    assert torch.equal(int_matmul(q, codes_t, kernel).double(), reference)


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 256, 768), (5, 1024, 1024), (1280, 256, 10),
                                   (7, 129, 67), (33, 1000, 3)])
@needs_u8s8
def test_u8s8_is_bit_identical_to_the_other_kernels(m, k, n, binary):
    q, codes_t = _codes(m, k, n, seed=m * k + n)
    if binary:
        codes_t = torch.where(codes_t >= 0, 1, -1).to(torch.int8)
    q[0, : k // 2] = 127  # a run of the largest codes: u = q + 128 = 255
    reference = q.double() @ codes_t.double()
    acc = int_matmul(q, codes_t, "u8s8")
    assert acc.dtype == torch.float32 and torch.equal(acc.double(), reference)
    assert torch.equal(acc, int_matmul(q, codes_t, "fp32"))
    assert torch.equal(acc, int_matmul(q, codes_t, "int8").float())
    # Prepacked once (as a layer does) or per call (training): the same integers.
    assert torch.equal(int_matmul(q, pack_codes(codes_t), "u8s8"), acc)


@needs_u8s8
def test_packed_codes_copy_and_pickle_by_packing_again():
    q, codes_t = _codes(9, 64, 16, seed=4)
    packed = pack_codes(codes_t)
    assert packed.nbytes == 64 * 16 and packed.codes_t is codes_t  # a view, not a copy
    for again in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
        assert isinstance(again, PackedCodes) and again.weight is not packed.weight
        assert torch.equal(again.codes_t, codes_t)
        assert torch.equal(int_matmul(q, again, "u8s8"), int_matmul(q, packed, "u8s8"))


@needs_u8s8
def test_packing_follows_in_place_changes_of_its_codes(onednn):
    q, codes_t = _codes(9, 64, 16, seed=5)
    packed = pack_codes(codes_t)
    assert packed_for(codes_t) is packed and packed_for(codes_t.t().t()) is packed  # any view
    codes_t.copy_(-codes_t)  # in place, as load_state_dict writes
    for _ in range(2):
        assert torch.equal(int_matmul(q, packed, "u8s8"), int_matmul(q, codes_t, "int8").float())
    assert onednn == {"prepack": 2, "product": 2}  # packed again once, for the change
    # The same values elsewhere have no live packing: packed for the call (as training does).
    other = codes_t.clone()
    assert packed_for(other) is not packed and onednn["prepack"] == 3
    key = kernels._codes_key(codes_t)
    assert kernels._PACKED.get(key) is packed
    del packed
    gc.collect()
    assert kernels._PACKED.get(key) is None  # the registry holds no packing alive


@needs_u8s8
def test_u8s8_op_runs_on_the_live_packing(onednn):
    # bitvit::u8s8_mm, what a compiled graph calls: uint8 q + 128 and the codes as a tensor.
    q, codes_t = _codes(7, 129, 67, seed=6)
    u = q.view(torch.uint8) ^ 128
    want = int_matmul(q, codes_t, "int8").float()
    packed = pack_codes(codes_t)
    assert torch.equal(torch.ops.bitvit.u8s8_mm(u, codes_t), want)
    assert onednn == {"prepack": 1, "product": 1} and packed.codes_t is codes_t
    assert torch.equal(torch.ops.bitvit.u8s8_mm(u, codes_t.clone()), want)  # packed per call
    assert onednn == {"prepack": 2, "product": 2}
    torch.library.opcheck(torch.ops.bitvit.u8s8_mm.default, (u, codes_t))  # schema, fake kernel


@pytest.mark.parametrize("kernel", ["fp32", pytest.param("u8s8", marks=needs_u8s8)])
def test_fp32_output_kernels_refuse_k_beyond_the_bound(kernel):
    q, codes_t = _codes(1, MAX_EXACT_K + 1, 1, seed=0)
    with pytest.raises(ValueError, match=f"^{kernel} integer kernel: K={MAX_EXACT_K + 1}"):
        int_matmul(q, codes_t, kernel)
    with pytest.raises(ValueError, match="kernel='int4'"):
        int_matmul(q, codes_t, "int4")


def test_fp32_kernel_takes_cached_float_codes():
    q, codes_t = _codes(9, 64, 16, seed=3)
    assert torch.equal(int_matmul(q, codes_t.float(), "fp32"), int_matmul(q, codes_t, "fp32"))


def test_float_activation_codes_are_the_int8_codes():
    x = torch.randn(7, 50) * torch.rand(7, 1) * 10
    x[0] = 0.0  # an all-zero token: scale 127 / EPS, codes 0
    q, s = absmax_codes(x)
    q8, s8 = absmax_int8(x)
    assert q.dtype == torch.float32 and torch.equal(q, q8.float()) and torch.equal(s, s8)
    assert q.abs().max() <= 127 and torch.equal(q, q.round())


@pytest.mark.parametrize("with_bias", [False, True])
def test_rescale_gives_identical_values_for_either_kernel(with_bias):
    q, codes_t = _codes(17, 300, 24, seed=5)
    row_scale = torch.rand(17, 1) * 50 + 0.5
    col_scale = torch.rand(24) + 0.1
    bias = torch.randn(24) if with_bias else None
    as_int = rescale(int_matmul(q, codes_t, "int8"), row_scale, col_scale, bias)
    as_float = rescale(int_matmul(q, codes_t, "fp32"), row_scale, col_scale, bias)
    assert as_int.dtype == as_float.dtype == torch.float32
    assert torch.equal(as_int, as_float)
    expected = (q.double() @ codes_t.double()) * (col_scale.double() / row_scale.double())
    if bias is not None:
        expected += bias.double()
    torch.testing.assert_close(as_int.double(), expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The choice
# ---------------------------------------------------------------------------------------------


def test_env_override(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "benchmark_kernels", lambda: calls.append(1) or {"int8": 2.0})
    for name in RUNNABLE:
        use_kernel(monkeypatch, name)
        choice = choose_kernel()
        assert choice.name == name and "BITVIT_INT_KERNEL" in choice.reason
        assert choice.isa == isa_summary()
    assert not calls and not (fresh / "kernels.json").exists()  # nothing measured


def test_bad_env_value_is_one_line(fresh, monkeypatch):
    use_kernel(monkeypatch, "int4")
    with pytest.raises(ValueError, match=r"^\$BITVIT_INT_KERNEL='int4': expected one of "
                                         r"int8, fp32, u8s8$"):
        choose_kernel()


def test_env_u8s8_without_onednn_is_one_line(fresh, monkeypatch):
    monkeypatch.setattr(kernels, "u8s8_available", lambda: False)
    use_kernel(monkeypatch, "u8s8")
    with pytest.raises(ValueError, match=r"^\$BITVIT_INT_KERNEL=u8s8: this PyTorch build lacks "
                                         r"oneDNN's quantized linear \("):
        choose_kernel()


def test_decided_once_per_process(fresh, monkeypatch):
    use_kernel(monkeypatch, "fp32")
    first = choose_kernel()
    monkeypatch.setenv("BITVIT_INT_KERNEL", "int8")  # too late: the process has decided
    assert choose_kernel() is first and choose_kernel(torch.device("cpu")) is first


@pytest.mark.parametrize("speed, expected", [
    ({"int8": 1.8, "u8s8": 1.2}, "int8"),
    ({"int8": 0.04, "u8s8": 1.9}, "u8s8"),
    ({"int8": 0.6, "u8s8": 0.9}, "fp32"),
    ({"int8": 1.0, "u8s8": 1.0}, "fp32"),  # a tie keeps fp32
    ({"int8": 1.3}, "int8"),  # a build without oneDNN measures no u8s8
])
def test_benchmark_decides_and_is_cached(fresh, monkeypatch, speed, expected):
    calls = []
    monkeypatch.setattr(kernels, "benchmark_kernels", lambda: calls.append(1) or speed)
    choice = choose_kernel()
    assert choice.name == expected and len(calls) == 1
    fastest_first = sorted(speed.items(), key=lambda kv: -kv[1])
    listed = ", ".join(f"{name} {v:.2f}x" for name, v in fastest_first)
    assert f": {listed} fp32's speed (measured now, saved to" in choice.reason
    entries = json.loads((fresh / "kernels.json").read_text())["entries"]
    (key, entry), = entries.items()
    threads = torch.get_num_threads()
    assert isa_summary() in key and torch.__version__ in key and f"| {threads} threads" in key
    assert entry["kernel"] == expected and entry["speed"] == speed
    # A new process (here: a reset) reads the verdict instead of measuring again.
    reset_choice()
    again = choose_kernel()
    assert again.name == expected and len(calls) == 1 and "cached" in again.reason
    assert again.reason.endswith(f"fp32's speed (cached {fresh / 'kernels.json'})")


@pytest.mark.parametrize("content", [
    "{not json", "[1, 2]", '{"version": 2, "entries": 3}',
    '{"version": 2, "entries": {"KEY": {"kernel": "int4", "speed": {}}}}',
    '{"version": 2, "entries": {"KEY": {"kernel": "u8s8", "speed": {"int8": 2.0}}}}',
    # The previous layout (one int8 speedup), from before u8s8: measured again.
    '{"version": 1, "entries": {"KEY": {"kernel": "int8", "int8_speedup": 2.0}}}',
    # A hand-edited speed past any float: measured again, not an OverflowError.
    '{"version": 2, "entries": {"KEY": {"kernel": "int8", "speed": {"int8": 1' + "0" * 400 + '}}}}',
])
def test_corrupt_or_old_cache_is_measured_again_and_rewritten(fresh, monkeypatch, content):
    cache = fresh / "kernels.json"
    content = content.replace("KEY", kernels._cache_key(isa_summary()))
    cache.write_text(content)
    calls = []
    monkeypatch.setattr(kernels, "benchmark_kernels",
                        lambda: calls.append(1) or {"int8": 0.5, "u8s8": 0.7})
    assert choose_kernel().name == "fp32" and len(calls) == 1
    data = json.loads(cache.read_text())
    assert data["version"] == kernels.CACHE_VERSION == 2
    assert list(data["entries"].values())[0]["kernel"] == "fp32"


def test_other_machines_entries_are_kept(fresh, monkeypatch):
    cache = fresh / "kernels.json"
    other = {"kernel": "u8s8", "speed": {"int8": 0.05, "u8s8": 1.8}, "measured": "then"}
    cache.write_text(json.dumps({"version": 2, "entries": {"another CPU": other}}))
    monkeypatch.setattr(kernels, "benchmark_kernels", lambda: {"int8": 0.5})
    choose_kernel()
    entries = json.loads(cache.read_text())["entries"]
    assert entries["another CPU"] == other and len(entries) == 2


def test_unwritable_cache_still_chooses(fresh, monkeypatch):
    monkeypatch.setenv("BITVIT_CACHE", str(fresh / "file"))
    (fresh / "file").write_text("a file where the folder should be")
    monkeypatch.setattr(kernels, "benchmark_kernels", lambda: {"int8": 2.0, "u8s8": 1.5})
    choice = choose_kernel()
    assert choice.name == "int8" and "not cached" in choice.reason


def test_cuda_takes_int8_unmeasured(fresh, monkeypatch):
    monkeypatch.setattr(kernels, "benchmark_kernels", lambda: pytest.fail("measured"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    assert choose_kernel("cuda") == kernels.KernelChoice("int8", "CUDA: torch._int_mm",
                                                         "Fake GPU")


@needs_u8s8
def test_micro_benchmark_measures_a_ratio_per_kernel():
    speed = kernels.benchmark_kernels(shapes=((32, 64, 48), (17, 128, 8)), budget_s=0.01)
    assert speed.keys() == {"int8", "u8s8"}
    # Positive and finite; no tighter: on a loaded machine a kernel's first call (oneDNN's
    # set-up) can be 1000x fp32's, and a kernel that slow in the warm-up is not timed further.
    assert all(0 < v < math.inf for v in speed.values())


def test_micro_benchmark_without_onednn_measures_int8_only(monkeypatch):
    monkeypatch.setattr(kernels, "u8s8_available", lambda: False)
    speed = kernels.benchmark_kernels(shapes=((17, 64, 8),), budget_s=0.01)
    assert speed.keys() == {"int8"}


# ---------------------------------------------------------------------------------------------
# The ISA summary
# ---------------------------------------------------------------------------------------------

SAPPHIRE_RAPIDS = frozenset({"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                             "amx_int8", "amx_bf16", "amx_tile"})
ZEN3 = frozenset({"avx2", "fma", "sse4_2"})


@pytest.mark.parametrize("flags, env, expected", [
    (SAPPHIRE_RAPIDS, {}, "AVX-512 VNNI + AMX"),
    (SAPPHIRE_RAPIDS, {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
     "AVX2 (emulated: ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2)"),
    (SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
     "AVX-512 VNNI (emulated: ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI)"),
    (SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "ALL", "ATEN_CPU_CAPABILITY": "avx512"},
     "AVX-512 VNNI + AMX"),
    (SAPPHIRE_RAPIDS - {"amx_int8"}, {}, "AVX-512 VNNI"),
    (ZEN3 | {"avx512f"}, {}, "AVX-512"),
    (ZEN3 | {"avx_vnni"}, {}, "AVX2 + AVX-VNNI"),
    (ZEN3, {}, "AVX2"),
    (ZEN3, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "AVX2"),  # a cap above nothing emulates nothing
    (frozenset({"sse4_2"}), {}, "no AVX2"),
])
def test_isa_summary(monkeypatch, flags, env, expected):
    monkeypatch.setattr(kernels, "_cpuinfo", lambda: ("Fake CPU", flags))
    for var in kernels.ISA_ENV:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    isa = kernels.cpu_isa()
    assert isa["model_name"] == "Fake CPU" and isa["avx2"] == ("avx2" in flags)
    assert all(isa[var] == env.get(var) for var in kernels.ISA_ENV)
    assert isa_summary() == expected


def test_isa_summary_without_x86_flags(monkeypatch):
    monkeypatch.setattr(kernels, "_cpuinfo", lambda: ("Fake ARM", None))
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    isa = kernels.cpu_isa()
    assert isa["avx2"] is None and isa["amx_int8"] is None
    assert isa_summary() == f"aarch64 ({isa['cpu_capability']})"


# ---------------------------------------------------------------------------------------------
# Models under either kernel
# ---------------------------------------------------------------------------------------------


def _tiny_b158(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(TINY)
    quantize_(model, "b158")
    return model


@needs_u8s8
def test_train_step_is_identical_under_every_kernel(monkeypatch):
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6) % 10
    steps = {}
    calls = {"fp32": [], "u8s8": []}
    for name in calls:  # count the calls, so each kernel is known to have run
        # quant calls fp32_mm itself and u8s8 through bitvit.nn.kernels.int_matmul.
        home = quant if name == "fp32" else kernels
        mm = getattr(home, f"{name}_mm")
        monkeypatch.setattr(home, f"{name}_mm",
                            lambda *a, mm=mm, name=name: calls[name].append(1) or mm(*a))
    for name in KERNELS:
        use_kernel(monkeypatch, name)
        model = _tiny_b158()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(2):  # the second step runs on updated weights (u8s8: packed again)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            grads = {k: p.grad.clone() for k, p in model.named_parameters()}
            opt.step()
            losses.append(loss.detach())
        steps[name] = (losses, grads, model.state_dict())
        assert all(bool(c) == (k == name) for k, c in calls.items())  # really that kernel
        for c in calls.values():
            c.clear()
    loss_a, grad_a, state_a = steps["int8"]
    for name in ("fp32", "u8s8"):
        loss_b, grad_b, state_b = steps[name]
        assert all(torch.equal(a, b) for a, b in zip(loss_a, loss_b, strict=True))
        assert grad_a.keys() == grad_b.keys()
        assert all(torch.equal(grad_a[k], grad_b[k]) for k in grad_a)
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


@needs_u8s8
def test_converted_model_logits_are_identical_under_every_kernel(monkeypatch):
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    logits, held, resident = {}, {}, {}
    for name in KERNELS:
        use_kernel(monkeypatch, name)
        model = convert_for_inference(_tiny_b158().eval())
        layers = [m for m in model.modules() if isinstance(m, InferenceLinear)]
        assert all(m.kernel == name for m in layers)
        assert all((m.codes_f32 is not None) == (name == "fp32") for m in layers)
        assert all((m.packed is not None) == (name == "u8s8") for m in layers)
        with torch.no_grad():
            logits[name] = model(x)
        held[name] = _bytes_held(model)
        resident[name] = profile_model(model, TINY).totals["bytes_resident"]
    assert torch.equal(logits["int8"], logits["fp32"])
    assert torch.equal(logits["int8"], logits["u8s8"])
    # The kernels' own copies: fp32 codes, 4 bytes per weight of every integer-path layer;
    # u8s8's prepacked codes, 1 byte. The profile counts what the module holds.
    weights = sum(m.codes.numel() for m in layers)
    assert held["fp32"] - held["int8"] == 4 * weights == resident["fp32"] - resident["int8"]
    assert held["u8s8"] - held["int8"] == weights == resident["u8s8"] - resident["int8"]


@needs_u8s8
@pytest.mark.parametrize("act_bits", [8, 1])
def test_inference_linear_under_u8s8_equals_int8(monkeypatch, act_bits):
    g = torch.Generator().manual_seed(6)
    codes = torch.randint(-1, 2, (67, 129), dtype=torch.int8, generator=g)  # (out, in), odd
    scale, bias = torch.rand(67, generator=g) + 0.1, torch.randn(67, generator=g)
    x = torch.randn(3, 5, 129, generator=g)
    out = {}
    for name in ("int8", "u8s8"):
        use_kernel(monkeypatch, name)
        layer = InferenceLinear(codes, scale, bias, "b158", act_bits)
        assert layer.kernel == name
        out[name] = layer(x)
    assert out["u8s8"].shape == (3, 5, 67) and torch.equal(out["u8s8"], out["int8"])


@needs_u8s8
def test_to_device_chooses_the_kernel_again(monkeypatch):
    use_kernel(monkeypatch, "fp32")
    model = convert_for_inference(_tiny_b158().eval())
    layer = model.blocks[0].mlp.fc1
    assert layer.kernel == "fp32" and layer.codes_f32.dtype == torch.float32
    assert "codes_f32" not in model.state_dict()
    use_kernel(monkeypatch, "u8s8")
    model.to("cpu")
    packed = layer.packed
    assert layer.kernel == "u8s8" and layer.codes_f32 is None and isinstance(packed, PackedCodes)
    assert "packed" not in str(list(model.state_dict()))
    model.to("cpu")  # packed again from the (moved) codes
    assert layer.packed is not packed and layer.packed.codes_t.data_ptr() == layer.codes.data_ptr()
    use_kernel(monkeypatch, "int8")
    model.to("cpu")
    assert layer.kernel == "int8" and layer.packed is None and "kernel=int8" in repr(layer)
    assert layer.codes_t.is_contiguous()


@needs_u8s8
def test_u8s8_model_copies_and_loads_state(monkeypatch):
    use_kernel(monkeypatch, "u8s8")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    model = convert_for_inference(_tiny_b158().eval())
    other = convert_for_inference(_tiny_b158(seed=1).eval())
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(copy.deepcopy(model)(x), expected)  # the copy packs its own codes
        assert not torch.equal(other(x), expected)
        other.load_state_dict(model.state_dict())  # new codes: packed again
        assert torch.equal(other(x), expected)


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_kernel_traces_in_one_graph(monkeypatch, name):
    # torch.compile sees the kernel as a constant: no graph break in training or inference
    # (backend="eager" checks the tracing without the seconds inductor takes).
    use_kernel(monkeypatch, name)
    torch._dynamo.reset()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    model = _tiny_b158()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    F.cross_entropy(compiled(x), torch.arange(4)).backward()
    assert model.blocks[0].mlp.fc1.weight.grad is not None
    inference = convert_for_inference(model.eval())
    with torch.no_grad():
        expected = inference(x)
        got = torch.compile(inference, backend="eager", fullgraph=True)(x)
    assert torch.equal(got, expected)


def _int_layers(model: torch.nn.Module) -> int:
    return sum(getattr(m, "uses_int", False) or (isinstance(m, quant.BitLinear)
                                                 and m.act_bits is not None)
               for m in model.modules())


@needs_u8s8
def test_compiled_int_engine_runs_the_prepacked_u8s8_product(monkeypatch, onednn):
    """Inductor calls the u8s8 op on the layers' packings (no packing, no fp32 codes per call),
    with the int8 kernel's logits; codes loaded after compiling are packed once and used."""
    torch._dynamo.reset()
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    models, compiled, eager = {}, {}, {}
    for name in ("int8", "u8s8"):
        use_kernel(monkeypatch, name)
        models[name] = convert_for_inference(_tiny_b158().eval())
        with torch.inference_mode():
            eager[name] = models[name](x)
            compiled[name] = compile_model(models[name], x, dynamic=False)
        if compiled[name] is models[name]:
            pytest.skip("torch.compile unavailable here (compile_model fell back to eager)")
    new_state = convert_for_inference(_tiny_b158(seed=1).eval()).state_dict()
    layers = _int_layers(models["u8s8"])

    def run() -> dict[str, torch.Tensor]:
        onednn.update(prepack=0, product=0)
        with torch.inference_mode():
            out = {name: c(x) for name, c in compiled.items()}
        assert onednn == {"prepack": 0, "product": layers}  # the int8 graph calls none
        assert torch.equal(out["u8s8"], out["int8"])
        return out

    got = run()
    # Not bit-identical to eager: inductor reorders the fp32 arithmetic around the product.
    torch.testing.assert_close(got["u8s8"], eager["u8s8"], atol=1e-5, rtol=0)
    onednn.update(prepack=0)
    for name, model in models.items():
        use_kernel(monkeypatch, name)  # the hook chooses the kernel again
        model.load_state_dict(new_state)  # written in place; the hook packs the codes again
    assert onednn["prepack"] == layers
    new = run()
    assert not torch.equal(new["u8s8"], got["u8s8"])
    with torch.no_grad():  # a write that bypasses the hook: packed again on the next call
        for model in models.values():
            model.blocks[0].mlp.fc1.codes.mul_(-1)
    with torch.inference_mode():
        flipped = compiled["u8s8"](x)
    assert onednn["prepack"] == 1 and not torch.equal(flipped, new["u8s8"])
    with torch.inference_mode():
        assert torch.equal(flipped, compiled["int8"](x))


@needs_u8s8
def test_compiled_train_step_under_u8s8_equals_int8(monkeypatch, onednn):
    # aot_eager traces the op's fake kernel through autograd; the weights change every step,
    # so u8s8 packs per call.
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6) % 10
    steps = {}
    for name in ("int8", "u8s8"):
        use_kernel(monkeypatch, name)
        torch._dynamo.reset()
        model = _tiny_b158()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(2):
            opt.zero_grad()
            loss = F.cross_entropy(compiled(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        steps[name] = losses, model.state_dict()
    calls = 2 * _int_layers(model)
    assert onednn == {"prepack": calls, "product": calls}
    (loss_a, state_a), (loss_b, state_b) = steps["int8"], steps["u8s8"]
    assert all(torch.equal(a, b) for a, b in zip(loss_a, loss_b, strict=True))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.int32, torch.float32])
def test_rescale_in_slabs_gives_the_one_pass_values(monkeypatch, with_bias, dtype):
    """Slabs of rows (the last one ragged) compute every element as the single expression does:
    bit for bit, from either kernel's products."""
    import bitvit.nn.quant as quant

    gen = torch.Generator().manual_seed(3)
    acc = torch.randint(-30000, 30000, (203, 37), generator=gen).to(dtype)
    row_scale = torch.rand(203, 1, generator=gen) * 50 + 0.5
    col_scale = torch.rand(37, generator=gen) + 0.1
    bias = torch.randn(37, generator=gen) if with_bias else None
    ratio = col_scale.reshape(1, -1) / row_scale
    one_pass = torch.mul(acc, ratio) if bias is None else torch.addcmul(bias, acc, ratio)
    monkeypatch.setattr(quant, "RESCALE_SLAB", 37 * 10)  # 10 rows a slab: 21 slabs
    slabbed = rescale(acc, row_scale, col_scale, bias)
    assert slabbed.dtype == torch.float32 and torch.equal(slabbed, one_pass)
