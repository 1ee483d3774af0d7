"""IResNet r18 ... r200 (+ iresnet_tiny), module for module arcface_torch's `iresnet.py`.

State-dict keys and shapes are arcface_torch's (r50: 475 entries), so released weights load
with `strict=True`. Widths come from `jaxface.models.names.BACKBONES` (pure data, no jax).
"""

from __future__ import annotations

import torch
from torch import nn

from jaxface.models.names import BACKBONES, IMAGE_SIZE

FC_SPATIAL = 7 * 7  # four stride-2 stages take 112 px to 7 px


def _conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN, plus the (projected) input."""

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """Input: normalised float images (N, 3, 112, 112). Output: (N, num_features) float32.

    `fp16=True` runs the convolutional trunk under autocast and the fc layer and the last
    BatchNorm in float32, as arcface_torch; `autocast_dtype` picks float16 or bfloat16.
    """

    def __init__(
        self,
        layers: tuple[int, ...],
        widths: tuple[int, ...] = (64, 128, 256, 512),
        dropout: float = 0.0,
        num_features: int = 512,
        fp16: bool = False,
        autocast_dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        self.fp16 = fp16
        self.autocast_dtype = autocast_dtype
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-5)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1])
        self.layer3 = self._make_layer(widths[2], layers[2])
        self.layer4 = self._make_layer(widths[3], layers[3])
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-5)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(widths[3] * FC_SPATIAL, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # frozen at 1, as arcface_torch

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        # Every stage strides 2, so its first block always needs a projection.
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, 1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=1e-5),
        )
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.fp16):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.bn2(x)
            x = torch.flatten(x, 1)  # NCHW order: (c, h, w)
            x = self.dropout(x)
        x = self.fc(x.float() if self.fp16 else x)
        return self.features(x)


def get_model(
    name: str,
    *,
    dropout: float = 0.0,
    num_features: int = 512,
    fp16: bool = False,
    autocast_dtype: torch.dtype = torch.float16,
) -> IResNet:
    """The backbone called `name` (r18 r34 r50 r100 r180 r200 iresnet_tiny)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    layers, widths = BACKBONES[name]
    return IResNet(layers, widths, dropout, num_features, fp16, autocast_dtype)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC RGB to float NCHW (x / 255 - 0.5) / 0.5, as arcface_torch's loader."""
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected uint8 images (N, 112, 112, 3), got {tuple(images.shape)}")
    # Same float ops as jaxface.models.normalize_images, so inputs agree to the bit.
    return (images.permute(0, 3, 1, 2).float() * (2.0 / 255.0) - 1.0).contiguous()
