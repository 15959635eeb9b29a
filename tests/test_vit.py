"""ViT backbones: sizes, parameter count, position-embedding interpolation, MoCo v3's sin-cos embedding and
frozen patch projection, timm as an optional dependency, and a ViT encoder through encoder.pt / checkpoint.pt."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from contrastive.errors import ConfigError
from contrastive.nn.backbones import build_backbone
from contrastive.nn.vit import sincos_position_embedding

timm = pytest.importorskip("timm")


def _vit(name="vit_tiny", size=16, channels=3, **fields):
    torch.manual_seed(0)
    return build_backbone({"name": name, "patch_size": 4, **fields}, input_shape=(channels, size, size))


@pytest.mark.parametrize("name,dim,heads", [("vit_tiny", 192, 3), ("vit_small", 384, 6), ("vit_base", 768, 12)])
def test_sizes_at_32px_with_patch_4(name, dim, heads):
    # structure and shapes on the meta device (no weights allocated): width, depth, heads, 8x8 patch grid
    with torch.device("meta"):
        net, feature_dim = build_backbone({"name": name, "patch_size": 4}, input_shape=(3, 32, 32))
        out = net(torch.empty(2, 3, 32, 32))
    assert feature_dim == dim and out.shape == (2, dim)
    assert len(net.blocks) == 12 and net.blocks[0].attn.num_heads == heads
    assert net.pos_embed.shape == (1, 1 + 8 * 8, dim)  # class token + one entry per patch
    assert net.patch_embed.proj.kernel_size == (4, 4) and net.patch_embed.proj.stride == (4, 4)


def test_tiny_forward_is_the_class_token_after_the_final_norm():
    net, dim = _vit()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = net.eval()(x)
        tokens = net.forward_features(x)  # [3, 1 + 16, 192], after the final LayerNorm
    assert out.shape == (3, dim) and torch.isfinite(out).all()
    torch.testing.assert_close(out, tokens[:, 0])
    assert isinstance(net.head, torch.nn.Identity)  # no classifier


def test_vit_small_16_parameter_count_is_timms_and_the_known_figure():
    with torch.device("meta"):
        ours, _ = build_backbone({"name": "vit_small"}, input_shape=(3, 224, 224))
        reference = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) == 21_665_664  # DeiT-S: 22M with its head
    # 12 heads (MoCo v3's ViT-S) changes no parameter count, only how Q, K, V are split
    with torch.device("meta"):
        moco, _ = build_backbone({"name": "vit_small", "num_heads": 12}, input_shape=(3, 224, 224))
    assert sum(p.numel() for p in moco.parameters()) == count and moco.blocks[0].attn.num_heads == 12


def _manual_forward(net, x, pos_embed):
    """The ViT forward written out, with the position embedding given: patches -> tokens -> blocks -> norm."""
    patches = net.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]
    tokens = torch.cat([net.cls_token.expand(x.shape[0], -1, -1), patches], dim=1) + pos_embed
    return net.norm(net.blocks(tokens))[:, 0]


def test_position_embedding_is_the_identity_at_the_built_size_and_interpolated_elsewhere():
    net, dim = _vit(size=16)  # built for a 4x4 grid
    net.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 16, 16)
        # at the built size: the stored embedding itself, bitwise
        assert torch.equal(net(x), _manual_forward(net, x, net.pos_embed))
        # another size (multi-crop's small crops): 8 px -> a 2x2 grid, bicubic from the 4x4 grid, the class
        # token's entry kept as it is
        small = torch.randn(2, 3, 8, 8)
        out = net(small)
        assert out.shape == (2, dim) and torch.isfinite(out).all()
        grid = net.pos_embed[:, 1:].reshape(1, 4, 4, dim).permute(0, 3, 1, 2)
        resized = F.interpolate(grid, size=(2, 2), mode="bicubic", antialias=True, align_corners=False)
        pos = torch.cat([net.pos_embed[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 4, dim)], dim=1)
        torch.testing.assert_close(out, _manual_forward(net, small, pos))
        # and larger (a 224 px model shown 256 px): a 6x6 grid
        assert net(torch.randn(1, 3, 24, 24)).shape == (1, dim)


def test_sincos_embedding_equals_the_formula():
    grid, dim = 3, 8
    emb = sincos_position_embedding(grid, dim)
    assert emb.shape == (grid * grid, dim)
    quarter = dim // 4
    for r in range(grid):
        for c in range(grid):
            row = emb[r * grid + c]
            for i in range(quarter):
                w = 10000.0 ** (-i / quarter)
                expected = [math.sin(r * w), math.cos(r * w), math.sin(c * w), math.cos(c * w)]
                got = [row[i], row[quarter + i], row[2 * quarter + i], row[3 * quarter + i]]
                for g, e in zip(got, expected):
                    assert g.item() == pytest.approx(e, abs=1e-6)


def test_sincos_option_is_fixed_and_zero_for_the_class_token():
    net, dim = _vit(position_embedding="sincos")
    assert not net.pos_embed.requires_grad
    assert torch.equal(net.pos_embed[0, 0], torch.zeros(dim))
    assert torch.equal(net.pos_embed[0, 1:], sincos_position_embedding(4, dim))
    with pytest.raises(ConfigError, match="divisible by 4"):
        sincos_position_embedding(4, 10)


def test_frozen_patch_projection_gets_no_gradient_and_does_not_move():
    from contrastive.config import OptimConfig
    from contrastive.optim.optimizers import build_optimizer

    net, _ = _vit(freeze_patch_embed=True, init="xavier")
    proj = net.patch_embed.proj
    before = proj.weight.detach().clone(), proj.bias.detach().clone()
    opt = build_optimizer(net, OptimConfig(name="adamw", weight_decay=0.1), lr=1e-2)
    net.train()
    net(torch.randn(2, 3, 16, 16)).pow(2).sum().backward()
    assert proj.weight.grad is None and proj.bias.grad is None
    assert net.blocks[0].attn.qkv.weight.grad is not None  # the rest learns
    opt.step()
    assert torch.equal(proj.weight, before[0]) and torch.equal(proj.bias, before[1])
    # the frozen projection is MoCo v3's random xavier-uniform one, over C * p * p inputs
    bound = math.sqrt(6.0 / (3 * 4 * 4 + 192))
    assert proj.weight.abs().max() <= bound and proj.weight.abs().max() > 0.9 * bound
    assert torch.equal(proj.bias, torch.zeros(192))


def test_channels_last_input_and_weights_give_the_same_features():
    net, _ = _vit()
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
        net = net.to(memory_format=torch.channels_last)
        out = net(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fields,match", [
    ({"patch_size": 5}, "patch_size=5 does not divide the 16 px views"),
    ({"position_embedding": "rope"}, "position_embedding='rope'"),
    ({"init": "zeros"}, "init='zeros'"),
    ({"num_heads": 5}, "num_heads=5 does not divide"),
    ({"drop_path_rate": 1.0}, "drop_path_rate=1.0 is out of range"),
])
def test_bad_fields_name_the_field(fields, match):
    with pytest.raises(ConfigError, match=match):
        _vit(**fields)


def test_without_timm_a_vit_names_the_extra_and_convnets_still_build(monkeypatch):
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'contrastive\[vit\]'"):
        _vit()
    net, dim = build_backbone({"name": "small_cnn"}, input_shape=(3, 32, 32))
    assert dim == 256


@pytest.mark.slow
def test_vit_encoder_round_trips_through_encoder_pt_and_checkpoint_pt(tmp_path):
    """api.load_encoder rebuilds the method on the meta device and assigns the saved tensors: a ViT with a
    fixed sin-cos embedding and a frozen projection (parameters without gradient) must come back whole."""
    from contrastive import api
    from contrastive.configure import resolve_config
    from contrastive.training.checkpoint import load_checkpoint

    cfg = resolve_config(tree={"data": {"name": "digits"}}, overrides=[
        "method.name=moco-v3", "backbone.name=vit_tiny", "backbone.patch_size=4",
        "backbone.position_embedding=sincos", "backbone.freeze_patch_embed=true", "data.image_size=8",
        "method.hidden_dim=32", "method.projection_dim=16", "train.batch_size=32", "train.epochs=1",
        "train.max_steps=1", "train.progress=false", "eval.enabled=false", f"train.output={tmp_path}"])
    api.pretrain(cfg)
    state = load_checkpoint(tmp_path / "checkpoint.pt")["method"]
    trained = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    x = torch.randn(2, 1, 8, 8)
    features = []
    for which in ("encoder.pt", "checkpoint.pt"):
        encoder, info = api.load_encoder(tmp_path / which)
        assert info["feature_dim"] == 192
        assert not [n for n, t in [*encoder.named_parameters(), *encoder.named_buffers()] if t.is_meta]
        assert not encoder.pos_embed.requires_grad and not encoder.patch_embed.proj.weight.requires_grad
        loaded = encoder.state_dict()
        assert loaded.keys() == trained.keys()
        for k in trained:
            assert torch.equal(loaded[k], trained[k]), k
        with torch.no_grad():
            features.append(encoder(x))
    assert torch.equal(features[0], features[1])
