"""MobileFaceNet (mbf, mbf_large) in Flax, NHWC, as arcface_torch's backbones/mobilefacenet.py.

Module names mirror arcface_torch's state-dict keys (`layers.2.layers.1.layers.0` is
`layers_2/layers_1/layers_0`), so conversion is a table (jaxface.families).

Precision: the trunk (`layers_*`) runs in the policy's compute dtype; `conv_sep` and the
GDC head in float32, as arcface_torch's fp16 autocast leaves them.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxface.models.layers import BatchNorm, PReLU
from jaxface.models.names import IMAGE_SIZE, MOBILEFACENETS
from jaxface.precision import Policy

# arcface_torch: kaiming_normal_(mode="fan_out", nonlinearity="relu") on convs and linears;
# PyTorch's fan_out counts kh*kw*out whatever the groups, as Flax's variance_scaling does.
_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class _Conv(nn.Module):
    """Conv -> BatchNorm (-> PReLU): arcface_torch's ConvBlock (`prelu`) or LinearBlock."""

    features: int
    kernel: int
    stride: int
    padding: int
    groups: int
    prelu: bool
    dtype: jnp.dtype
    policy: Policy
    bn_groups: int | str

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        pad = ((self.padding, self.padding),) * 2
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=self.stride,
            padding=pad,
            feature_group_count=self.groups,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.policy.param_dtype,
            kernel_init=_kaiming_fan_out,
            precision=self.policy.matmul_precision,
            name="layers_0",
        )(x)
        x = BatchNorm(num_groups=self.bn_groups, dtype=self.dtype, name="layers_1")(x, train)
        if self.prelu:
            x = PReLU(dtype=self.dtype, name="layers_2")(x)
        return x


class DepthWise(nn.Module):
    """1x1 expand to `groups` channels, kxk depthwise (stride), 1x1 linear projection;
    plus the input when `residual`."""

    features: int
    groups: int
    stride: int
    residual: bool
    policy: Policy
    bn_groups: int | str

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        conv = partial(
            _Conv, dtype=self.policy.compute_dtype, policy=self.policy, bn_groups=self.bn_groups
        )
        out = conv(self.groups, 1, 1, 0, 1, True, name="layers_0")(x, train)
        out = conv(self.groups, 3, self.stride, 1, self.groups, True, name="layers_1")(out, train)
        out = conv(self.features, 1, 1, 0, 1, False, name="layers_2")(out, train)
        return x + out if self.residual else out


class Residual(nn.Module):
    """`num_block` residual DepthWise blocks (each rematerialised when `remat`)."""

    features: int
    num_block: int
    groups: int
    policy: Policy
    bn_groups: int | str
    remat: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        block = DepthWise
        if self.remat:
            # Keep only each block's input, recompute the rest: torch.utils.checkpoint's trade.
            block = nn.remat(
                DepthWise, static_argnums=(2,), policy=jax.checkpoint_policies.nothing_saveable
            )
        for j in range(self.num_block):
            x = block(
                self.features, self.groups, 1, True, self.policy, self.bn_groups, name=f"layers_{j}"
            )(x, train)
        return x


class GDC(nn.Module):
    """Global depthwise conv 7x7 -> BatchNorm -> flatten -> Linear (no bias) -> BatchNorm1d."""

    embedding_size: int
    policy: Policy
    bn_groups: int | str

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        dtype = self.policy.head_dtype
        x = _Conv(x.shape[-1], 7, 1, 0, x.shape[-1], False, dtype, self.policy, self.bn_groups,
                  name="layers_0")(x, train)  # fmt: skip
        x = x.reshape(x.shape[0], -1)  # 1x1 spatial: the flatten order does not matter
        x = nn.Dense(
            self.embedding_size,
            use_bias=False,
            dtype=dtype,
            param_dtype=self.policy.param_dtype,
            kernel_init=_kaiming_fan_out,
            precision=self.policy.matmul_precision,
            name="layers_2",
        )(x)
        return BatchNorm(num_groups=self.bn_groups, dtype=dtype, name="layers_3")(x, train)


class MobileFaceNet(nn.Module):
    """Input: normalised float images (N, 112, 112, 3). Output: (N, embedding_size) float32."""

    blocks: tuple[int, ...] = (1, 4, 6, 2)
    scale: int = 2
    embedding_size: int = 512
    policy: Policy = Policy("fp32", jnp.float32)
    bn_groups: int | str = 1
    remat: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(
                f"MobileFaceNet expects images of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), "
                f"got {x.shape}"
            )
        dtype = self.policy.compute_dtype
        kw = dict(policy=self.policy, bn_groups=self.bn_groups)
        c1, c2 = 64 * self.scale, 128 * self.scale
        b = self.blocks
        x = x.astype(dtype)
        x = _Conv(c1, 3, 2, 1, 1, True, dtype, name="layers_0", **kw)(x, train)
        if b[0] == 1:  # arcface_torch: a grouped conv (64 groups), not a residual stage
            x = _Conv(c1, 3, 1, 1, 64, True, dtype, name="layers_1", **kw)(x, train)
        else:
            x = Residual(c1, b[0], 128, remat=self.remat, name="layers_1", **kw)(x, train)
        x = DepthWise(c1, 128, 2, False, name="layers_2", **kw)(x, train)
        x = Residual(c1, b[1], 128, remat=self.remat, name="layers_3", **kw)(x, train)
        x = DepthWise(c2, 256, 2, False, name="layers_4", **kw)(x, train)
        x = Residual(c2, b[2], 256, remat=self.remat, name="layers_5", **kw)(x, train)
        x = DepthWise(c2, 512, 2, False, name="layers_6", **kw)(x, train)
        x = Residual(c2, b[3], 256, remat=self.remat, name="layers_7", **kw)(x, train)
        head = self.policy.head_dtype
        x = _Conv(512, 1, 1, 0, 1, True, head, name="conv_sep", **kw)(x.astype(head), train)
        return GDC(self.embedding_size, name="features", **kw)(x, train)


def get_mobilefacenet(
    name: str,
    *,
    embedding_size: int = 512,
    policy: Policy | None = None,
    bn_groups: int | str = 1,
    remat: bool = False,
) -> MobileFaceNet:
    """`mbf` or `mbf_large`, as arcface_torch's get_mbf / get_mbf_large."""
    blocks, scale = MOBILEFACENETS[name]
    return MobileFaceNet(
        blocks=blocks,
        scale=scale,
        embedding_size=embedding_size,
        policy=policy or Policy("fp32", jnp.float32),
        bn_groups=bn_groups,
        remat=remat,
    )
