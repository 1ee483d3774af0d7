"""The backbone's gradients as a few flat buffers in backward order, one all-reduce each.

Summed leaf by leaf (autodiff of replicated weights under jit), r50's 161 gradients reach
XLA as one all-reduce per leaf; XLA combines them into a few large ones and slices every
result back into its leaf: about 400 slice kernels per step on 8 GPUs. Here each device
ravels its own gradients into buckets of about BUCKET_BYTES, last layer first (the order the
backward pass produces them, as PyTorch DDP's buckets), each bucket is summed across devices
as one buffer, which XLA starts as soon as the bucket's last gradient exists, and the summed
buckets are viewed as leaves again, which the fused optimizer concatenates
(`jaxface.fused_sgd`): XLA folds those slices and concatenations into the update's own
kernels, so r50's 8-device step has 18 kernels more than its 1-device step, not 635.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# PyTorch DDP's default bucket (bucket_cap_mb=25): r50's 174 MB of float32 gradients in 7
# all-reduces. Compiled for 8 H200s with 8 collectives in flight (jaxface.setup), the share
# of all-reduce bytes XLA's scheduler starts before the last backward convolution was 51 %
# with 12 MB buckets, 72 % with 16, 68 % with 20, 77 % with 25, 54 % with 40, 61 % with 50
# and 40 % with 64 (docs/multi-gpu.md).
BUCKET_BYTES = 25 << 20


@flax.struct.dataclass
class GradBuckets:
    """Gradients of a tree's leaves as float vectors: `vectors[j]` is the leaves
    `groups[j]` (indices into the tree's flattened leaves) raveled one after another."""

    vectors: list
    groups: tuple = flax.struct.field(pytree_node=False)

    def leaves(self, like) -> list[jnp.ndarray]:
        """The gradient of every leaf of `like`, shaped and typed as that leaf."""
        flat = jax.tree.leaves(like)
        out = [None] * len(flat)
        for vec, idx in zip(self.vectors, self.groups, strict=True):
            sizes = [flat[i].size for i in idx]
            parts = jnp.split(vec, np.cumsum(sizes)[:-1]) if len(idx) > 1 else [vec]
            for i, part in zip(idx, parts, strict=True):
                out[i] = part.reshape(flat[i].shape).astype(flat[i].dtype)
        return out

    def tree(self, like):
        """The gradients as a tree shaped as `like`."""
        return jax.tree.unflatten(jax.tree.structure(like), self.leaves(like))


def flatten(tree, groups, dtype=jnp.float32) -> GradBuckets:
    """`tree`'s leaves raveled into one `dtype` vector per group."""
    flat = jax.tree.leaves(tree)
    vectors = [
        jnp.concatenate([jnp.ravel(flat[i]).astype(dtype) for i in idx])
        if len(idx) > 1
        else jnp.ravel(flat[idx[0]]).astype(dtype)
        for idx in groups
    ]
    return GradBuckets(vectors=vectors, groups=tuple(tuple(idx) for idx in groups))


def forward_order(apply_fn: Callable, params, *args) -> list[int]:
    """Indices of `params`' leaves in the order `apply_fn(params, *args)` first reads them
    (traced for their shapes only, nothing computed); leaves it never reads come last, in
    tree order."""
    leaves, treedef = jax.tree.flatten(_shapes(params))
    closed = jax.make_jaxpr(lambda ls, a: apply_fn(jax.tree.unflatten(treedef, ls), *a))(
        leaves, _shapes(args)
    )
    jaxpr = closed.jaxpr
    first: dict = {}
    for n, eqn in enumerate(jaxpr.eqns):
        for var in eqn.invars:
            if not hasattr(var, "val"):  # a Var, not a Literal
                first.setdefault(var, n)
    position = [first.get(var, len(jaxpr.eqns)) for var in jaxpr.invars]
    return sorted(range(len(leaves)), key=lambda i: (position[i], i))


def _shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def backward_buckets(sizes, order, cap_bytes: int, itemsize: int = 4) -> list[list[int]]:
    """Leaf indices (of leaves of these `sizes`) in buckets of about `cap_bytes`: the leaves
    in reverse `order` (the last layer's first), a bucket closed once it holds at least
    `cap_bytes`; within a bucket, tree order."""
    buckets, current, held = [], [], 0
    for i in reversed(order):
        current.append(i)
        held += sizes[i] * itemsize
        if held >= cap_bytes:
            buckets.append(sorted(current))
            current, held = [], 0
    return buckets + [sorted(current)] if current else buckets
