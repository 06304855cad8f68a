import pytest
import torch
from torch import nn

from bitvit import VisionTransformer, ViTConfig
from bitvit.nn.model import PatchEmbed


def test_patch_embed_flattens_patches_in_row_major_order():
    pe = PatchEmbed(image_size=4, patch_size=2, in_channels=2, dim=8)
    nn.init.eye_(pe.proj.weight)
    nn.init.zeros_(pe.proj.bias)
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    out = pe(x)
    assert out.shape == (1, 4, 8)
    # Patch 1 is the top-right 2x2 square: channel 0 then channel 1, each row-major.
    expected = torch.cat([x[0, c, 0:2, 2:4].flatten() for c in range(2)])
    torch.testing.assert_close(out[0, 1], expected)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_shapes_and_names(pooling):
    cfg = ViTConfig(image_size=32, patch_size=4, dim=48, depth=3, heads=6, num_classes=7,
                    pooling=pooling, in_channels=1)
    model = VisionTransformer(cfg)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    names = dict(model.named_modules())
    for n in ["patch_embed.proj", "blocks.2.attn.qkv", "blocks.2.attn.proj", "blocks.0.mlp.fc1",
              "blocks.0.mlp.fc2", "head"]:
        assert isinstance(names[n], nn.Linear), n
    assert model.pos_embed.shape == (1, 64 + (pooling == "cls"), 48)


def test_paper_preset_size():
    model = VisionTransformer(ViTConfig(patch_size=16, dim=256, depth=6, heads=8, mlp_ratio=4))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert linear == 768 * 256 + 6 * (256 * 768 + 256 * 256 + 2 * 256 * 1024) + 256 * 10


def test_dropout_only_in_training():
    cfg = ViTConfig(patch_size=8, dim=32, depth=2, heads=4, dropout=0.5, attn_dropout=0.5,
                    drop_path=0.5)
    model = VisionTransformer(cfg)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize("kwargs,match", [
    ({"patch_size": 5}, "patch_size"), ({"heads": 7}, "heads"), ({"pooling": "max"}, "pooling")])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViTConfig(**kwargs)
