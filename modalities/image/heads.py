"""Heads on top of a backbone: SimCLR's projection MLP, the BYOL/SimSiam predictor, and a light
FPN/U-Net-style segmentation decoder over the backbone's feature maps.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def _positive_int(name: str, value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int ({what}), got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 ({what}), got {value}")
    return value


class ProjectionHead(nn.Module):
    r"""The projection MLP g(h) of SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive
    Learning of Visual Representations", Sec. 2.1: g(h) = W2 ReLU(W1 h), with BatchNorm after
    W1 as in its code), generalised to the heads of the other methods:

        layers - 1 times [Linear(hidden) - BatchNorm1d - ReLU], then Linear(out)
        [- BatchNorm1d(out, affine=False) if last_batch_norm]

    ``batch_norm=False`` drops the hidden BatchNorms (MoCo v2's and SupCon's Linear-ReLU-Linear);
    ``layers=3`` is Barlow Twins' and VICReg's projector; ``last_batch_norm=True`` SimSiam's
    (Chen and He 2021). A Linear followed by a BatchNorm has no bias (the BatchNorm's shift
    replaces it).

    Args:
        in_dim: input features (the backbone's ``feature_dim``).
        hidden_dim: width of the hidden layers.
        out_dim: output features.
        layers: number of Linear layers, >= 1 (1: a single Linear).
        batch_norm: BatchNorm1d after each hidden Linear.
        last_batch_norm: a BatchNorm1d without affine parameters on the output.

    Shapes: (n, in_dim) -> (n, out_dim).

    Example:
        >>> head = ProjectionHead(512, 512, 128)
        >>> head(torch.randn(16, 512)).shape
        torch.Size([16, 128])
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128, *, layers: int = 2,
                 batch_norm: bool = True, last_batch_norm: bool = False) -> None:
        super().__init__()
        _positive_int("in_dim", in_dim, "input features")
        _positive_int("hidden_dim", hidden_dim, "width of the hidden layers")
        _positive_int("out_dim", out_dim, "output features")
        _positive_int("layers", layers, "number of Linear layers")
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(layers - 1):
            blocks.append(nn.Linear(width, hidden_dim, bias=not batch_norm))
            if batch_norm:
                blocks.append(nn.BatchNorm1d(hidden_dim))
            blocks.append(nn.ReLU(inplace=True))
            width = hidden_dim
        blocks.append(nn.Linear(width, out_dim, bias=not last_batch_norm))
        if last_batch_norm:
            blocks.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*blocks)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PredictionHead(nn.Module):
    r"""The predictor q of BYOL (Grill et al. 2020, Sec. 3.3: Linear(4096) - BatchNorm - ReLU -
    Linear(256)) and of SimSiam (Chen and He 2021, Sec. 4: a bottleneck Linear - BN - ReLU -
    Linear):

        Linear(in_dim, hidden_dim, no bias) - BatchNorm1d - ReLU - Linear(hidden_dim, out_dim)

    Shapes: (n, in_dim) -> (n, out_dim).

    Example:
        >>> PredictionHead(128, 512, 128)(torch.randn(16, 128)).shape
        torch.Size([16, 128])
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        _positive_int("in_dim", in_dim, "input features")
        _positive_int("hidden_dim", hidden_dim, "width of the hidden layer")
        _positive_int("out_dim", out_dim, "output features")
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SegmentationHead(nn.Module):
    r"""A light top-down decoder (FPN-style, Lin et al. 2017; the U-Net idea of Ronneberger et
    al. 2015 of merging every stride's map on the way up) over a backbone's ``forward_maps``:

        y = smooth_L(lateral_L(m_L))                                     deepest map
        y = smooth_i(upsample(y, size of m_i) + lateral_i(m_i))          i = L-1 .. 1
        logits = upsample(classifier(y), input size)                     bilinear

    with lateral_i a 1 x 1 convolution to ``width`` channels, smooth_i a 3 x 3 conv - BN - ReLU,
    the classifier a 1 x 1 convolution. Upsampling goes to the next map's actual size, so odd
    input sizes (33 px: maps of 33, 17, 9, 5) need no cropping.

    Args:
        map_channels: channels of each map, shallow to deep (``Backbone.map_channels``).
        map_strides: their strides (``Backbone.map_strides``), increasing.
        num_classes: output classes K (logit channels), >= 1.
        width: channels of the decoder.

    ``forward(maps, size=None)``: maps as ``Backbone.forward_maps`` returns them; ``size`` the
    (H, W) of the input images; None takes ``map_strides[0]`` times the first map's size (exact
    when the first stride is 1 or divides H and W). Returns (n, K, H, W) logits.
    :class:`SegmentationModel` pairs a backbone with this head and passes the size itself.

    Example:
        >>> from modalities.image.backbones import build_backbone
        >>> net = build_backbone("small_cnn", cifar_stem=True)
        >>> head = SegmentationHead(net.map_channels, net.map_strides, num_classes=11)
        >>> x = torch.randn(2, 3, 33, 33)
        >>> head(net.forward_maps(x), size=x.shape[-2:]).shape
        torch.Size([2, 11, 33, 33])
    """

    def __init__(self, map_channels: Sequence[int], map_strides: Sequence[int], num_classes: int,
                 width: int = 64) -> None:
        super().__init__()
        map_channels, map_strides = list(map_channels), list(map_strides)
        if not map_channels or len(map_channels) != len(map_strides):
            raise ValueError(
                f"map_channels and map_strides must be non-empty and of equal length (one per feature map), "
                f"got map_channels={map_channels}, map_strides={map_strides}"
            )
        for i, c in enumerate(map_channels):
            _positive_int(f"map_channels[{i}]", c, "channels of a feature map")
        for i, s in enumerate(map_strides):
            _positive_int(f"map_strides[{i}]", s, "stride of a feature map")
        if any(b < a for a, b in zip(map_strides, map_strides[1:])):
            raise ValueError(f"map_strides must not decrease (maps shallow to deep), got {map_strides}")
        _positive_int("num_classes", num_classes, "number of segmentation classes")
        _positive_int("width", width, "channels of the decoder")
        self.map_channels, self.map_strides, self.num_classes = map_channels, map_strides, num_classes
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, kernel_size=1) for c in map_channels)
        self.smooth = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(width),
                          nn.ReLU(inplace=True))
            for _ in map_channels
        )
        self.classifier = nn.Conv2d(width, num_classes, kernel_size=1)

    def forward(self, maps: Sequence[Tensor], size: Sequence[int] | None = None) -> Tensor:
        if len(maps) != len(self.map_channels):
            raise ValueError(f"maps: expected {len(self.map_channels)} feature maps, got {len(maps)}")
        for i, (m, c) in enumerate(zip(maps, self.map_channels)):
            if m.dim() != 4 or m.shape[1] != c:
                raise ValueError(f"maps[{i}] must have shape (n, {c}, h, w), got shape {tuple(m.shape)}")
        if size is None:
            size = (maps[0].shape[-2] * self.map_strides[0], maps[0].shape[-1] * self.map_strides[0])
        size = (int(size[0]), int(size[1]))
        y = self.smooth[-1](self.lateral[-1](maps[-1]))
        for i in range(len(maps) - 2, -1, -1):
            up = F.interpolate(y, size=maps[i].shape[-2:], mode="bilinear", align_corners=False)
            y = self.smooth[i](up + self.lateral[i](maps[i]))
        logits = self.classifier(y)
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


class SegmentationModel(nn.Module):
    """A backbone and a :class:`SegmentationHead`: (n, 3, H, W) images -> (n, K, H, W) logits.

    Example:
        >>> from modalities.image.backbones import build_backbone
        >>> net = build_backbone("small_cnn")
        >>> model = SegmentationModel(net, SegmentationHead(net.map_channels, net.map_strides, 11))
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 11, 32, 32])
    """

    def __init__(self, encoder: nn.Module, head: SegmentationHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder.forward_maps(x), size=x.shape[-2:])


__all__ = ["PredictionHead", "ProjectionHead", "SegmentationHead", "SegmentationModel"]
