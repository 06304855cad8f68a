"""The ONNX export (`bitvit.deploy.onnx_export`, run by `bitvit.deploy.onnx_runtime`): every
method's graph against bitvit's int engine, the per-token quantizer's codes against absmax_int8
(equal but at near ties), the per-tensor mode within a measured bound, the fp graph against
torch, the token-major graph's few data moves, its q, k, v products against the whole qkv
layer's, the cls-pooled last block's cls-only products, metadata, bad files, a missing
onnxruntime, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hide_module, write_pngs
from torch import nn

from bitvit.cli import main
from bitvit.deploy.engine import InferenceLinear, agreement, convert_for_inference
from bitvit.deploy.export import ExportError, export_model, load, model_metadata
from bitvit.nn.methods import METHOD_TABLE
from bitvit.nn.quant import METHODS, BitLinear, absmax_codes, absmax_int8
from bitvit.training.checkpoint import build_model, save_model
from bitvit.training.config import Config, load_config

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from bitvit.deploy.onnx_export import (  # noqa: E402 - after the skip: needs onnx
    _Graph,
    _linear,
    _linears,
    export_onnx,
    onnx_model,
    to_onnx,
)
from bitvit.deploy.onnx_runtime import (  # noqa: E402
    GRAPH_OPS,
    OrtModel,
    load_onnx,
    metadata_of,
)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c", "d"]
N_IMAGES = 64
# The per-token graph is the int engine's arithmetic: only fp32 rounding order differs (and a
# code at a near tie, rarely).
ATOL_TOKEN = 1e-4
# Weights-only layers (sign: scale 1, so hidden states grow large) multiply in fp32, where the
# summation order shows more: tests/test_export.py's bar for fp32 exports.
ATOL_FLOAT_PRODUCTS = 1e-3
# Per tensor, one activation scale for the whole batch (asymmetric uint8): measured on these
# tiny models at <= 0.02 of logits up to ~6 (see test_tensor_mode_is_close); bound with margin.
# (With cls pooling the last block's proj, fc1 and fc2 scale the cls tokens alone: on
# test_tensor_mode_is_close's models max |tensor - token| moved within 0.0003 of the largest
# logit, 0.0007-0.0015 before, 0.0007-0.0013 after.)
TENSOR_REL = 0.02 * 3


def _config(method: str, **quant: object) -> Config:
    return Config.from_dict({
        "model": {"image_size": 16, "patch_size": 4, "dim": 32, "depth": 2, "heads": 2,
                  "mlp_ratio": 2, "num_classes": len(CLASSES)},
        "quant": {"method": method, **quant},
        "data": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    })


def _model(config: Config) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():  # spread the logits and the tokens, as training does
        model.head.weight.mul_(20)
        model.pos_embed.mul_(20)
    return model.eval()


def _images(n: int = N_IMAGES) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _export(model: nn.Module, config: Config, path: Path, act_quant: str = "token") -> OrtModel:
    to_onnx(model, path, act_quant, metadata=model_metadata(config, CLASSES))
    return load_onnx(path, threads=1)


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_agrees_with_the_int_engine(tmp_path: Path, method: str):
    config = _config(method)
    model = _model(config)
    exported = load(export_model(model, config, CLASSES, tmp_path / "m.safetensors",
                                 float_dtype="fp32"), engine="int")
    ort_model = _export(model, config, tmp_path / "m.onnx")
    x = _images()
    with torch.no_grad():
        ref, got = exported(x), ort_model(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    int_products = METHOD_TABLE[method].default_act_bits == 8
    assert (got - ref).abs().max().item() <= (ATOL_TOKEN if int_products
                                              else ATOL_FLOAT_PRODUCTS), method
    assert torch.equal(got.argmax(1), ref.argmax(1))
    ops = _ops(tmp_path / "m.onnx")
    if int_products:  # the integer product, not a float stand-in
        assert "MatMulIntegerToFloat" in ops and "QuantizeLinear" in ops
    else:  # weights-only: dequantized codes through a float MatMul
        assert "MatMulInteger" not in ops and "Cast" in ops


@pytest.mark.parametrize("act_quant", ["token", "tensor"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("method", ["fp", "b158", "bitnet", "xnor", "sign"])
def test_a_batch_of_zero_images_gives_zero_rows(tmp_path: Path, method: str, pooling: str,
                                                act_quant: str):
    """An empty batch (every image of a folder unreadable, say) is (0, classes), not an error in
    the graph's reshapes; the same in the int engine."""
    config = _config(method)
    config.model.pooling = pooling
    model = _model(config)
    ort_model = _export(model, config, tmp_path / "m.onnx", act_quant)
    exported = load(export_model(model, config, CLASSES, tmp_path / "m.safetensors"), engine="int")
    empty = torch.zeros(0, 3, 16, 16)
    with torch.no_grad():
        assert ort_model(empty).shape == exported(empty).shape == (0, len(CLASSES))
    assert ort_model.logits(torch.zeros(0, 3, 16, 16, dtype=torch.uint8)).shape == (0, 4)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_one_bit_activations_sub_norm_and_pooling(tmp_path: Path, pooling: str):
    config = _config("b158", act_bits=1, sub_norm=True)
    config.model.pooling = pooling
    model = _model(config)
    # The patch embedding keeps 8 bits (its input is pixels): both kinds of layer are here.
    assert {m.act_bits for m in model.modules() if hasattr(m, "act_bits")} == {1, 8}
    int_model = convert_for_inference(_model(config), engine="int")
    ort_model = _export(model, config, tmp_path / "token.onnx")
    x = _images()
    with torch.no_grad():
        ref, got = int_model(x), ort_model(x)
    assert (got - ref).abs().max().item() <= ATOL_TOKEN
    # Per tensor: only the 8-bit patch embedding changes; the 1-bit layers keep their sign
    # products, 6 per block (q, k and v are three; with cls pooling the last block's take fewer
    # rows, not fewer products). (Signs flip under the per-tensor rounding, so no tight bound.)
    to_onnx(model, tmp_path / "tensor.onnx", "tensor")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "tensor.onnx")).graph.node]
    assert ops.count("DynamicQuantizeMatMul") == 1
    assert ops.count("MatMulInteger") == 6 * config.model.depth
    assert ops.count("Where") == 4 * config.model.depth  # one sign per layer, shared by q, k, v


def _layer_graph(layer: nn.Module, act_quant: str, in_features: int, path: Path) -> Path:
    """A one-layer graph with the quantized activations (uint8, code + 128) as a second output."""
    g = _Graph(onnx)
    y = _linear(g, "x", layer, "layer", act_quant)
    h = onnx.helper
    outputs = [h.make_tensor_value_info(y, onnx.TensorProto.FLOAT, None),
               h.make_tensor_value_info("layer.q_u8", onnx.TensorProto.UINT8, None)]
    graph = h.make_graph(g.nodes, "layer", [h.make_tensor_value_info(
        "x", onnx.TensorProto.FLOAT, ["M", in_features])], outputs, g.initializers)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17),
                                               h.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    onnx.save_model(model, str(path))
    return path


def _token_layer(tmp_path: Path, x: torch.Tensor) -> tuple[InferenceLinear, np.ndarray,
                                                             np.ndarray]:
    """A b158 layer, and its one-layer graph's output and int8 codes (uint8 - 128) on x."""
    torch.manual_seed(0)
    qlayer = InferenceLinear.from_bitlinear(BitLinear(x.shape[1], 8, method="b158"),
                                            engine="int")
    path = _layer_graph(qlayer, "token", x.shape[1], tmp_path / "layer.onnx")
    y, q = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})
    assert q.dtype == np.uint8
    return qlayer, y, q.astype(np.int32) - 128


def test_token_codes_are_absmax_int8(tmp_path: Path):
    torch.manual_seed(1)
    x = torch.randn(200, 16) * torch.logspace(-3, 3, 200)[:, None]
    # Ties: rows whose max is 127, so x * s lands exactly on halves (k.5 values).
    x[:4] = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 127.0] * 2])
    x[4:8] = 0.0  # an all-zero token: scale 127 / EPS, codes 0
    qlayer, y, q = _token_layer(tmp_path, x)
    q_ref, _ = absmax_int8(x)
    assert np.array_equal(q, q_ref.numpy())  # round half to even, as torch.round
    assert set(q[0, :7].tolist()) == {0, 2, -2, 4}  # 0.5->0, 1.5->2, 2.5->2, 3.5->4
    with torch.no_grad():
        ref = qlayer(x)
    # acc * w_scale * step in ONNX Runtime, acc * (w_scale / s) in bitvit: an ulp or two apart.
    assert np.allclose(y, ref.numpy(), rtol=1e-6, atol=1e-6)


def test_token_codes_differ_only_at_near_ties(tmp_path: Path):
    """QuantizeLinear divides by the step m / 127 where absmax_int8 multiplies by 127 / m: the
    two round differently only where x * 127 / m is within an ulp of a half, by one code."""
    gen = torch.Generator().manual_seed(2)
    m = torch.logspace(-4, 4, 4000)[:, None] * (1 + torch.rand(4000, 1, generator=gen))
    k = torch.randint(-127, 127, (4000, 63), generator=gen).float()
    x = torch.cat([m, (k + 0.5) * m / 127], dim=1)  # max m; the rest at (near) ties
    x[:2000, 1:] += torch.randn(2000, 63, generator=gen) * m[:2000] / 1000  # half: not ties
    _, _, q = _token_layer(tmp_path, x)
    q_ref, s = absmax_codes(x)
    t = (x * s).numpy()
    near_tie = np.abs(np.abs(t - np.trunc(t)) - 0.5) <= 4 * np.spacing(np.abs(t))
    differ = q != q_ref.numpy()
    assert near_tie[2000:].mean() > 0.9 and near_tie[:2000].mean() < 0.01
    assert not (differ & ~near_tie).any()  # away from ties, the same codes
    assert np.abs(q - q_ref.numpy()).max() <= 1
    assert (q[:, 0] == 127).all()  # the max itself lands on 127


@pytest.mark.parametrize("method", ["b158", "b158c", "twn", "bitnet"])
def test_tensor_mode_is_close(tmp_path: Path, method: str):
    config = _config(method)
    model = _model(config)
    ort_token = _export(model, config, tmp_path / "token.onnx")
    ort_tensor = _export(model, config, tmp_path / "tensor.onnx", "tensor")
    assert "DynamicQuantizeMatMul" in _ops(tmp_path / "tensor.onnx")
    assert "MatMulInteger" not in _ops(tmp_path / "tensor.onnx")
    x = _images()
    report = agreement(ort_token, ort_tensor, x)
    scale = ort_token(x).abs().max().item()
    assert 0 < report["max_abs_logit_diff"] <= TENSOR_REL * scale, report
    assert report["argmax_agreement"] >= 0.9, report


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("method,act_bits", [("fp", None), ("b158", 8), ("b158", 1)])
def test_token_major_graph_moves_little_data(tmp_path: Path, method: str, act_bits: int | None,
                                             pooling: str):
    """The residual stream is (tokens, N, dim): one Transpose per attention block (its output)
    plus the patches', no Gather/Split of q, k, v, and the same logits as the reference."""
    config = _config(method, **({} if method == "fp" else {"act_bits": act_bits}))
    config.model.pooling = pooling
    model = _model(config)
    ref_model = model if method == "fp" else convert_for_inference(_model(config), engine="int")
    x = _images()
    with torch.no_grad():
        ref = ref_model(x)
    depth = config.model.depth
    for act_quant in ("token", "tensor"):
        path = tmp_path / f"{act_quant}.onnx"
        with torch.no_grad():
            got = _export(model, config, path, act_quant)(x)
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert ops.count("Transpose") == depth + 1
        assert ops.count("FusedMatMul") == 2 * depth  # q k^T and weights v, per block
        # Float products: fp's 6 per block, the patch embedding and the head; else the head's.
        assert ops.count("MatMul") == (6 * depth + 2 if method == "fp" else 1)
        assert "Gather" not in ops and "Split" not in ops
        # cls pooling: the last block's cls rows of its residual stream and of q's input (per
        # token: the codes and their steps; 1 bit: the signs and their scales) are Slices; the
        # pooled token a Squeeze.
        q_inputs = 1 if method == "fp" or act_quant == "tensor" and act_bits == 8 else 2
        assert ops.count("Slice") == (1 + q_inputs if pooling == "cls" else 0)
        assert ops.count("Squeeze") == (pooling == "cls")
        if method == "fp" or act_quant == "token":
            assert (got - ref).abs().max().item() <= ATOL_TOKEN, act_quant
        elif act_bits == 8:  # one activation scale per tensor: close, as test_tensor_mode_is_close
            assert (got - ref).abs().max().item() <= TENSOR_REL * ref.abs().max().item()
            assert (got.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.9
        # (1 bit per tensor: only the patch embedding changes, and signs flip after it.)


PRODUCTS = ("MatMul", "MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeMatMul")


def _product_rows(path: Path, block: str, batch: int) -> dict[str, int]:
    """Rows (the product of all but the last axis) of each product's input in ``block``, by
    layer (q, k, v, proj, fc1, fc2), run on ``batch`` images."""
    proto = onnx.load(str(path))
    nodes = [n for n in proto.graph.node if n.op_type in PRODUCTS
             and n.name.startswith(f"{block}.")]
    for n in nodes:
        integer = n.op_type in ("MatMulIntegerToFloat", "MatMulInteger")
        proto.graph.output.append(onnx.helper.make_tensor_value_info(
            n.input[0], onnx.TensorProto.UINT8 if integer else onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = session.run([n.input[0] for n in nodes], {"images": _images(batch).numpy()})
    return {n.name.split(".")[-2]: int(np.prod(o.shape[:-1])) for n, o in zip(nodes, outs,
                                                                              strict=True)}


@pytest.mark.parametrize("method,act_bits", [("b158", 8), ("fp", None), ("b158", 1)])
def test_cls_pooling_last_block_computes_the_cls_token_only(tmp_path: Path, method: str,
                                                           act_bits: int | None):
    """With cls pooling the last block's q, proj, fc1 and fc2 take the cls token's rows only
    (k and v every token's): per token, the same logits as the int engine; mean pooling keeps
    every token's rows."""
    batch, depth, tokens = 3, 2, 17  # (16 / 4)^2 patches and the cls token
    for pooling in ("cls", "mean"):
        config = _config(method, **({} if method == "fp" else {"act_bits": act_bits}))
        config.model.pooling = pooling
        model = _model(config)
        ref_model = model if method == "fp" else convert_for_inference(_model(config), engine="int")
        x = _images()
        for act_quant in ("token", "tensor"):
            path = tmp_path / f"{pooling}-{act_quant}.onnx"
            got = _export(model, config, path, act_quant)(x)
            if act_quant == "token":
                with torch.no_grad():
                    ref = ref_model(x)
                assert (got - ref).abs().max().item() <= ATOL_TOKEN, pooling
            n = tokens - (pooling == "mean")
            assert _product_rows(path, "blocks.0", batch) == dict.fromkeys(
                ("q", "k", "v", "proj", "fc1", "fc2"), n * batch)
            cls_rows = batch if pooling == "cls" else n * batch
            assert _product_rows(path, f"blocks.{depth - 1}", batch) == {
                "q": cls_rows, "k": n * batch, "v": n * batch, "proj": cls_rows,
                "fc1": cls_rows, "fc2": cls_rows}, (pooling, act_quant)


@pytest.mark.parametrize("method,act_bits,act_quant", [
    ("b158", 8, "tensor"), ("b158c", 8, "tensor"), ("b158c", 8, "token"), ("b158c", 1, "token"),
    ("b158c", None, "token"), ("fp", None, "token")])
def test_qkv_parts_are_the_whole_layer(tmp_path: Path, method: str, act_bits: int | None,
                                       act_quant: str):
    """q, k, v as three products sharing one activation quantization (`_linears`) give the
    columns of the whole qkv product (per tensor: DynamicQuantizeMatMul's), per-channel scales
    and bias sliced alike."""
    torch.manual_seed(0)
    layer = (nn.Linear(16, 3 * 8) if method == "fp" else
             BitLinear(16, 3 * 8, method=method, act_bits=act_bits))
    with torch.no_grad():
        layer.bias.normal_()
    g = _Graph(onnx)
    parts = _linears(g, "x", layer, "qkv", act_quant, tokens=5, parts="qkv")
    whole = _linear(g, "x", layer, "whole", act_quant, tokens=5)
    h = onnx.helper
    graph = h.make_graph(g.nodes, "qkv", [h.make_tensor_value_info(
        "x", onnx.TensorProto.FLOAT, [5, "B", 16])], [h.make_tensor_value_info(
            o, onnx.TensorProto.FLOAT, None) for o in [*parts, whole]], g.initializers)
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17),
                                               h.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 9
    x = torch.randn(5, 7, 16, generator=torch.Generator().manual_seed(3)).numpy() * 3 + 0.5
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    *qkv, ref = ort.InferenceSession(proto.SerializeToString(), options,
                                     providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert [q.shape for q in qkv] == [(5, 7, 8)] * 3
    ops = [n.op_type for n in proto.graph.node]
    if method != "fp" and act_bits is not None:  # x quantized once for q, k, v, once for whole
        assert sum(ops.count(op) for op in ("QuantizeLinear", "DynamicQuantizeLinear", "Where",
                                            "DynamicQuantizeMatMul")) == 2
    got = np.concatenate(qkv, axis=-1)
    assert np.allclose(got, ref, rtol=1e-6, atol=1e-6)
    if act_bits is not None:  # integer products, rescaled alike: the same numbers
        assert np.array_equal(got, ref)


def test_unquantized_model_is_a_plain_fp32_graph(tmp_path: Path):
    config = _config("fp")
    model = _model(config)
    ort_model = _export(model, config, tmp_path / "fp.onnx", act_quant="tensor")  # ignored
    assert not _ops(tmp_path / "fp.onnx") & {"MatMulInteger", "DynamicQuantizeMatMul", "Round"}
    x = _images()
    with torch.no_grad():
        ref, got = model(x), ort_model(x)
    assert (got - ref).abs().max().item() <= 1e-4
    assert ort_model.metadata["method"] == "fp"


def test_fp32_graph_takes_ort_quantize_dynamic(tmp_path: Path):
    # ONNX Runtime's own int8 recipe (the benchmark's baseline) needs every tensor's type;
    # shape inference stops at contrib ops unless the graph declares their outputs.
    from onnxruntime.quantization import QuantType, quantize_dynamic

    config = _config("fp")
    model = _model(config)
    fp32, int8 = tmp_path / "fp.onnx", tmp_path / "int8.onnx"
    _export(model, config, fp32)
    inferred = onnx.shape_inference.infer_shapes(onnx.load(fp32))
    typed = {v.name for v in (*inferred.graph.value_info, *inferred.graph.output)}
    untyped = [o for n in inferred.graph.node for o in n.output if o not in typed]
    assert not untyped, f"outputs without a type: {untyped[:5]}"
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    assert "MatMulInteger" in _ops(int8) or "DynamicQuantizeMatMul" in _ops(int8)
    x = _images()
    with torch.no_grad():
        ref, got = model(x), load_onnx(int8, threads=1)(x)
    assert (got.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.9


def test_metadata_round_trip_and_batch_independence(tmp_path: Path):
    config = _config("b158c")
    model = _model(config)
    ort_model = _export(model, config, tmp_path / "m.onnx")
    exported = load(export_model(model, config, CLASSES, tmp_path / "m.safetensors"))
    assert ort_model.classes == CLASSES
    assert ort_model.preprocessing == exported.preprocessing
    assert ort_model.config.to_dict() == config.to_dict()
    meta = metadata_of(tmp_path / "m.onnx")
    assert meta["format"] == "bitvit-onnx" and meta["format_version"] == "1"
    assert meta["act_quant"] == "token" and meta["method"] == "b158c"
    x = _images(5)
    # Per-token quantization: an image's logits do not depend on its batch mates.
    whole = ort_model(x)
    assert torch.allclose(torch.cat([ort_model(x[i:i + 1]) for i in range(5)]), whole,
                          atol=1e-6)
    images = (torch.rand(3, 3, 20, 20) * 255).to(torch.uint8)  # resized by the preprocessing
    assert [[c for c, _ in row] for row in ort_model.predict(images, 2)] == \
        [[c for c, _ in row] for row in exported.predict(images, 2)]


def test_bad_files_are_one_line_errors(tmp_path: Path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    foreign = tmp_path / "foreign.onnx"
    h = onnx.helper
    graph = h.make_graph([h.make_node("Identity", ["images"], ["logits"])], "g",
                         [h.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1])],
                         [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1])])
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    proto.ir_version = 9
    onnx.save_model(proto, str(foreign))
    future = tmp_path / "future.onnx"
    h.set_model_props(proto, {"format": "bitvit-onnx", "format_version": "99"})
    onnx.save_model(proto, str(future))
    for path, words in ((garbage, "not a readable ONNX model"),
                        (foreign, "not a bitvit ONNX export"),
                        (future, "unknown bitvit ONNX format version '99'"),
                        (tmp_path / "missing.onnx", "no such file")):
        with pytest.raises(ExportError) as err:
            load_onnx(path)
        assert str(path) in str(err.value) and words in str(err.value)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown act_quant 'row'"):
        to_onnx(_model(_config("b158")), tmp_path / "x.onnx", "row")


def test_without_config_metadata_runs_but_cannot_read_images(tmp_path: Path):
    model = _model(_config("b158"))
    ort_model = OrtModel(to_onnx(model, tmp_path / "bare.onnx"))
    assert ort_model.config is None and ort_model(_images(2)).shape == (2, len(CLASSES))
    with pytest.raises(ExportError, match="bare.onnx: has no config"):
        ort_model.logits(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    # evaluate asks for the mean and std such a graph does not carry (no AttributeError).
    from bitvit import evaluate
    from bitvit.data import ImageSet

    data = ImageSet(torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
                    torch.zeros(2, dtype=torch.long), list(CLASSES))
    with pytest.raises(TypeError, match="needs its mean and std"):
        evaluate(ort_model, data)


# ---------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A small b158 checkpoint (no training) whose classes are CIFAR-10's."""
    config = _config("b158")
    config.model.num_classes = 10
    model = _model(config)
    path = tmp_path / "model.safetensors"
    save_model(path, model, config, [str(i) for i in range(10)])
    return path


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_missing_packages_say_what_to_install(checkpoint, tmp_path, capsys, monkeypatch,
                                              missing):
    onnx_file = to_onnx(_model(_config("b158")), tmp_path / "m.onnx")
    hide_module(monkeypatch, missing)
    argv = (["export", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "o.onnx")]
            if missing == "onnx" else ["predict", str(onnx_file), str(tmp_path)])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[onnx]"' in err
    assert f"{missing} is not installed" in err


def test_export_options_are_checked(checkpoint, tmp_path, capsys):
    for argv, words in (
            (["--act-quant", "tensor"], "--act-quant applies to --format onnx"),
            (["--format", "onnx", "--packing", "2bit"], "--packing applies to --format"),
            (["--format", "onnx", "--float-dtype", "fp32"], "--float-dtype applies")):
        out = tmp_path / ("x.onnx" if "onnx" in argv else "x")
        assert main(["export", str(checkpoint), "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err
    assert main(["export", str(checkpoint), "--format", "onnx", "--out",
                 str(tmp_path / "m.onnx")]) == 0
    assert "token activation quantization" in capsys.readouterr().out
    twin = load_onnx(export_onnx(checkpoint, tmp_path / "twin.onnx"))  # the Python API
    assert torch.equal(twin(_images(4)), load_onnx(tmp_path / "m.onnx")(_images(4)))
    assert twin.classes == [str(i) for i in range(10)]
    for command, extra in (("eval", []), ("predict", [str(tmp_path)])):
        for argv, words in (([str(tmp_path / "m.onnx"), "--engine", "int"], "runs on the ort"),
                            # a training checkpoint: engines are for exports
                            ([str(checkpoint), "--engine", "ort"],
                             "export it with `bitvit export`"),
                            ([str(tmp_path / "m.onnx"), "--compile"], "--compile"),
                            ([str(tmp_path / "m.onnx"), "--device", "cuda"], "cuda")):
            assert main([command, *argv[:1], *extra, *argv[1:]]) == 2, (command, argv)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and words in err, err


TINY = ["model.dim=32", "model.depth=2", "model.heads=4", "model.patch_size=8",
        "quant.method=b158", "train.epochs=1", "train.batch_size=50", "data.limit_train=200",
        "data.limit_test=200"]


def test_cli_export_eval_predict_on_a_trained_run(real_env, tmp_path, capsys):
    from bitvit.training.loop import train

    run = tmp_path / "run"
    train(load_config(ROOT / "configs/paper.yaml", TINY), out=run, quiet=True)
    files = {}
    for fmt, act_quant in (("safetensors", None), ("onnx", "token"), ("onnx", "tensor")):
        out = tmp_path / f"m_{act_quant}.{fmt}"
        argv = ["export", str(run), "--format", fmt, "--out", str(out)]
        if fmt == "safetensors":
            argv += ["--float-dtype", "fp32"]
        assert main(argv + (["--act-quant", act_quant] if act_quant else [])) == 0
        files[act_quant] = out
    capsys.readouterr()
    reports = {}
    for key, path in files.items():
        engine = [] if key is None else ["--engine", "ort"]
        assert main(["eval", str(path), *engine]) == 0
        reports[key] = json.loads(capsys.readouterr().out)
    assert reports["token"]["n"] == 200
    assert reports["token"]["accuracy"] == reports[None]["accuracy"]
    assert reports["token"]["loss"] == pytest.approx(reports[None]["loss"], abs=1e-4)
    assert abs(reports["tensor"]["accuracy"] - reports[None]["accuracy"]) <= 0.05
    # predict on files: the ort engine by default, the same classes as the int engine.
    images = tmp_path / "images"
    write_pngs(images, 3, 32)
    outs = {}
    for key in (None, "token"):
        assert main(["predict", str(files[key]), str(images), "--json", "--top-k", "3"]) == 0
        outs[key] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(outs["token"]) == 3
    for a, b in zip(outs[None], outs["token"], strict=True):
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
        assert [p["probability"] for p in a["predictions"]] == pytest.approx(
            [p["probability"] for p in b["predictions"]], abs=1e-5)


@pytest.mark.parametrize("method", ["b158", "bitnet", "sign"])
@pytest.mark.parametrize("act_quant", ["token", "tensor"])
def test_every_initializer_is_used(tmp_path: Path, method: str, act_quant: str):
    # A bias written twice (once unused) would ship dead bytes in the file.
    config = _config(method)
    to_onnx(_model(config), tmp_path / "m.onnx", act_quant)
    graph = onnx.load(tmp_path / "m.onnx").graph
    used = {name for node in graph.node for name in node.input}
    assert [i.name for i in graph.initializer if i.name not in used] == []


# ---------------------------------------------------------------------------------------------
# Hostile or contradictory graphs: refused at load, or one line when they fail at run time.
# ---------------------------------------------------------------------------------------------


def test_graph_ops_are_every_operator_the_exporter_writes():
    """`GRAPH_OPS` (what a loaded file may use) covers every variant the exporter writes: every
    method, act_bits, act_quant, pooling, final norm, GELU and sub_norm."""
    used = set()
    variants = [({}, "cls", "tokens", "exact"), ({"act_bits": 1, "sub_norm": True}, "mean",
                                                "pooled", "tanh"),
                ({"act_bits": None}, "cls", "none", "exact")]
    for method in ("fp", *METHODS):
        for quant, pooling, final_norm, gelu in variants:
            config = _config(method, **({} if method == "fp" else quant))
            config.model.pooling, config.model.final_norm, config.model.gelu = (pooling,
                                                                                final_norm, gelu)
            for act_quant in ("token", "tensor"):
                proto = onnx_model(_model(config), act_quant)
                used |= {(n.domain, n.op_type) for n in proto.graph.node}
    assert used <= GRAPH_OPS, used - GRAPH_OPS
    assert not {"Loop", "Scan", "If", "ConstantOfShape", "Tile", "Range"} & {
        op for _, op in GRAPH_OPS}


H = onnx.helper
MEAN = H.make_node("ReduceMean", ["images"], ["r"], axes=[2, 3], keepdims=0)  # (N, 3)


def _hostile(path: Path, nodes: list, inits: list, in_shape: tuple = ("N", 3, 16, 16),
             out_type: int = onnx.TensorProto.FLOAT, out_shape: list | None = None) -> Path:
    """A small graph from ``images`` to ``logits`` with a valid bitvit export's metadata."""
    graph = H.make_graph(nodes, "g", [H.make_tensor_value_info(
        "images", onnx.TensorProto.FLOAT, list(in_shape))], [H.make_tensor_value_info(
            "logits", out_type, out_shape)], inits)
    proto = H.make_model(graph, opset_imports=[H.make_opsetid("", 17)])
    proto.ir_version = 9
    H.set_model_props(proto, {"format": "bitvit-onnx", "format_version": "1",
                              **model_metadata(_config("fp"), CLASSES)})
    onnx.save_model(proto, str(path))
    return path


def _const(name: str, value: object, dtype: type = np.int64) -> object:
    return onnx.numpy_helper.from_array(np.array(value, dtype), name)


def _head(width: int = len(CLASSES), channels: int = 3) -> tuple[list, list]:
    """(N, channels) mean colours times a (channels, width) matrix: logits."""
    return ([MEAN, H.make_node("MatMul", ["r", "w"], ["logits"])],
            [_const("w", np.ones((channels, width)), np.float32)])


def _loop(path: Path) -> Path:
    """A Loop of 10^12 iterations (an identity body) between the mean and the head."""
    body = H.make_graph([H.make_node("Identity", ["c"], ["c_out"]),
                         H.make_node("Identity", ["x"], ["x_out"])], "body",
                        [H.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
                         H.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
                         H.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                        [H.make_tensor_value_info("c_out", onnx.TensorProto.BOOL, []),
                         H.make_tensor_value_info("x_out", onnx.TensorProto.FLOAT, None)])
    nodes, inits = _head()
    nodes[1].input[0] = "looped"
    return _hostile(path, [MEAN, H.make_node("Loop", ["m", "cond", "r"], ["looped"], body=body),
                           nodes[1]], [*inits, _const("m", 10**12), _const("cond", True, bool)])


def _alloc(path: Path) -> Path:
    """ConstantOfShape of 10^5 x 10^5 floats (40 GB), added to the logits."""
    nodes, inits = _head()
    nodes[1].output[0] = "m"
    return _hostile(path, [*nodes, H.make_node("ConstantOfShape", ["shape"], ["big"]),
                           H.make_node("ReduceMean", ["big"], ["b"], keepdims=0),
                           H.make_node("Add", ["m", "b"], ["logits"])],
                    [*inits, _const("shape", [10**5, 10**5])])


def _subgraph(path: Path) -> Path:
    """An allowed operator carrying a graph attribute."""
    nodes, inits = _head()
    nodes[1].attribute.append(H.make_attribute("body", H.make_graph([], "empty", [], [])))
    return _hostile(path, nodes, inits)


def _external(path: Path) -> Path:
    """The head's matrix read from another file (/etc/passwd)."""
    nodes, inits = _head()
    inits[0].ClearField("raw_data")
    inits[0].data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "/etc/passwd"), ("length", "48")):
        inits[0].external_data.add(key=key, value=value)
    return _hostile(path, nodes, inits)


def test_metadata_of_a_file_that_is_no_onnx_model_is_one_error_naming_it(tmp_path):
    pytest.importorskip("onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ExportError, match=f"^{garbage}: not a readable ONNX model \\("):
        metadata_of(garbage)
    with pytest.raises(ExportError, match=f"^{tmp_path}"):  # a folder: refused unread
        metadata_of(tmp_path)


@pytest.mark.parametrize("build,words", [
    (_loop, "uses the operator 'Loop'"), (_alloc, "uses the operator 'ConstantOfShape'"),
    (_subgraph, "holds a subgraph"), (_external, "external or sparse tensor data")])
def test_graphs_the_exporter_never_writes_are_refused_before_a_session(tmp_path, monkeypatch,
                                                                       build, words):
    """Control flow (a Loop that would run for ever), data-sized allocations, subgraphs and
    external data: refused from the file itself, before ONNX Runtime builds a session (which
    folds constants) or runs anything."""
    path = build(tmp_path / "hostile.onnx")

    def no_session(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("ONNX Runtime was given the graph")

    monkeypatch.setattr(ort, "InferenceSession", no_session)
    with pytest.raises(ExportError) as err:
        load_onnx(path)
    assert str(err.value).startswith(f"{path}: ") and words in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("in_shape,out_type,width,words", [
    (("N", 3, 32, 32), onnx.TensorProto.FLOAT, 4, "input 'images' is float (N, 3, 32, 32); "
     "expected float (N, 3, 16, 16)"),
    (("N", 1, 16, 16), onnx.TensorProto.FLOAT, 4, "expected float (N, 3, 16, 16)"),
    (("N", 3, "H", "W"), onnx.TensorProto.FLOAT, 4, "input 'images' is float (N, 3, H, W)"),
    (("N", 3, 16, 16), onnx.TensorProto.INT64, 4, "output 'logits' is int64 (N, 4)"),
    (("N", 3, 16, 16), onnx.TensorProto.FLOAT, 12, "output 'logits' is float (N, 12); "
     "expected float (N, 4), one per class name"),
    (("N", 3, 16, 16), onnx.TensorProto.FLOAT, 3, "output 'logits' is float (N, 3)")])
def test_a_graph_that_contradicts_its_metadata_is_refused(tmp_path, capsys, in_shape, out_type,
                                                          width, words):
    """Input size or channels, the logits' type or their count against the class names: at load,
    not as ORT's InvalidArgument, a TypeError, an IndexError or a silently wrong report."""
    nodes, inits = _head(width, in_shape[1])
    if out_type != onnx.TensorProto.FLOAT:
        nodes[1].output[0] = "m"
        nodes.append(H.make_node("Cast", ["m"], ["logits"], to=out_type))
    path = _hostile(tmp_path / "liar.onnx", nodes, inits, in_shape, out_type)
    with pytest.raises(ExportError) as err:
        load_onnx(path)
    assert str(err.value).startswith(f"{path}: ") and words in str(err.value), err.value
    assert "\n" not in str(err.value)
    write_pngs(tmp_path / "images", 2, 16)
    capsys.readouterr()
    assert main(["predict", str(path), str(tmp_path / "images")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and words in err


def test_the_right_signature_loads_and_runs(tmp_path):
    """The checks pass a graph that fits its metadata (a fixed batch, too)."""
    for batch in ("N", 2):
        path = _hostile(tmp_path / "fits.onnx", *_head(), in_shape=(batch, 3, 16, 16))
        assert load_onnx(path, threads=1)(_images(2)).shape == (2, len(CLASSES))


def test_run_time_errors_are_one_line_and_ort_prints_nothing(tmp_path, capfd):
    """An error inside ONNX Runtime's run (a Reshape that cannot apply) is bitvit's one line
    naming the file, with ORT's reason; ORT's own coloured log line is not printed."""
    nodes, inits = _head()
    nodes[1].output[0] = "m"
    path = _hostile(tmp_path / "fails.onnx", [
        *nodes, H.make_node("Reshape", ["images", "bad"], ["z"]),
        H.make_node("ReduceMean", ["z"], ["zm"], keepdims=0),
        H.make_node("Add", ["m", "zm"], ["logits"])], [*inits, _const("bad", [-1, 7])])
    model = load_onnx(path, threads=1)
    assert model(_images(7)).shape == (7, len(CLASSES))  # 7 images: 7 rows of 768
    capfd.readouterr()
    with pytest.raises(ExportError) as err:
        model(_images(1))
    message = str(err.value)
    assert message.startswith(f"{path}: ONNX Runtime failed running the graph on 1 image")
    assert "cannot be reshaped" in message or "Reshape" in message
    assert "\n" not in message
    assert capfd.readouterr().err == ""
    write_pngs(tmp_path / "images", 1, 16)
    assert main(["predict", str(path), str(tmp_path / "images")]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and f"{path}: ONNX Runtime failed" in err, err


def test_a_graph_that_grows_past_the_memory_cap_fails_its_run_in_one_line(tmp_path):
    """Allowed operators can still ask for any amount of memory at run time (an Expand to
    8,000 x 8,000 floats, 256 MB): ONNX Runtime's arena stops at 80% of the memory available,
    so the run fails in one line and the process goes on. Here in a process that sees 256 MiB
    available (a 204.8 MiB cap); the small graph beside it runs under the same cap."""
    import subprocess
    import sys

    nodes, inits = _head()
    nodes[1].output[0] = "m"
    grows = _hostile(tmp_path / "grows.onnx", [
        *nodes, H.make_node("ReduceMean", ["r"], ["s"], keepdims=0),
        H.make_node("Expand", ["s", "shape"], ["big"]),
        H.make_node("ReduceMean", ["big"], ["b"], keepdims=0),
        H.make_node("Add", ["m", "b"], ["logits"])], [*inits, _const("shape", [8000, 8000])])
    small = _hostile(tmp_path / "small.onnx", *_head())
    script = f"""
import torch
from bitvit import system
system.host_memory = lambda: (256 << 20, "test")
from bitvit.deploy.export import ExportError
from bitvit.deploy.onnx_runtime import arena_cap, load_onnx
x = torch.zeros(2, 3, 16, 16)
print(load_onnx({str(small)!r}, threads=1)(x).shape, arena_cap())
try:
    load_onnx({str(grows)!r}, threads=1)(x)
except ExportError as e:
    print(e)
print(load_onnx({str(small)!r}, threads=1)(x).shape)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.splitlines() == [
        f"torch.Size([2, {len(CLASSES)}]) {int(256 * 0.8 * (1 << 20))}",
        f"{grows}: running the graph on 2 image(s) needs more memory than ONNX Runtime may take "
        "here (204.8 MiB: 80% of what was available when its first session started, at least "
        "64.0 MiB); fewer images at once need less",
        f"torch.Size([2, {len(CLASSES)}])"]


def test_logits_that_belie_the_declared_output_are_one_line(tmp_path):
    """The run's logits are checked too: a session that returns the wrong width or type."""
    model = load_onnx(_hostile(tmp_path / "m.onnx", *_head()), threads=1)

    class Liar:
        def __init__(self, logits: np.ndarray) -> None:
            self.logits = logits

        def run(self, *args: object) -> list[np.ndarray]:
            return [self.logits]

    for logits, words in ((np.zeros((2, 12), np.float32), "float32 (2, 12)"),
                          (np.zeros((2, 4), np.int64), "int64 (2, 4)"),
                          (np.zeros((3, 4), np.float32), "float32 (3, 4)")):
        model.vit.session = Liar(logits)
        with pytest.raises(ExportError, match=r"m\.onnx: the graph gave logits") as err:
            model(_images(2))
        assert words in str(err.value) and "expected float32 (2, 4)" in str(err.value)
