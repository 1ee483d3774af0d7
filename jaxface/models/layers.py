"""Layers with arcface_torch's exact semantics: BatchNorm (PyTorch statistics) and PReLU."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class BatchNorm(nn.Module):
    """BatchNorm over the last axis with PyTorch's statistics.

    flax.linen.BatchNorm keeps the biased variance as running statistic; PyTorch keeps the
    unbiased one, and parity with arcface_torch needs PyTorch's. `num_groups` splits the
    batch (leading axis) into groups with statistics of their own: one group per device gives
    arcface_torch's per-device BatchNorm inside a single jit over the global batch, and since
    the batch is sharded along the same axis, no collective is needed for it.
    """

    use_scale: bool = True  # False: scale frozen at 1 (arcface_torch's `features` BN)
    momentum: float = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch
    epsilon: float = 1e-5
    num_groups: int = 1
    dtype: Any = jnp.float32  # output dtype; statistics are always float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        channels = x.shape[-1]
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        scale = (
            self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
            if self.use_scale
            else None
        )
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)

        xf = x.astype(jnp.float32)
        if train:
            groups = self.num_groups
            if x.shape[0] % groups:
                raise ValueError(f"batch {x.shape[0]} not divisible into {groups} BN groups")
            grouped = xf.reshape(groups, -1, channels)  # (groups, elements per group, C)
            mean = grouped.mean(axis=1)
            var = jnp.square(grouped - mean[:, None, :]).mean(axis=1)
            if not self.is_initializing():
                n = grouped.shape[1]
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean.mean(axis=0)
                running_var.value = (1 - m) * running_var.value + m * unbiased.mean(axis=0)
            shape = (groups, -1) + (1,) * (x.ndim - 2) + (channels,)
            inv = jnp.reciprocal(jnp.sqrt(var + self.epsilon))
            y = (xf.reshape(groups, -1, *x.shape[1:]) - mean.reshape(shape)) * inv.reshape(shape)
            y = y.reshape(x.shape)
        else:
            y = (xf - running_mean.value) * jnp.reciprocal(
                jnp.sqrt(running_var.value + self.epsilon)
            )
        if scale is not None:
            y = y * scale
        return (y + bias).astype(self.dtype)


class PReLU(nn.Module):
    """PReLU with one slope per channel (last axis), initialised to 0.25 as PyTorch."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        slope = self.param("slope", nn.initializers.constant(0.25), (x.shape[-1],), jnp.float32)
        x = x.astype(self.dtype)
        return jnp.where(x >= 0, x, slope.astype(self.dtype) * x)
