"""Starting from pretrained models: Hugging Face folders and timm state dicts read into bitvit's
ViT (the same logits as the library that wrote them), the architecture taken from the source,
what cannot be expressed refused in one line, and a fine-tuning run through the command line."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

import bitvit
from bitvit.cli import main
from bitvit.deploy.export import export_model, load
from bitvit.files import sha256
from bitvit.nn.model import VisionTransformer, ViTConfig
from bitvit.nn.pretrained import read_pretrained, resample_pos_embed
from bitvit.training.checkpoint import CheckpointError, build_model
from bitvit.training.config import Config, ConfigError
from bitvit.training.pretrained import load_run_config

ROOT = Path(__file__).resolve().parents[1]
# A tiny ViT: 32x32 images, patches of 4 (an 8x8 grid), 2 layers, dim 32, 4 heads, 5 classes.
TINY_HF = {"image_size": 32, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "intermediate_size": 48, "num_labels": 5,
           "initializer_range": 0.2}
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _randomize_norms(model: torch.nn.Module) -> None:
    """LayerNorms away from (1, 0), so that a norm mapped to the wrong place shows."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)


def _images(n: int = 6, size: int = 32) -> torch.Tensor:
    """Normalized model inputs: both libraries get the same tensor."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _hf_folder(folder: Path, cls_name: str = "ViTForImageClassification", **config) -> Path:
    transformers = pytest.importorskip("transformers")
    cfg_cls = transformers.DeiTConfig if cls_name.startswith("DeiT") else transformers.ViTConfig
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg_cls(**{**TINY_HF, **config})).eval()
    _randomize_norms(model)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255,
         "image_mean": MEAN, "image_std": STD, "size": {"height": 32, "width": 32}}))
    return folder


def _hf_logits(folder: Path, x: torch.Tensor, cls_name: str = "ViTForImageClassification"
               ) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    model = getattr(transformers, cls_name).from_pretrained(folder).eval()
    with torch.no_grad():
        return model(pixel_values=x).logits


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory) -> Path:
    return _hf_folder(tmp_path_factory.mktemp("hf") / "vit")


def _bitvit_logits(path: Path, x: torch.Tensor, **model) -> torch.Tensor:
    vit, config = bitvit.load_pretrained(path, **model)
    assert isinstance(vit, VisionTransformer) and isinstance(config, ViTConfig)
    assert not vit.training
    with torch.no_grad():
        return vit(x)


# ---------------------------------------------------------------------------------------------
# Hugging Face
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_act, qkv_bias", [("gelu", True), ("gelu_new", False)])
def test_hugging_face_vit_gives_transformers_logits(tmp_path, hidden_act, qkv_bias):
    folder = _hf_folder(tmp_path / "vit", hidden_act=hidden_act, qkv_bias=qkv_bias)
    x = _images()
    ref = _hf_logits(folder, x)
    got = _bitvit_logits(folder, x)
    assert ref.shape == got.shape == (6, 5) and ref.abs().max() > 0.5
    assert (got - ref).abs().max().item() < 1e-4
    _, config = bitvit.load_pretrained(folder)
    assert (config.dim, config.depth, config.heads, config.patch_size, config.image_size,
            int(config.dim * config.mlp_ratio), config.num_classes) == (32, 2, 4, 4, 32, 48, 5)
    assert config.norm_eps == 1e-12 and config.final_norm == "tokens"
    assert config.qkv_bias is qkv_bias and config.gelu == ("exact" if hidden_act == "gelu"
                                                           else "tanh")
    # The model's own normalization, from preprocessor_config.json.
    source = read_pretrained(folder)
    assert source.mean == pytest.approx(MEAN) and source.std == pytest.approx(STD)
    assert source.classes == [f"LABEL_{i}" for i in range(5)]


def test_hugging_face_folder_with_pytorch_model_bin(tmp_path, hf_vit):
    """pytorch_model.bin goes through the weights-only loader; a pickled object is refused."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((hf_vit / "config.json").read_text())
    torch.save(load_file(str(hf_vit / "model.safetensors")), folder / "pytorch_model.bin")
    x = _images()
    torch.testing.assert_close(_bitvit_logits(folder, x), _bitvit_logits(hf_vit, x))
    torch.save({"weights": Path("x")}, folder / "pytorch_model.bin")  # not plain tensors
    with pytest.raises(CheckpointError) as e:
        bitvit.load_pretrained(folder)
    assert "pytorch_model.bin" in str(e.value) and "\n" not in str(e.value)


def test_deit_without_distillation_token_loads(tmp_path, hf_vit):
    """model_type deit with deit.* names and no distillation token maps as a ViT does. (Every
    folder transformers' DeiT classes write has the token: see the next test.)"""
    folder = tmp_path / "deit"
    folder.mkdir()
    config = json.loads((hf_vit / "config.json").read_text())
    config.update(model_type="deit", architectures=["DeiTForImageClassification"])
    (folder / "config.json").write_text(json.dumps(config))
    state = load_file(str(hf_vit / "model.safetensors"))
    save_file({k.replace("vit.", "deit.", 1): v for k, v in state.items()},
              str(folder / "model.safetensors"))
    x = _images()
    assert (_bitvit_logits(folder, x) - _hf_logits(hf_vit, x)).abs().max().item() < 1e-4


@pytest.mark.parametrize("cls_name, expected", [
    ("DeiTForImageClassification", "deit.embeddings.distillation_token: DeiT's distillation "
                                   "token"),
    ("DeiTForImageClassificationWithTeacher", "DeiTForImageClassificationWithTeacher: DeiT's "
                                              "distillation token and distillation head"),
])
def test_deit_distillation_token_is_refused_in_one_line(tmp_path, capsys, cls_name, expected):
    """transformers' DeiT embeddings always carry the distillation token (position embeddings
    for both tokens, and every block attends to it), WithTeacher a second head too."""
    folder = _hf_folder(tmp_path / "deit", cls_name)
    with pytest.raises(CheckpointError) as e:
        bitvit.load_pretrained(folder)
    assert expected in str(e.value) and "not supported" in str(e.value)
    assert "\n" not in str(e.value)
    capsys.readouterr()
    assert main(["train", "--init-from", str(folder), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, expected", [
    ({"model_type": "vit_mae"}, "model_type 'vit_mae': expected vit or deit"),
    ({"hidden_act": "relu"}, "hidden_act='relu': bitvit's ViT has GELU"),
    ({"hidden_size": "32"}, "hidden_size='32': expected int"),
    ({"image_size": [32, 16]}, "image_size=[32, 16]: expected int (square only)"),
    ({"num_hidden_layers": 1}, "vit.encoder.layer.1.attention.attention.key.bias: a part "
                               "bitvit's ViT has no counterpart for"),
    ({"num_hidden_layers": 3}, "missing vit.encoder.layer.2."),
    ({"intermediate_size": 64}, "blocks.0.mlp.fc1.weight has shape (48, 32), expected (64, 32)"),
    ({"hidden_size": 0}, "hidden_size=0: expected a positive int"),
    ({"image_size": [[32]]}, "image_size=[32]: expected int (square only)"),
])
def test_hugging_face_configs_bitvit_cannot_read(tmp_path, hf_vit, change, expected):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((hf_vit / "model.safetensors").read_bytes())
    config = json.loads((hf_vit / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError) as e:
        bitvit.load_pretrained(folder)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_hugging_face_labels_that_are_not_decimal_indices_are_left_out(tmp_path, hf_vit):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((hf_vit / "model.safetensors").read_bytes())
    config = json.loads((hf_vit / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "id2label": {"\u00b2": "x"}}))
    from bitvit.nn.pretrained import read_pretrained

    assert read_pretrained(folder).classes is None  # "²".isdigit(), but no int("²")


def test_hugging_face_weights_whose_shapes_do_not_stack_are_one_line(tmp_path, hf_vit):
    from safetensors.torch import load_file

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text((hf_vit / "config.json").read_text())
    state = load_file(str(hf_vit / "model.safetensors"))
    key = next(k for k in state if k.endswith("attention.attention.key.weight"))
    state[key] = state[key][:-1]  # a key projection one row short of query's and value's
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        bitvit.load_pretrained(folder)
    assert "\n" not in str(e.value) and str(folder / "model.safetensors") in str(e.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # past Python's recursion limit
    (" " * (2 << 20) + "{}", "bytes; a JSON file is at most"),  # read no further than the cap
])
def test_a_hugging_face_config_json_that_is_too_deep_or_too_big(tmp_path, hf_vit, text,
                                                                 expected):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((hf_vit / "model.safetensors").read_bytes())
    (folder / "config.json").write_text(text)
    with pytest.raises(CheckpointError) as e:
        bitvit.load_pretrained(folder)
    assert expected in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------


def _timm_state_from_hf(folder: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face ViT's weights under timm's names and shapes (timm's own conversion)."""
    hf = load_file(str(folder / "model.safetensors"))
    e, out = "vit.embeddings.", {}
    out["cls_token"], out["pos_embed"] = hf[f"{e}cls_token"], hf[f"{e}position_embeddings"]
    out["patch_embed.proj.weight"] = hf[f"{e}patch_embeddings.projection.weight"]  # (D, C, p, p)
    out["patch_embed.proj.bias"] = hf[f"{e}patch_embeddings.projection.bias"]
    for i in range(TINY_HF["num_hidden_layers"]):
        h, b = f"vit.encoder.layer.{i}.", f"blocks.{i}."
        for t in ("weight", "bias"):
            out[f"{b}attn.qkv.{t}"] = torch.cat([hf[f"{h}attention.attention.{n}.{t}"]
                                                 for n in ("query", "key", "value")])
            for ours, theirs in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                                 ("attn.proj", "attention.output.dense"),
                                 ("mlp.fc1", "intermediate.dense"),
                                 ("mlp.fc2", "output.dense")):
                out[f"{b}{ours}.{t}"] = hf[f"{h}{theirs}.{t}"]
    for t in ("weight", "bias"):
        out[f"norm.{t}"], out[f"head.{t}"] = hf[f"vit.layernorm.{t}"], hf[f"classifier.{t}"]
    return {k: v.contiguous() for k, v in out.items()}


def test_timm_state_dict_gives_the_same_logits(tmp_path):
    """timm's names and shapes (here converted from a transformers ViT with timm's epsilon,
    1e-6), its architecture inferred from the shapes; heads given (no shape holds them)."""
    folder = _hf_folder(tmp_path / "vit", layer_norm_eps=1e-6)
    path = tmp_path / "timm.safetensors"
    save_file(_timm_state_from_hf(folder), str(path))
    x = _images()
    assert (_bitvit_logits(path, x, heads=4) - _hf_logits(folder, x)).abs().max().item() < 1e-4
    _, config = bitvit.load_pretrained(path, heads=4)
    assert (config.image_size, config.patch_size, config.dim, config.depth, config.num_classes,
            config.norm_eps, config.pooling, config.final_norm) == (32, 4, 32, 2, 5, 1e-6, "cls",
                                                                    "tokens")
    # dim 32 is no multiple of timm's 64-wide heads: the heads must be given.
    with pytest.raises(ConfigError, match="does not record the number of heads.*give "
                                          "model.heads=N"):
        bitvit.load_pretrained(path)


def _timm_like(dim: int = 64, cls: bool = True, fc_norm: bool = False,
               **extra: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Random tensors with timm's names and shapes: patch 4, 16x16 images, one block."""
    shapes = {"patch_embed.proj.weight": (dim, 3, 4, 4), "patch_embed.proj.bias": (dim,),
              "pos_embed": (1, 16 + cls, dim), "blocks.0.attn.qkv.weight": (3 * dim, dim),
              "blocks.0.attn.proj.weight": (dim, dim), "blocks.0.attn.proj.bias": (dim,),
              "blocks.0.mlp.fc1.weight": (2 * dim, dim), "blocks.0.mlp.fc1.bias": (2 * dim,),
              "blocks.0.mlp.fc2.weight": (dim, 2 * dim), "blocks.0.mlp.fc2.bias": (dim,),
              **{f"blocks.0.{n}.{t}": (dim,) for n in ("norm1", "norm2")
                 for t in ("weight", "bias")},
              **{f"{'fc_norm' if fc_norm else 'norm'}.{t}": (dim,) for t in ("weight", "bias")},
              **({"cls_token": (1, 1, dim)} if cls else {}), **extra}
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_heads_other_than_the_timm_convention_are_said(tmp_path):
    # No shape holds the heads: any number loads, so one other than dim / 64 is said.
    path = tmp_path / "d128.safetensors"
    save_file(_timm_like(dim=128), str(path))
    for heads, said in ((4, True), (2, False), (None, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, config = bitvit.load_pretrained(path, **({} if heads is None else {"heads": heads}))
        assert config.heads == (heads or 2)
        notes = [str(w.message) for w in caught if "does not record heads" in str(w.message)]
        assert notes == ([f"{path}: model.heads=4 is the config's: {path} does not record heads "
                          "(its convention gives 2); make sure 4 is the source's"] if said else [])


def test_timm_architecture_is_inferred_from_the_shapes(tmp_path):
    path = tmp_path / "gap.safetensors"
    # No class token, fc_norm, no qkv bias, no head: timm's global average pooling ViT.
    save_file(_timm_like(cls=False, fc_norm=True), str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vit, config = bitvit.load_pretrained(path, num_classes=3)
    assert (config.pooling, config.final_norm, config.qkv_bias, config.heads) == (
        "mean", "pooled", False, 1)  # dim 64: one 64-wide head
    assert vit.cls_token is None and vit.blocks[0].attn.qkv.bias is None
    assert any("no classifier head" in str(w.message) for w in caught)
    # The norm after pooling: on the pooled vector, the fc_norm's weights.
    x = _images(2, 16)
    with torch.no_grad():
        tokens = vit.forward_features(x)
        expected = vit.head(vit.norm(tokens.mean(1)))
        torch.testing.assert_close(vit(x), expected)
        torch.testing.assert_close(vit.norm.weight, load_file(str(path))["fc_norm.weight"])


@pytest.mark.parametrize("state, expected", [
    (_timm_like(**{"blocks.0.ls1.gamma": (64,)}), "blocks.0.ls1.gamma: layer scale"),
    (_timm_like(**{"reg_token": (1, 4, 64)}), "reg_token: register tokens"),
    (_timm_like(**{"dist_token": (1, 1, 64)}), "dist_token: DeiT's distillation token"),
    (_timm_like(**{"blocks.0.attn.q_norm.weight": (16,)}), "query/key norms (timm qk_norm)"),
    (_timm_like(**{"pos_embed": (1, 16, 64)}), "position embedding without the class token's "
                                                "entry (timm no_embed_class)"),
    (_timm_like(fc_norm=True), "fc_norm beside a class token"),
    (_timm_like(**{"blocks.0.attn.extra": (1,)}), "blocks.0.attn.extra: a part bitvit's ViT "
                                                  "has no counterpart for"),
    (_timm_like(**{"pos_embed": (64,)}), "not a timm ViT state dict bitvit can read"),
    ({k: v for k, v in _timm_like().items() if k != "blocks.0.mlp.fc1.weight"},
     "not a timm ViT state dict bitvit can read ('blocks.0.mlp.fc1.weight')"),
    (_timm_like(**{"patch_embed.proj.weight": (0, 3, 4, 4)}), "bitvit can read"),
])
def test_timm_features_bitvit_cannot_express_are_refused(tmp_path, state, expected):
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as e:
        bitvit.load_pretrained(path)
    assert expected in str(e.value) and str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_a_weights_file_that_is_a_fifo_is_refused_unread(tmp_path):
    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)  # safe_open would wait for a writer forever
    with pytest.raises(CheckpointError, match="not a regular file; expected a weights file"):
        bitvit.load_pretrained(fifo)


def test_against_timm_itself_where_it_imports(tmp_path):
    timm = pytest.importorskip("timm")
    for kwargs in ({}, {"class_token": False, "global_pool": "avg", "qkv_bias": False}):
        torch.manual_seed(0)
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=1.5,
            num_classes=5, **kwargs).eval()
        _randomize_norms(model)
        path = tmp_path / "timm.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        x = _images()
        with torch.no_grad():
            ref = model(x)
        assert (_bitvit_logits(path, x, heads=4) - ref).abs().max().item() < 1e-4, kwargs


# ---------------------------------------------------------------------------------------------
# The architecture comes from the source
# ---------------------------------------------------------------------------------------------


def test_config_file_gives_training_settings_and_the_source_the_architecture(hf_vit):
    paper = ROOT / "configs/paper.yaml"
    config = load_run_config(paper, [("train.init_from", str(hf_vit))])
    m = config.model
    assert (m.dim, m.depth, m.heads, m.patch_size, int(m.dim * m.mlp_ratio)) == (32, 2, 4, 4, 48)
    assert (m.norm_eps, m.gelu, m.qkv_bias) == (1e-12, "exact", True)
    paper_config = yaml.safe_load(paper.read_text())
    assert config.train.lr == paper_config["train"]["lr"]
    assert config.train.epochs == paper_config["train"]["epochs"]
    # The config file gives image_size and num_classes: the run's, not the source's.
    assert (m.image_size, m.num_classes) == (32, 10)
    assert config.data.mean == pytest.approx(MEAN) and config.data.std == pytest.approx(STD)
    # Without a config file they are the source's; an explicit data.mean wins over the source's.
    config = load_run_config(None, [("train.init_from", str(hf_vit)), "model.image_size=16",
                                    "data.mean=[0, 0, 0]", "model.heads=4", "model.mlp_ratio=1.5"])
    assert (config.model.image_size, config.model.num_classes) == (16, 5)
    assert config.data.mean == (0.0, 0.0, 0.0) and config.data.std == pytest.approx(STD)


@pytest.mark.parametrize("override, expected", [
    ("model.dim=64", "model.dim=64 contradicts the source {}, whose dim is 32"),
    ("model.norm_eps=1e-6", "model.norm_eps=1e-06 contradicts the source {}, whose norm_eps is "
                            "1e-12"),
    ("model.patch_size=8", "model.patch_size=8 contradicts the source {}, whose patch_size is 4"),
])
def test_contradicting_model_override_is_one_line(hf_vit, tmp_path, capsys, override, expected):
    expected = expected.format(hf_vit / "model.safetensors")
    with pytest.raises(ConfigError) as e:
        load_run_config(ROOT / "configs/paper.yaml", [("train.init_from", str(hf_vit)), override])
    assert expected in str(e.value) and "\n" not in str(e.value)
    capsys.readouterr()
    assert main(["train", "--init-from", str(hf_vit), override,
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert not (tmp_path / "run").exists()


def test_position_embedding_resampling_keeps_the_class_token():
    pos = torch.randn(1, 1 + 64, 8)
    same = resample_pos_embed(pos, 8, 1)
    torch.testing.assert_close(same, pos)  # the same grid: unchanged
    small = resample_pos_embed(pos, 4, 1)
    assert small.shape == (1, 17, 8) and torch.equal(small[:, 0], pos[:, 0])
    # A field linear along the rows stays linear (bicubic reproduces it away from the edges).
    ramp = torch.arange(8.0).repeat_interleave(8).reshape(1, 64, 1).expand(1, 64, 8)
    big = resample_pos_embed(ramp, 16, 0).reshape(16, 16, 8)[4:12, 6, 0]
    assert torch.allclose(big.diff(), big.diff()[0].expand(7), atol=1e-4)


def test_load_pretrained_with_other_sizes(hf_vit):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vit, config = bitvit.load_pretrained(hf_vit, image_size=16, num_classes=3)
    assert vit.pos_embed.shape == (1, 1 + 16, 32) and vit.head.out_features == 3
    notes = [str(w.message) for w in caught]
    assert any("resampled from 8x8 to 4x4" in n for n in notes)
    assert any("the source has 5 classes, the model 3" in n for n in notes)
    source, _ = bitvit.load_pretrained(hf_vit)
    torch.testing.assert_close(vit.cls_token, source.cls_token)
    torch.testing.assert_close(vit.pos_embed[:, 0], source.pos_embed[:, 0])


# ---------------------------------------------------------------------------------------------
# The new ViT options: defaults unchanged, exports agree
# ---------------------------------------------------------------------------------------------


def test_default_models_write_their_configs_as_before():
    assert set(Config().to_dict()["model"]) == {
        "image_size", "in_channels", "patch_size", "dim", "depth", "heads", "mlp_ratio",
        "dropout", "attn_dropout", "drop_path", "num_classes", "pooling"}
    changed = Config.from_dict({"model": {"norm_eps": 1e-6, "gelu": "tanh"}})
    assert changed.to_dict()["model"]["norm_eps"] == 1e-6
    assert Config.from_dict(changed.to_dict()) == changed
    keys = set(VisionTransformer(ViTConfig(image_size=8, patch_size=4, dim=8, depth=1, heads=2))
               .state_dict())
    assert "blocks.0.attn.qkv.bias" in keys and "norm.weight" in keys


@pytest.mark.parametrize("options", [
    {"norm_eps": 1e-6, "final_norm": "pooled", "qkv_bias": False, "gelu": "tanh",
     "pooling": "mean"},
    {"norm_eps": 1e-12, "final_norm": "none", "gelu": "tanh"},
    {"final_norm": "pooled"},
])
def test_exports_agree_with_the_model_on_the_new_options(tmp_path, options):
    pytest.importorskip("onnxruntime")
    from bitvit.deploy.onnx_export import to_onnx
    from bitvit.deploy.onnx_runtime import load_onnx

    config = Config.from_dict({
        "model": {"image_size": 16, "patch_size": 4, "dim": 32, "depth": 2, "heads": 2,
                  "mlp_ratio": 2, "num_classes": 3, **options},
        "quant": {"method": "b158"}, "data": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    torch.manual_seed(0)
    model = build_model(config).eval()
    _randomize_norms(model)
    x = _images(8, 16)
    with torch.no_grad():
        ref = model(x)
    exported = load(export_model(model, config, ["a", "b", "c"], tmp_path / "m.safetensors",
                                 float_dtype="fp32"), engine="fp")
    to_onnx(model, tmp_path / "m.onnx")
    with torch.no_grad():
        assert (exported(x) - ref).abs().max().item() < 1e-4
        assert (load_onnx(tmp_path / "m.onnx", threads=1)(x) - ref).abs().max().item() < 1e-3
    assert exported.config == config


# ---------------------------------------------------------------------------------------------
# End to end, through the command line
# ---------------------------------------------------------------------------------------------


def _image_folder(root: Path, classes: tuple[str, ...] = ("ant", "bee", "cat")) -> Path:
    """train/ and test/ with three classes of 24x24 PNGs (the model reads them at 16x16)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for k, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 156, (24, 24, 3)) + 50 * k
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_fine_tune_a_hugging_face_model_then_export_and_predict(hf_vit, tmp_path, capsys,
                                                                monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "cache"))
    data, run = _image_folder(tmp_path / "images"), tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--init-from", str(hf_vit), "--quant", "b158", "--data", str(data),
                 "model.num_classes=3", "model.image_size=16", "--epochs", "1",
                 "train.batch_size=9", "--out", str(run), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "position embeddings resampled from 8x8 to 4x4" in err
    assert "the source has 5 classes, the model 3: the classifier head starts freshly" in err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"] == {
        "image_size": 16, "in_channels": 3, "patch_size": 4, "dim": 32, "depth": 2, "heads": 4,
        "mlp_ratio": 1.5, "dropout": 0.0, "attn_dropout": 0.0, "drop_path": 0.0,
        "num_classes": 3, "pooling": "cls", "norm_eps": 1e-12}
    assert saved["data"]["mean"] == pytest.approx(MEAN)  # the model's own normalization
    info = json.loads((run / "run.json").read_text())
    weights = hf_vit / "model.safetensors"
    assert info["init_from"] == {"path": str(weights), "kind": "huggingface",
                                 "sha256": sha256(weights)}
    # eval, export (both formats), predict and profile take the run as any other.
    assert main(["eval", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 6
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "m.safetensors")]) == 0
    capsys.readouterr()
    tests = sorted((data / "test").rglob("*.png"))
    for model in ("m.onnx", "m.safetensors"):
        assert main(["predict", str(tmp_path / model), str(data / "test"), "--json",
                     "--top-k", "1"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [Path(r["file"]) for r in lines] == tests
        assert {r["predictions"][0]["class"] for r in lines} <= {"ant", "bee", "cat"}
    assert main(["profile", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["params"] > 0
