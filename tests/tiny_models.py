"""Small hand-written networks in different coding styles, shared by the tests.

Each entry of TINY_MODELS says how many residual blocks a correct pass must find, so one
parametrized test can drive them all (the habit of peft's test_custom_models).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout))


class FunctionalBlock(nn.Module):
    """``F.relu(branch + shortcut)`` with a projection shortcut (1x1 conv + BN) when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.proj is None else self.proj(x)
        return F.relu(out + shortcut)


class FunctionalResNet(nn.Module):
    """Functional adds, stages as nested nn.Sequential, projection shortcuts on downsampling."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.Sequential(
            nn.Sequential(FunctionalBlock(16, 16), FunctionalBlock(16, 16)),
            nn.Sequential(FunctionalBlock(16, 32, 2), FunctionalBlock(32, 32)),
            nn.Sequential(FunctionalBlock(32, 64, 2)),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InplaceBottleneck(nn.Module):
    """torchvision style: ``out += identity`` and ``nn.ReLU(inplace=True)`` shared by three calls."""

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class InplaceResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(InplaceBottleneck(32, 8), InplaceBottleneck(32, 8))
        self.layer2 = nn.Sequential(InplaceBottleneck(32, 16, 2), InplaceBottleneck(64, 16))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean((2, 3)))


class MethodAddBlock(nn.Module):
    """``out.add_(x)`` whose result is never used by name, and ``torch.add`` for the next block."""

    def __init__(self, channels: int, use_torch_add: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), nn.ReLU(), conv_bn(channels, channels))
        self.use_torch_add = use_torch_add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.use_torch_add:
            return torch.relu(torch.add(out, x))
        out.add_(x)
        return torch.relu(out)


class MethodAddNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.blocks = nn.ModuleList([MethodAddBlock(16, use_torch_add=i % 2 == 1) for i in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


class RootResidualNet(nn.Module):
    """Residual additions written in the root forward itself; the shortcut comes first in the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(x + self.a2(F.relu(self.a1(x))))
        x = F.relu(x + self.b2(F.relu(self.b1(x))))
        return x


class PlainNet(nn.Module):
    """No residual addition at all: a VGG-like stack with one non-residual add of parallel convs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.left, self.right = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.left(x) + self.right(x)


@dataclass(frozen=True)
class TinyCase:
    name: str
    build: Callable[[], nn.Module]
    blocks: int  # residual blocks a correct pass finds
    stages: int
    spatial_convs: int  # blocks whose branch has a convolution wider than 1x1 (all of them here)


TINY_MODELS = [
    TinyCase("functional_add_nested_sequential_projection", FunctionalResNet, blocks=5, stages=3, spatial_convs=5),
    TinyCase("inplace_iadd_bottleneck", InplaceResNet, blocks=4, stages=2, spatial_convs=4),
    TinyCase("method_add_and_torch_add", MethodAddNet, blocks=3, stages=1, spatial_convs=3),
    TinyCase("root_level_functional", RootResidualNet, blocks=2, stages=1, spatial_convs=2),
]


# --- one small module per pattern kind ------------------------------------------------------------


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class InceptionModule(nn.Module):
    """Four parallel branches from one input, concatenated: 8 + 16 + 8 + 8 = 40 channels."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = conv_bn_relu(cin, 8, 1)
        self.b3 = nn.Sequential(conv_bn_relu(cin, 8, 1), conv_bn_relu(8, 16, 3))
        self.b5 = nn.Sequential(conv_bn_relu(cin, 4, 1), conv_bn_relu(4, 8, 5))
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn_relu(cin, 8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], 1)


class NestedInception(nn.Module):
    """A branch that itself splits and concatenates (Inception-v3's Mixed_7b): one unit, outside."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = conv_bn_relu(cin, 8, 1)
        self.stem = conv_bn_relu(cin, 8, 1)
        self.left, self.right = conv_bn_relu(8, 8, (1, 3)[1]), conv_bn_relu(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return torch.cat([self.b1(x), torch.cat([self.left(y), self.right(y)], 1)], 1)


class InceptionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 16)
        self.mixed_a = InceptionModule(16)
        self.reduce = nn.MaxPool2d(2)
        self.mixed_b = InceptionModule(40)
        self.mixed_c = NestedInception(40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixed_c(self.mixed_b(self.reduce(self.mixed_a(self.stem(x)))))


class InceptionResidual(nn.Module):
    """Inception-ResNet: concatenated branches, a 1x1 conv, scaled, added to the input."""

    def __init__(self, channels: int, scale: float = 0.2) -> None:
        super().__init__()
        self.b1 = conv_bn_relu(channels, 8, 1)
        self.b3 = nn.Sequential(conv_bn_relu(channels, 8, 1), conv_bn_relu(8, 8, 3))
        self.project = nn.Conv2d(16, channels, 1)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(torch.cat([self.b1(x), self.b3(x)], 1))
        return F.relu(out * self.scale + x)


class InceptionResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 32)
        self.blocks = nn.Sequential(InceptionResidual(32), InceptionResidual(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


class SeparableStack(nn.Module):
    """MobileNet v1: depthwise 3x3 + BN + ReLU, then pointwise 1x1 + BN + ReLU (widening or keeping)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 16, stride=2)
        widths = [(16, 32, 1), (32, 64, 2), (64, 64, 1)]
        self.blocks = nn.Sequential(
            *[nn.Sequential(conv_bn_relu(a, a, 3, s, groups=a), conv_bn_relu(a, b, 1)) for a, b, s in widths]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


class InvertedResidual(nn.Module):
    """MobileNetV2: expand 1x1, depthwise 3x3, linear projection 1x1; a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = conv_bn_relu(cin, hidden, 1)
        self.dw = conv_bn_relu(hidden, hidden, 3, stride, groups=hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x)))
        return x + out if self.skip else out


class MobileNetV2ish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 16, stride=2)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2), InvertedResidual(24, 24, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


class VGGStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(3, 16), conv_bn_relu(16, 16), nn.MaxPool2d(2), conv_bn_relu(16, 32), conv_bn_relu(32, 32)
        )
        self.classifier = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNetV2: split the channels, transform one half, concatenate, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            conv_bn_relu(half, half, 1),
            nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            conv_bn_relu(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((left, self.branch(right)), 1), 2)


class ShuffleNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 32)
        self.blocks = nn.Sequential(ShuffleBlock(32), ShuffleBlock(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


class GatedBlock(nn.Module):
    """A residual block that already recalibrates its channels (an SE module written by hand)."""

    def __init__(self, channels: int, gated: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(channels, channels), nn.Conv2d(channels, channels, 3, padding=1))
        self.fc = nn.Conv2d(channels, channels, 1) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.fc is not None:
            out = out * torch.sigmoid(self.fc(out.mean((2, 3), keepdim=True)))
        return F.relu(out + x)


class PartlyGatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 16)
        self.blocks = nn.Sequential(GatedBlock(16, True), GatedBlock(16, False), GatedBlock(16, True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


class DenseLayer(nn.Module):
    """A DenseNet layer: new features from the concatenation of every earlier one."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(F.relu(self.bn(torch.cat(features, 1))))


class DenseNetish(nn.Module):
    """One dense block of three layers (growth 8) and the concatenation of all their features."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 16)
        self.layers = nn.ModuleList(DenseLayer(16 + 8 * i, 8) for i in range(3))
        self.head = nn.Conv2d(40, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(features))
        return self.head(torch.cat(features, 1))


@dataclass(frozen=True)
class FamilyCase:
    name: str
    build: Callable[[], nn.Module]
    rules: dict[str, int]  # units per rule at the standard position
    channels: list[int]  # channels each unit sees, in graph order


FAMILY_MODELS = [
    FamilyCase("inception_concat", InceptionNet, {"inception": 3}, [40, 40, 24]),
    FamilyCase("inception_inside_residual", InceptionResNet, {"residual": 2}, [32, 32]),
    FamilyCase("depthwise_separable_stack", SeparableStack, {"depthwise_separable": 3}, [32, 64, 64]),
    FamilyCase("inverted_residual", MobileNetV2ish, {"inverted_residual": 3}, [64, 64, 96]),
    FamilyCase("vgg_stack", VGGStack, {"plain": 4}, [16, 16, 32, 32]),
    FamilyCase("shufflenet_split_concat", ShuffleNetish, {"split_concat": 2}, [16, 16]),
    FamilyCase("densenet_layers", DenseNetish, {"dense": 3}, [8, 8, 8]),
    FamilyCase("partly_gated_residual", PartlyGatedNet, {"residual": 1}, [16]),
]


class DataDependentGate(nn.Module):
    """Branches on a tensor value: torch.fx cannot trace it, and shapes need real tensors."""

    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: torch.fx cannot trace this
            return x
        return -x


class NetWithUntraceableChild(nn.Module):
    """A residual whose branch ends in DataDependentGate: traceable only with it as a leaf."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), DataDependentGate())

    def forward(self, x):
        x = self.conv(x)
        return x + self.body(x)


class TiedResNet(FunctionalResNet):
    """FunctionalResNet whose first two blocks share their first conv's weight (tied: one parameter,
    two names), as weight-shared and recurrent backbones do."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.stages[0][1].conv1.weight = self.stages[0][0].conv1.weight


def tied_resnet() -> TiedResNet:
    return TiedResNet(num_classes=10)


class FeatureNet(FunctionalResNet):
    """A body without a classifier: pooled features out, as a backbone or a feature extractor gives them."""

    def __init__(self) -> None:
        super().__init__()
        del self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1)


class NamedHeadNet(FeatureNet):
    """A classifier under a name no convention knows (``out``): the user names it (head='out')."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.out = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(super().forward(x))


def feature_net() -> FeatureNet:
    return FeatureNet()
