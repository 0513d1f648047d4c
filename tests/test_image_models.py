"""modalities.image.backbones, .heads and .momentum: output shapes of every backbone at 32 and
64 px (and 33 px, where strides do not divide), the CIFAR stem, the maps' strides, the heads,
the segmentation head at odd sizes, the cosine momentum schedule and the EMA update, and bad
arguments. ResNet-50 is built once (it takes a second), always with ``weights=None``.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from modalities.image import backbones as bb
from modalities.image.backbones import BACKBONES, build_backbone
from modalities.image.heads import PredictionHead, ProjectionHead, SegmentationHead, SegmentationModel
from modalities.image.momentum import cosine_momentum, update_momentum

FEATURE_DIM = {"small_cnn": 256, "resnet18": 512, "resnet50": 2048}
MAP_CHANNELS = {"small_cnn": [32, 64, 128, 256], "resnet18": [64, 128, 256, 512],
                "resnet50": [256, 512, 1024, 2048]}


def _no_download(*args, **kwargs):
    raise AssertionError("a backbone tried to download weights")


def _recording_builder(original, calls: list):
    def build(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)
    return build


@pytest.fixture(scope="module")
def resnet50():
    """ResNet-50, ImageNet stem (cifar_stem None -> False), built once, with the torchvision
    builder recorded (it must get weights=None) and downloads made to fail."""
    calls: list[dict] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "load_state_dict_from_url", _no_download)
        mp.setattr(torchvision.models, "resnet50", _recording_builder(torchvision.models.resnet50, calls))
        torch.manual_seed(0)
        net = build_backbone("resnet50").eval()
    assert calls == [{"weights": None}]
    return net


@pytest.fixture(scope="module")
def small_backbones():
    """small_cnn and resnet18 with both stems, built once."""
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "load_state_dict_from_url", _no_download)
        return {(name, stem): build_backbone(name, cifar_stem=stem).eval()
                for name in ("small_cnn", "resnet18") for stem in (True, False)}


def _get(name: str, stem: bool, small_backbones, request) -> bb.Backbone:
    if name == "resnet50":
        assert stem is False
        return request.getfixturevalue("resnet50")
    return small_backbones[name, stem]


CASES = [(name, stem) for name in ("small_cnn", "resnet18") for stem in (True, False)] + [("resnet50", False)]


@pytest.mark.parametrize("name,stem", CASES)
def test_backbone_shapes_and_strides(name, stem, small_backbones, request):
    net = _get(name, stem, small_backbones, request)
    assert net.name == name and net.cifar_stem is stem
    assert net.feature_dim == FEATURE_DIM[name]
    assert net.map_channels == MAP_CHANNELS[name]
    first = 1 if stem else 4
    assert net.map_strides == [first, 2 * first, 4 * first, 8 * first]
    gen = torch.Generator().manual_seed(1)
    for size in (32, 64, 33):
        x = torch.randn(1, 3, size, size, generator=gen)  # one image: eval-mode BatchNorm
        with torch.no_grad():
            maps = net.forward_maps(x)
            pooled = net(x)
        assert len(maps) == len(net.map_channels)
        for m, c, s in zip(maps, net.map_channels, net.map_strides):
            # every stride-2 layer pads by its half-width: ceil(size / stride) positions
            assert tuple(m.shape) == (1, c, math.ceil(size / s), math.ceil(size / s)), (size, s)
        assert tuple(pooled.shape) == (1, net.feature_dim)
        torch.testing.assert_close(pooled, maps[-1].mean(dim=(2, 3)))


def test_cifar_stem_is_3x3_stride_1_without_max_pool(small_backbones, resnet50):
    cifar, imagenet = small_backbones["resnet18", True], small_backbones["resnet18", False]
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1) and cifar.conv1.padding == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in cifar.modules())
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert any(isinstance(m, nn.MaxPool2d) for m in imagenet.modules())
    assert resnet50.conv1.kernel_size == (7, 7)  # None -> torchvision's own stem for the ResNets
    small = small_backbones["small_cnn", True]
    first = next(m for m in small.modules() if isinstance(m, nn.Conv2d))
    assert first.kernel_size == (3, 3) and first.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.modules())
    assert build_backbone("small_cnn").cifar_stem is True  # None -> the CIFAR stem for small_cnn


def test_resnet18_built_with_weights_none_and_torchvision_names(monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    monkeypatch.setattr(torchvision.models, "resnet18", _recording_builder(torchvision.models.resnet18, calls))
    net = build_backbone("resnet18", cifar_stem=False)
    assert calls == [{"weights": None}]
    # torchvision's names: its state dict (without fc) loads exactly
    reference = torchvision.models.resnet18(weights=None).state_dict()
    missing, unexpected = net.load_state_dict(reference, strict=False)
    assert missing == [] and sorted(unexpected) == ["fc.bias", "fc.weight"]


def test_small_cnn_size():
    n = bb.count_parameters(build_backbone("small_cnn", width=32))
    assert 100_000 <= n <= 500_000, n
    assert build_backbone("small_cnn", width=8).feature_dim == 64


def test_backbone_bad_arguments():
    with pytest.raises(ValueError, match=r"vgg16.*small_cnn.*resnet18.*resnet50"):
        build_backbone("vgg16")
    with pytest.raises(TypeError, match="name"):
        build_backbone(18)
    with pytest.raises(ValueError, match="width must be >= 1.*0"):
        build_backbone("small_cnn", width=0)
    with pytest.raises(TypeError, match="cifar_stem"):
        build_backbone("small_cnn", cifar_stem="yes")
    net = build_backbone("small_cnn", width=4)
    with pytest.raises(ValueError, match=r"\(n, 3, h, w\).*\(2, 1, 16, 16\)"):
        net(torch.randn(2, 1, 16, 16))
    with pytest.raises(TypeError, match="floating-point.*uint8"):
        net(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert BACKBONES == ("small_cnn", "resnet18", "resnet50")


# ----------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------
def test_projection_head_structure():
    simclr = ProjectionHead(64, 32, 16)
    kinds = [type(m) for m in simclr.net]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert simclr.net[0].bias is None and simclr.net[3].bias is not None  # BN's shift replaces the bias
    moco = ProjectionHead(64, 32, 16, batch_norm=False)
    assert [type(m) for m in moco.net] == [nn.Linear, nn.ReLU, nn.Linear]
    barlow = ProjectionHead(64, 32, 16, layers=3)
    assert [type(m) for m in barlow.net].count(nn.Linear) == 3
    simsiam = ProjectionHead(64, 32, 16, last_batch_norm=True)
    assert isinstance(simsiam.net[-1], nn.BatchNorm1d) and simsiam.net[-1].affine is False
    assert ProjectionHead(64, 32, 16, layers=1).net[0].out_features == 16
    x = torch.randn(8, 64)
    for head in (simclr, moco, barlow, simsiam):
        assert tuple(head(x).shape) == (8, 16)
    pred = PredictionHead(16, 8, 16)
    assert [type(m) for m in pred.net] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert tuple(pred(torch.randn(8, 16)).shape) == (8, 16)
    with pytest.raises(ValueError, match="layers must be >= 1.*0"):
        ProjectionHead(64, 32, 16, layers=0)
    with pytest.raises(TypeError, match="out_dim"):
        ProjectionHead(64, 32, 16.0)


@pytest.mark.parametrize("name,stem", [("small_cnn", True), ("small_cnn", False), ("resnet18", True)])
def test_segmentation_head_output_is_input_size(name, stem, small_backbones):
    net = small_backbones[name, stem]
    head = SegmentationHead(net.map_channels, net.map_strides, num_classes=5, width=16)
    model = SegmentationModel(net, head).eval()
    for h, w in ((33, 33), (32, 32), (35, 29)):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            logits = model(x)
        assert tuple(logits.shape) == (1, 5, h, w)
    if stem:  # first stride 1: size=None recovers the input size exactly
        x = torch.randn(1, 3, 33, 33)
        with torch.no_grad():
            assert tuple(head(net.forward_maps(x)).shape) == (1, 5, 33, 33)


def test_segmentation_head_trains_every_parameter():
    net = build_backbone("small_cnn", width=4)
    head = SegmentationHead(net.map_channels, net.map_strides, num_classes=3, width=8)
    model = SegmentationModel(net, head)
    x, mask = torch.randn(2, 3, 17, 17), torch.randint(0, 3, (2, 17, 17))
    nn.functional.cross_entropy(model(x), mask).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_segmentation_head_bad_arguments():
    with pytest.raises(ValueError, match="equal length"):
        SegmentationHead([8, 16], [1], num_classes=3)
    with pytest.raises(ValueError, match="must not decrease"):
        SegmentationHead([8, 16], [2, 1], num_classes=3)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        SegmentationHead([8], [1], num_classes=0)
    head = SegmentationHead([8, 16], [1, 2], num_classes=3)
    with pytest.raises(ValueError, match=r"maps\[1\].*\(n, 16, h, w\)"):
        head([torch.randn(1, 8, 4, 4), torch.randn(1, 12, 2, 2)])
    with pytest.raises(ValueError, match="expected 2 feature maps, got 1"):
        head([torch.randn(1, 8, 4, 4)])


# ----------------------------------------------------------------------------------------------
# Momentum
# ----------------------------------------------------------------------------------------------
def test_cosine_momentum_schedule():
    base, final, total = 0.99, 1.0, 10
    assert cosine_momentum(0, total, base, final) == pytest.approx(base, abs=1e-15)
    assert cosine_momentum(total, total, base, final) == pytest.approx(final, abs=1e-15)
    assert cosine_momentum(total + 5, total, base, final) == pytest.approx(final, abs=1e-15)
    for k in range(total + 1):
        # BYOL: tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2
        expected = 1 - (1 - base) * (math.cos(math.pi * k / total) + 1) / 2
        assert cosine_momentum(k, total, base) == pytest.approx(expected, rel=1e-14)
    steps = [cosine_momentum(k, total, base) for k in range(total + 1)]
    assert all(a < b for a, b in zip(steps, steps[1:]))
    assert cosine_momentum(3, 10, 0.5, 0.9) == pytest.approx(0.9 - 0.4 * (math.cos(0.3 * math.pi) + 1) / 2)
    with pytest.raises(ValueError, match="total_steps must be >= 1, got 0"):
        cosine_momentum(0, 0, 0.99)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        cosine_momentum(-1, 10, 0.99)
    with pytest.raises(ValueError, match=r"base must be in \[0, 1\].*1.5"):
        cosine_momentum(0, 10, 1.5)
    with pytest.raises(TypeError, match="step must be an int"):
        cosine_momentum(0.5, 10, 0.99)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))


def test_update_momentum_formula_on_parameters_and_buffers():
    torch.manual_seed(0)
    online = _net()
    target = copy.deepcopy(online).requires_grad_(False)
    online(torch.randn(16, 5))  # changes online's BN running statistics and counter
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    old = {k: v.clone() for k, v in target.state_dict().items()}
    m = 0.9
    update_momentum(online, target, m)
    new, cur = target.state_dict(), online.state_dict()
    for key in ("0.weight", "3.bias", "1.weight", "1.running_mean", "1.running_var"):
        torch.testing.assert_close(new[key], m * old[key] + (1 - m) * cur[key], rtol=1e-6, atol=1e-7)
        assert not torch.equal(new[key], old[key])
    assert int(new["1.num_batches_tracked"]) == int(cur["1.num_batches_tracked"]) == 1  # integer: copied
    assert all(not p.requires_grad for p in target.parameters())

    update_momentum(online, target, 1.0)  # m = 1: unchanged
    for key, value in target.state_dict().items():
        assert torch.equal(value, new[key]), key
    update_momentum(online, target, 0.0)  # m = 0: a copy
    for key, value in target.state_dict().items():
        torch.testing.assert_close(value, cur[key], rtol=0, atol=0)


def test_update_momentum_bad_arguments():
    with pytest.raises(ValueError, match=r"m must be in \[0, 1\].*1.1"):
        update_momentum(_net(), _net(), 1.1)
    with pytest.raises(ValueError, match="same parameters"):
        update_momentum(_net(), nn.Linear(5, 4), 0.9)
    with pytest.raises(ValueError, match="differ in shape"):
        update_momentum(nn.Linear(5, 4), nn.Linear(5, 3), 0.9)
