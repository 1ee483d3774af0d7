"""The precision policy: the one place that reads the config's precision flags.

Parameters and optimizer state are float32 under every policy. The convolutional trunk
computes in `compute_dtype`; the fc layer, the last BatchNorm, the logits and the softmax
stay float32, as arcface_torch does under fp16 autocast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

_COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


@dataclass(frozen=True)
class Policy:
    name: str
    compute_dtype: Any  # the trunk's activations and convolutions
    param_dtype: Any = jnp.float32
    head_dtype: Any = jnp.float32  # fc, features BN, logits, softmax


def policy_from_config(cfg) -> Policy:
    """Build the policy from `cfg.precision`."""
    try:
        compute = _COMPUTE_DTYPES[cfg.precision]
    except KeyError:
        raise ValueError(
            f"config key 'precision'={cfg.precision!r} must be one of {', '.join(_COMPUTE_DTYPES)}"
        ) from None
    return Policy(name=cfg.precision, compute_dtype=compute)
