"""Activations a backbone keeps from its forward pass for the backward pass, per image.

This is what `remat` changes. XLA:CPU's memory analysis (jaxface.plan) cannot show it: the
CPU compiler drops the optimisation barriers that keep rematerialised values from being
merged with the forward's, so its peak is the same with remat on or off.
Counting the residuals of `jax.vjp` instead is backend-independent: they are the arrays the
backward closure holds. Counted at two batch sizes, the difference is per image, free of
the parameters the closure also holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxface.models.names import IMAGE_SIZE


def _residual_bytes(model, batch: int) -> int:
    images = jax.ShapeDtypeStruct((batch, IMAGE_SIZE, IMAGE_SIZE, 3), model.policy.compute_dtype)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)

    def residuals(params, stats, x):
        def forward(p):
            out, _ = model.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(0)},
            )  # fmt: skip
            return out

        return jax.tree.leaves(jax.vjp(forward, params)[1])

    leaves = jax.eval_shape(residuals, variables["params"], variables["batch_stats"], images)
    arrays = [a for a in leaves if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)]
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)


def activation_bytes_per_image(model) -> float:
    """Bytes of saved forward activations per training image (train mode, remat as built)."""
    return (_residual_bytes(model, 4) - _residual_bytes(model, 2)) / 2
