import json
import math

import pytest
import torch

from bitvit.cli import main
from bitvit.data import DataConfig
from bitvit.deploy.profile import ENERGY_PJ, SUMMED, profile_model
from bitvit.deploy.profile_sources import load_for_profile
from bitvit.nn.model import VisionTransformer, ViTConfig
from bitvit.nn.quant import QuantConfig, quantize_
from bitvit.training.checkpoint import build_model, save_model
from bitvit.training.config import Config

# depth 1, dim 8, patch 16 on 32x32: 4 patches + cls = 5 tokens.
TINY = ViTConfig(image_size=32, patch_size=16, dim=8, depth=1, heads=2, mlp_ratio=4.0,
                 num_classes=10)
NUMBERS = DataConfig(mean=(0.5,) * 3, std=(0.25,) * 3)  # an export needs normalization numbers


def tiny(method: str = "fp", **quant) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(TINY)
    quantize_(model, method, **quant)
    return model


def rows_by_name(profile):
    return {r.name: r for r in profile.rows}


@pytest.mark.parametrize("method, quant, vit", [
    ("fp", {}, TINY),
    ("b158", {}, TINY),
    ("xnor", {"where": "mlp"}, TINY),
    ("bitnet", {"act_bits": 1, "sub_norm": True}, ViTConfig(dim=16, depth=2, heads=2,
                                                             patch_size=8, pooling="mean")),
])
def test_totals_are_the_sum_of_rows_and_the_parameter_count(method, quant, vit):
    torch.manual_seed(0)
    model = VisionTransformer(vit)
    quantize_(model, method, **quant)
    p = profile_model(model, vit)
    for key in SUMMED:
        assert p.totals[key] == pytest.approx(sum(getattr(r, key) for r in p.rows)), key
    for node in ENERGY_PJ:
        assert p.totals["energy_pj"][node] == pytest.approx(
            sum(r.energy_pj[node] for r in p.rows))
        assert p.totals["baseline_energy_pj"][node] == pytest.approx(
            sum(r.baseline_energy_pj[node] for r in p.rows))
    assert p.totals["params"] == sum(x.numel() for x in model.parameters())
    assert p.totals["bytes_fp32"] == 4 * p.totals["params"]
    assert p.totals["macs"] == p.totals["mul_macs"] + p.totals["add_macs"] + p.totals["zero_macs"]


def test_macs_by_hand():
    p = profile_model(tiny(), TINY)
    macs = {r.name: r.macs for r in p.rows if r.kind != "params"}
    assert macs == {
        "patch_embed.proj": 4 * 768 * 8,  # the cls token does not go through the projection
        "blocks.0.attn.qkv": 5 * 8 * 24,
        "blocks.0.attn.qk": 5 * 5 * 8,
        "blocks.0.attn.av": 5 * 5 * 8,
        "blocks.0.attn.proj": 5 * 8 * 8,
        "blocks.0.mlp.fc1": 5 * 8 * 32,
        "blocks.0.mlp.fc2": 5 * 32 * 8,
        "head": 8 * 10,  # one pooled vector
    }
    assert p.totals["macs"] == 28896
    # qk and av sit between qkv and proj, in the order they run.
    names = [r.name for r in p.rows]
    assert names.index("blocks.0.attn.qkv") < names.index("blocks.0.attn.qk") < names.index(
        "blocks.0.attn.proj")


def test_fp_model_has_only_multiplies():
    p = profile_model(tiny(), TINY)
    assert p.totals["add_macs"] == 0 and p.totals["zero_macs"] == 0
    assert p.totals["mul_macs"] == p.totals["macs"]
    assert set(p.totals["ops"]) == {"fp32_mul", "fp32_add"}
    assert p.totals["energy_ratio"] == {"45nm": pytest.approx(1.0), "7nm": pytest.approx(1.0)}


def known_ternary_fc1(model: VisionTransformer) -> None:
    # 6 of 8 inputs +-1, 2 zero: gamma = 0.75, so codes are exactly the pattern.
    w = torch.zeros(32, 8)
    w[:, :6] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.copy_(w)


def test_ternary_layer_with_known_zeros_splits_adds_and_noops():
    model = tiny("b158")
    known_ternary_fc1(model)
    fc1 = rows_by_name(profile_model(model, TINY))["blocks.0.mlp.fc1"]
    assert fc1.zero_weights == 64
    assert fc1.zero_macs == 5 * 64 and fc1.add_macs == 5 * 192 and fc1.mul_macs == 0
    # int8 adds for the +-1 weights, one fp32 rescale per output; the 8-bit activations' absmax
    # (an add) and scaling (a multiply) per input element.
    assert fc1.ops == {"int8_add": 960, "fp32_mul": 5 * 32 + 5 * 8, "fp32_add": 5 * 8}
    assert fc1.energy_pj["45nm"] == pytest.approx(960 * 0.03 + 200 * 3.7 + 40 * 0.9)
    assert fc1.energy_pj["7nm"] == pytest.approx(960 * 0.007 + 200 * 1.31 + 40 * 0.38)
    assert fc1.baseline_energy_pj["45nm"] == pytest.approx(1280 * (3.7 + 0.9))
    assert fc1.baseline_energy_pj["7nm"] == pytest.approx(1280 * (1.31 + 0.38))


def test_bits_and_bytes_of_quantized_layers():
    b158 = rows_by_name(profile_model(tiny("b158"), TINY, int_kernel="int8"))["blocks.0.mlp.fc1"]
    assert b158.info_bits_per_weight == pytest.approx(math.log2(3))
    assert b158.stored_bits_per_weight == pytest.approx(1.6)
    assert b158.bytes_packed == math.ceil(256 / 5) + 4 + 2 * 32  # codes, one scale, fp16 bias
    assert b158.bytes_resident == 256 + 4 + 4 * 32  # int8 codes, scale, fp32 bias
    # The fp32 integer kernel also holds the codes as fp32.
    fp32 = rows_by_name(profile_model(tiny("b158"), TINY, int_kernel="fp32"))["blocks.0.mlp.fc1"]
    assert fp32.bytes_resident == (1 + 4) * 256 + 4 + 4 * 32
    two_bit = rows_by_name(profile_model(tiny("b158"), TINY, ternary_packing="2bit"))
    assert two_bit["blocks.0.mlp.fc1"].bytes_packed == 256 // 4 + 4 + 2 * 32
    xnor = rows_by_name(profile_model(tiny("xnor"), TINY))["blocks.0.mlp.fc1"]
    assert xnor.stored_bits_per_weight == 1
    assert xnor.bytes_packed == 256 // 8 + 4 * 32 + 2 * 32  # one scale per output channel
    head = rows_by_name(profile_model(tiny("b158"), TINY))["head"]
    assert head.method == "fp" and head.bytes_resident == 4 * 90


def test_weights_only_binary_adds_in_float():
    p = profile_model(tiny("sign"), TINY)  # act_bits None by default, scale 1: no rescale
    fc2 = rows_by_name(p)["blocks.0.mlp.fc2"]
    assert fc2.ops == {"fp32_add": fc2.macs}
    assert fc2.energy_pj["45nm"] == pytest.approx(fc2.macs * 0.9)
    assert p.totals["zero_macs"] == 0


def test_binary_activations_add_in_integers_and_fp16_precision():
    p = profile_model(tiny("bitnet", act_bits=1), TINY, float_precision="fp16")
    rows = rows_by_name(p)
    assert rows["blocks.0.mlp.fc1"].act_bits == 1
    assert rows["patch_embed.proj"].act_bits == 8  # pixels never go to 1 bit
    assert set(p.totals["ops"]) == {"int8_add", "fp16_mul", "fp16_add"}
    assert rows["blocks.0.attn.qk"].energy_pj["45nm"] == pytest.approx(200 * (1.1 + 0.4))


def test_quantized_model_needs_less_energy():
    p = profile_model(tiny("b158"), TINY)
    assert p.totals["energy_ratio"]["45nm"] > 1 and p.totals["energy_ratio"]["7nm"] > 1


def test_table_and_json():
    p = profile_model(tiny("b158"), TINY, source="tiny")
    table = p.format_table()
    assert "blocks.0.attn.qk" in table and "Horowitz" in table and "no memory access" in table
    data = json.loads(p.to_json())
    assert data["totals"]["params"] == p.totals["params"]
    assert "Horowitz" in data["energy_source"]


def write_tiny_yaml(tmp_path, method="b158"):
    path = tmp_path / "tiny.yaml"
    path.write_text("model: {image_size: 32, patch_size: 16, dim: 8, depth: 1, heads: 2}\n"
                    f"quant: {{method: {method}}}\n")
    return path


def test_cli_prints_table_and_json(tmp_path, capsys):
    path = write_tiny_yaml(tmp_path)
    assert main(["profile", str(path)]) == 0
    out = capsys.readouterr().out
    assert "patch_embed.proj" in out and "total" in out and "Horowitz" in out
    assert main(["profile", str(path), "model.depth=2", "--json", "--quant", "xnor"]) == 0
    data = json.loads(capsys.readouterr().out)
    config = Config(model=ViTConfig(image_size=32, patch_size=16, dim=8, depth=2, heads=2),
                    quant=QuantConfig(method="xnor"))
    assert data["totals"]["params"] == sum(x.numel() for x in build_model(config).parameters())
    assert {r["method"] for r in data["rows"] if r["kind"] == "linear"} == {"xnor", "fp"}


def test_cli_on_a_checkpoint(tmp_path, capsys):
    config = Config(model=TINY)
    save_model(tmp_path / "model.safetensors", build_model(config), config, ["a"] * 10)
    assert main(["profile", str(tmp_path), "--quant", "b158", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "quantized after training" in data["weights_source"]
    assert data["totals"]["add_macs"] > 0

    config = Config(model=TINY, quant=QuantConfig(method="b158"))
    save_model(tmp_path / "model.safetensors", build_model(config), config, ["a"] * 10)
    assert main(["profile", str(tmp_path), "--quant", "xnor"]) == 2
    assert "already quantized" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["missing.yaml"], "not found"),
    (["missing_folder"], "no such checkpoint"),
    (["{yaml}", "model.nope=1"], "model.nope"),
    (["{onnx}"], "an ONNX graph; profile reads a config, a run folder, a checkpoint or a "
                 ".safetensors export"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    args = [a.replace("{yaml}", str(write_tiny_yaml(tmp_path))).replace(
        "{onnx}", str(tmp_path / "m.onnx")) for a in args]
    assert main(["profile", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_activation_peak_is_the_largest_layer():
    p = profile_model(tiny(), TINY)
    rows = rows_by_name(p)
    assert rows["blocks.0.mlp.fc1"].activation_bytes == 4 * 5 * (8 + 32)
    assert rows["blocks.0.attn.qk"].activation_bytes == 4 * (3 * 5 * 8 + 2 * 5 * 5)
    assert rows["patch_embed.proj"].activation_bytes == 4 * 4 * (768 + 8)  # the largest
    assert p.totals["activation_bytes_peak"] == 4 * 4 * (768 + 8)


def test_bytes_held_by_the_module_as_loaded():
    model = tiny("b158")  # a training model keeps its latent fp32 weights
    p = profile_model(model, TINY, int_kernel="int8")
    assert p.totals["bytes_held_by_module"] == 4 * p.totals["params"]
    assert p.totals["bytes_resident"] < p.totals["bytes_held_by_module"]


@pytest.mark.parametrize("float_dtype", ["fp16", "fp32"])
def test_profile_of_an_export_matches_the_file(tmp_path, capsys, float_dtype):
    export = pytest.importorskip("bitvit.deploy.export")
    from safetensors import safe_open

    config = Config(model=TINY, quant=QuantConfig(method="b158"), data=NUMBERS)
    model = tiny("b158")
    file = tmp_path / "model.safetensors"
    export.export_model(model, config, [str(i) for i in range(10)], file, packing="2bit",
                        float_dtype=float_dtype)
    src = load_for_profile(file)
    assert src.ternary_packing == "2bit" and src.float_dtype == float_dtype
    p = profile_model(src.model, src.config, ternary_packing=src.ternary_packing,
                      packed_float_dtype=src.float_dtype)
    direct = profile_model(model, TINY, ternary_packing="2bit", packed_float_dtype=float_dtype)
    for key in ("params", "zero_weights", "macs", "add_macs", "bytes_packed"):
        assert p.totals[key] == direct.totals[key], key
    # Profiled from Python as docs/deployment.md shows: the cls-only last block that `load`
    # installs counts as the whole block, and stays installed.
    loaded = export.load(file, engine="int")
    last = loaded.vit.blocks[-1]
    from_python = profile_model(loaded.vit, loaded.config, ternary_packing="2bit",
                                packed_float_dtype=float_dtype)
    assert [r.name for r in from_python.rows] == [r.name for r in p.rows]
    for key in ("params", "macs", "add_macs", "bytes_packed"):
        assert from_python.totals[key] == p.totals[key], key
    assert loaded.vit.blocks[-1] is last
    with safe_open(str(file), framework="pt") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys())  # noqa: SIM118 - not iterable
    assert p.totals["bytes_packed"] == stored
    assert p.packed_float_dtype == float_dtype and f"{float_dtype} biases" in p.format_table()
    # The command line reads the file's float dtype too.
    capsys.readouterr()
    assert main(["profile", str(file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["bytes_packed"] == stored
    # Another packing, or best/, is not what the file holds: one line, not silently ignored.
    assert main(["profile", str(file), "--ternary-packing", "base3"]) == 2
    assert capsys.readouterr().err.endswith("packs its codes as 2bit; profile its checkpoint to "
                                            "compare\n")
    assert main(["profile", str(file), "--ternary-packing", "2bit", "--json"]) == 0
    capsys.readouterr()
    assert main(["profile", str(file), "--best"]) == 2
    assert "--best applies to run folders" in capsys.readouterr().err


def test_packed_floats_default_to_the_export_default():
    p = profile_model(tiny("b158"), TINY)  # no file: fp16, as `bitvit export` writes
    head = rows_by_name(p)["head"]
    assert head.bytes_packed == 2 * 90 and head.stored_bits_per_weight == 16
    assert p.packed_float_dtype == "fp16" and "export's default" in " ".join(p.assumptions)
    fp32 = rows_by_name(profile_model(tiny("b158"), TINY, packed_float_dtype="fp32"))
    assert fp32["head"].bytes_packed == 4 * 90
    assert fp32["blocks.0.mlp.fc1"].bytes_packed == math.ceil(256 / 5) + 4 + 4 * 32
    with pytest.raises(ValueError, match="packed_float_dtype='bf16'"):
        profile_model(tiny(), TINY, packed_float_dtype="bf16")


def _storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor the module holds (parameters and buffers), each storage once."""
    storages = {}
    for t in [*module.parameters(), *module.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("method, quant", [
    ("b158", {}), ("b158", {"act_bits": "none", "where": "mlp"}), ("bitnet", {"act_bits": 1}),
    ("xnor", {}), ("sign", {"act_bits": 8}), ("fp", {}),
])
def test_resident_bytes_are_what_the_loaded_model_holds(tmp_path, method, quant):
    """The profile's resident weights equal what `bitvit.load` (int engine) really holds."""
    import bitvit

    config = Config(model=TINY, quant=QuantConfig(method=method, **quant), data=NUMBERS)
    file = tmp_path / "model.safetensors"
    bitvit.export_model(build_model(config), config, [str(i) for i in range(10)], file)
    src = load_for_profile(file)
    p = profile_model(src.model, src.config, packed_float_dtype=src.float_dtype)
    held = _storage_bytes(bitvit.load(file, engine="int"))
    assert p.totals["bytes_resident"] == held
    assert p.totals["bytes_held_by_module"] == held
    if method != "fp" and p.int_kernel == "int8":  # 1 byte per quantized weight, not 2 (or a
        assert held < 4 * p.totals["params"] - 2 * p.totals["quantized_weights"]  # fp32 copy)
    # The fp engine's layers hold an fp32 copy of their weights beside the codes, no kernel's.
    fp_engine = bitvit.load(file, engine="fp")
    p_fp = profile_model(fp_engine.vit, fp_engine.config, packed_float_dtype=src.float_dtype)
    assert p_fp.totals["bytes_resident"] == _storage_bytes(fp_engine)


def test_a_model_without_torch_layers_is_refused_with_what_to_load():
    class OrtLike:  # what `bitvit.load(..., engine="ort").vit` is: a session, no modules
        pass

    with pytest.raises(TypeError, match="engine='int' or 'fp'"):
        profile_model(OrtLike(), TINY)
