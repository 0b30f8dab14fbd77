"""ResNet-18 and ResNet-50 for small (32x32) images.

The ImageNet ResNet shrinks its input 4x in the stem (7x7 stride-2 conv and a
max-pool); on 32x32 images that would leave 8x8 feature maps before the first
stage. The CIFAR variant used here keeps full resolution in the stem (one 3x3
stride-1 conv, no max-pool), so the four stages run at 32, 16, 8 and 4 pixels.

Small-image adapter: the embedded image set (scikit-learn digits) is 8x8 with
one channel. With input_size != 32 the input is resized to 32x32 (bilinear)
before the stem, so the same architecture, and the same stage resolutions,
serve both data sets; in_channels sets the stem's input channels.

Zero-initialised residual gamma: the last BatchNorm of every residual branch
starts with weight 0, so each block starts as the identity on its shortcut
(Goyal et al. 2017, "Accurate, Large Minibatch SGD"). The network then starts
as a shallow one and the signal does not grow with depth, which makes the
first steps stable at large learning rates and batch sizes. The gammas
receive gradient at the first step, so the branches open up right away.
"""

import torch.nn as nn
import torch.nn.functional as F


def conv3x3(in_ch, out_ch, stride=1):
    # No bias: every conv is followed by BatchNorm, whose shift makes a bias redundant.
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch, out_ch, stride=1):
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def shortcut(in_ch, out_ch, stride):
    """Identity when shapes match, else a strided 1x1 projection (option B of the paper)."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch, planes, stride=1):
        super().__init__()
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut(in_ch, planes, stride)

    @property
    def last_bn(self):
        return self.bn2

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch, planes, stride=1):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        # Stride on the 3x3 conv rather than the first 1x1 ("ResNet v1.5"): a strided
        # 1x1 conv would discard three quarters of its input.
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = shortcut(in_ch, out_ch, stride)

    @property
    def last_bn(self):
        return self.bn3

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    # The optimizer keeps the classifier dense under SPAM's sparse momentum.
    dense_only_modules = ("fc",)

    def __init__(self, block, layers, num_classes, in_channels=3, input_size=32, base_width=64,
                 zero_init_residual=True):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels),
                            ("input_size", input_size), ("base_width", base_width)):
            if value < 1:
                raise ValueError(f"ResNet {name} must be >= 1, got {value}")
        self.input_size = input_size
        self.stem = nn.Sequential(conv3x3(in_channels, base_width), nn.BatchNorm2d(base_width), nn.ReLU())
        stages = []
        in_ch = base_width
        for i, n_blocks in enumerate(layers):
            planes = base_width * 2 ** i
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(block(in_ch, planes, stride))
                in_ch = planes * block.expansion
        self.blocks = nn.Sequential(*stages)
        self.fc = nn.Linear(in_ch, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for b in self.blocks:
                nn.init.zeros_(b.last_bn.weight)

    def forward(self, x):
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"expected {self.input_size}x{self.input_size} images, got {tuple(x.shape[-2:])}")
        if self.input_size != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        x = self.blocks(self.stem(x))
        x = x.mean(dim=(2, 3))  # global average pool
        return self.fc(x)


def resnet18(num_classes, **kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, **kwargs)


def resnet50(num_classes, **kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, **kwargs)


def build_resnet(cfg, num_classes, in_channels=3, input_size=32) -> ResNet:
    """ResNet from settings: cfg.MODEL_RESNET18 / cfg.MODEL_RESNET50 pick the depth,
    cfg.RESNET_BASE_WIDTH the width of the first stage."""
    kwargs = dict(in_channels=in_channels, input_size=input_size, base_width=cfg.RESNET_BASE_WIDTH)
    if cfg.MODEL_RESNET18:
        return resnet18(num_classes, **kwargs)
    if cfg.MODEL_RESNET50:
        return resnet50(num_classes, **kwargs)
    raise ValueError("build_resnet: settings select no ResNet (MODEL_RESNET18 and MODEL_RESNET50 are both off)")
