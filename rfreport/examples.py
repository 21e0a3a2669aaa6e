"""Small example architectures, each chosen to show a different receptive-field finding.

configs/examples.toml audits them (the default of `make report`). All are fast on CPU at the
sizes used there. Each factory documents the finding it was chosen for.
"""

from __future__ import annotations

import torch
from torch import nn


def seed_convs(in_channels: int = 1) -> nn.Module:
    """Build the seed README's conv stack: its (7, 1) kernel at stride 3 skips two columns in three."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, (7, 1), stride=3),
        nn.Conv2d(16, 16, 5, padding=1),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.Conv2d(16, 8, 3),
        nn.Conv2d(8, 1, 7),
    )


def _conv_block(c_in: int, c_out: int, *, stride: int = 1, dilation: int = 1, padding_mode: str = "zeros",
                norm: bool = False) -> nn.Sequential:
    """A 3x3 convolution ('same' padding at stride 1), optionally batch-normalised, then ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation,
                                         padding_mode=padding_mode, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def dilated_net(in_channels: int = 3, width: int = 8, dilation: int = 2, depth: int = 3) -> nn.Module:
    """Build 3x3 convs of one dilation rate: the gridding artefact, a chequered RF (fill about 1/4)."""
    blocks = [_conv_block(in_channels if i == 0 else width, width, dilation=dilation) for i in range(depth)]
    return nn.Sequential(*blocks, nn.Conv2d(width, 1, 1))


def circular_net(in_channels: int = 3, width: int = 8, depth: int = 4) -> nn.Module:
    """Build circular-padded convs: RFs of border positions wrap round to the opposite border."""
    blocks = [_conv_block(in_channels if i == 0 else width, width, stride=1 + i % 2, padding_mode="circular")
              for i in range(depth)]
    return nn.Sequential(*blocks)


class UNet(nn.Module):
    """A two-level U-Net: max-pool encoder, nearest-upsampling decoder, concatenated skips.

    Two nearest upsamplings make the RF box move in steps of 4 input pixels every 4 output
    positions: a non-affine map from position to RF.
    """

    def __init__(self, in_channels: int = 3, width: int = 4, out_channels: int = 2):
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.enc1 = nn.Sequential(_conv_block(in_channels, w1), _conv_block(w1, w1))
        self.enc2 = nn.Sequential(nn.MaxPool2d(2), _conv_block(w1, w2), _conv_block(w2, w2))
        self.bottom = nn.Sequential(nn.MaxPool2d(2), _conv_block(w2, w3), _conv_block(w3, w3))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec2 = nn.Sequential(_conv_block(w3 + w2, w2), _conv_block(w2, w2))
        self.dec1 = nn.Sequential(_conv_block(w2 + w1, w1), _conv_block(w1, w1))
        self.head = nn.Conv2d(w1, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode, decode with skips, and map to per-pixel outputs."""
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        d2 = self.dec2(torch.cat([self.up(self.bottom(e2)), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up(d2), e1], dim=1))
        return self.head(d1)


def unet(in_channels: int = 3, width: int = 4, out_channels: int = 2) -> nn.Module:
    """Build the example U-Net: a full-resolution output whose RF moves in blocks of four positions."""
    return UNet(in_channels, width, out_channels)


class BasicBlock(nn.Module):
    """A ResNet basic block: two batch-normalised 3x3 convs plus an identity or 1x1 strided shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(_conv_block(c_in, c_out, stride=stride, norm=True),
                                  nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the residual to the shortcut and apply ReLU."""
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """Stem, three residual stages, global pooling and a classifier; `stages` is the spatial feature map."""

    def __init__(self, in_channels: int, width: int, blocks: int, num_classes: int):
        super().__init__()
        self.stem = _conv_block(in_channels, width, norm=True)
        stages, c_in = [], width
        for i, stride in enumerate((1, 2, 2)):
            c_out = width * 2 ** i
            stages += [BasicBlock(c_in if b == 0 else c_out, c_out, stride if b == 0 else 1) for b in range(blocks)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        return self.head(self.stages(self.stem(x)))


def resnet_small(in_channels: int = 3, width: int = 8, blocks: int = 2, num_classes: int = 10) -> nn.Module:
    """Build a CIFAR-style ResNet (analyse `stages`): at 32x32 its RF outgrows the input, all positions see padding."""
    return ResNetSmall(in_channels, width, blocks, num_classes)


def transposed_decoder(in_channels: int = 3, width: int = 8) -> nn.Module:
    """Build a strided encoder and stride-2 transposed decoder: a checkerboard, RF sizes alternate with parity."""
    return nn.Sequential(
        _conv_block(in_channels, width, stride=2), _conv_block(width, width, stride=2),
        nn.ConvTranspose2d(width, width, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
        nn.ConvTranspose2d(width, 1, 3, stride=2, padding=1, output_padding=1),
    )


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: channel gates computed from the global average of the feature map."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels // reduction, 1), nn.ReLU(),
                                  nn.Conv2d(channels // reduction, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale each channel by its gate."""
        return x * self.gate(x)


def se_net(in_channels: int = 3, width: int = 8, depth: int = 3) -> nn.Module:
    """Build convs and a squeeze-and-excitation block: every RF is global, the local RF under it small."""
    blocks = [_conv_block(in_channels if i == 0 else width, width, stride=2 if i else 1) for i in range(depth)]
    return nn.Sequential(*blocks, SqueezeExcite(width), nn.Conv2d(width, 4, 1))
