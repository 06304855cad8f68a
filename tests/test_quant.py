import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitvit import BitLinear, VisionTransformer, ViTConfig, quantize_, quantize_weights
from bitvit.nn.quant import EPS, METHODS, absmax_int8, quantize_activations


def _b158_with_exact_ties() -> torch.Tensor:
    """Weights where two entries sit exactly on +-0.5 * (gamma + eps): round-half-to-even -> 0."""
    w = torch.tensor([[1.0, -1.0, 2.0, -2.0], [0.0, 0.3, 0.3, -0.8]])
    for _ in range(50):  # fixed point: the tie entries change gamma a little
        d = w.abs().mean() + EPS
        w[1, 1], w[1, 2] = d / 2, -d / 2
    d = w.abs().mean() + EPS
    assert (w[1, 1] / d).item() == 0.5 and (w[1, 2] / d).item() == -0.5
    return w


def test_b158_hand_computed():
    w = torch.tensor([[0.5, -1.0, 0.0, 2.5], [-0.25, 1.5, -3.0, 0.75]])
    codes, scale = quantize_weights(w, "b158")
    gamma = 9.5 / 8
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert codes.tolist() == [[0, -1, 0, 1], [0, 1, -1, 1]]
    assert scale.dtype == torch.float32 and scale.shape == (1, 1)
    assert scale.item() == pytest.approx(gamma)
    torch.testing.assert_close(codes * scale, torch.tensor(
        [[0, -gamma, 0, gamma], [0, gamma, -gamma, gamma]]))


def test_b158_ties_round_half_to_even():
    codes, _ = quantize_weights(_b158_with_exact_ties(), "b158")
    assert codes[1, 1].item() == 0 and codes[1, 2].item() == 0
    assert codes[0].tolist() == [1, -1, 1, -1]
    assert codes[1, 0].item() == 0  # zero weight -> zero code


def test_bitnet_hand_computed():
    # mean(W) = 0.5; W - mean = [-0.5, 0.0, 1.5, -1.0]: the zero gets +1.
    w = torch.tensor([[0.0, 0.5], [2.0, -0.5]])
    codes, scale = quantize_weights(w, "bitnet")
    assert codes.tolist() == [[-1, 1], [1, -1]]
    assert scale.item() == pytest.approx(3.0 / 4)  # mean |W|
    # A weight where beta = mean|W| = 1.0 differs from the centred weight's mean|W - mean W|
    # = 0.5 (above both are 0.75), so taking the scale from the wrong tensor fails here.
    w = torch.tensor([[0.0, 1.0], [2.0, 1.0]])  # mean 1; W - mean = [-1, 0, 1, 0]
    codes, scale = quantize_weights(w, "bitnet")
    assert codes.tolist() == [[-1, 1], [1, 1]]
    assert scale.item() == 1.0 and scale.item() != (w - w.mean()).abs().mean().item()


def test_sign_hand_computed():
    w = torch.tensor([[0.0, -0.0, 0.5, -0.5], [3.0, -2.0, 1e-8, -1e-8]])
    codes, scale = quantize_weights(w, "sign")
    assert codes.tolist() == [[1, 1, 1, -1], [1, -1, 1, -1]]
    assert scale.tolist() == [[1.0]]


def test_xnor_hand_computed():
    w = torch.tensor([[0.0, -1.0, 2.0], [-0.5, -0.5, 0.5]])
    codes, scale = quantize_weights(w, "xnor")
    assert codes.tolist() == [[1, -1, 1], [-1, -1, 1]]
    assert scale.shape == (2, 1)
    torch.testing.assert_close(scale, torch.tensor([[1.0], [0.5]]))


def test_b158c_hand_computed():
    # Rows of very different size: one scale per row keeps the small row's codes (a per-tensor
    # gamma = 8.15 / 8 would round all of row 0 to 0).
    w = torch.tensor([[0.1, -0.2, 0.05, 0.3], [2.0, -4.0, 1.0, 0.5]])
    codes, scale = quantize_weights(w, "b158c")
    # row 0: gamma = 0.65 / 4 = 0.1625, W / gamma = [0.62, -1.23, 0.31, 1.85]
    # row 1: gamma = 7.5 / 4 = 1.875, W / gamma = [1.07, -2.13, 0.53, 0.27]
    assert codes.dtype == torch.int8 and codes.tolist() == [[1, -1, 0, 1], [1, -1, 1, 0]]
    assert scale.dtype == torch.float32 and scale.shape == (2, 1)
    torch.testing.assert_close(scale, torch.tensor([[0.1625], [1.875]]))
    assert quantize_weights(w, "b158")[0][0].tolist() == [0, 0, 0, 0]


def test_b158c_is_b158_on_a_single_row():
    w = _b158_with_exact_ties()[1:]  # holds two ties of its own (not of this row's gamma)
    codes, _ = quantize_weights(w, "b158c")
    assert codes.tolist() == quantize_weights(w, "b158")[0].tolist()


def test_twn_hand_computed():
    w = torch.tensor([[0.1, -0.2, 0.05, 0.3],  # mean 0.1625, D = 0.11375: keeps -0.2, 0.3
                      [2.0, -4.0, 1.0, 0.5],  # mean 1.875, D = 1.3125: keeps 2, -4
                      [0.7, 0.0, 0.0, 3.3],  # mean 1, D = 0.7: 0.7 is not above it
                      [0.0, 0.0, 0.0, 0.0],  # nothing kept: codes 0, scale 0 (not NaN)
                      [1.0, -1.0, 1.0, -1.0]])  # D = 0.7: all kept, scale 1
    codes, scale = quantize_weights(w, "twn")
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[0, -1, 0, 1], [1, -1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0],
                              [1, -1, 1, -1]]
    assert scale.dtype == torch.float32 and scale.shape == (5, 1)
    torch.testing.assert_close(scale, torch.tensor([[0.25], [3.0], [3.3], [0.0], [1.0]]))


@pytest.mark.parametrize("method,values", [
    ("b158", {-1, 0, 1}), ("b158c", {-1, 0, 1}), ("twn", {-1, 0, 1}), ("bitnet", {-1, 1}),
    ("sign", {-1, 1}), ("xnor", {-1, 1})])
def test_code_sets_on_random_weights(method, values):
    w = torch.randn(64, 48)
    w[0, :5] = 0.0
    codes, scale = quantize_weights(w, method)
    assert set(codes.unique().tolist()) == values
    assert scale.dtype == torch.float32
    assert (codes * scale).shape == w.shape


@pytest.mark.parametrize("method", ["fp", "int4", ""])
def test_unknown_methods_raise(method):
    with pytest.raises(ValueError, match=", ".join(METHODS)):
        quantize_weights(torch.randn(3, 3), method)


def test_int8_activations_hand_computed():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q, s = absmax_int8(x)
    # 1.0 * 127 = 127; -0.5 * 127 = -63.5 -> -64 (half to even); 0.25 * 127 = 31.75 -> 32.
    assert q.tolist() == [[127, -64, 32, 0], [0, 0, 0, 0]]
    assert s[0].item() == pytest.approx(127.0)
    assert s[1].item() == pytest.approx(127.0 / EPS)
    torch.testing.assert_close(quantize_activations(x, 8)[0], torch.tensor([127, -64, 32, 0]) / 127)


def test_int8_activations_round_half_to_even():
    # max|x| = 127 gives s = 1 exactly, so x * s are exact ties: half to even gives 62, 0, -2,
    # 4, where rounding half away from zero would give 63, 1, -3, 5 (and -63.5 -> -64 either way).
    x = torch.tensor([[127.0, 62.5, 0.5, -2.5, 3.5, -63.5]])
    q, s = absmax_int8(x)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 62, 0, -2, 4, -64]]
    assert quantize_activations(x, 8).tolist() == [[127.0, 62.0, 0.0, -2.0, 4.0, -64.0]]


def test_int8_activation_error_bound():
    x = torch.randn(50, 37) * torch.logspace(-3, 3, 50).unsqueeze(1)
    err = (quantize_activations(x, 8) - x).abs()
    bound = x.abs().amax(dim=-1, keepdim=True) / 254
    assert (err <= bound * (1 + 1e-5)).all()


def test_one_bit_activations_hand_computed():
    x = torch.tensor([[1.0, -3.0, 0.0, 2.0]])
    torch.testing.assert_close(quantize_activations(x, 1), torch.tensor([[1.5, -1.5, 1.5, 1.5]]))


# --- the layer and its straight-through estimators ----------------------------------------------


def _layer(method, act_bits, w, b):
    layer = BitLinear(w.shape[1], w.shape[0], method=method, act_bits=act_bits)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    return layer


@pytest.mark.parametrize("method", ["b158", "b158c", "twn", "bitnet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: fake-quant path
def test_identity_ste_gradients(method, dtype):
    torch.manual_seed(0)
    w, b = torch.randn(5, 7, dtype=dtype), torch.randn(5, dtype=dtype)
    x = torch.randn(2, 3, 7, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 3, 5, dtype=dtype)
    layer = _layer(method, 8, w, b).to(dtype)
    assert layer._int8_path_ok(x) == (dtype == torch.float32)
    y = layer(x)
    y.backward(g)
    codes, scale = quantize_weights(w, method)
    wq, xq = (codes * scale).to(dtype), quantize_activations(x.detach(), 8)
    torch.testing.assert_close(y, F.linear(xq, wq, b), rtol=1e-5, atol=1e-5)
    # Identity STE: dL/dx = g W~, dL/dW = g^T x^ (the quantized activations), dL/db = sum g.
    torch.testing.assert_close(x.grad, g @ wq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, g.reshape(-1, 5).t() @ xq.reshape(-1, 7),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, g.sum((0, 1)))


@pytest.mark.parametrize("method", ["sign", "xnor"])
def test_clipped_ste_gradients_for_binary_weights(method):
    torch.manual_seed(1)
    w, b = torch.randn(4, 6) * 0.8, torch.zeros(4)
    w[0, 0], w[1, 2], w[3, 5] = 1.5, -2.0, 1.0  # two outside [-1, 1], one exactly on the edge
    x = torch.randn(3, 6, requires_grad=True)
    g = torch.randn(3, 4)
    layer = _layer(method, None, w, b)
    layer(x).backward(g)
    codes, scale = quantize_weights(w, method)
    mask = (w.abs() <= 1).float()
    assert mask[0, 0] == 0 and mask[1, 2] == 0 and mask[3, 5] == 1
    torch.testing.assert_close(layer.weight.grad, (g.t() @ x.detach()) * mask)
    torch.testing.assert_close(x.grad, g @ (codes * scale))


def test_clipped_ste_for_one_bit_activations():
    torch.manual_seed(2)
    w, b = torch.randn(4, 6) * 0.5, torch.zeros(4)
    x = torch.randn(3, 6) * 1.5
    x[0, 0] = 1.0
    x.requires_grad_(True)
    g = torch.randn(3, 4)
    layer = _layer("xnor", 1, w, b)
    y = layer(x)
    y.backward(g)
    codes, scale = quantize_weights(w, "xnor")
    torch.testing.assert_close(y, F.linear(quantize_activations(x.detach(), 1), codes * scale))
    torch.testing.assert_close(x.grad, (g @ (codes * scale)) * (x.detach().abs() <= 1))
    assert x.grad[0].abs().sum() > 0


@pytest.mark.parametrize("method", ["b158", "b158c", "twn", "bitnet"])
def test_int8_path_matches_fake_quant_path(method):
    """The fast int8 forward is the same function, with the same gradients, as plain fake quant
    (per-tensor and per-output-channel scales, ternary and binary codes alike)."""
    torch.manual_seed(3)
    layer = BitLinear(64, 48, method=method)
    x = torch.randn(4, 9, 64, requires_grad=True)
    y = layer(x)
    assert layer._int8_path_ok(x)
    y.square().sum().backward()
    grads = x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()
    x.grad = layer.weight.grad = layer.bias.grad = None
    codes, scale = layer.quantized_weight()
    xq = x + (quantize_activations(x, 8) - x).detach()
    wq = layer.weight + (codes * scale - layer.weight).detach()
    y_ref = F.linear(xq, wq, layer.bias)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, (x.grad, layer.weight.grad, layer.bias.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sub_norm_keeps_state_dict_keys_and_normalizes():
    layer = BitLinear(8, 4, method="b158", sub_norm=True)
    assert set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x * 100 + 5), layer(x), rtol=1e-3, atol=1e-3)


# --- the transform --------------------------------------------------------------------------------


@pytest.mark.parametrize("where,include_patch_embed,count", [
    ("all", True, 25), ("all", False, 24), ("mlp", True, 12), ("attn", True, 12),
    ("none", True, 0)])
def test_layer_counts_at_depth_6(where, include_patch_embed, count):
    model = VisionTransformer(ViTConfig(depth=6, dim=32, heads=4))
    rows = quantize_(model, "b158", where=where, include_patch_embed=include_patch_embed)
    quantized = [n for n, m in model.named_modules() if isinstance(m, BitLinear)]
    assert len(rows) == len(quantized) == count
    assert [r.name for r in rows] == quantized
    assert type(model.head) is nn.Linear
    if where == "mlp":
        assert all(n.split(".")[-1] in ("fc1", "fc2") for n in quantized)
    if where == "attn":
        assert all(n.split(".")[-1] in ("qkv", "proj") and ".attn." in n for n in quantized)


def test_summary_rows():
    model = VisionTransformer(ViTConfig(depth=2, dim=32, heads=4, patch_size=4))
    rows = quantize_(model, "b158")
    assert rows[0].name == "patch_embed.proj" and rows[0].shape == (32, 48)
    assert rows[1].name == "blocks.0.attn.qkv" and rows[1].shape == (96, 32)
    assert all(r.bits_per_weight == pytest.approx(math.log2(3)) for r in rows)
    assert {r.act_bits for r in rows} == {8}
    model = VisionTransformer(ViTConfig(depth=2, dim=32, heads=4, patch_size=4))
    rows = quantize_(model, "xnor", act_bits=1)
    assert all(r.bits_per_weight == 1.0 for r in rows)
    # Pixels are never binarized: the patch embedding falls back to 8-bit activations.
    assert rows[0].act_bits == 8 and model.patch_embed.proj.act_bits == 8
    assert {r.act_bits for r in rows[1:]} == {1}


@pytest.mark.parametrize("method,default_bits", [
    ("b158", 8), ("b158c", 8), ("twn", 8), ("bitnet", 8), ("sign", None), ("xnor", None)])
def test_default_act_bits(method, default_bits):
    # BitNet's methods quantize activations to 8 bits; the binarization study's stay full
    # precision (None), in the summary rows and in the layers alike.
    model = VisionTransformer(ViTConfig(depth=1, dim=32, heads=4, patch_size=8))
    rows = quantize_(model, method)
    assert len(rows) == 5 and all(r.act_bits == default_bits for r in rows)
    assert all(m.act_bits == default_bits for m in model.modules() if isinstance(m, BitLinear))


def test_head_untouched_and_fp_is_a_no_op():
    model = VisionTransformer(ViTConfig(depth=2, dim=32, heads=4))
    head = model.head.weight.clone()
    assert quantize_(model, "fp") == []
    assert not any(isinstance(m, BitLinear) for m in model.modules())
    quantize_(model, "sign")
    assert type(model.head) is nn.Linear
    torch.testing.assert_close(model.head.weight, head)
    wrapped = nn.ModuleDict({"vit": VisionTransformer(ViTConfig(depth=1, dim=32, heads=4))})
    quantize_(wrapped, "b158")  # inside a wrapper the classifier is still the head
    assert type(wrapped["vit"].head) is nn.Linear


def test_filter_fn_and_errors():
    model = VisionTransformer(ViTConfig(depth=3, dim=32, heads=4))
    rows = quantize_(model, "b158", filter_fn=lambda m, name: name.startswith("blocks.1."))
    assert [r.name for r in rows] == [
        "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, "b158")
    with pytest.raises(ValueError, match="unknown where 'heads'"):
        quantize_(VisionTransformer(ViTConfig(depth=1, dim=32, heads=4)), "b158", where="heads")
    with pytest.raises(ValueError, match="act_bits"):
        quantize_(VisionTransformer(ViTConfig(depth=1, dim=32, heads=4)), "b158", act_bits=4)
    with pytest.raises(ValueError, match="act_bits True"):  # True == 1, yet not 1 bit
        quantize_(VisionTransformer(ViTConfig(depth=1, dim=32, heads=4)), "b158", act_bits=True)


def test_lone_shared_and_eval_mode_linears():
    with pytest.raises(ValueError, match="lone nn.Linear use BitLinear.from_linear"):
        quantize_(nn.Linear(4, 4), "b158")  # it has no parent: it would stay full precision
    shared, model = nn.Linear(4, 4), nn.Module()
    model.a = model.b = shared
    assert [r.name for r in quantize_(model, "b158")] == ["a"]  # one layer ...
    assert type(model.b) is BitLinear and model.a is model.b  # ... under both names
    frozen = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).eval()
    quantize_(frozen, "b158")
    assert not any(m.training for m in frozen.modules())


def test_hugging_face_names_and_a_selection_of_nothing():
    def hf_like() -> nn.Module:  # the module names of transformers' ViTForImageClassification
        layer = nn.Module()
        layer.attention = nn.ModuleDict({"query": nn.Linear(8, 8), "output": nn.Linear(8, 8)})
        layer.mlp = nn.ModuleDict({"fc1": nn.Linear(8, 16), "fc2": nn.Linear(16, 8)})
        model = nn.Module()
        model.vit = nn.ModuleDict({"layers": nn.ModuleList([layer])})
        model.classifier = nn.Linear(8, 10)
        return model

    assert [r.name for r in quantize_(hf_like(), "b158")] == [
        "vit.layers.0.attention.query", "vit.layers.0.attention.output",
        "vit.layers.0.mlp.fc1", "vit.layers.0.mlp.fc2"]  # the classifier kept
    assert [r.name for r in quantize_(hf_like(), "b158", where="attn")] == [
        "vit.layers.0.attention.query", "vit.layers.0.attention.output"]
    other = nn.Module()
    other.blocks = nn.ModuleList([nn.ModuleDict({"ffn": nn.Linear(8, 8)})])
    with pytest.raises(ValueError, match="no nn.Linear to quantize with where='mlp'.*filter_fn"):
        quantize_(other, "b158", where="mlp")  # trained at full precision, silently, before
    assert quantize_(other, "b158", where="none") == []


@pytest.mark.parametrize("method", ["b158", "sign"])
def test_an_empty_batch_goes_through(method):
    model = VisionTransformer(ViTConfig(image_size=16, patch_size=8, dim=32, depth=1, heads=4))
    quantize_(model, method)
    assert model(torch.randn(0, 3, 16, 16)).shape == (0, 10)
    x = torch.randn(0, 2, 12, requires_grad=True)
    layer = BitLinear(12, 5, method=method)
    layer(x).sum().backward()
    assert x.grad.shape == (0, 2, 12) and not layer.weight.grad.any()


@pytest.mark.parametrize("key", ["patch_size", "heads", "image_size"])
def test_vit_config_sizes_must_be_positive(key):
    with pytest.raises(ValueError, match=f"model.{key}=0: expected a positive integer"):
        ViTConfig(**{key: 0})


@pytest.mark.parametrize("method,act_bits", [
    ("b158", "default"), ("bitnet", "default"), ("sign", None), ("xnor", 1)])
def test_quantized_vit_forward_backward_and_eval_equals_train(method, act_bits):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(depth=2, dim=32, heads=4, patch_size=8))
    quantize_(model, method, act_bits=act_bits)
    x = torch.randn(3, 3, 32, 32)
    y = model(x)
    F.cross_entropy(y, torch.tensor([0, 1, 2])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), y.detach())


def test_state_dict_round_trip_and_fp_initialisation():
    torch.manual_seed(0)
    cfg = ViTConfig(depth=2, dim=32, heads=4, patch_size=8)
    fp = VisionTransformer(cfg).eval()
    q = VisionTransformer(cfg).eval()
    quantize_(q, "b158")
    assert list(q.state_dict()) == list(fp.state_dict())
    # A full-precision checkpoint initialises quantization-aware training...
    q.load_state_dict(fp.state_dict())
    direct = VisionTransformer(cfg).eval()
    direct.load_state_dict(fp.state_dict())
    quantize_(direct, "b158")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(q(x), direct(x))
        assert not torch.allclose(q(x), fp(x), atol=1e-4)
    # ...and a quantized model's state dict round-trips into a fresh quantized model.
    again = VisionTransformer(cfg).eval()
    quantize_(again, "b158")
    again.load_state_dict(q.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(x), q(x))
