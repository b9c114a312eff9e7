"""The U-Net of Ronneberger et al. 2015, as in the widely used Pytorch-UNet.

DoubleConv (conv3x3-BN-ReLU x2), 4 max-pool downsamplings to a 1024-channel bottleneck (at
base width 64), transposed-convolution upsampling with concatenated skips, a 1x1 convolution
to one channel of logits. 31.0M parameters at width 64; ``bilinear=True`` upsamples
bilinearly and halves the bottleneck (17.3M), as Pytorch-UNet does.

``norm`` chooses the normalisation after each convolution: ``"batch"`` (BatchNorm, as in the original U-Net scripts),
``"group"`` (GroupNorm, ``GROUPS`` groups or fewer where the width is not a multiple) or
``"instance"`` (InstanceNorm with affine parameters). GroupNorm/InstanceNorm compute the same
statistics in training and evaluation (those of the image itself), so a model cannot be good
with batch statistics and bad with the running averages used at evaluation, a mismatch that
small batches, a high learning rate and a validation set unlike the training batches all make
worse with BatchNorm. Checkpoints without ``norm`` in their model section are BatchNorm models.

Any input size works: sides that are not multiples of 16 are zero-padded inside ``forward``
(split evenly between both sides) and the logits are cropped back, so the output always has
the input's height and width.

Shape:
    input ``(N, in_channels, H, W)`` -> logits ``(N, 1, H, W)``
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DOWNSAMPLE = 16  # 2 ** number of poolings
NORMS = ("batch", "group", "instance")
GROUPS = 8  # GroupNorm groups (fewer where the channel count is not a multiple of 8)


def norm_layer(kind: str, channels: int) -> nn.Module:
    """The normalisation layer ``kind`` ('batch', 'group' or 'instance') for ``channels`` channels."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(GROUPS, channels), channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"norm={kind!r} is not valid; valid options are {', '.join(NORMS)}")


class DoubleConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None, norm: str = "batch"):
        super().__init__()
        mid_ch = mid_ch or out_ch
        self.block = nn.Sequential(
            nn.Conv2d(in_ch, mid_ch, 3, padding=1, bias=False),
            norm_layer(norm, mid_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, 3, padding=1, bias=False),
            norm_layer(norm, out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Down(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch"):
        super().__init__()
        self.block = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_ch, out_ch, norm=norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Up(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, bilinear: bool, norm: str = "batch"):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_ch, out_ch, in_ch // 2, norm=norm)
        else:
            self.up = nn.ConvTranspose2d(in_ch, in_ch // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_ch, out_ch, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net for binary segmentation.

    Args:
        in_channels: 1 (grey) or 3 (RGB) input channels.
        base_channels: width of the first level; 64 is Pytorch-UNet's 31.0M model.
        bilinear: bilinear upsampling instead of transposed convolutions.
        norm: 'batch', 'group' or 'instance' normalisation (see the module docstring).
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, bilinear: bool = False, norm: str = "batch"):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels={in_channels} is not valid; use 1 (grey) or 3 (RGB)")
        if base_channels < 1:
            raise ValueError(f"base_channels={base_channels} is not valid; it must be >= 1")
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r} is not valid; valid options are {', '.join(NORMS)}")
        self.in_channels, self.base_channels, self.bilinear, self.norm = in_channels, base_channels, bilinear, norm
        c = base_channels
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(in_channels, c, norm=norm)
        self.down1 = Down(c, 2 * c, norm)
        self.down2 = Down(2 * c, 4 * c, norm)
        self.down3 = Down(4 * c, 8 * c, norm)
        self.down4 = Down(8 * c, 16 * c // factor, norm)
        self.up1 = Up(16 * c, 8 * c // factor, bilinear, norm)
        self.up2 = Up(8 * c, 4 * c // factor, bilinear, norm)
        self.up3 = Up(4 * c, 2 * c // factor, bilinear, norm)
        self.up4 = Up(2 * c, c, bilinear, norm)
        self.outc = nn.Conv2d(c, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}; "
                f"the model was built with in_channels={self.in_channels}"
            )
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % DOWNSAMPLE, (-w) % DOWNSAMPLE
        if pad_h or pad_w:
            top, left = pad_h // 2, pad_w // 2
            x = F.pad(x, (left, pad_w - left, top, pad_h - top))
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        logits = self.outc(x)
        if pad_h or pad_w:
            logits = logits[..., top:top + h, left:left + w]
        return logits

    def config(self) -> dict:
        """Plain dict that rebuilds this model with build_model(**config)."""
        return {"in_channels": self.in_channels, "base_channels": self.base_channels, "bilinear": self.bilinear,
                "norm": self.norm}


def build_model(in_channels: int = 3, base_channels: int = 64, bilinear: bool = False, norm: str = "batch") -> UNet:
    """The U-Net; ``norm`` defaults to 'batch' so that checkpoints stored without it load as built."""
    return UNet(in_channels=in_channels, base_channels=base_channels, bilinear=bilinear, norm=norm)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
