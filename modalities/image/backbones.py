"""Image backbones: torchvision's ResNet-18/50 (no weights, ever downloaded) with an optional
CIFAR stem, and a small CNN for CPU presets. Each returns global-average-pooled features and,
for segmentation heads, its feature maps at increasing stride.

    name        feature_dim   map_channels            map_strides (cifar stem / ImageNet stem)
    small_cnn   8 w           w, 2w, 4w, 8w           1, 2, 4, 8  /  4, 8, 16, 32
    resnet18    512           64, 128, 256, 512       1, 2, 4, 8  /  4, 8, 16, 32
    resnet50    2048          256, 512, 1024, 2048    1, 2, 4, 8  /  4, 8, 16, 32

A map at stride s of an H x W input has ceil(H / s) x ceil(W / s) positions (every stride-2
layer pads by its kernel's half-width).

CIFAR stem (He et al. 2016, "Deep Residual Learning for Image Recognition", Sec. 4.2, and the
SimCLR paper's CIFAR-10 setting, Chen et al. 2020, Appendix B.9): the 7 x 7 stride-2 first
convolution becomes a 3 x 3 stride-1 one and the max-pool is removed, so a 32 px image keeps a
32 x 32 map through the first stage instead of 8 x 8.
"""
from __future__ import annotations

import torchvision
from torch import Tensor, nn

BACKBONES = ("small_cnn", "resnet18", "resnet50")


def _check_images(x: object) -> Tensor:
    """(n, 3, h, w) floating point, checked from the shape alone (no host synchronisation)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of images (n, 3, h, w), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x must have shape (n, 3, h, w) (RGB images), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(
            f"x must be a floating-point tensor (normalised images), got dtype {x.dtype}; "
            "uint8 images go through the transforms of modalities.image.transforms first"
        )
    return x


class Backbone(nn.Module):
    """An image encoder: ``forward`` gives pooled features (n, feature_dim), ``forward_maps``
    the feature maps [(n, map_channels[i], ceil(h / map_strides[i]), ceil(w / map_strides[i]))],
    strides increasing; the last map is the one ``forward`` average-pools.

    Attributes:
        name: one of :data:`BACKBONES`.
        feature_dim: size of the pooled feature.
        map_channels, map_strides: channels and stride of each map of ``forward_maps``.
        cifar_stem: whether the stem is the CIFAR one (3 x 3 stride-1 convolution, no max-pool).
    """

    name: str
    feature_dim: int
    map_channels: list[int]
    map_strides: list[int]
    cifar_stem: bool

    def _stem(self, x: Tensor) -> Tensor:
        """What runs before the first map's stage (identity unless overridden)."""
        return x

    def _stages(self) -> list[nn.Module]:  # pragma: no cover - abstract
        """The modules whose outputs are the maps, in order."""
        raise NotImplementedError

    def forward_maps(self, x: Tensor) -> list[Tensor]:
        """(n, 3, h, w) float images -> the feature maps, shallow to deep."""
        x = self._stem(_check_images(x))
        maps = []
        for stage in self._stages():
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x: Tensor) -> Tensor:
        """(n, 3, h, w) float images -> (n, feature_dim): the last map, averaged over positions
        (the earlier maps are not kept, so inference holds one map at a time)."""
        x = self._stem(_check_images(x))
        for stage in self._stages():
            x = stage(x)
        return x.mean(dim=(2, 3))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, feature_dim={self.feature_dim}, cifar_stem={self.cifar_stem}"


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    # no conv bias: the BatchNorm's shift replaces it
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(Backbone):
    """Four conv-BN-ReLU blocks of width w, 2w, 4w, 8w channels (3 x 3 kernels), the last three
    with stride 2; about 0.39 M parameters at w = 32, some 15 M multiply-adds per 32 px image
    (a ResNet-18 with the CIFAR stem needs 0.56 G), so a CPU trains it in minutes.

    ``cifar_stem=False`` (images well above 64 px) makes the first block stride 2 and adds a
    3 x 3 stride-2 max-pool, as ResNet's ImageNet stem does, so the maps are at strides 4..32.

    Example:
        >>> net = SmallCNN(width=32)
        >>> net(torch.randn(8, 3, 32, 32)).shape
        torch.Size([8, 256])
    """

    def __init__(self, width: int = 32, *, cifar_stem: bool = True) -> None:
        super().__init__()
        self.name, self.cifar_stem = "small_cnn", cifar_stem
        channels = [width, 2 * width, 4 * width, 8 * width]
        stem: list[nn.Module] = [_conv_bn_relu(3, channels[0], stride=1 if cifar_stem else 2)]
        if not cifar_stem:
            stem.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.stages = nn.ModuleList(
            [nn.Sequential(*stem)] + [_conv_bn_relu(channels[i - 1], channels[i], stride=2) for i in range(1, 4)]
        )
        first = 1 if cifar_stem else 4
        self.map_channels = channels
        self.map_strides = [first, 2 * first, 4 * first, 8 * first]
        self.feature_dim = channels[-1]

    def _stages(self) -> list[nn.Module]:
        return list(self.stages)


class ResNetBackbone(Backbone):
    """torchvision's ResNet-18 or ResNet-50 built with ``weights=None`` (never downloads),
    without its classifier ``fc``. The modules keep torchvision's names (``conv1``, ``bn1``,
    ``layer1`` .. ``layer4``), so a local torchvision state dict loads with
    ``load_state_dict(state, strict=False)`` (its ``fc.*`` keys are then reported as unexpected;
    with the CIFAR stem ``conv1`` differs in shape).

    Maps: the outputs of ``layer1`` .. ``layer4`` (strides 1, 2, 4, 8 with the CIFAR stem; 4, 8,
    16, 32 with the ImageNet stem).

    Example:
        >>> net = ResNetBackbone("resnet18", cifar_stem=True)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 512])
    """

    def __init__(self, name: str = "resnet18", *, cifar_stem: bool = False) -> None:
        super().__init__()
        builders = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}
        if name not in builders:
            raise ValueError(f"name={name!r} is not a ResNet backbone; expected one of {tuple(builders)}")
        net = builders[name](weights=None)
        self.name, self.cifar_stem = name, cifar_stem
        if cifar_stem:
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
            # torchvision initialises its convolutions with Kaiming normal (fan_out, relu); so here
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.map_channels = [self._out_channels(layer) for layer in self._stages()]
        first = 1 if cifar_stem else 4
        self.map_strides = [first, 2 * first, 4 * first, 8 * first]
        self.feature_dim = self.map_channels[-1]

    @staticmethod
    def _out_channels(layer: nn.Sequential) -> int:
        block = layer[-1]
        last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
        return int(last_bn.num_features)

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def _stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]


def build_backbone(name: str, *, cifar_stem: bool | None = None, width: int = 32) -> Backbone:
    """Build a backbone by name, randomly initialised (no weights are ever downloaded).

    Args:
        name: "small_cnn", "resnet18" or "resnet50".
        cifar_stem: True for the CIFAR stem (3 x 3 stride-1 first convolution, no max-pool: the
            choice for images of 64 px and less; the recipes pass ``image_size <= 64``), False
            for the ImageNet stem. None: True for small_cnn (made for small images), False for
            the ResNets (torchvision's own architecture).
        width: small_cnn's first-block channels (w; the blocks have w, 2w, 4w, 8w). The ResNets
            have fixed widths and do not use it.

    Returns:
        A :class:`Backbone` (``feature_dim``, ``forward``, ``forward_maps``, ``map_channels``,
        ``map_strides``).

    Example:
        >>> net = build_backbone("resnet18", cifar_stem=True)
        >>> net.feature_dim, net.map_strides
        (512, [1, 2, 4, 8])
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {BACKBONES}; got {type(name).__name__}")
    if name not in BACKBONES:
        raise ValueError(f"backbone name={name!r} is not one of {BACKBONES}")
    if cifar_stem is not None and not isinstance(cifar_stem, bool):
        raise TypeError(f"cifar_stem must be a bool or None, got {type(cifar_stem).__name__} {cifar_stem!r}")
    if isinstance(width, bool) or not isinstance(width, int):
        raise TypeError(f"width must be an int (small_cnn's first-block channels), got {type(width).__name__}")
    if width < 1:
        raise ValueError(f"width must be >= 1 (small_cnn's first-block channels), got {width}")
    if name == "small_cnn":
        return SmallCNN(width, cifar_stem=True if cifar_stem is None else cifar_stem)
    return ResNetBackbone(name, cifar_stem=bool(cifar_stem))


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of ``module`` (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["BACKBONES", "Backbone", "ResNetBackbone", "SmallCNN", "build_backbone", "count_parameters"]
