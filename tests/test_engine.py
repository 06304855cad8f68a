import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitvit import BitLinear, VisionTransformer, ViTConfig, quantize_
from bitvit.deploy.engine import (
    ENGINES,
    InferenceLinear,
    agreement,
    compile_model,
    convert_for_inference,
    set_engine,
)
from bitvit.nn.quant import absmax_int8, int_mm, pad_for_int_mm, quantize_activations

TINY = ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, heads=4, mlp_ratio=2.0)


def _bitlinear(method: str, act_bits, in_f: int = 64, out_f: int = 48, seed: int = 0):
    torch.manual_seed(seed)
    layer = BitLinear(in_f, out_f, method=method, act_bits=act_bits)
    nn.init.normal_(layer.bias, std=0.1)
    return layer.eval()


def _rounding_bound(x_q: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Elementwise bound on fp32 rounding of a K-term dot product plus bias: K * u * sum|terms|.

    Both engines multiply the same integers; they differ only in where fp32 rounds (the fp
    engine rounds each product q/s * code*scale and every partial sum; the int engine sums
    exactly and rounds once in the rescale), so the gap is within the classic dot-product bound.
    """
    k = x_q.shape[-1]
    u = torch.finfo(torch.float32).eps / 2
    mag = x_q.abs() @ w.abs().t() + (0 if bias is None else bias.abs())
    return (k + 2) * u * mag


# ---------------------------------------------------------------------------------------------
# Integer matmul and padding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", [(1, 13, 7), (16, 8, 8), (5, 64, 24), (33, 20, 3)])
def test_int_mm_padding_path_is_exact(m, k, n):
    g = torch.Generator().manual_seed(m * k * n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-1, 2, (k, n), dtype=torch.int8, generator=g)
    exact = (a.long() @ b.long()).int()
    pa, pb = pad_for_int_mm(a, b)
    assert pa.shape[0] > 16 and pa.shape[1] % 8 == 0 and pb.shape[1] % 8 == 0
    assert pa.shape[1] == pb.shape[0]
    assert torch.equal(pa[:m, :k], a) and pa[m:].abs().sum() == 0 and pa[:, k:].abs().sum() == 0
    assert torch.equal(int_mm(a, b, pad=True), exact)  # forced padding, as CUDA would
    assert torch.equal(int_mm(a, b), exact)  # the CPU kernel takes any shape
    assert int_mm(a, b, pad=True).dtype == torch.int32


def test_pad_for_int_mm_leaves_good_shapes_alone():
    a = torch.ones(32, 16, dtype=torch.int8)
    b = torch.ones(16, 24, dtype=torch.int8)
    pa, pb = pad_for_int_mm(a, b)
    assert pa is a and pb is b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int_mm_cuda_odd_shapes():
    a = torch.randint(-128, 128, (3, 13), dtype=torch.int8, device="cuda")
    b = torch.randint(-1, 2, (13, 7), dtype=torch.int8, device="cuda")
    assert torch.equal(int_mm(a, b).cpu(), (a.long() @ b.long()).int().cpu())


def test_absmax_int8_equals_the_formula():
    x = torch.randn(50, 96) * torch.logspace(-3, 2, 50)[:, None]
    x[3] = 0.0  # an all-zero token: scale clamped, codes zero
    q, s = absmax_int8(x)
    s_ref = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    assert torch.equal(q, torch.round(x * s_ref).clamp(-128, 127).to(torch.int8))
    assert q.abs().max() == 127 and q[3].abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# One layer: int engine vs fp engine vs BitLinear
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["b158", "b158c", "twn", "bitnet"])
def test_int_engine_matches_fp_engine_within_rounding(method):
    layer = _bitlinear(method, 8)
    x = torch.randn(3, 11, 64) * 2.0
    int_layer = InferenceLinear.from_bitlinear(layer, engine="int")
    fp_layer = InferenceLinear.from_bitlinear(layer, engine="fp")
    y_int, y_fp = int_layer(x), fp_layer(x)
    assert y_int.shape == (3, 11, 48) and y_int.dtype == torch.float32
    bound = _rounding_bound(quantize_activations(x, 8), fp_layer.weight_fp, fp_layer.bias)
    assert ((y_int - y_fp).abs() <= bound).all()
    # BitLinear's own eval forward (int8 too on CPU): the same products, rescaled alike.
    with torch.no_grad():
        assert ((y_int - layer(x)).abs() <= bound).all()


def test_fp_engine_is_bitlinear_fake_quant():
    layer = _bitlinear("b158", 8)
    x = torch.randn(7, 64)
    codes, scale = layer.quantized_weight()
    expected = F.linear(quantize_activations(x, 8), codes * scale, layer.bias)
    got = InferenceLinear.from_bitlinear(layer, engine="fp")(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_one_bit_activations_path():
    layer = _bitlinear("bitnet", 1)
    x = torch.randn(4, 9, 64)
    x[0, 0, :5] = 0.0  # sign(0) = +1 in both engines
    int_layer = InferenceLinear.from_bitlinear(layer, engine="int")
    fp_layer = InferenceLinear.from_bitlinear(layer, engine="fp")
    assert int_layer.codes_t is not None  # really the integer path
    y_int, y_fp = int_layer(x), fp_layer(x)
    bound = _rounding_bound(quantize_activations(x, 1), fp_layer.weight_fp, fp_layer.bias)
    assert ((y_int - y_fp).abs() <= 4 * bound).all()  # plus the rounding of 1 / mean|x|
    with torch.no_grad():
        torch.testing.assert_close(y_int, layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["sign", "xnor"])
def test_weights_only_layers_use_dequantized_weight(method):
    layer = _bitlinear(method, None)
    int_layer = InferenceLinear.from_bitlinear(layer, engine="int")
    # No integer product to take; the int engine holds only the codes and dequantizes per call,
    # the fp engine caches the dequantized weight.
    assert int_layer.codes_t is None and int_layer.weight_fp is None
    assert int_layer.codes.is_contiguous()
    assert int_layer.scale.shape == ((48,) if method == "xnor" else (1,))
    fp_layer = InferenceLinear.from_bitlinear(layer, engine="fp")
    assert fp_layer.weight_fp is not None
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(int_layer(x), layer(x), rtol=1e-6, atol=1e-6)
        assert torch.equal(int_layer(x), fp_layer(x))


def test_per_channel_scale_with_int8_activations():
    layer = _bitlinear("xnor", 8)
    x = torch.randn(6, 64)
    y_int = InferenceLinear.from_bitlinear(layer, engine="int")(x)
    fp_layer = InferenceLinear.from_bitlinear(layer, engine="fp")
    bound = _rounding_bound(quantize_activations(x, 8), fp_layer.weight_fp, fp_layer.bias)
    assert ((y_int - fp_layer(x)).abs() <= bound).all()


def test_sub_norm_and_no_bias():
    torch.manual_seed(1)
    layer = BitLinear(64, 16, bias=False, method="b158", sub_norm=True).eval()
    x = torch.randn(2, 5, 64) * 3 + 1
    int_layer = InferenceLinear.from_bitlinear(layer)
    assert int_layer.bias is None
    with torch.no_grad():
        torch.testing.assert_close(int_layer(x), layer(x), rtol=1e-5, atol=1e-6)


def test_buffers_state_dict_and_validation():
    layer = InferenceLinear.from_bitlinear(_bitlinear("b158", 8))
    assert set(layer.state_dict()) == {"codes", "scale", "bias"}
    assert layer.codes.dtype == torch.int8 and layer.scale.dtype == torch.float32
    assert set(layer.codes.unique().tolist()) <= {-1, 0, 1}
    fresh = InferenceLinear(torch.zeros(48, 64, dtype=torch.int8), torch.ones(1), torch.zeros(48),
                            "b158", 8)
    fresh.load_state_dict(layer.state_dict())  # the derived buffers follow the loaded codes
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), layer(x))
    # One copy of the codes (1 byte per weight): codes_t is a view of the same storage, laid
    # out (in, out) contiguous for _int_mm, also after a load that assigns row-major codes.
    codes = layer.codes.clone()
    for assign in (False, True):
        fresh = InferenceLinear(torch.zeros(48, 64, dtype=torch.int8), torch.ones(1),
                                torch.zeros(48), "b158", 8)
        fresh.load_state_dict({k: v.contiguous() for k, v in layer.state_dict().items()},
                              assign=assign)
        assert fresh.codes_t.is_contiguous() and fresh.codes_t.data_ptr() == fresh.codes.data_ptr()
        assert fresh.codes.untyped_storage().nbytes() == 48 * 64
        assert torch.equal(fresh.state_dict()["codes"], codes) and torch.equal(fresh(x), layer(x))
    fresh.set_engine("fp")  # row-major for the fp engine, same values
    assert fresh.codes.is_contiguous() and torch.equal(fresh.codes, codes)
    with pytest.raises(ValueError, match="engine"):
        InferenceLinear(layer.codes, layer.scale, None, "b158", 8, engine="cuda")
    with pytest.raises(ValueError, match="scale"):
        InferenceLinear(layer.codes, torch.ones(3), None, "b158", 8)
    with pytest.raises(ValueError, match="act_bits"):
        InferenceLinear(layer.codes, layer.scale, None, "b158", 4)


def test_autocast_runs_the_fp_engine():
    layer = InferenceLinear.from_bitlinear(_bitlinear("b158", 8))
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------


def _tiny_vit(method: str = "b158", **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(TINY)
    quantize_(model, method, **kwargs)
    return model.eval()


def test_convert_for_inference_gives_bitlinear_logits():
    model = _tiny_vit()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        convert_for_inference(model)
        assert not any(isinstance(m, BitLinear) for m in model.modules())
        assert isinstance(model.blocks[0].mlp.fc1, InferenceLinear)
        assert type(model.head) is nn.Linear
        # BitLinear's eval forward is itself int8 on CPU; the rescale rounds once instead of
        # twice (1 ulp), which can flip an activation code at a rounding boundary downstream.
        y = model(x)
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-3)
        assert torch.equal(y.argmax(1), ref.argmax(1))
    assert "blocks.0.attn.qkv.codes" in model.state_dict()
    assert "blocks.0.attn.qkv.codes_t" not in model.state_dict()


def test_engine_switch():
    model = convert_for_inference(_tiny_vit(), engine="int")
    layers = [m for m in model.modules() if isinstance(m, InferenceLinear)]
    assert len(layers) == 1 + 4 * TINY.depth and all(m.engine == "int" for m in layers)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        y_int = model(x)
        assert set_engine(model, "fp") is model
        assert all(m.engine == "fp" and m.codes_t is None for m in layers)
        y_fp = model(x)
        set_engine(model, "int")
        assert torch.equal(model(x), y_int)
    assert not torch.equal(y_int, y_fp)  # really a different computation...
    torch.testing.assert_close(y_int, y_fp, rtol=0, atol=0.05)  # ...of the same function
    with pytest.raises(ValueError, match="unknown engine 'xla'"):
        set_engine(model, "xla")
    with pytest.raises(ValueError, match="unknown engine"):
        convert_for_inference(_tiny_vit(), engine="bf16")
    assert ENGINES == ("int", "fp")


def test_convert_binary_model_with_one_bit_activations():
    model = _tiny_vit("bitnet", act_bits=1)
    # Nonzero biases, as after training: with zero biases, a +-1 x +-1 dot product of exactly 0
    # gives 0 in the int engine but a rounding residue of either sign in fake quant, and the next
    # 1-bit layer's sign() turns that into a full-size difference.
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.normal_(p, std=0.05)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        convert_for_inference(model)
        assert model.patch_embed.proj.act_bits == 8 and model.blocks[0].mlp.fc2.act_bits == 1
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


def _class_means_data(n: int, seed: int, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable synthetic images: each class has its own mean image, plus unit Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(means), (n,), generator=g)
    return means[labels] + torch.randn(n, *means.shape[1:], generator=g), labels


def test_agreement_of_a_trained_exported_model(tmp_path):
    """A tiny b158 ViT trained for a few seconds on class-dependent means, exported, and loaded
    twice from the same file (same weights): engine int vs engine fp on 1000 held-out images.

    Tolerances: the integer products are identical; the engines differ in fp32 rounding
    (~1e-6 relative per layer), which can flip an activation code at a rounding boundary and
    move logits by a few 1e-3. So: argmax agreement >= 99.5% (at most 5 flips, only between
    near-tied classes), |accuracy difference| <= 0.005, mean |logit diff| < 1e-3, max < 0.05.
    The model must have learned (accuracy >= 0.6, chance 0.1), or agreement says little.
    """
    from bitvit.data import DataConfig
    from bitvit.deploy.export import export_model, load
    from bitvit.nn.quant import QuantConfig
    from bitvit.training.config import Config

    torch.manual_seed(0)
    means = 0.5 * torch.randn(TINY.num_classes, 3, 16, 16)
    x_train, y_train = _class_means_data(512, 1, means)
    x_test, y_test = _class_means_data(1000, 2, means)
    model = VisionTransformer(TINY)
    quantize_(model, "b158")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        batch = slice(64 * (step % 8), 64 * (step % 8 + 1))
        opt.zero_grad()
        F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
        opt.step()
    config = Config(model=TINY, quant=QuantConfig(method="b158"),
                    data=DataConfig(mean=(0.5,) * 3, std=(0.25,) * 3))  # an export needs numbers
    path = export_model(model.eval(), config, [f"c{i}" for i in range(TINY.num_classes)],
                        tmp_path / "m.safetensors")
    int_model, fp_model = load(path, engine="int"), load(path, engine="fp")
    assert {m.engine for m in int_model.modules() if isinstance(m, InferenceLinear)} == {"int"}
    assert {m.engine for m in fp_model.modules() if isinstance(m, InferenceLinear)} == {"fp"}
    stats = agreement(fp_model, int_model, x_test, y_test, batch_size=250)
    assert stats["n"] == 1000
    assert stats["accuracy_a"] >= 0.6
    assert stats["argmax_agreement"] >= 0.995
    assert abs(stats["accuracy_diff"]) <= 0.005
    assert stats["mean_abs_logit_diff"] < 1e-3 and stats["max_abs_logit_diff"] < 0.05
    assert stats["mean_abs_logit_diff"] > 0  # really two different computations


def test_compile_model_falls_back_to_eager(monkeypatch):
    model = convert_for_inference(_tiny_vit())

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(UserWarning, match="running eager"):
        out = compile_model(model, x)
    assert out is model
    with torch.no_grad():
        assert out(x).shape == (2, 10)
