"""IResNet (r18 ... r200) in Flax, NHWC, architecture exactly as arcface_torch's.

Module names mirror arcface_torch's state-dict keys (`layer3.5.conv2` is `layer3_5/conv2`,
`layer1.0.downsample.0` is `layer1_0/downsample_0`), so weight conversion is a table.

The fc layer flattens the last feature map in NHWC, i.e. (h, w, c) order; PyTorch flattens
NCHW, (c, h, w). Converting `fc.weight` permutes its input dimension accordingly
(`jaxface.convert.fc_from_torch`), which costs nothing at run time, unlike a transpose in the model.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxface.models.layers import BatchNorm, PReLU, strided_pointwise_conv
from jaxface.models.names import BACKBONES, IMAGE_SIZE
from jaxface.precision import Policy

# arcface_torch initialises every conv weight from N(0, 0.1), whatever its fan-in.
_conv_init = nn.initializers.normal(stddev=0.1)
# PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _linear_bias_init(fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: (
        nn.initializers.uniform(2 * bound)(key, shape, dtype) - jnp.asarray(bound, dtype)
    )


def normalize_images(images: jnp.ndarray, dtype: Any = jnp.float32) -> jnp.ndarray:
    """uint8 RGB NHWC in [0, 255] to (x / 255 - 0.5) / 0.5, as arcface_torch."""
    return (images.astype(jnp.float32) * (2.0 / 255.0) - 1.0).astype(dtype)


class IBasicBlock(nn.Module):
    features: int
    stride: int
    downsample: bool
    policy: Policy
    bn_groups: int | str

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        dtype = self.policy.compute_dtype
        bn = partial(BatchNorm, num_groups=self.bn_groups, dtype=dtype)
        conv = partial(
            nn.Conv,
            self.features,
            use_bias=False,
            dtype=dtype,
            param_dtype=self.policy.param_dtype,
            kernel_init=_conv_init,
            precision=self.policy.matmul_precision,
        )
        out = bn(name="bn1")(x, train)
        out = conv((3, 3), padding=((1, 1), (1, 1)), name="conv1")(out)
        out = PReLU(dtype=dtype, name="prelu")(out, bn(name="bn2"), train)
        out = conv((3, 3), strides=self.stride, padding=((1, 1), (1, 1)), name="conv2")(out)
        out = bn(name="bn3")(out, train)
        identity = x
        if self.downsample:
            identity = conv(
                (1, 1),
                strides=self.stride,
                padding="VALID",
                conv_general_dilated=strided_pointwise_conv,
                name="downsample_0",
            )(x)
            identity = bn(name="downsample_1")(identity, train)
        return out + identity


class IResNet(nn.Module):
    """Input: normalised float images (N, 112, 112, 3). Output: (N, embedding_size) float32."""

    stage_blocks: tuple[int, ...]
    stage_widths: tuple[int, ...]
    embedding_size: int = 512
    dropout: float = 0.0
    policy: Policy = Policy("fp32", jnp.float32)
    bn_groups: int | str = 1  # per group of the batch, or a mesh axis: layers.BatchNorm

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(
                f"IResNet expects images of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), got {x.shape}"
            )
        dtype = self.policy.compute_dtype
        x = x.astype(dtype)
        x = nn.Conv(
            self.stage_widths[0],
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            dtype=dtype,
            param_dtype=self.policy.param_dtype,
            kernel_init=_conv_init,
            precision=self.policy.matmul_precision,
            name="conv1",
        )(x)
        x = BatchNorm(num_groups=self.bn_groups, dtype=dtype, name="bn1")(x, train)
        x = PReLU(dtype=dtype, name="prelu")(x)
        for stage, (blocks, width) in enumerate(
            zip(self.stage_blocks, self.stage_widths, strict=True)
        ):
            for i in range(blocks):
                first = i == 0
                x = IBasicBlock(
                    features=width,
                    stride=2 if first else 1,
                    downsample=first,  # every stage strides 2, so its first block projects
                    policy=self.policy,
                    bn_groups=self.bn_groups,
                    name=f"layer{stage + 1}_{i}",
                )(x, train)
        x = BatchNorm(num_groups=self.bn_groups, dtype=dtype, name="bn2")(x, train)
        # Flattened in (h, w, c) order; see the module docstring.
        x = x.reshape(x.shape[0], -1).astype(self.policy.head_dtype)
        x = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0)(x)
        fan_in = x.shape[-1]
        x = nn.Dense(
            self.embedding_size,
            dtype=self.policy.head_dtype,
            param_dtype=self.policy.param_dtype,
            kernel_init=_linear_kernel_init,
            bias_init=_linear_bias_init(fan_in),
            precision=self.policy.matmul_precision,
            name="fc",
        )(x)
        return BatchNorm(
            use_scale=False,
            num_groups=self.bn_groups,
            dtype=self.policy.head_dtype,
            name="features",
        )(x, train)


def get_model(
    name: str,
    *,
    embedding_size: int = 512,
    dropout: float = 0.0,
    policy: Policy | None = None,
    bn_groups: int | str = 1,
) -> IResNet:
    """The backbone called `name` (r18, r34, r50, r100, r180, r200, iresnet_tiny)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    blocks, widths = BACKBONES[name]
    return IResNet(
        stage_blocks=blocks,
        stage_widths=widths,
        embedding_size=embedding_size,
        dropout=dropout,
        policy=policy or Policy("fp32", jnp.float32),
        bn_groups=bn_groups,
    )
