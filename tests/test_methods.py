"""Every registered quantization method, end to end; and the method table's own checks.

A method is one row of `bitvit.nn.methods.METHOD_TABLE` (plain data) naming a quantizer of
`bitvit.nn.quant.QUANTIZERS`. Each row here goes through quantize_, a
training step, export, load under both engines and the profile, so a row the rest of bitvit
mishandles (wrong packing, scale shape or stored bits) fails here.
"""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from bitvit.cli import main
from bitvit.deploy.export import export_model, load
from bitvit.deploy.profile import profile_model
from bitvit.nn.methods import METHOD_TABLE, QUANTIZER_GRANULARITIES, QuantMethod
from bitvit.nn.model import VisionTransformer
from bitvit.nn.quant import METHODS, QUANTIZERS, BitLinear, check_table, quantize_
from bitvit.training.config import Config

CLASSES = ["a", "b", "c", "d"]
# What each kind of code takes in the packed file (base3 for ternary, the export default) and
# holds in information, written out rather than read from the table under test.
STORED_BITS = {"ternary": 1.6, "binary": 1.0, "centred binary": 1.0}
INFO_BITS = {"ternary": math.log2(3), "binary": 1.0, "centred binary": 1.0}
CODE_VALUES = {"ternary": {-1, 0, 1}, "binary": {-1, 1}, "centred binary": {-1, 1}}
ATOL_FP32 = 1e-3  # tests/test_export.py's bar for fp32 exports


def _config(method: str) -> Config:
    return Config.from_dict({
        "model": {"image_size": 16, "patch_size": 4, "dim": 32, "depth": 1, "heads": 2,
                  "mlp_ratio": 2, "num_classes": len(CLASSES)},
        "quant": {"method": method},
        "data": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    })


def _trained_one_step(config: Config) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(config.model)
    rows = quantize_(model, config.quant.method)
    spec = METHOD_TABLE[config.quant.method]
    assert len(rows) == 5 and all(r.bits_per_weight == spec.info_bits for r in rows)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if isinstance(m, BitLinear)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, len(CLASSES), (8,))
    loss = F.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    for name, w in before.items():
        assert not torch.equal(model.get_submodule(name).weight, w), name
    with torch.no_grad():  # spread the logits, so they are far from fp32 rounding noise
        model.head.weight.mul_(20)
    return model.eval()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_exports_loads_and_profiles(tmp_path: Path, method: str, capsys):
    spec = METHOD_TABLE[method]
    config = _config(method)
    model = _trained_one_step(config)
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)

    packings = ["base3", "2bit"] if spec.codes == "ternary" else ["base3"]
    for packing in packings:
        path = export_model(model, config, CLASSES, tmp_path / f"{packing}.safetensors",
                            packing=packing, float_dtype="fp32")
        for engine in ("int", "fp"):
            with torch.no_grad():
                out = load(path, engine=engine)(x)
            torch.testing.assert_close(out, ref, atol=ATOL_FP32, rtol=0)

    # The file: codes in the method's code set, one scale per tensor or per output channel.
    path = tmp_path / "base3.safetensors"
    loaded = load(path)
    fc1 = loaded.vit.blocks[0].mlp.fc1
    assert set(fc1.codes.unique().tolist()) == CODE_VALUES[spec.codes]
    assert fc1.scale.numel() == (fc1.out_features if spec.granularity == "channel" else 1)

    # The profile, of the exported file (what `bitvit profile` reads) and of the model.
    assert main(["profile", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    quantized = [r for r in rows if r["kind"] == "linear" and r["method"] == method]
    assert len(quantized) == 5
    with safe_open(str(path), framework="pt") as f:
        for r in quantized:
            assert r["stored_bits_per_weight"] == STORED_BITS[spec.codes]
            assert r["info_bits_per_weight"] == pytest.approx(INFO_BITS[spec.codes])
            # Packed bytes: exactly the file's codes and scales (fp32), and bias (fp32 here).
            stored = sum(f.get_slice(f"{r['name']}.{t}").get_shape()[0] * size
                         for t, size in (("codes", 1), ("scale", 4), ("bias", 4)))
            assert r["bytes_packed"] == stored, r["name"]
    in_memory = profile_model(model, config, packed_float_dtype="fp32")
    assert [(r.name, r.stored_bits_per_weight, r.bytes_packed) for r in in_memory.rows
            if r.method == method] == [(r["name"], r["stored_bits_per_weight"],
                                        r["bytes_packed"]) for r in quantized]


def test_every_method_is_a_cli_choice(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "{" + ",".join(["fp", *METHODS]) + "}" in help_text


def test_the_methods_page_lists_every_method_with_its_formula():
    readme = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    for name, spec in METHOD_TABLE.items():
        rows = [line for line in readme.splitlines() if line.startswith(f"| `{name}` |")]
        assert len(rows) == 1, name
        assert spec.label in rows[0] and spec.formula.replace("|", r"\|") in rows[0], name


# --- the table refuses half-described methods ---------------------------------------------------


def _fields(**changes) -> dict:
    spec = METHOD_TABLE["twn"]
    return {**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}, "name": "fake",
            **changes}


def test_a_method_without_packing_is_refused():
    fields = _fields()
    del fields["packings"]
    with pytest.raises(TypeError, match="packings"):
        QuantMethod(**fields)
    with pytest.raises(ValueError, match=r"^quantization method 'fake': packings=\(\)") as e:
        QuantMethod(**_fields(packings=()))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("changes,field", [
    ({"packings": ("1bit",)}, "packings"),  # ternary codes do not fit one bit
    ({"packings": ("base4",)}, "packings"),
    ({"codes": "quaternary"}, "codes"),
    ({"granularity": "row"}, "granularity"),
    ({"ste": "tanh"}, "ste"),
    ({"default_act_bits": 4}, "default_act_bits"),
    ({"ste": "clipped"}, "int_path"),  # the int8 training kernel has the identity STE
    ({"quantizer": None}, "quantizer"),
    ({"quantizer": "not a name"}, "quantizer"),
    ({"formula": ""}, "formula"),
])
def test_bad_method_fields_are_refused(changes, field):
    with pytest.raises(ValueError, match=f"'fake': {field}="):
        QuantMethod(**_fields(**changes))


def test_a_row_naming_an_unknown_quantizer_is_refused():
    check_table(METHOD_TABLE)
    fake = QuantMethod(**_fields(quantizer="absmax_ternary"))  # a typo: no such quantizer
    with pytest.raises(ValueError, match=r"^METHOD_TABLE\['fake'\]: quantizer='absmax_ternary', "
                                         r"expected one of .*absmean_ternary") as e:
        check_table({**METHOD_TABLE, "fake": fake})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not a QuantMethod named 'other'"):
        check_table({**METHOD_TABLE, "other": QuantMethod(**_fields())})


@pytest.mark.parametrize("quantizer, granularity, expected", [
    ("twn_threshold", "tensor", "channel"), ("twn_threshold", "none", "channel"),
    ("centred_sign", "channel", "tensor")])
def test_a_row_pairing_a_quantizer_with_a_granularity_it_cannot_compute_is_refused(
        quantizer, granularity, expected):
    # Refused when the row is made (so at import, for a row of METHOD_TABLE), not when it
    # first quantizes a weight.
    with pytest.raises(ValueError, match=rf"^quantization method 'fake': granularity="
                       rf"'{granularity}', expected {expected}, the granularity quantizer "
                       rf"'{quantizer}' computes$") as e:
        QuantMethod(**_fields(quantizer=quantizer, granularity=granularity))
    assert "\n" not in str(e.value)


def test_every_quantizer_says_which_granularities_it_computes():
    for spec in METHOD_TABLE.values():
        assert spec.granularity in QUANTIZER_GRANULARITIES[spec.quantizer]
    assert set(QUANTIZER_GRANULARITIES) == set(QUANTIZERS)
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="quantizer 'twn_threshold': granularity='tensor', "
                                         "expected channel"):
        QUANTIZERS["twn_threshold"](w, "tensor")  # a direct call is checked too


def test_the_per_channel_variant_is_only_a_row():
    # b158c is b158 with granularity="channel": the same quantizer, called per output channel.
    b158, b158c = METHOD_TABLE["b158"], METHOD_TABLE["b158c"]
    differing = {f.name for f in dataclasses.fields(b158)
                 if getattr(b158, f.name) != getattr(b158c, f.name)}
    assert differing == {"name", "label", "formula", "granularity"}
    assert b158.quantizer == b158c.quantizer in QUANTIZERS
    assert (b158.granularity, b158c.granularity) == ("tensor", "channel")
