"""get_model for every family: IResNet, MobileFaceNet, ViT (names in jaxface.models.names)."""

from __future__ import annotations

import flax.linen as nn

from jaxface.models.iresnet import get_model as get_iresnet
from jaxface.models.mobilefacenet import get_mobilefacenet
from jaxface.models.names import family_of, remat_problem
from jaxface.models.vit import get_vit
from jaxface.precision import Policy


def get_model(
    name: str,
    *,
    embedding_size: int = 512,
    dropout: float = 0.0,
    policy: Policy | None = None,
    bn_groups: int | str = 1,
    remat: bool = False,
    **overrides,
) -> nn.Module:
    """The backbone called `name`. `remat` rematerialises each block in the backward pass
    (refused, with the reason, where the family has none); `overrides` go to the ViT
    (mask_ratio, drop_path_rate, depth, ...), for tests."""
    family = family_of(name)
    if remat and (problem := remat_problem(name)):
        raise ValueError(f"remat=True: {problem}")
    if family == "iresnet":
        return get_iresnet(
            name, embedding_size=embedding_size, dropout=dropout, policy=policy,
            bn_groups=bn_groups,
        )  # fmt: skip
    if dropout:
        raise ValueError(
            f"dropout={dropout}: {name} has no dropout layer (arcface_torch's neither); set 0"
        )
    kw = dict(embedding_size=embedding_size, policy=policy, bn_groups=bn_groups, remat=remat)
    if family == "mobilefacenet":
        return get_mobilefacenet(name, **kw)
    return get_vit(name, **kw, **overrides)
