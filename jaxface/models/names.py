"""Backbone shapes by name. Pure data: config validation reads it without importing jax."""

from typing import NamedTuple

# name -> (blocks per stage, channels per stage). The standard IResNets are arcface_torch's;
# iresnet_tiny keeps the architecture at a fraction of the cost, for demos and tests.
BACKBONES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "r18": ((2, 2, 2, 2), (64, 128, 256, 512)),
    "r34": ((3, 4, 6, 3), (64, 128, 256, 512)),
    "r50": ((3, 4, 14, 3), (64, 128, 256, 512)),
    "r100": ((3, 13, 30, 3), (64, 128, 256, 512)),
    "r180": ((3, 20, 63, 3), (64, 128, 256, 512)),
    "r200": ((6, 26, 60, 6), (64, 128, 256, 512)),
    "iresnet_tiny": ((1, 1, 1, 1), (8, 16, 32, 64)),
}

IMAGE_SIZE = 112  # every IResNet here takes 112x112 RGB; four stride-2 stages leave 7x7

# MobileFaceNet: name -> (blocks of the four residual stages, width scale), as arcface_torch's
# backbones/__init__.py calls get_mbf / get_mbf_large.
MOBILEFACENETS: dict[str, tuple[tuple[int, ...], int]] = {
    "mbf": ((1, 4, 6, 2), 2),
    "mbf_large": ((2, 8, 12, 4), 4),
}


class ViTSpec(NamedTuple):
    embed_dim: int
    depth: int
    num_heads: int
    drop_path_rate: float
    mask_ratio: float


# ViT (patch 9 on 112x112: 144 patches), arguments as arcface_torch's backbones/__init__.py.
VIT_PATCH = 9
VITS: dict[str, ViTSpec] = {
    "vit_t": ViTSpec(256, 12, 8, 0.1, 0.1),
    "vit_t_dp005_mask0": ViTSpec(256, 12, 8, 0.05, 0.0),
    "vit_s": ViTSpec(512, 12, 8, 0.1, 0.1),
    "vit_s_dp005_mask_0": ViTSpec(512, 12, 8, 0.05, 0.0),
    "vit_b": ViTSpec(512, 24, 8, 0.1, 0.1),
    "vit_b_dp005_mask_005": ViTSpec(512, 24, 8, 0.05, 0.05),
    "vit_l_dp005_mask_005": ViTSpec(768, 24, 8, 0.05, 0.05),
    "vit_h": ViTSpec(1024, 48, 8, 0.1, 0.0),
}

# Every network name -> its family; the config validator and the CLIs accept these names.
NETWORKS: dict[str, str] = (
    dict.fromkeys(BACKBONES, "iresnet")
    | dict.fromkeys(MOBILEFACENETS, "mobilefacenet")
    | dict.fromkeys(VITS, "vit")
)

# What `remat` rematerialises, per family; a family missing here refuses remat=True.
REMAT_UNITS = {"mobilefacenet": "depthwise block", "vit": "transformer block"}


def family_of(network: str) -> str:
    """The family of `network`; ValueError listing the known names if there is none."""
    try:
        return NETWORKS[network]
    except KeyError:
        raise ValueError(
            f"unknown backbone {network!r}; choose one of {', '.join(NETWORKS)}"
        ) from None


def remat_problem(network: str) -> str | None:
    """Why `remat=True` cannot apply to `network`, or None."""
    family = NETWORKS.get(network)
    if family is None or family in REMAT_UNITS:
        return None
    return (
        f"network {network!r} ({family}) has no rematerialisable blocks in jaxface; remat "
        f"applies to {', '.join(f'{f} ({u})' for f, u in REMAT_UNITS.items())} backbones"
    )
