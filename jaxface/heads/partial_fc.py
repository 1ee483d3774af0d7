"""Class-sharded margin softmax (Partial FC, sample_rate 1) with jax.shard_map.

Every device owns a contiguous block of `num_local = ceil(C / D)` class centres; the centre
matrix is padded to D * num_local rows, and padded rows are masked out of the softmax.
The embeddings and labels of the whole global batch are gathered to every device, each
device scores them against its own centres only, and the softmax's max, sum of
exponentials and target logit are reduced across devices. No device ever holds more than
its block of centres or its [global batch, num_local] block of logits.

Autodiff through the gather sums each embedding's gradient from every class shard back to
the device that owns that embedding (a reduce-scatter); the centres' gradients stay local.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxface.heads.margins import Margin

CENTRE_INIT_STD = 0.01


def _l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
    # torch.nn.functional.normalize's clamp (norm >= 1e-12), applied before the square root so
    # that zero rows (the padding) get zero gradients rather than NaN.
    sum_sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sum_sq, 1e-24))


def init_class_centres(key, num_classes: int, num_padded: int, dim: int) -> jnp.ndarray:
    """N(0, 0.01) centres for the real classes, zeros for the padding rows."""
    centres = CENTRE_INIT_STD * jax.random.normal(key, (num_padded, dim), jnp.float32)
    real = jnp.arange(num_padded)[:, None] < num_classes
    return jnp.where(real, centres, 0.0)


def partial_fc_loss(
    embeddings: jnp.ndarray,
    labels: jnp.ndarray,
    centres: jnp.ndarray,
    *,
    margin: Margin,
    num_classes: int,
    mesh: Mesh,
    axis: str = "data",
    precision=jax.lax.Precision.HIGHEST,
    num_sample: int | None = None,
    key: jax.Array | None = None,
    class_ids: jnp.ndarray | None = None,
    num_local: int | None = None,
) -> jnp.ndarray:
    """Mean margin-softmax cross-entropy over the global batch.

    embeddings: [global_batch, E], sharded over `axis` along the batch.
    labels: [global_batch] int, sharded likewise, values in [0, num_classes).
    centres: [num_padded, E], sharded over `axis` along the classes.
    num_sample: if set (sample_rate < 1), each device scores only this many of its centres:
      every class of its block present in the global batch, plus random others (`key`).
    class_ids (with num_local): the sampling done beforehand by `sample_class_ids`; then
      `centres` are only the sampled rows ([D * num_sample, E], from `gather_rows`), so the
      gradient is one for those rows alone.
    Returns a replicated float32 scalar.
    """
    presampled = class_ids is not None
    sampled = num_sample is not None and not presampled
    if sampled and key is None:
        raise ValueError("partial_fc_loss: sampling (num_sample) needs a PRNG key")
    if presampled and num_local is None:
        raise ValueError("partial_fc_loss: class_ids need num_local, the rows per device")

    def shard_loss(local_emb, local_labels, local_centres, key_data, ids):
        block = num_local if presampled else local_centres.shape[0]
        # [B_local, E] per device -> [B_global, E]; transposes to a reduce-scatter.
        emb = jax.lax.all_gather(local_emb.astype(jnp.float32), axis, tiled=True)
        # [B_local] -> [B_global]
        batch_labels = jax.lax.all_gather(local_labels, axis, tiled=True)
        shard = jax.lax.axis_index(axis)
        first_class = shard * block
        local_labels_all = batch_labels - first_class  # in [0, block) where this block owns it
        if presampled:
            picked = ids
            local_labels_all = _remap(picked, local_labels_all, block)
        elif sampled:
            picked, local_labels_all = _sample_classes(
                key_data, shard, local_labels_all, block, num_sample, num_classes - first_class
            )
            local_centres = local_centres[picked]  # [num_sample, E]; gradient scatters back
        else:
            picked = jnp.arange(block)
        # The centres' norms scale the logit columns after the matmul rather than the
        # centres before it: a normalised copy of the centre block (and its gradient)
        # would be one more [num_local, E] buffer, 10-20 % of the head's memory.
        centres32 = local_centres.astype(jnp.float32)
        sum_sq = jnp.sum(jnp.square(centres32), axis=-1)
        inv_norm = 1.0 / jnp.sqrt(jnp.maximum(sum_sq, 1e-24))  # as _l2_normalize
        cos = jnp.dot(_l2_normalize(emb), centres32.T, precision=precision) * inv_norm
        cos = jnp.clip(cos, -1.0, 1.0)  # [B_global, num_local or num_sample]
        width = picked.shape[0]
        is_target = jnp.arange(width)[None, :] == local_labels_all[:, None]
        logits = margin.logits(cos, is_target)
        logits = jnp.where((first_class + picked < num_classes)[None, :], logits, -jnp.inf)
        # [B_global] per device -> the max over all classes.
        row_max = jax.lax.pmax(jax.lax.stop_gradient(logits.max(axis=1)), axis)
        row_max = jax.lax.stop_gradient(row_max)
        # [B_global] partial sums -> full sums over all class shards.
        sum_exp = jax.lax.psum(jnp.exp(logits - row_max[:, None]).sum(axis=1), axis)
        # [B_global]: only the owning shard contributes a non-zero target logit.
        target = jax.lax.psum(jnp.where(is_target, logits, 0.0).sum(axis=1), axis)
        # log p_y in the log domain: no underflow, so no 1e-30 clamp is needed (arcface_torch's
        # clamp is why its loss sticks at 69.08 when p_y underflows).
        log_prob = target - row_max - jnp.log(sum_exp)
        return -jnp.mean(log_prob)

    key_data = jax.random.key_data(key) if sampled else jnp.zeros((2,), jnp.uint32)
    ids = class_ids if presampled else jnp.zeros((mesh.shape[axis],), jnp.int32)
    return jax.shard_map(
        shard_loss,
        mesh=mesh,
        in_specs=(P(axis, None), P(axis), P(axis, None), P(), P(axis)),
        out_specs=P(),
        check_vma=True,
    )(embeddings, labels, centres, key_data, ids)


def sample_class_ids(
    labels, key, *, num_classes: int, num_local: int, num_sample: int, mesh: Mesh, axis="data"
):
    """[D * num_sample] int32, sharded over `axis`: each device's sampled rows of its own
    block (local indices, sorted), the same choice partial_fc_loss makes with `key`."""

    def shard_ids(local_labels, key_data):
        batch_labels = jax.lax.all_gather(local_labels, axis, tiled=True)
        shard = jax.lax.axis_index(axis)
        first_class = shard * num_local
        picked, _ = _sample_classes(
            key_data,
            shard,
            batch_labels - first_class,
            num_local,
            num_sample,
            num_classes - first_class,
        )
        return picked.astype(jnp.int32)

    return jax.shard_map(
        shard_ids, mesh=mesh, in_specs=(P(axis), P()), out_specs=P(axis), check_vma=True
    )(labels, jax.random.key_data(key))


def gather_rows(centres, class_ids, *, mesh: Mesh, axis="data"):
    """Each device's rows `class_ids` of its block: [D * num_sample, E], sharded."""
    return jax.shard_map(
        lambda c, i: c[i],
        mesh=mesh,
        in_specs=(P(axis, None), P(axis)),
        out_specs=P(axis, None),
        check_vma=True,
    )(centres, class_ids)


def _sample_classes(key_data, shard, local_labels, num_local, num_sample, num_real_local):
    """Indices of the centres this device keeps, and the batch labels remapped into them.

    As arcface_torch: every positive class of this block, then random negatives, sorted.
    Static shape: `num_sample` must be at least the number of positives a batch can bring
    (checked by the config). Padding rows are never picked while real classes remain.
    """
    owned = (local_labels >= 0) & (local_labels < num_local)
    positive = (
        jnp.zeros((num_local,), bool)
        .at[jnp.where(owned, local_labels, num_local)]
        .set(True, mode="drop")
    )
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data), shard)
    score = jax.random.uniform(key, (num_local,))  # in [0, 1): a random order of negatives
    score = jnp.where(jnp.arange(num_local) < num_real_local, score, -1.0)
    score = jnp.where(positive, 2.0, score)
    _, picked = jax.lax.top_k(score, num_sample)
    picked = jnp.sort(picked)
    return picked, _remap(picked, local_labels, num_local)


def _remap(picked, local_labels, num_local):
    """Position of each owned label among the picked classes; -1 where another block owns
    it (every owned label is picked: positives always are)."""
    owned = (local_labels >= 0) & (local_labels < num_local)
    remapped = jnp.searchsorted(picked, jnp.clip(local_labels, 0, num_local - 1))
    return jnp.where(owned, remapped, -1)
