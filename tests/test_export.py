import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import bitvit
from bitvit.cli import main
from bitvit.data import DataError, ImageSet, normalize
from bitvit.deploy.engine import (
    ClsTokenBlock,
    InferenceLinear,
    cls_token_last_block,
    compile_model,
    convert_for_inference,
)
from bitvit.deploy.export import (
    ExportedModel,
    ExportError,
    _digest,
    _metadata_digest,
    export_checkpoint,
    export_model,
    image_files,
    load,
)
from bitvit.deploy.packing import (
    pack_binary,
    pack_ternary,
    pack_ternary_2bit,
    unpack_binary,
    unpack_ternary,
    unpack_ternary_2bit,
)
from bitvit.nn.quant import BitLinear
from bitvit.training.checkpoint import CheckpointError, build_model, save_model
from bitvit.training.config import Config

CLASSES = ["airplane", "bird", "cat", "dog"]

# Tolerances on logits (max abs difference) of the loaded model vs the trained model in eval
# mode; the test models' logits are of magnitude ~15.
# - fp32 floats: the same codes, scales and floats, so only the arithmetic's rounding order
#   differs (engine "fp" takes the fake-quant path where BitLinear takes its int8 path).
# - fp16 floats: the non-quantized parameters are rounded to 11 significant bits (~5e-4
#   relative), and activations near an int8 rounding boundary may flip: ~1% of the logit scale.
# - 1-bit activations: sign(x) jumps at 0, so even fp32 rounding-order noise flips the sign of
#   near-zero activations and moves logits by up to ~10% of their scale; only argmax agreement
#   is a meaningful check there.
ATOL = {("fp32", False): 1e-3, ("fp16", False): 0.25, ("fp32", True): 2.0, ("fp16", True): 2.0}
ATOL_FP32, ATOL_FP16 = ATOL["fp32", False], ATOL["fp16", False]


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------

shapes = st.lists(st.integers(0, 23), min_size=1, max_size=3)
SCHEMES = {
    "base3": (pack_ternary, unpack_ternary, (-1, 0, 1), 5),
    "2bit": (pack_ternary_2bit, unpack_ternary_2bit, (-1, 0, 1), 4),
    "1bit": (pack_binary, unpack_binary, (-1, 1), 8),
}


@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_pack_round_trip(scheme, shape, seed):
    pack, unpack, values, per_byte = SCHEMES[scheme]
    g = torch.Generator().manual_seed(seed)
    codes = torch.tensor(values, dtype=torch.int8)[torch.randint(len(values), shape, generator=g)]
    packed = pack(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(codes.numel() / per_byte),)
    out = unpack(packed, shape)
    assert out.dtype == torch.int8 and out.shape == codes.shape
    assert torch.equal(out, codes)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n", [1, 3, 4, 6, 7, 9, 11, 13, 17, 1001])  # not multiples of 5 or 8
def test_pack_round_trip_awkward_counts(scheme, n):
    pack, unpack, values, _ = SCHEMES[scheme]
    codes = torch.tensor(values, dtype=torch.int8)[torch.randint(len(values), (n,))]
    assert torch.equal(unpack(pack(codes), (n,)), codes)
    # Other integer dtypes pack the same.
    assert torch.equal(pack(codes.long()), pack(codes))


def test_pack_layouts_by_hand():
    # base3: sum_k (c_k + 1) 3^k over 5 codes; the second byte is padded with digit 0.
    c = torch.tensor([-1, 0, 1, 1, -1, 1], dtype=torch.int8)
    assert pack_ternary(c).tolist() == [0 + 1 * 3 + 2 * 9 + 2 * 27 + 0 * 81, 2]
    # 2bit: fields (c_k + 1) << 2k over 4 codes.
    assert pack_ternary_2bit(c[:4]).tolist() == [0 | 1 << 2 | 2 << 4 | 2 << 6]
    # 1bit: bit k set when code k is +1 (little-endian bit order, as np.packbits "little").
    b = torch.tensor([1, -1, -1, -1, -1, -1, -1, 1, 1], dtype=torch.int8)
    assert pack_binary(b).tolist() == [0b10000001, 0b1]
    assert pack_binary(b).tolist() == np.packbits(b.numpy() > 0, bitorder="little").tolist()
    # All 243 base-3 bytes decode and re-encode to themselves.
    every = torch.arange(243, dtype=torch.uint8)
    assert torch.equal(pack_ternary(unpack_ternary(every, (243 * 5,))), every)


def test_ternary_packing_is_1_6_bits_per_weight():
    codes = torch.randint(-1, 2, (320, 128), dtype=torch.int8)  # 40960 = 5 * 8192
    assert pack_ternary(codes).numel() * 8 / codes.numel() == pytest.approx(1.6)
    assert pack_ternary_2bit(codes).numel() * 8 / codes.numel() == 2.0
    assert pack_binary(codes.clamp(min=0) * 2 - 1).numel() * 8 / codes.numel() == 1.0


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="ternary codes"):
        pack_ternary(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="ternary codes"):
        pack_ternary_2bit(torch.tensor([-2]))
    with pytest.raises(ValueError, match="binary codes"):
        pack_binary(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="integer"):
        pack_ternary(torch.tensor([1.0]))
    # Wide integers that an int16 cast would wrap into range (65537 -> 1, -65537 -> -1).
    for wide in (torch.tensor([65536, 65537, -65537], dtype=torch.int32),
                 torch.tensor([2**40 + 1], dtype=torch.int64)):
        with pytest.raises(ValueError, match="ternary codes"):
            pack_ternary(wide)
        with pytest.raises(ValueError, match="ternary codes"):
            pack_ternary_2bit(wide)
        with pytest.raises(ValueError, match="binary codes"):
            pack_binary(wide)


def test_unpack_rejects_bad_bytes():
    with pytest.raises(ValueError, match="242"):
        unpack_ternary(torch.tensor([243], dtype=torch.uint8), (5,))
    with pytest.raises(ValueError, match="field 3"):
        unpack_ternary_2bit(torch.tensor([0b11], dtype=torch.uint8), (4,))
    with pytest.raises(ValueError, match="2 bytes"):
        unpack_binary(torch.zeros(3, dtype=torch.uint8), (3, 4))
    with pytest.raises(ValueError, match="uint8"):
        unpack_binary(torch.zeros(2, dtype=torch.int8), (16,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_pack_on_cuda(scheme):
    pack, unpack, values, _ = SCHEMES[scheme]
    codes = torch.tensor(values, dtype=torch.int8)[torch.randint(len(values), (37, 11))]
    packed = pack(codes.cuda())
    assert packed.is_cuda and torch.equal(packed.cpu(), pack(codes))
    assert torch.equal(unpack(packed, codes.shape).cpu(), codes)


# ---------------------------------------------------------------------------------------------
# Export -> load
# ---------------------------------------------------------------------------------------------


def small_config(method="b158", **quant) -> Config:
    return Config.from_dict({
        "model": {"image_size": 16, "patch_size": 4, "dim": 32, "depth": 2, "heads": 2,
                  "mlp_ratio": 2, "num_classes": len(CLASSES)},
        "quant": {"method": method, **quant},
        "data": {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]},
    })


def small_model(config: Config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():  # spread the logits, so argmax is not decided by rounding noise
        model.head.weight.mul_(50)
        model.head.bias.normal_()
    return model.eval()


def uint8_images(n: int = 16, size: int = 16, channels: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


VARIANTS = [
    ("b158", {}), ("b158", {"sub_norm": True}), ("b158", {"act_bits": 1}),
    ("b158", {"act_bits": "none", "where": "mlp"}), ("bitnet", {}), ("sign", {}),
    ("xnor", {}), ("xnor", {"act_bits": 8, "include_patch_embed": False}), ("fp", {}),
]


@pytest.mark.parametrize(("method", "quant"), VARIANTS)
@pytest.mark.parametrize("engine", ["int", "fp"])
def test_export_load_is_exact(tmp_path, method, quant, engine):
    """fp32 export -> load gives exactly the model `convert_for_inference` makes in memory."""
    config = small_config(method, **quant)
    model = small_model(config)
    path = export_model(model, config, CLASSES, tmp_path / "m.safetensors", float_dtype="fp32")
    loaded = load(path, engine=engine)
    assert isinstance(loaded, ExportedModel) and not loaded.training
    direct = cls_token_last_block(convert_for_inference(copy.deepcopy(model), engine).eval())
    x = normalize(uint8_images(), config.data.mean, config.data.std)
    with torch.no_grad():
        assert torch.equal(loaded(x), direct(x))
    state = direct.state_dict()
    assert loaded.vit.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.vit.state_dict().items())


@pytest.mark.parametrize("method, act_bits", [("b158", "default"), ("b158", 1),
                                              ("xnor", "none")])
@pytest.mark.parametrize("engine", ["int", "fp"])
def test_cls_only_last_block_gives_the_whole_blocks_logits(tmp_path, method, act_bits, engine):
    """The loaded model's last block computes the cls token alone (cls pooling); the logits are
    the whole block's, to fp32 rounding (attention over one query sums in another order).
    Except under the fp engine with 1-bit activations: its float products round differently
    for 33 rows than for 33 x 17 (BLAS blocks them otherwise), and sign(x) turns a near-zero
    activation's rounding into a flipped code (see ATOL): there the argmax only."""
    config = small_config(method, act_bits=act_bits)
    config.model.depth = 3
    path = export_model(small_model(config), config, CLASSES, tmp_path / "m.safetensors")
    loaded = load(path, engine=engine)
    blocks = loaded.vit.blocks
    assert isinstance(blocks[-1], ClsTokenBlock)
    assert not any(isinstance(b, ClsTokenBlock) for b in blocks[:-1])
    full = copy.deepcopy(loaded)
    full.vit.blocks[-1] = full.vit.blocks[-1].full_block()
    assert type(full.vit.blocks[-1]) is bitvit.nn.model.Block
    assert full.vit.state_dict().keys() == loaded.vit.state_dict().keys()
    images = uint8_images(33)
    got, want = loaded.logits(images), full.logits(images)
    assert torch.equal(got.argmax(1), want.argmax(1))
    if engine == "fp" and act_bits == 1:
        return
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    one = loaded.logits(images[:1])  # batch 1 as well
    torch.testing.assert_close(one, want[:1], rtol=0, atol=1e-5)


def test_mean_pooling_keeps_every_block_whole(tmp_path):
    config = small_config("b158")
    config.model.pooling = "mean"
    loaded = load(export_model(small_model(config), config, CLASSES, tmp_path / "m.safetensors"))
    assert not any(isinstance(b, ClsTokenBlock) for b in loaded.vit.blocks)


@pytest.mark.parametrize(("method", "quant"), VARIANTS)
def test_export_load_same_logits(tmp_path, method, quant):
    """The loaded model (engine fp) vs the trained model in eval mode, within ATOL."""
    config = small_config(method, **quant)
    model = small_model(config)
    x = normalize(uint8_images(64), config.data.mean, config.data.std)
    with torch.no_grad():
        ref = model(x)
    top2 = ref.topk(2, dim=1).values
    one_bit = quant.get("act_bits") == 1
    for float_dtype in ("fp32", "fp16"):
        atol = ATOL[float_dtype, one_bit]
        path = export_model(model, config, CLASSES, tmp_path / f"{float_dtype}.safetensors",
                            float_dtype=float_dtype)
        with torch.no_grad():
            out = load(path, engine="fp")(x)
        torch.testing.assert_close(out, ref, atol=atol, rtol=0)
        clear = top2[:, 0] - top2[:, 1] > 2 * atol  # argmax cannot move within the tolerance
        assert clear.float().mean() > 0.5
        assert torch.equal(out.argmax(1)[clear], ref.argmax(1)[clear])
    n_quantized = sum(isinstance(m, BitLinear) for m in model.modules())
    loaded = load(path)
    assert sum(isinstance(m, InferenceLinear) for m in loaded.modules()) == n_quantized
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


@pytest.mark.parametrize("method", ["b158", "bitnet", "xnor"])
def test_int_engine_and_2bit_packing_agree(tmp_path, method):
    config = small_config(method)
    model = small_model(config)
    x = normalize(uint8_images(), config.data.mean, config.data.std)
    with torch.no_grad():
        ref = model(x)
    path = export_model(model, config, CLASSES, tmp_path / "m.safetensors", packing="2bit",
                        float_dtype="fp32")
    loaded = bitvit.load(path)  # default engine: int
    assert all(m.engine == "int" for m in loaded.modules() if isinstance(m, InferenceLinear))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, atol=ATOL_FP32, rtol=0)


def test_exported_accuracy_matches_the_run(tmp_path):
    """export -> load -> `bitvit.evaluate` gives the trained model's accuracy: fp32 floats give
    identical predictions; with fp16 only samples whose top-2 logit margin is below 2 * ATOL_FP16
    may change. (The loaded model plugs into `evaluate` like the trained one.)"""
    config = small_config("b158")
    model = small_model(config)
    labels = torch.randint(0, len(CLASSES), (64,), generator=torch.Generator().manual_seed(2))
    test = ImageSet(uint8_images(64, seed=1), labels, CLASSES)
    mean, std = config.data.mean, config.data.std
    ref = bitvit.evaluate(model, test, mean, std)
    with torch.no_grad():
        top2 = model(normalize(test.images, mean, std)).topk(2, dim=1).values
    close = int(((top2[:, 0] - top2[:, 1]) < 2 * ATOL_FP16).sum())
    for float_dtype, slack in (("fp32", 0), ("fp16", close)):
        path = export_model(model, config, CLASSES, tmp_path / "m.safetensors",
                            float_dtype=float_dtype)
        loaded = load(path)
        p = loaded.preprocessing
        result = bitvit.evaluate(loaded, test, p.mean, p.std, batch_size=10)
        assert abs(result["accuracy"] - ref["accuracy"]) <= slack / 64 + 1e-9
        # logits() on uint8 images applies the stored preprocessing itself.
        acc = (loaded.logits(test.images).argmax(1) == labels).float().mean().item()
        assert acc == pytest.approx(result["accuracy"])


def test_file_contents(tmp_path):
    config = small_config("b158")
    model = small_model(config)
    path = export_model(model, config, CLASSES, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "bitvit-export" and meta["format_version"] == "1"
    assert Config.from_dict(json.loads(meta["config"])).to_dict() == config.to_dict()
    assert json.loads(meta["classes"]) == CLASSES
    assert json.loads(meta["preprocessing"]) == {
        "image_size": 16, "channels": 3, "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3],
        "interpolation": "bilinear"}
    layers = json.loads(meta["layers"])
    assert layers["blocks.0.mlp.fc1"] == {"shape": [64, 32], "method": "b158", "act_bits": 8,
                                          "sub_norm": False, "packing": "base3"}
    tensors = load_file(str(path))
    # Only what inference needs: no latent weights of quantized layers.
    assert "blocks.0.mlp.fc1.weight" not in tensors
    assert tensors["blocks.0.mlp.fc1.codes"].dtype == torch.uint8
    assert tensors["blocks.0.mlp.fc1.codes"].numel() == math.ceil(64 * 32 / 5)
    assert tensors["blocks.0.mlp.fc1.scale"].dtype == torch.float32
    assert tensors["blocks.0.mlp.fc1.bias"].dtype == torch.float16
    assert tensors["head.weight"].dtype == torch.float16
    assert tensors["pos_embed"].dtype == torch.float16
    # The codes decode to exactly the model's codes.
    codes, _ = model.blocks[0].mlp.fc1.quantized_weight()
    assert torch.equal(unpack_ternary(tensors["blocks.0.mlp.fc1.codes"], (64, 32)), codes)
    # Loaded model: classes and preprocessing travel with it.
    loaded = load(path)
    assert loaded.classes == CLASSES
    assert loaded.preprocessing.mean == (0.5, 0.4, 0.3) and loaded.preprocessing.image_size == 16


def test_binary_codes_take_one_bit(tmp_path):
    config = small_config("xnor")
    path = export_model(small_model(config), config, CLASSES, tmp_path / "m.safetensors")
    tensors = load_file(str(path))
    assert tensors["blocks.1.attn.qkv.codes"].numel() == 96 * 32 // 8
    assert tensors["blocks.1.attn.qkv.scale"].shape == (96,)  # per output channel
    assert json.loads(safe_open(str(path), "pt").metadata()["layers"])[
        "blocks.1.attn.qkv"]["packing"] == "1bit"


def test_export_is_smaller_than_the_checkpoint(tmp_path):
    config = small_config("b158")
    model = small_model(config)
    save_model(tmp_path / "ckpt.safetensors", model, config, CLASSES)
    small = export_model(model, config, CLASSES, tmp_path / "m.safetensors")
    fp32 = export_model(model, config, CLASSES, tmp_path / "m32.safetensors", packing="2bit",
                        float_dtype="fp32")
    ckpt_bytes = (tmp_path / "ckpt.safetensors").stat().st_size
    assert small.stat().st_size < fp32.stat().st_size < ckpt_bytes


def test_export_checkpoint_from_run_folder(tmp_path):
    config = small_config("bitnet")
    model = small_model(config)
    run = tmp_path / "run"
    (run / "last").mkdir(parents=True)
    save_model(run / "last" / "model.safetensors", model, config, CLASSES)
    out = export_checkpoint(run, tmp_path / "out" / "m.safetensors", float_dtype="fp32")
    x = normalize(uint8_images(), config.data.mean, config.data.std)
    with torch.no_grad():
        torch.testing.assert_close(load(out, engine="fp")(x), model(x), atol=ATOL_FP32, rtol=0)
    with pytest.raises(CheckpointError, match="best"):
        export_checkpoint(run, tmp_path / "b.safetensors", best=True)


def test_export_rejects_bad_options(tmp_path):
    config = small_config("b158")
    model = small_model(config)
    with pytest.raises(ValueError, match="packing"):
        export_model(model, config, CLASSES, tmp_path / "m.safetensors", packing="3bit")
    with pytest.raises(ValueError, match="float_dtype"):
        export_model(model, config, CLASSES, tmp_path / "m.safetensors", float_dtype="bf16")
    with pytest.raises(ValueError, match="class names"):
        export_model(model, config, CLASSES[:2], tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="do not match"):  # config says fp, model is ternary
        export_model(model, small_config("fp"), CLASSES, tmp_path / "m.safetensors")
    # What load would refuse is not written: other tensors than the config's, numbered classes.
    wide = small_config("fp")
    wide.model = type(wide.model)(**{**vars(wide.model), "dim": 64})
    with pytest.raises(ValueError, match=r"tensors do not match its config \(cls_token has "
                                         r"shape \(1, 1, 32\), expected \(1, 1, 64\)\)"):
        export_model(small_model(small_config("fp")), wide, CLASSES, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="class names must be strings"):
        export_model(model, config, [0, 1, 2, 3], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_a_compiled_model_exports_as_itself(tmp_path):
    # torch.compile's wrapper prefixes every parameter name with _orig_mod. (nothing compiles
    # until it is called).
    config = small_config("b158")
    model = small_model(config)
    plain = export_model(model, config, CLASSES, tmp_path / "plain.safetensors")
    wrapped = export_model(torch.compile(model), config, CLASSES, tmp_path / "c.safetensors")
    a, b = load_file(str(plain)), load_file(str(wrapped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_is_atomic(tmp_path):
    config = small_config("b158")
    model = small_model(config)
    path = export_model(model, config, CLASSES, tmp_path / "m.safetensors")
    before = path.read_bytes()
    with torch.no_grad():
        model.head.weight[0, 0] = 1e6  # beyond fp16
    with pytest.raises(ValueError, match="head.weight.*fp32"):
        export_model(model, config, CLASSES, path)
    assert path.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left over
    export_model(model, config, CLASSES, path, float_dtype="fp32")
    assert load(path).vit.head.weight[0, 0].item() == 1e6


def test_load_compiled_agrees_with_eager(tmp_path):
    """`load(compile=True)`: the int engine under torch.compile gives the eager logits.

    Tolerance: inductor fuses and reorders the fp32 arithmetic (LayerNorm, absmax scales, the
    rescale), which can flip an int8 activation code at a rounding boundary and move logits
    (magnitude ~15) by a few 1e-4: atol 1e-3, and equal argmax where the top-2 margin is wider
    than 2e-3. One test only: compiling on CPU takes tens of seconds.
    """
    import warnings

    config = small_config("b158")
    model = small_model(config)
    path = export_model(model, config, CLASSES, tmp_path / "m.safetensors")
    eager = load(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = bitvit.load(path, compile=True)
    fallback = [str(w.message) for w in caught if "running eager" in str(w.message)]
    if fallback:
        pytest.skip(f"torch.compile unavailable here: {fallback[0]}")
    assert isinstance(compiled.vit, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(eager.vit, bitvit.VisionTransformer)
    images = uint8_images(48)
    want, got = eager.logits(images), compiled.logits(images, batch_size=20)  # 20, 20, 8 rows
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    top2 = want.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > 2e-3
    assert clear.float().mean() > 0.9 and torch.equal(got.argmax(1)[clear], want.argmax(1)[clear])
    assert bitvit.compile_model is compile_model


def test_load_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    config = small_config("b158")
    model = small_model(config)
    path = export_model(model, config, CLASSES, tmp_path / "m.safetensors", float_dtype="fp32")
    loaded = load(path, device="cuda")
    assert loaded.device.type == "cuda"
    images = uint8_images()
    with torch.no_grad():
        ref = model(normalize(images, config.data.mean, config.data.std))
    torch.testing.assert_close(loaded.logits(images).cpu(), ref, atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------
# Bad files: one-line errors naming the file
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def exported(tmp_path) -> Path:
    config = small_config("b158")
    return export_model(small_model(config), config, CLASSES, tmp_path / "good.safetensors")


def rewrite(src: Path, dst: Path, tensors=None, **meta_changes) -> Path:
    """Copy an export with changed tensors/metadata and a checksum that matches them."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(src)) if tensors is None else tensors
    meta["sha256"] = _digest(tensors)
    meta.update(meta_changes)  # None removes a key
    meta = {k: v for k, v in meta.items() if v is not None}
    if "metadata_sha256" not in meta_changes:  # consistent, as another writer's file would be
        meta["metadata_sha256"] = _metadata_digest(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def assert_one_line_error(path: Path, match: str) -> None:
    with pytest.raises(ExportError, match=match) as e:
        load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_unknown_format_version(exported, tmp_path):
    assert_one_line_error(rewrite(exported, tmp_path / "v2.safetensors", format_version="2"),
                          "unknown export format version '2'")


def test_not_an_export(exported, tmp_path):
    config = small_config("b158")
    save_model(tmp_path / "ckpt.safetensors", small_model(config), config, CLASSES)
    assert_one_line_error(tmp_path / "ckpt.safetensors", "training checkpoint")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    assert_one_line_error(tmp_path / "other.safetensors", "not a bitvit export")
    assert_one_line_error(tmp_path / "missing.safetensors", "no such file")


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.99])
def test_truncated_file(exported, tmp_path, keep):
    data = exported.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: int(len(data) * keep)])
    assert_one_line_error(bad, "not a readable safetensors|corrupt")


def test_corrupted_file(exported, tmp_path):
    data = bytearray(exported.read_bytes())
    data[-100] ^= 0x55  # a flipped byte in the tensor data: caught by the checksum
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    assert_one_line_error(bad, "checksum")
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json header}" + bytes(data[24:]))
    assert_one_line_error(bad, "not a readable safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 4)
    assert_one_line_error(garbage, "not a readable safetensors")


def test_bad_metadata(exported, tmp_path):
    assert_one_line_error(rewrite(exported, tmp_path / "a.safetensors", config="{"),
                          "bad export metadata")
    assert_one_line_error(rewrite(exported, tmp_path / "b.safetensors", classes='["one"]'),
                          "class names")
    assert_one_line_error(rewrite(exported, tmp_path / "c.safetensors", layers=None),
                          "bad export metadata")
    assert_one_line_error(rewrite(exported, tmp_path / "d.safetensors", sha256=None),
                          "bad export metadata")
    assert_one_line_error(rewrite(exported, tmp_path / "e.safetensors", layers="[1]"),
                          "do not match")
    with safe_open(str(exported), framework="pt") as f:
        preprocessing = json.loads(f.metadata()["preprocessing"])
    huge = json.dumps({**preprocessing, "mean": [10 ** 400] * 3})  # past float's range
    assert_one_line_error(rewrite(exported, tmp_path / "f.safetensors", preprocessing=huge),
                          "bad export metadata \\(OverflowError")
    other = json.dumps({**preprocessing, "mean": [0.9, 0.4, 0.3]})  # not the config's mean
    assert_one_line_error(rewrite(exported, tmp_path / "g.safetensors", preprocessing=other),
                          r"preprocessing.mean=\[0.9, 0.4, 0.3\]: expected data.mean=\[0.5, 0.4, "
                          r"0.3\] of the stored config")


def test_metadata_corruption_is_caught_by_its_checksum(exported, tmp_path):
    raw = bytearray(exported.read_bytes())
    at = raw.index(b'"mean\\": [0.5') + len(b'"mean\\": [0.')
    raw[at] = ord("9")  # one byte of the header: tensors intact, every prediction moved
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(raw))
    assert_one_line_error(bad, "corrupt export \\(its metadata does not match its checksum\\)")
    # Exports written before the metadata checksum load as they did.
    old = rewrite(exported, tmp_path / "old.safetensors", metadata_sha256=None)
    assert "metadata_sha256" not in safe_open(str(old), "pt").metadata()
    torch.testing.assert_close(load(old).logits(uint8_images(2)), load(exported).logits(
        uint8_images(2)))


def test_loading_needs_room_for_one_image_not_the_training_eval_batch(tmp_path, monkeypatch):
    from bitvit.training import memory

    config = small_config("b158")
    config.train = type(config.train)(**{**vars(config.train), "eval_batch_size": 10**6})
    path = export_model(small_model(config), config, CLASSES, tmp_path / "m.safetensors")
    one = memory.estimate(config.model, 1, False).total
    monkeypatch.setattr(memory, "host_memory", lambda: (4 * one, "a test's"))
    assert load(path).logits(uint8_images(1)).shape == (1, len(CLASSES))
    with pytest.raises(memory.MemoryLimitError, match="at a batch of 1000000 images"):
        memory.check_inference_fits(config, str(path), 10**6)


def test_a_pipe_is_not_called_missing(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.safetensors")
    assert_one_line_error(tmp_path / "pipe.safetensors", "not a regular file")


def test_tensors_not_matching_config(exported, tmp_path):
    tensors = load_file(str(exported))
    missing = {k: v for k, v in tensors.items() if k != "blocks.1.mlp.fc2.scale"}
    assert_one_line_error(rewrite(exported, tmp_path / "a.safetensors", missing),
                          "do not match.*missing blocks.1.mlp.fc2.scale")
    extra = {**tensors, "blocks.9.mlp.fc1.codes": torch.zeros(3, dtype=torch.uint8)}
    assert_one_line_error(rewrite(exported, tmp_path / "b.safetensors", extra),
                          "do not match.*unexpected blocks.9")
    shape = {**tensors, "head.weight": torch.zeros(len(CLASSES), 16, dtype=torch.float16)}
    assert_one_line_error(rewrite(exported, tmp_path / "c.safetensors", shape),
                          r"do not match.*head.weight has shape \(4, 16\)")
    short = {**tensors, "blocks.0.attn.qkv.codes": tensors["blocks.0.attn.qkv.codes"][:-1]}
    assert_one_line_error(rewrite(exported, tmp_path / "d.safetensors", short),
                          "do not match.*blocks.0.attn.qkv.codes")
    # Right shapes, wrong dtypes (and a checksum that matches them): named, not a traceback
    # from load_state_dict or the kernels.
    for i, (key, dtype, match) in enumerate([
            ("pos_embed", torch.int32, "pos_embed has dtype torch.int32, expected torch.float16"),
            ("head.weight", torch.int32, "head.weight has dtype torch.int32"),
            ("norm.weight", torch.float32, "norm.weight has dtype torch.float32"),  # file: fp16
            ("blocks.0.mlp.fc1.bias", torch.int16, "blocks.0.mlp.fc1.bias has dtype"),
            ("blocks.0.mlp.fc1.scale", torch.float16, "fc1.scale has dtype torch.float16, "
                                                      "expected torch.float32"),
            ("blocks.0.mlp.fc1.codes", torch.int8, "fc1.codes has dtype torch.int8, "
                                                   "expected torch.uint8")]):
        wrong = {**tensors, key: tensors[key].to(dtype)}
        assert_one_line_error(rewrite(exported, tmp_path / f"dtype{i}.safetensors", wrong),
                              f"do not match.*{match}")
    assert_one_line_error(rewrite(exported, tmp_path / "h.safetensors", float_dtype="bf16"),
                          "bad export metadata.*float_dtype 'bf16'")
    # A config that says another model (deeper) than the tensors hold.
    meta = json.loads(safe_open(str(exported), "pt").metadata()["config"])
    meta["model"]["depth"] = 3
    assert_one_line_error(rewrite(exported, tmp_path / "e.safetensors", config=json.dumps(meta)),
                          "do not match")
    # Layer list saying binary packing where the config says ternary.
    layers = json.loads(safe_open(str(exported), "pt").metadata()["layers"])
    layers["blocks.0.mlp.fc1"]["packing"] = "1bit"
    assert_one_line_error(rewrite(exported, tmp_path / "f.safetensors",
                                  layers=json.dumps(layers)), "do not match.*blocks.0.mlp.fc1")
    bad_byte = dict(tensors)
    bad_byte["blocks.0.mlp.fc1.codes"] = bad_byte["blocks.0.mlp.fc1.codes"].clone()
    bad_byte["blocks.0.mlp.fc1.codes"][0] = 250
    assert_one_line_error(rewrite(exported, tmp_path / "g.safetensors", bad_byte),
                          "corrupt export.*blocks.0.mlp.fc1.codes")


# ---------------------------------------------------------------------------------------------
# Preprocessing, predict, CLI
# ---------------------------------------------------------------------------------------------


def test_preprocess_and_logits(exported):
    model = load(exported)
    images = uint8_images(5)
    x = model.preprocess(images)
    torch.testing.assert_close(x, normalize(images, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)))
    torch.testing.assert_close(model.logits(images, batch_size=2), model(x))
    big = torch.nn.functional.interpolate(images.float(), scale_factor=2).to(torch.uint8)
    assert model.preprocess(big).shape == (5, 3, 16, 16)  # resized to the stored size
    with pytest.raises(ValueError, match="uint8"):
        model.preprocess(images.float())
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model.preprocess(images[:, :1])
    top = model.predict(images, top_k=3)
    assert len(top) == 5 and all(len(t) == 3 for t in top)
    assert all(t[0][1] >= t[1][1] >= t[2][1] for t in top)
    assert {c for t in top for c, _ in t} <= set(CLASSES)


def write_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    png = folder / "b.png"
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(png)
    jpg = folder / "a.jpg"
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(jpg, quality=95)
    gray = folder / "sub" / "c.jpeg"
    gray.parent.mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), mode="L").save(gray)
    (folder / "notes.txt").write_text("not an image")
    return [jpg, png, gray]


def test_read_image_png_and_jpeg(exported, tmp_path):
    files = write_images(tmp_path / "imgs")
    prep = load(exported).preprocessing
    for f in files:
        img = prep.read_image(f)
        assert img.dtype == torch.uint8 and img.shape == (3, 16, 16)
    # A 16x16 PNG is read without any change of its pixels.
    arr = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "exact.png")
    assert torch.equal(prep.read_image(tmp_path / "exact.png"),
                       torch.from_numpy(arr).permute(2, 0, 1))
    assert image_files([tmp_path / "imgs"]) == files  # sorted, recursive, images only
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="bad.png: not a readable image"):
        prep.read_image(tmp_path / "bad.png")
    # Raw images of another size are resized as read_image resizes them: the same pixels.
    for shape in ((40, 30, 3), (17, 33, 3)):
        arr = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "big.png")
        raw = torch.from_numpy(arr).permute(2, 0, 1)
        assert torch.equal(prep(raw), prep(prep.read_image(tmp_path / "big.png")))


def test_grayscale_model_reads_color_images(tmp_path):
    config = small_config("sign")
    config.model.in_channels = 1
    config.data.mean, config.data.std = (0.5,), (0.25,)
    path = export_model(small_model(config), config, CLASSES, tmp_path / "g.safetensors")
    files = write_images(tmp_path / "imgs")
    model = load(path)
    assert model.preprocessing.read_image(files[1]).shape == (1, 16, 16)


def test_cli_export_and_predict(tmp_path, capsys):
    config = small_config("b158")
    run = tmp_path / "run"
    (run / "last").mkdir(parents=True)
    save_model(run / "last" / "model.safetensors", small_model(config), config, CLASSES)
    out = tmp_path / "m.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and f"{out.stat().st_size:,} bytes" in line
    assert "(base3 packed codes, fp16 floats)" in line  # b158 codes: base3; xnor's say 1bit
    assert f"{(run / 'last' / 'model.safetensors').stat().st_size:,} bytes" in line

    files = write_images(tmp_path / "imgs")
    assert main(["predict", str(out), str(tmp_path / "imgs"), "--top-k", "2",
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(": ")[0] for ln in lines] == [str(f) for f in files]
    assert all(len(ln.split(": ", 1)[1].split(", ")) == 2 for ln in lines)

    assert main(["predict", str(out), str(files[1]), str(files[0]), "--json",
                 "--device", "cpu"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.strip().splitlines()]
    assert [r["file"] for r in rows] == [str(files[1]), str(files[0])]
    probs = [p["probability"] for p in rows[0]["predictions"]]
    assert len(probs) == len(CLASSES) and probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    # The CLI gives the same answer as the Python API.
    model = load(out)
    top = model.predict(model.preprocessing.read_image(files[1]), top_k=4)[0]
    assert [p["class"] for p in rows[0]["predictions"]] == [c for c, _ in top]


def test_cli_errors(exported, tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    assert main(["predict", str(exported), str(tmp_path / "bad.jpg"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitvit predict: error:") and "bad.jpg" in err and "\n" not in err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(exported), str(tmp_path / "empty"), "--device", "cpu"]) == 2
    assert "no image files" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nope.safetensors"), str(tmp_path)]) == 2
    assert "nope.safetensors: no such file" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "norun"), "--out", str(tmp_path / "x")]) == 2
    assert "norun" in capsys.readouterr().err
