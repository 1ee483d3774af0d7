"""The precision policy: the one place that reads the config's precision flags.

Parameters and optimizer state are float32 under every policy. The convolutional trunk
computes in `compute_dtype`; the fc layer, the last BatchNorm, the logits and the softmax
stay float32, as arcface_torch's fc and BatchNorm under fp16 autocast (its head's cosine
product runs in fp16 there, converted to float32 before the softmax; here it has TF32
inputs, fp16's 10 mantissa bits, and float32 results). The softmax's gradient with respect
to the cosines is stored in bfloat16 under bf16 by the dense head's fused update
(`cosine_grad_dtype`), as arcface_torch's autocast stores its logits' gradient in fp16: its
[batch, classes] matrix is the head's largest write after the centres (0.32 GB per step in
float32 for r50 at 617,970 classes on one GPU).

`tf32` chooses the precision of float32 matrix products and convolutions (the trunk under
fp32, and the head's cosine matmul under every policy): TF32 tensor cores when true, full
float32 (`highest`) when false. It only changes anything on GPUs that have TF32.

fp16 needs loss scaling: `LossScale` behaves like torch's GradScaler as arcface_torch
configures it (initial scale 2**16, doubled after `growth_interval` finite steps, halved and
the update skipped on a non-finite gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

_COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}

INITIAL_LOSS_SCALE = 2.0**16
GROWTH_INTERVAL = 100  # arcface_torch: GradScaler(growth_interval=100)


@dataclass(frozen=True)
class Policy:
    name: str
    compute_dtype: Any  # the trunk's activations and convolutions
    param_dtype: Any = jnp.float32
    head_dtype: Any = jnp.float32  # fc, features BN, logits, softmax
    tf32: bool = True

    @property
    def matmul_precision(self) -> jax.lax.Precision:
        """For float32 products: TF32 (DEFAULT lets XLA use it) or full float32."""
        return jax.lax.Precision.DEFAULT if self.tf32 else jax.lax.Precision.HIGHEST

    @property
    def cosine_grad_dtype(self) -> Any:
        """What the loss's gradient with respect to the head's cosines (divided by the
        centres' norms) is stored in between the softmax and the two products that read it
        (the embeddings' and the centres' gradients) when the dense head's update is fused
        (jaxface.heads.centre_update; other heads keep it float32): bfloat16 under bf16 with
        TF32 products,
        whose inputs keep 10 mantissa bits of it where bfloat16 keeps 7 (arcface_torch's
        fp16 autocast keeps its logits' gradient in fp16); float32 otherwise. Not float16
        under fp16: divided by the norms (about 0.23 at initialisation) and loss-scaled, it
        would overflow float16 where arcface_torch's does not."""
        if self.compute_dtype == jnp.bfloat16 and self.tf32:
            return jnp.bfloat16
        return jnp.float32

    @property
    def loss_scaling(self) -> bool:
        return self.compute_dtype == jnp.float16


def policy_from_config(cfg) -> Policy:
    """Build the policy from `cfg.precision` and `cfg.tf32`."""
    try:
        compute = _COMPUTE_DTYPES[cfg.precision]
    except KeyError:
        raise ValueError(
            f"config key 'precision'={cfg.precision!r} must be one of {', '.join(_COMPUTE_DTYPES)}"
        ) from None
    return Policy(name=cfg.precision, compute_dtype=compute, tf32=cfg.tf32)


@flax.struct.dataclass
class LossScale:
    """Dynamic loss scale, part of the train state (so it survives a resume)."""

    scale: jax.Array  # float32 scalar
    good_steps: jax.Array  # int32 scalar: finite steps since the last change

    @classmethod
    def create(cls, enabled: bool) -> LossScale:
        scale = INITIAL_LOSS_SCALE if enabled else 1.0
        return cls(jnp.asarray(scale, jnp.float32), jnp.zeros((), jnp.int32))

    def update(self, grads_finite: jax.Array, growth_interval: int = GROWTH_INTERVAL) -> LossScale:
        """x0.5 on overflow; x2 after `growth_interval` finite steps in a row."""
        grown = self.good_steps + 1 >= growth_interval
        scale = jnp.where(
            grads_finite, jnp.where(grown, self.scale * 2.0, self.scale), self.scale * 0.5
        )
        good = jnp.where(grads_finite & ~grown, self.good_steps + 1, 0)
        return LossScale(scale.astype(jnp.float32), good.astype(jnp.int32))
