"""SGD with weight decay and momentum in a few kernels over many leaves.

optax updates parameter by parameter: r50 has 237 leaves, and XLA:GPU compiled each leaf's
update into its own kernel, plus a transpose and a copy for every convolution kernel held
HWIO. Fused optimizers (apex's FusedSGD, torch.optim.SGD(foreach=True)) launch one kernel
over many tensors instead. Here the gradients are concatenated into one float32 vector,
which the global norm, the finite check and the clipping read in one pass each, and every
leaf's update reads its slice of it: XLA:GPU fuses the leaves' updates into a few
multi-output kernels that write the parameters and momentum in place. (The parameters and
momentum were concatenated too, updated as vectors and split back: 0.35 GB more written per
step for r50 on one H200, for two kernels fewer; docs/gpu.md.)

The maths and its order are the optax chain's that `chain` holds (torch.optim.SGD's order):

    g <- clip(g)          global norm over the clipped leaves (the backbone's)
    d <- g + wd * p
    m <- d + mu * m
    p <- p + (-lr) * m    lr = schedule(count), count += 1

and the optimizer state is `chain.init`'s, so checkpoints do not change. Leaves of at least
`large` elements (the class centres) are updated on their own: copying the 1.27 GB matrix
into a concatenation would cost more than the launch it saves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import tree_utils as otu


@dataclass(frozen=True)
class FusedSGD:
    """`chain` (clip, add_decayed_weights, sgd with momentum) computed by `apply` in one
    pass. `clip_only`: the top-level key whose leaves are clipped (None: every leaf);
    `clip_norm` 0: no clipping. `init` and `update` are the chain's."""

    chain: optax.GradientTransformation
    schedule: Callable
    momentum: float
    weight_decay: float
    large: int  # leaves of at least this many elements are updated alone
    clip_norm: float = 0.0
    clip_only: str | None = None

    def init(self, params):
        return self.chain.init(params)

    def update(self, updates, state, params=None):
        return self.chain.update(updates, state, params)

    def apply(self, params, grads, state, finite=None, alone=None):
        """(new params, new state). `finite` False (fp16 overflow) keeps both as they were,
        the step count included; None: always apply. A large leaf whose gradient is None is
        updated by `alone(p, m, step_size, apply)` -> (new p, new m), apply a float32 1 or
        0: the class centres, whose gradient the caller never forms
        (jaxface.heads.centre_update)."""
        count = otu.tree_get(state, "count")
        step_size = -self.schedule(count)
        path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        p = [leaf for _, leaf in path_leaves]
        g = treedef.flatten_up_to(grads)
        m = treedef.flatten_up_to(otu.tree_get(state, "trace"))
        clipped = [
            self.clip_only is None or path[0].key == self.clip_only for path, _ in path_leaves
        ]
        groups = _groups(p, clipped, self.large)
        new_p, new_m = list(p), list(m)
        deferred = [grp for grp in groups if len(grp[0]) == 1 and g[grp[0][0]] is None]
        if deferred:
            if alone is None:
                raise ValueError("a gradient is None and no update for it was given (alone)")
            apply = jnp.float32(1.0) if finite is None else finite.astype(jnp.float32)
            if self.clip_norm > 0 and any(clip for _, clip in deferred):
                raise ValueError("a clipped leaf's gradient is needed for the global norm")
            for (i,), _ in deferred:
                new_p[i], new_m[i] = alone(p[i], m[i], step_size, apply)
            groups = [grp for grp in groups if grp not in deferred]

        views = []
        for idx, clip in groups:
            gv = _view(g, idx)
            if len(idx) > 1:
                # Written once: without the barrier XLA folds the concatenation into every
                # kernel that reads a slice of it (dozens of operands each), which took the
                # GPU compile of r50's step from 37 s to 132 s.
                gv = jax.lax.optimization_barrier(gv)
            views.append((gv, clip))
        if self.clip_norm > 0:
            # As clip_by_global_norm over flat_views: the same vectors summed in the same order.
            norm = jnp.sqrt(sum(jnp.sum(jnp.square(gv)) for gv, clip in views if clip))
            trigger = norm < self.clip_norm

            def clip_fn(t):
                return jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * self.clip_norm)

            views = [(clip_fn(gv) if c else gv, c) for gv, c in views]

        # Each leaf updated from its slice of the flat gradient, the parameters and momentum
        # never concatenated: XLA:GPU fuses the leaves' updates into a few multi-output
        # kernels that write them in place.
        for (idx, _), (gv, _) in zip(groups, views, strict=True):
            for i, gi in zip(idx, _unview(gv, [p[i] for i in idx]), strict=True):
                new_p[i], new_m[i] = self._leaf_update(p[i], gi, m[i], step_size, finite)

        new_count = optax.safe_increment(count)
        if finite is not None:
            new_count = jnp.where(finite, new_count, count)
        new_state = otu.tree_set(state, trace=treedef.unflatten(new_m), count=new_count)
        return treedef.unflatten(new_p), new_state

    def _leaf_update(self, p, g, m, step_size, finite):
        """(new p, new m) of one leaf, in float32, in the chain's order."""
        p32, m32 = p.astype(jnp.float32), m.astype(jnp.float32)
        m_next = (g.astype(jnp.float32) + self.weight_decay * p32) + self.momentum * m32
        p_next = p32 + step_size * m_next
        if finite is not None:
            m_next = jnp.where(finite, m_next, m32)
            p_next = jnp.where(finite, p_next, p32)
        return p_next.astype(p.dtype), m_next.astype(m.dtype)


def concat_order(sizes) -> list[int]:
    """Indices of leaves of these `sizes` in the order they are concatenated: smallest first
    (ties in tree order).

    XLA:GPU fuses at most 128 operands into one concatenation and nests a longer one, writing
    the first 128 operands' concatenation out before the rest is added. In tree order those
    were 79 MB of r50's 174 MB (237 leaves), written a second time for each of the gradients,
    parameters and momentum; smallest first, they are r50's BatchNorm and PReLU vectors (under
    a megabyte): 0.24 GB less written per step on one H200 (docs/gpu.md)."""
    return sorted(range(len(sizes)), key=lambda i: (sizes[i], i))


def _groups(leaves, clipped, large) -> list[tuple[list[int], bool]]:
    """Leaf indices in update groups: the small clipped leaves, the small unclipped ones
    (each in `concat_order`), then each large leaf alone in tree order (flat_views' order)."""
    sizes = [x.size for x in leaves]
    small = [
        ([i for i in concat_order(sizes) if sizes[i] < large and clipped[i] == c], c)
        for c in (True, False)
    ]
    alone = [([i], clipped[i]) for i, x in enumerate(leaves) if x.size >= large]
    return [grp for grp in small if grp[0]] + alone


def _view(leaves, idx) -> jnp.ndarray:
    if len(idx) == 1:
        return leaves[idx[0]].astype(jnp.float32)
    return jnp.concatenate([jnp.ravel(leaves[i]).astype(jnp.float32) for i in idx])


def _unview(flat, like) -> list[jnp.ndarray]:
    if len(like) == 1:
        return [flat.astype(like[0].dtype)]
    offsets = np.cumsum([x.size for x in like])[:-1]
    parts = jnp.split(flat, offsets)
    return [part.reshape(x.shape).astype(x.dtype) for part, x in zip(parts, like, strict=True)]
