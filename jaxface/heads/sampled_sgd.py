"""SGD on class centres of which a step scores only the sampled rows (sample_rate < 1).

torch.optim.SGD on arcface_torch's Partial FC weight sees a dense gradient that is zero
outside the sampled rows, so weight decay and momentum still act on every row:

    m <- mu * m + wd * W + g      (g = 0 outside the sampled rows)
    W <- W - lr * m

Written as one elementwise pass over W and m plus a scatter-add of the sampled rows'
gradients, no dense gradient and no other [C, E] temporary exists, and with the state
donated XLA updates both buffers in place: two float32 copies of the matrix per step
instead of four (measured with jaxface.plan; see the README).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jaxface.mesh import DATA_AXIS as A


@dataclass(frozen=True)
class SampledSGD:
    """The optimizer when sampling with SGD: optax for the backbone (clip, decay,
    momentum), the row update above for the centres. `init(params)` gives the state
    {"backbone": optax state, "head": {"momentum": [C_pad, E], "count": int32}}; `count`
    is the number of applied updates (the schedule's step; a skipped fp16 step does not
    count, as optax's own count)."""

    backbone: optax.GradientTransformation
    schedule: Callable
    momentum: float
    weight_decay: float

    def init(self, params):
        return {
            "backbone": self.backbone.init(params["backbone"]),
            "head": {
                "momentum": jnp.zeros_like(params["head"]["centres"]),
                "count": jnp.zeros((), jnp.int32),
            },
        }

    def update_head(self, centres, head_state, class_ids, row_grads, apply, mesh):
        """(new centres, new head state). `apply` False (fp16 overflow) leaves both as
        they were: decay, momentum and learning rate are gated, not selected afterwards,
        so no second copy of the matrix is made."""
        lr = jnp.where(apply, self.schedule(head_state["count"]), 0.0)
        mu = jnp.where(apply, self.momentum, 1.0)
        wd = jnp.where(apply, self.weight_decay, 0.0)
        row_grads = jnp.where(apply, row_grads, 0.0)

        def local(w, m, ids, g, lr, mu, wd):
            m = (mu * m + wd * w).at[ids].add(g)
            return w - lr * m, m

        centres, momentum = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(A, None), P(A, None), P(A), P(A, None), P(), P(), P()),
            out_specs=(P(A, None), P(A, None)),
            check_vma=True,
        )(centres, head_state["momentum"], class_ids, row_grads, lr, mu, wd)
        count = head_state["count"] + apply.astype(jnp.int32)
        return centres, {"momentum": momentum, "count": count}
