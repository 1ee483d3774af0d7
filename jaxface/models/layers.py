"""Layers with arcface_torch's exact semantics: BatchNorm (PyTorch statistics) and PReLU."""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
    """BatchNorm over the last axis with PyTorch's statistics.

    flax.linen.BatchNorm keeps the biased variance as running statistic; PyTorch keeps the
    unbiased one, and parity with arcface_torch needs PyTorch's. `num_groups` splits the
    batch (leading axis) into groups with statistics of their own: one group per device gives
    arcface_torch's per-device BatchNorm inside a single jit over the global batch, and since
    the batch is sharded along the same axis, no collective is needed for it. `num_groups`
    may instead name a mesh axis: inside a shard_map over it, statistics of the batch of all
    its devices together (sync BN); the models pass their `bn_groups` here as it is.
    """

    use_scale: bool = True  # False: scale frozen at 1 (arcface_torch's `features` BN)
    momentum: float = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch
    epsilon: float = 1e-5
    num_groups: int | str = 1
    dtype: Any = jnp.float32  # output dtype; statistics are always float32

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, train: bool, prelu_slope: jnp.ndarray | None = None
    ) -> jnp.ndarray:
        """`prelu_slope`: a PReLU follows (see PReLU's `norm`)."""
        channels = x.shape[-1]
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        scale = (
            self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
            if self.use_scale
            else None
        )
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)

        if train:
            groups, axis_name = self.num_groups, None
            if isinstance(groups, str):
                groups, axis_name = 1, groups
            if x.shape[0] % groups:
                raise ValueError(f"batch {x.shape[0]} not divisible into {groups} BN groups")
            # One sample per group and channel shifts the one-pass statistics (see
            # _statistics): it lies within the batch's spread, where the running mean (zero
            # at the start) may lie far outside it.
            first = x.reshape(groups, -1, channels)[:, 0, :].astype(jnp.float32)
            if axis_name is not None:
                # One shift for all devices' sums: their mean first sample.
                first = jax.lax.pmean(first, axis_name)
            shift = jax.lax.stop_gradient(first)
            ones = jnp.ones_like(bias)  # typed as bias: varying inside a shard_map
            scale_ = ones if scale is None else scale
            if prelu_slope is None:
                y, mean, var = batch_norm_train(
                    x, scale_, bias, shift, groups, self.epsilon, self.dtype, axis_name
                )
            else:
                y, mean, var = batch_norm_prelu_train(
                    x, scale_, bias, shift, prelu_slope, groups, self.epsilon, self.dtype,
                    axis_name,
                )  # fmt: skip
            if not self.is_initializing():
                n = x.size // (groups * channels) * _axis_size(axis_name)
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean.mean(axis=0)
                running_var.value = (1 - m) * running_var.value + m * unbiased.mean(axis=0)
            return y
        y = (x.astype(jnp.float32) - running_mean.value) * jnp.reciprocal(
            jnp.sqrt(running_var.value + self.epsilon)
        )
        if scale is not None:
            y = y * scale
        y = (y + bias).astype(self.dtype)
        return y if prelu_slope is None else prelu(y, prelu_slope)


def _grouped(x: jnp.ndarray, groups: int) -> jnp.ndarray:
    """(groups, elements per group and channel, channels) float32 view of x."""
    return x.reshape(groups, -1, x.shape[-1]).astype(jnp.float32)


def _sums(a, b):
    """Per group and channel sums of a and b [groups, n, C] over n, as one reduction of
    the pair stacked (XLA:GPU splits a long column reduction in two kernels; two sibling
    reductions share the first but not the second, and a stacked one shares both)."""
    both = jnp.stack([a, b], axis=2).sum(axis=1)  # [groups, 2, C]
    return both[:, 0], both[:, 1]


def _axis_size(axis_name) -> int:
    return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _global_sums(a, b, n, axis_name):
    """_sums over the batch of every device along `axis_name` (None: this device's), as
    means over the n * devices elements."""
    s1, s2 = _sums(a, b)
    if axis_name is not None:
        s1, s2 = jax.lax.psum((s1, s2), axis_name)
    total = n * _axis_size(axis_name)
    return s1 / total, s2 / total


def _statistics(x, shift, groups, axis_name=None):
    """Per group and channel mean and biased variance, in one pass over x.

    The sum and the sum of squares of x - shift come from one reduction of the same
    input (the two-pass form, the mean and then the mean of squared deviations, reads x
    twice in two dependent reductions). Shifting by a value within the batch's spread (shift:
    [C] or [groups, C]) keeps E[d^2] - E[d]^2 free of cancellation: float32 parity with
    PyTorch's two-pass statistics within 1e-5."""
    d = _grouped(x, groups) - shift[..., None, :]
    s1, s2 = _global_sums(d, jnp.square(d), d.shape[1], axis_name)
    return shift + s1, jnp.maximum(s2 - jnp.square(s1), 0.0)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def batch_norm_train(x, scale, bias, shift, groups, epsilon, dtype, axis_name=None):
    """Training-mode BatchNorm: (y in `dtype`, mean [groups, C], biased var [groups, C]).

    Statistics in float32 per group of the batch's leading axis. The backward pass is the
    closed form (two sibling reductions, sum(dy) and sum(dy * xhat), and one elementwise
    pass) rather than autodiff's trace of the forward graph, which XLA:GPU compiled to about
    a dozen kernels per layer. mean and var carry no gradient (they only feed the running
    statistics). With `axis_name` the statistics and the backward pass's two sums are those
    of every device's batch; the scale and bias gradients stay this device's share (the
    caller sums gradients across devices)."""
    return _bn_fwd(x, scale, bias, shift, groups, epsilon, dtype, axis_name)[0]


def _bn_fwd(x, scale, bias, shift, groups, epsilon, dtype, axis_name=None):
    mean, var = _statistics(x, shift, groups, axis_name)
    inv = jax.lax.rsqrt(var + epsilon)
    y = (_grouped(x, groups) - mean[:, None]) * (inv * scale)[:, None] + bias
    return (y.reshape(x.shape).astype(dtype), mean, var), (x, scale, mean, inv, shift)


def _bn_bwd(groups, epsilon, dtype, axis_name, res, cotangents):
    x, scale, mean, inv, shift = res
    dy = _grouped(cotangents[0], groups)
    xhat = (_grouped(x, groups) - mean[:, None]) * inv[:, None]
    sum_dy, sum_dy_xhat = _sums(dy, dy * xhat)  # [groups, C] each: this device's
    dx = _bn_dx(x, dy, xhat, scale, inv, sum_dy, sum_dy_xhat, axis_name)
    return dx, sum_dy_xhat.sum(axis=0), sum_dy.sum(axis=0), jnp.zeros_like(shift)


def _bn_dx(x, dy, xhat, scale, inv, sum_dy, sum_dy_xhat, axis_name):
    """BatchNorm's input gradient, the elementwise pass after the two sums over n."""
    n = dy.shape[1]
    mean_dy, mean_dy_xhat = sum_dy / n, sum_dy_xhat / n
    if axis_name is not None:
        total = n * _axis_size(axis_name)
        mean_dy, mean_dy_xhat = jax.lax.psum((sum_dy, sum_dy_xhat), axis_name)
        mean_dy, mean_dy_xhat = mean_dy / total, mean_dy_xhat / total
    dx = (scale * inv)[:, None] * (dy - mean_dy[:, None] - xhat * mean_dy_xhat[:, None])
    return dx.reshape(x.shape).astype(x.dtype)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


def prelu(x: jnp.ndarray, slope: jnp.ndarray) -> jnp.ndarray:
    """PReLU in x's dtype, one slope per channel (last axis)."""
    return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def batch_norm_prelu_train(x, scale, bias, shift, slope, groups, epsilon, dtype, axis_name=None):
    """batch_norm_train followed by PReLU, as one function whose backward pass recomputes the
    normalised values from x (which BatchNorm's backward pass reads anyway) instead of
    keeping them. Autodiff kept them: one activation-sized array more written per layer,
    0.26 GB per step for r50 on an H200 (docs/gpu.md). The slope's gradient is summed in
    float32 (autodiff summed it in `dtype`)."""
    return _bnp_fwd(x, scale, bias, shift, slope, groups, epsilon, dtype, axis_name)[0]


def _bnp_fwd(x, scale, bias, shift, slope, groups, epsilon, dtype, axis_name=None):
    (y, mean, var), res = _bn_fwd(x, scale, bias, shift, groups, epsilon, dtype, axis_name)
    return (prelu(y, slope), mean, var), (res, bias, slope)


def _bnp_bwd(groups, epsilon, dtype, axis_name, res, cotangents):
    (x, scale, mean, inv, shift), bias, slope = res

    def cotangent_of_y(x, g):
        """PReLU's backward pass from y recomputed as _bn_fwd computed it: (the cotangent of
        y as autodiff forms it, in float32; y before its rounding to `dtype`)."""
        y = (_grouped(x, groups) - mean[:, None]) * (inv * scale)[:, None] + bias
        _, vjp = jax.vjp(prelu, y.astype(dtype), slope)
        dy, _ = vjp(g.reshape(groups, -1, g.shape[-1]))
        return dy.astype(jnp.float32), y

    # The reductions and the elementwise pass each recompute y: computed once for both, XLA
    # wrote it (or its sign) to memory. The optimisation barriers keep the two computations
    # apart and after the cotangent exists (else XLA moves them into the forward pass and
    # keeps their result there). One reduction takes all three sums, for the same reason.
    # Small rewrites of this function made XLA write y again (tests/test_gpu_compile.py).
    g, x1 = jax.lax.optimization_barrier((cotangents[0], x))
    dy, y = cotangent_of_y(x1, g)
    xhat = (_grouped(x1, groups) - mean[:, None]) * inv[:, None]
    y = y.astype(dtype).astype(jnp.float32)
    slope_terms = jnp.where(y < 0, y * _grouped(g, groups), 0.0)
    sums = jnp.stack([dy, dy * xhat, slope_terms], axis=2).sum(axis=1)  # [groups, 3, C]
    sum_dy, sum_dy_xhat = sums[:, 0], sums[:, 1]  # this device's
    g, x2, sum_dy, sum_dy_xhat = jax.lax.optimization_barrier((g, x, sum_dy, sum_dy_xhat))
    dy, _ = cotangent_of_y(x2, g)
    xhat = (_grouped(x2, groups) - mean[:, None]) * inv[:, None]
    dx = _bn_dx(x, dy, xhat, scale, inv, sum_dy, sum_dy_xhat, axis_name)
    dslope = sums[:, 2].sum(axis=0)
    return dx, sum_dy_xhat.sum(axis=0), sum_dy.sum(axis=0), jnp.zeros_like(shift), dslope


batch_norm_prelu_train.defvjp(_bnp_fwd, _bnp_bwd)


class PReLU(nn.Module):
    """PReLU with one slope per channel (last axis), initialised to 0.25 as PyTorch."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, norm: BatchNorm | None = None, train: bool = False
    ) -> jnp.ndarray:
        """With `norm` (a BatchNorm of the enclosing module), x is the BatchNorm's input and
        the two run as batch_norm_prelu_train."""
        slope = self.param("slope", nn.initializers.constant(0.25), (x.shape[-1],), jnp.float32)
        if norm is not None:
            return norm(x, train, prelu_slope=slope)
        return prelu(x.astype(self.dtype), slope)


def strided_pointwise_conv(lhs, rhs, window_strides, padding, **kwargs):
    """jax.lax.conv_general_dilated for a 1x1 kernel with strides (IResNet's projection
    shortcut, NHWC), with the input's gradient formed on the strided grid and spread over
    the full one by a padding that XLA fuses into its consumer. Autodiff's strided
    backward-data convolution made cuDNN write the full-resolution array, three quarters
    zeros: 0.2 GB per step for r50 on an H200 (docs/gpu.md). The same values either way.
    NHWC input and HWIO kernel, as flax's Conv passes them."""
    conv = partial(jax.lax.conv_general_dilated, padding=padding, **kwargs)

    @jax.custom_vjp
    def apply(x, w):
        return conv(x, w, window_strides)

    def fwd(x, w):
        return apply(x, w), (x, w)

    def bwd(res, g):
        x, w = res
        # On the strided grid the 1x1 convolution is a product over the channels: a GEMM,
        # which reads the kernel as it is held (a convolution wanted it transposed).
        dx = jnp.einsum("...o,io->...i", g, w[0, 0], precision=kwargs.get("precision"))
        pads = [(0, 0, 0)]
        for full, part, step in zip(x.shape[1:-1], g.shape[1:-1], window_strides, strict=True):
            pads.append((0, full - (part - 1) * step - 1, step - 1))
        dx = jax.lax.pad(dx, jnp.zeros((), dx.dtype), pads + [(0, 0, 0)])
        (dw,) = jax.vjp(lambda v: conv(x, v, window_strides), w)[1](g)
        return dx, dw

    apply.defvjp(fwd, bwd)
    return apply(lhs, rhs)
