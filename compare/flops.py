"""FLOPs of a training step, counted from the architecture (no framework needed).

Forward multiply-accumulates of an IResNet at 112x112: the convolutions (stem, two 3x3 per
block, the 1x1 shortcut of each stage's first block) and the fc layer; BatchNorm, PReLU and
the additions are left out, as in insightface.s published GMACs (docs/sources.md), which
these match within 1 %. A training step costs 3x the forward (forward, and the backward's
two products per layer) and one MAC is two FLOPs. The head scores each embedding against
`sample_rate` of the class centres: 3 x 2 x E x C x sample_rate FLOPs per image.
"""

from __future__ import annotations

from jaxface.models.names import BACKBONES, IMAGE_SIZE

# insightface's figures (GMACs at 112x112), the ones the count is checked against.
PUBLISHED_GMACS = {"r18": 2.61, "r34": 4.46, "r50": 6.31, "r100": 12.09, "r200": 23.42}


def backbone_macs(name: str, embedding_size: int = 512) -> int:
    """Forward multiply-accumulates of backbone `name` for one 112x112 image."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    blocks, widths = BACKBONES[name]
    size = IMAGE_SIZE
    macs = size * size * 3 * widths[0] * 9  # stem: 3x3, 3 -> 64, stride 1
    channels = widths[0]
    for count, width in zip(blocks, widths, strict=True):
        for block in range(count):
            out_size = size // 2 if block == 0 else size
            macs += size * size * channels * width * 9  # conv1: 3x3 at the input size
            macs += out_size * out_size * width * width * 9  # conv2: 3x3, carries the stride
            if block == 0:
                macs += out_size * out_size * channels * width  # 1x1 shortcut
            channels, size = width, out_size
    return macs + channels * size * size * embedding_size  # fc: C*7*7 -> E


def train_flops_per_image(
    name: str, num_classes: int, embedding_size: int = 512, sample_rate: float = 1.0
) -> float:
    """FLOPs of one image's training step: backbone and margin-softmax head."""
    backbone = 3 * 2 * backbone_macs(name, embedding_size)
    head = 3 * 2 * embedding_size * num_classes * sample_rate
    return float(backbone + head)
