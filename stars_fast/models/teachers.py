"""ANN teachers with pre-activation stage taps for STARS.

Architectures and state-dict names follow the code that trained the public checkpoints, so those
load unchanged (see checkpoints.load_teacher):

- resnet18, resnet34: the DAFL / Fast-Datafree CIFAR ResNet (datafree/models/classifiers/resnet.py):
  3x3 stem with 64 channels, no max-pool, stages of BasicBlocks at 64/128/256/512, global average pool.
  Names: conv1, bn1, layer{1..4}.{i}.conv1/bn1/conv2/bn2, layer{2,3,4}.0.shortcut.0/1, linear.
- resnet19: the CIFAR ResNet-19 of the SNN literature (tdBN, TET, MPBN), as MPBN's ANN
  `resnet19_cifar`: 3x3 stem with 128 channels, [3, 3, 2] BasicBlocks at 128/256/512, one fc.
  Names: conv1, bn1, layer{1..3}.{i}.conv1/bn1/conv2/bn2, layer{2,3}.0.downsample.0/1, fc.
- resnet20: the classic CIFAR ResNet-20 of He et al. (16/32/64 channels, [3, 3, 3] BasicBlocks), as
  RepDistiller's and Fast-Datafree's `resnet_tiny.resnet20`; names as resnet19. Its
  known accuracy (about 92 / 69 on CIFAR-10/100) matches the ResNet-20 teacher of the KDSNN / BKDSNN
  rows of the paper's Table 1 (91.77 / 68.40). Adaptive average pooling replaces its AvgPool2d(8)
  (identical at 32 px, and 64-px inputs work too).
- vgg11, vgg16: Fast-Datafree's VGG with BN (RepDistiller's vgg11_bn / vgg16_bn): block{0..4} are
  Sequentials of conv(bias)-BN-ReLU with the last ReLU left out (conv at index 3j, BN at 3j+1);
  max-pool after blocks 0-2, after block 3 only for 64-px inputs; adaptive average pool; classifier.
- digits_cnn: a small CNN for the offline default (scikit-learn digits, 1x8x8, 10 classes):
  three conv3x3-BN-ReLU stages at 16/32/64 channels with strides 1/2/2, average pool, linear
  (about 24k parameters; trains to ~97% test accuracy in a few seconds on one CPU core).

Every architecture is written once, generic over its activation `act` (a module factory): the
teachers use ReLU, the spiking students (students.py) reuse the same classes with a neuron, so a
teacher and the student of the same architecture share their state-dict names.

Taps: `model(x, return_taps=True)` returns `(logits, taps)`, one tap per stage: the stage output
after BN and the residual add, before the activation, pooled to [B, C] by stars_fast.pool_features.
Every BatchNorm is a plain nn.BatchNorm2d, so BN-statistics hooks can read its input.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.stars import pool_features

Act = Callable[[], nn.Module]


class TapNet(nn.Module):
    """Base of every model: forward(x) -> logits; forward(x, return_taps=True) -> (logits, taps).

    Subclasses define `body(x, taps)`, which returns the logits and, when `taps` is a list,
    appends each stage's pre-activation feature to it.
    """

    def forward(self, x: Tensor, return_taps: bool = False):
        if not return_taps:
            return self.body(x, None)
        taps: List[Tensor] = []
        logits = self.body(x, taps)
        return logits, [pool_features(f) for f in taps]


def conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-act-conv3x3-BN, plus the shortcut, then act.

    The shortcut is a 1x1 conv + BN where the shape changes and the identity otherwise (an empty
    Sequential); it is registered as `shortcut_name` to match the checkpoints of each family.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, act: Act, shortcut_name: str):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = act()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                     nn.BatchNorm2d(planes))
        self.shortcut_name = shortcut_name
        self.add_module(shortcut_name, shortcut)
        self.act2 = act()

    def forward(self, x: Tensor, taps: Optional[List[Tensor]] = None) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        pre = self.bn2(self.conv2(out)) + getattr(self, self.shortcut_name)(x)
        if taps is not None:
            taps.append(pre)
        return self.act2(pre)


class ResNet(TapNet):
    """CIFAR ResNet of BasicBlocks: 3x3 stem (no max-pool), stages at `widths` (stride 1 then 2),
    global average pool, linear head. Names of DAFL / Fast-Datafree (`shortcut`, `linear`)."""

    shortcut_name = "shortcut"
    head_name = "linear"

    def __init__(self, depths: Sequence[int], widths: Sequence[int], stem_width: int, num_classes: int,
                 in_channels: int = 3, act: Act = nn.ReLU):
        super().__init__()
        self.conv1 = conv3x3(in_channels, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.act = act()
        self.num_stages = len(depths)
        in_planes = stem_width
        for i, (depth, planes) in enumerate(zip(depths, widths)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_planes if j == 0 else planes, planes, stride if j == 0 else 1, act,
                                 self.shortcut_name) for j in range(depth)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_planes = planes
        self.add_module(self.head_name, nn.Linear(in_planes, num_classes))

    def body(self, x: Tensor, taps: Optional[List[Tensor]]) -> Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            stage = getattr(self, f"layer{i}")
            for block in stage[:-1]:
                x = block(x)
            x = stage[-1](x, taps)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return getattr(self, self.head_name)(x)


class ResNetCifar(ResNet):
    """The same network under the names of RepDistiller / MPBN (`downsample`, `fc`)."""

    shortcut_name = "downsample"
    head_name = "fc"


VGG_CONFIGS = {
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
}


class VGG(TapNet):
    """Fast-Datafree's VGG with BN: five blocks of conv(bias)-BN-act, each block's last act applied
    outside its Sequential (so the block output is the pre-activation tap)."""

    def __init__(self, config: Sequence[Sequence[int]], num_classes: int, in_channels: int = 3, act: Act = nn.ReLU):
        super().__init__()
        for b, widths in enumerate(config):
            layers: List[nn.Module] = []
            for width in widths:
                layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), act()]
                in_channels = width
            self.add_module(f"block{b}", nn.Sequential(*layers[:-1]))
        self.num_blocks = len(config)
        self.acts = nn.ModuleList(act() for _ in config)
        self.classifier = nn.Linear(in_channels, num_classes)

    def body(self, x: Tensor, taps: Optional[List[Tensor]]) -> Tensor:
        large = x.shape[2] == 64  # Fast-Datafree pools once more for 64-px inputs (Tiny-ImageNet)
        for b in range(self.num_blocks):
            x = getattr(self, f"block{b}")(x)
            if taps is not None:
                taps.append(x)
            x = self.acts[b](x)
            if b < 3 or (b == 3 and large):
                x = F.max_pool2d(x, kernel_size=2, stride=2)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


class DigitsCNN(TapNet):
    """Small CNN for 8x8 digits: three conv3x3-BN-act stages (strides 1, 2, 2), average pool, linear."""

    widths = (16, 32, 64)

    def __init__(self, num_classes: int, in_channels: int = 1, act: Act = nn.ReLU):
        super().__init__()
        stages = []
        for i, width in enumerate(self.widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(conv3x3(in_channels, width, stride), nn.BatchNorm2d(width)))
            in_channels = width
        self.stages = nn.ModuleList(stages)
        self.acts = nn.ModuleList(act() for _ in self.widths)
        self.linear = nn.Linear(in_channels, num_classes)

    def body(self, x: Tensor, taps: Optional[List[Tensor]]) -> Tensor:
        for stage, act in zip(self.stages, self.acts):
            x = stage(x)
            if taps is not None:
                taps.append(x)
            x = act(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(x)


# name -> (class, architecture arguments); the class takes (*arguments, num_classes, in_channels, act).
# students.py builds the spiking students from the same entries.
ARCHITECTURES = {
    "resnet18": (ResNet, ((2, 2, 2, 2), (64, 128, 256, 512), 64)),
    "resnet34": (ResNet, ((3, 4, 6, 3), (64, 128, 256, 512), 64)),
    "resnet19": (ResNetCifar, ((3, 3, 2), (128, 256, 512), 128)),
    "resnet20": (ResNetCifar, ((3, 3, 3), (16, 32, 64), 16)),
    "vgg11": (VGG, (VGG_CONFIGS["vgg11"],)),
    "vgg16": (VGG, (VGG_CONFIGS["vgg16"],)),
    "digits_cnn": (DigitsCNN, ()),
}
TEACHERS = tuple(ARCHITECTURES)


def build_teacher(name: str, num_classes: int, in_channels: int = 3) -> TapNet:
    """Build an ANN teacher by name (one of TEACHERS), randomly initialised."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown teacher {name!r}; expected one of {TEACHERS}")
    cls, arguments = ARCHITECTURES[name]
    return cls(*arguments, num_classes, in_channels)
