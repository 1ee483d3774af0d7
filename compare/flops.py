"""FLOPs of a training step, counted from the architecture (no framework needed).

Forward multiply-accumulates of an IResNet at 112x112: the convolutions (stem, two 3x3 per
block, the 1x1 shortcut of each stage's first block) and the fc layer; BatchNorm, PReLU and
the additions are left out, as in insightface.s published GMACs (docs/sources.md), which
these match within 1 %. A training step costs 3x the forward (forward, and the backward's
two products per layer) and one MAC is two FLOPs. The head scores each embedding against
`sample_rate` of the class centres: 3 x 2 x E x C x sample_rate FLOPs per image.

MobileFaceNet: every convolution (grouped ones count in/groups inputs per output) and the
GDC's linear layer. ViT: the patch embedding, qkv, proj, the MLP, the feature head, and the
two attention products (q k^T and weights v), which ptflops misses and arcface_torch adds
as `extra_gflops`; masking (training only) is not counted. These match the GMACs
arcface_torch publishes (README: ViT-T 1.5, ViT-S 5.7, ViT-B 11.4, ViT-L 25.3) to the
digits published; mbf's 0.44 GMACs become the published 0.45 G with ptflops' BatchNorm and
PReLU element counts (`mobilefacenet_counts`), which are left out here as for IResNet.
"""

from __future__ import annotations

from jaxface.models.names import BACKBONES, IMAGE_SIZE, MOBILEFACENETS, NETWORKS, VIT_PATCH, VITS

# insightface's figures (GMACs at 112x112), the ones the count is checked against.
PUBLISHED_GMACS = {"r18": 2.61, "r34": 4.46, "r50": 6.31, "r100": 12.09, "r200": 23.42,
                   "mbf": 0.45, "vit_t": 1.5, "vit_s": 5.7, "vit_b": 11.4,
                   "vit_l_dp005_mask_005": 25.3}  # fmt: skip


def _conv(size: int, cin: int, cout: int, k: int, groups: int = 1) -> int:
    return size * size * cout * (cin // groups) * k * k


def mobilefacenet_counts(name: str, embedding_size: int = 512) -> tuple[int, int]:
    """(MACs of convolutions and the linear layer, elementwise ops of BatchNorm (2 per
    element) and PReLU (1 per element)). ptflops, which arcface_torch's flops.py runs, counts
    both: its sum is the published mobilefacenet-0.45G."""
    blocks, scale = MOBILEFACENETS[name]
    c1, c2 = 64 * scale, 128 * scale
    macs = elementwise = 0

    def conv(size, cin, cout, k=1, groups=1, prelu=True):  # ConvBlock / LinearBlock
        nonlocal macs, elementwise
        macs += _conv(size, cin, cout, k, groups)
        elementwise += size * size * cout * (3 if prelu else 2)

    def depthwise(size, cin, cout, groups, stride=1, n=1):
        for _ in range(n):
            conv(size, cin, groups)
            conv(size // stride, groups, groups, 3, groups)
            conv(size // stride, groups, cout, prelu=False)

    conv(56, 3, c1, 3)  # stride 2: 112 -> 56
    if blocks[0] == 1:
        conv(56, c1, c1, 3, 64)
    else:
        depthwise(56, c1, c1, 128, n=blocks[0])
    depthwise(56, c1, c1, 128, 2)
    depthwise(28, c1, c1, 128, n=blocks[1])
    depthwise(28, c1, c2, 256, 2)
    depthwise(14, c2, c2, 256, n=blocks[2])
    depthwise(14, c2, c2, 512, 2)
    depthwise(7, c2, c2, 256, n=blocks[3])
    conv(7, c2, 512)  # conv_sep
    conv(1, 512, 512, 7, 512, prelu=False)  # GDC's depthwise 7x7
    return macs + 512 * embedding_size, elementwise + 2 * embedding_size


def _vit_macs(name: str, embedding_size: int) -> int:
    dim, depth, heads = VITS[name].embed_dim, VITS[name].depth, VITS[name].num_heads
    n = (IMAGE_SIZE // VIT_PATCH) ** 2
    per_block = n * dim * (3 * dim + dim + 2 * 4 * dim)  # qkv, proj, fc1, fc2
    per_block += 2 * heads * n * n * (dim // heads)  # q k^T and weights v
    patch = n * dim * 3 * VIT_PATCH * VIT_PATCH
    return patch + depth * per_block + n * dim * dim + dim * embedding_size


def backbone_macs(name: str, embedding_size: int = 512) -> int:
    """Forward multiply-accumulates of backbone `name` for one 112x112 image."""
    family = NETWORKS.get(name)
    if family is None:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(NETWORKS)}")
    if family == "mobilefacenet":
        return mobilefacenet_counts(name, embedding_size)[0]
    if family == "vit":
        return _vit_macs(name, embedding_size)
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
