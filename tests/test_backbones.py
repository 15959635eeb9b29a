import pytest
import torch
from torch import nn
from torchvision import models

from contrastive.errors import ConfigError
from contrastive.nn.backbones import build_backbone
from contrastive.nn.heads import mlp, projection_head

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "small_cnn": 256}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(FEATURE_DIMS))
def test_output_shape_and_feature_dim_at_32px(name):
    torch.manual_seed(0)
    net, dim = build_backbone({"name": name}, input_shape=(3, 32, 32))
    assert dim == FEATURE_DIMS[name]
    with torch.no_grad():
        out = net.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,cifar_stem", [("resnet18", True), ("resnet18", False), ("small_cnn", None)])
def test_single_channel_input(name, cifar_stem):
    net, dim = build_backbone({"name": name, "cifar_stem": cifar_stem}, input_shape=(1, 32, 32))
    with torch.no_grad():
        out = net.eval()(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, dim)


def test_cifar_stem_is_3x3_stride_1_without_maxpool():
    net, _ = build_backbone({"name": "resnet18", "cifar_stem": True}, input_shape=(3, 224, 224))
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and net.conv1.padding == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)


@pytest.mark.parametrize("image_size,expect_cifar", [(32, True), (64, True), (96, False), (224, False)])
def test_default_stem_follows_image_size(image_size, expect_cifar):
    net, _ = build_backbone({"name": "resnet18"}, input_shape=(3, image_size, image_size))
    if expect_cifar:
        assert net.conv1.kernel_size == (3, 3) and isinstance(net.maxpool, nn.Identity)
    else:
        assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2)
        assert isinstance(net.maxpool, nn.MaxPool2d)


def test_explicit_stem_overrides_image_size():
    net, _ = build_backbone({"name": "resnet18", "cifar_stem": False}, input_shape=(3, 32, 32))
    assert net.conv1.kernel_size == (7, 7) and isinstance(net.maxpool, nn.MaxPool2d)
    small, _ = build_backbone({"name": "small_cnn", "cifar_stem": False}, input_shape=(3, 32, 32))
    assert small.features[0].stride == (2, 2)


def test_resnet18_parameter_count_is_torchvisions_without_fc():
    reference = models.resnet18(weights=None)
    expected = _count(reference) - _count(reference.fc)
    net, _ = build_backbone({"name": "resnet18", "cifar_stem": False}, input_shape=(3, 224, 224))
    assert _count(net) == expected
    cifar, _ = build_backbone({"name": "resnet18", "cifar_stem": True}, input_shape=(3, 32, 32))
    assert _count(cifar) == expected - 64 * 3 * (7 * 7 - 3 * 3)


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(ConfigError) as e:
        build_backbone({"name": "vgg11"}, input_shape=(3, 32, 32))
    for name in FEATURE_DIMS:
        assert name in str(e.value)


# --------------------------------------------------------------------------------------------------
# heads


def _types(seq: nn.Sequential) -> list[type]:
    return [type(m) for m in seq]


def test_simclr_v1_head_is_two_linears_with_relu_between():
    head = projection_head(512, 512, 128, num_layers=2, batch_norm=False)
    assert _types(head) == [nn.Linear, nn.ReLU, nn.Linear]
    assert head[0].bias is not None and head[2].bias is not None
    assert head(torch.randn(4, 512)).shape == (4, 128)


def test_simclr_v2_head_is_three_linears_with_bn_on_every_layer():
    head = projection_head(2048, 2048, 128, num_layers=3, batch_norm=True)
    assert _types(head) == [
        nn.Linear, nn.BatchNorm1d, nn.ReLU,
        nn.Linear, nn.BatchNorm1d, nn.ReLU,
        nn.Linear, nn.BatchNorm1d,
    ]  # fmt: skip
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 2048), (2048, 2048), (2048, 128)]
    assert all(m.bias is None for m in linears)  # each is followed by a BN, whose shift replaces the bias
    # the last BN as SimCLR's code has it (center=False, scale=True): a learnable scale, a shift fixed at 0
    assert head[1].affine and head[-1].weight.requires_grad and not head[-1].bias.requires_grad
    from contrastive.config import OptimConfig
    from contrastive.optim.optimizers import build_optimizer

    opt = build_optimizer(head, OptimConfig(name="sgd", weight_decay=0.1), lr=0.5)
    head.train()
    head(torch.randn(8, 2048)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(head[-1].bias, torch.zeros(128)) and not torch.equal(head[-1].weight, torch.ones(128))
    assert head(torch.randn(4, 2048)).shape == (4, 128)


def test_mlp_options():
    assert _types(mlp([8, 16, 4], batch_norm=False)) == [nn.Linear, nn.ReLU, nn.Linear]
    no_bias = mlp([8, 16, 4], batch_norm=True, bias_last=False)
    assert _types(no_bias) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert no_bias[-1].bias is None
    assert _types(mlp([8, 4], batch_norm=True, last_bn=True)) == [nn.Linear, nn.BatchNorm1d]


def test_bad_head_sizes_raise():
    with pytest.raises(ConfigError):
        projection_head(8, 8, 8, num_layers=0, batch_norm=False)
    with pytest.raises(ConfigError):
        mlp([8], batch_norm=False)
