"""Backbone shapes by name. Pure data: config validation reads it without importing jax."""

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
