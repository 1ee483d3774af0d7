"""torchref's backbone factory: every network name of jaxface.models.names, as arcface_torch's
backbones/__init__.py get_model."""

from __future__ import annotations

import torch
from torch import nn

from jaxface.models.names import family_of
from torchref.iresnet import get_model as get_iresnet
from torchref.mobilefacenet import get_mobilefacenet
from torchref.vit import get_vit


def get_model(
    name: str,
    *,
    dropout: float = 0.0,
    num_features: int = 512,
    fp16: bool = False,
    autocast_dtype: torch.dtype = torch.float16,
    **overrides,
) -> nn.Module:
    """The backbone called `name`. MobileFaceNet and ViT have no dropout (arcface_torch
    ignores the argument there; torchref refuses a non-zero one). `overrides` go to the ViT
    (mask_ratio, drop_path_rate, ...)."""
    family = family_of(name)
    kw = dict(num_features=num_features, fp16=fp16, autocast_dtype=autocast_dtype)
    if family == "iresnet":
        return get_iresnet(name, dropout=dropout, **kw)
    if dropout:
        raise ValueError(
            f"dropout={dropout}: {name} has no dropout layer (arcface_torch's neither)"
        )
    if family == "mobilefacenet":
        return get_mobilefacenet(name, **kw)
    return get_vit(name, **kw, **overrides)
