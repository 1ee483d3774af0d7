"""MobileFaceNet (mbf, mbf_large), module for module arcface_torch's backbones/mobilefacenet.py.

State-dict keys and shapes are arcface_torch's, so its released weights load with
strict=True. `fp16` runs the trunk under autocast and `conv_sep` and the GDC head in float32,
as arcface_torch.
"""

from __future__ import annotations

import torch
from torch import nn

from jaxface.models.names import MOBILEFACENETS


class ConvBlock(nn.Module):
    """Conv (no bias) -> BatchNorm2d -> PReLU; without the PReLU: arcface_torch's LinearBlock."""

    def __init__(self, cin: int, cout: int, kernel=1, stride=1, padding=0, groups=1, prelu=True):
        super().__init__()
        modules = [
            nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if prelu:
            modules.append(nn.PReLU(cout))
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """1x1 to `groups` channels, 3x3 depthwise (stride), 1x1 linear; + input if residual."""

    def __init__(self, cin: int, cout: int, residual: bool, stride: int, groups: int):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(cin, groups),
            ConvBlock(groups, groups, 3, stride, 1, groups=groups),
            ConvBlock(groups, cout, prelu=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    def __init__(self, channels: int, num_block: int, groups: int):
        super().__init__()
        self.layers = nn.Sequential(
            *[DepthWise(channels, channels, True, 1, groups) for _ in range(num_block)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    def __init__(self, embedding_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            ConvBlock(512, 512, 7, 1, 0, groups=512, prelu=False),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    def __init__(
        self,
        blocks: tuple[int, ...] = (1, 4, 6, 2),
        scale: int = 2,
        num_features: int = 512,
        fp16: bool = False,
        autocast_dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        self.fp16 = fp16
        self.autocast_dtype = autocast_dtype
        c1, c2 = 64 * scale, 128 * scale
        self.layers = nn.ModuleList([ConvBlock(3, c1, 3, 2, 1)])
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c1, c1, 3, 1, 1, groups=64))
        else:
            self.layers.append(Residual(c1, blocks[0], 128))
        self.layers.extend(
            [
                DepthWise(c1, c1, False, 2, 128),
                Residual(c1, blocks[1], 128),
                DepthWise(c1, c2, False, 2, 256),
                Residual(c2, blocks[2], 256),
                DepthWise(c2, c2, False, 2, 512),
                Residual(c2, blocks[3], 256),
            ]
        )
        self.conv_sep = ConvBlock(c2, 512)
        self.features = GDC(num_features)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.autocast_dtype, enabled=self.fp16):
            for layer in self.layers:
                x = layer(x)
        x = self.conv_sep(x.float() if self.fp16 else x)
        return self.features(x)


def get_mobilefacenet(
    name: str,
    *,
    num_features: int = 512,
    fp16: bool = False,
    autocast_dtype: torch.dtype = torch.float16,
) -> MobileFaceNet:
    blocks, scale = MOBILEFACENETS[name]
    return MobileFaceNet(blocks, scale, num_features, fp16, autocast_dtype)
