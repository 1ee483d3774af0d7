"""Class-sharded margin softmax (Partial FC) with jax.shard_map.

Every device owns a contiguous block of `num_local` class centres (class c is row c):
`jaxface.config.class_rows_per_device`, ceil(C / D) rounded up to 512 rows for a dense
head. The centre matrix is padded to D * num_local rows, and padded rows are masked out of
the softmax.

One step of the head, in three public pieces:
1. `sample_class_ids`: which rows of its block each device scores. With sampling
   (sample_rate < 1) every class of the block present in the global batch plus random
   others, sorted, as arcface_torch; without, the whole block.
2. `gather_rows`: those rows ([D * rows, E], sharded). The whole block is returned as it is
   (no copy), so the dense case differentiates straight through to the centres.
3. `partial_fc_loss`: the embeddings and labels of the whole global batch are gathered to
   every device, each device scores them against its rows only, and the softmax's max, sum
   of exponentials and target logit are reduced across devices. No device ever holds more
   than its block of centres or its [global batch, rows] block of logits.

Autodiff through the gather of embeddings sums each embedding's gradient from every class
shard back to the device that owns that embedding (a reduce-scatter); the centres'
gradients stay local.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxface.heads.losses import PerSampleLoss, RowContext
from jaxface.heads.margins import Margin
from jaxface.mesh import DATA_AXIS

CENTRE_INIT_STD = 0.01


def _l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
    # torch.nn.functional.normalize's clamp (norm >= 1e-12), applied before the square root so
    # that zero rows (the padding) get zero gradients rather than NaN.
    sum_sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sum_sq, 1e-24))


def init_class_centres(key, num_classes: int, num_padded: int, dim: int) -> jnp.ndarray:
    """N(0, 0.01) centres for the real classes, zeros for the padding rows. The real rows
    are drawn alone, so they are the same whatever the padding (device count, alignment)."""
    centres = CENTRE_INIT_STD * jax.random.normal(key, (num_classes, dim), jnp.float32)
    return jnp.pad(centres, ((0, num_padded - num_classes), (0, 0)))


def sample_class_ids(
    labels,
    key,
    *,
    num_classes: int,
    num_local: int,
    num_sample: int | None,
    mesh: Mesh,
):
    """[D * rows] int32, sharded over the mesh: each device's rows of its own block (local
    indices, sorted). rows = num_sample when sampling, else num_local (every row; `key` is
    then unused and may be None)."""
    if num_sample is None:
        ids = jnp.tile(jnp.arange(num_local, dtype=jnp.int32), mesh.shape[DATA_AXIS])
        return jax.lax.with_sharding_constraint(ids, jax.NamedSharding(mesh, P(DATA_AXIS)))

    shard_ids = partial(
        sample_on_device, num_classes=num_classes, num_local=num_local, num_sample=num_sample
    )

    return jax.shard_map(
        shard_ids, mesh=mesh, in_specs=(P(DATA_AXIS), P()), out_specs=P(DATA_AXIS), check_vma=True
    )(labels, jax.random.key_data(key))


def sample_on_device(local_labels, key_data, *, num_classes: int, num_local: int, num_sample: int):
    """`sample_class_ids`' body on one device inside a shard_map over DATA_AXIS: the local
    indices (sorted) of the `num_sample` rows of this device's block that it scores."""
    # [B_local] -> [B_global]: every device needs every label of the global batch.
    batch_labels = jax.lax.all_gather(local_labels, DATA_AXIS, tiled=True)
    shard = jax.lax.axis_index(DATA_AXIS)
    first_class = shard * num_local
    return _sample_classes(
        key_data,
        shard,
        batch_labels - first_class,
        num_local,
        num_sample,
        num_classes - first_class,
    ).astype(jnp.int32)


def gather_rows(centres, class_ids, *, mesh: Mesh):
    """Each device's rows `class_ids` of its block: [D * rows, E], sharded. The whole block
    (class_ids from sample_class_ids without sampling) is `centres` itself."""
    if class_ids.shape[0] == centres.shape[0]:  # sorted, unique, all of them: the identity
        return centres
    return jax.shard_map(
        lambda c, i: c[i],
        mesh=mesh,
        in_specs=(P(DATA_AXIS, None), P(DATA_AXIS)),
        out_specs=P(DATA_AXIS, None),
        check_vma=True,
    )(centres, class_ids)


def partial_fc_loss(
    embeddings: jnp.ndarray,
    labels: jnp.ndarray,
    rows: jnp.ndarray,
    class_ids: jnp.ndarray,
    *,
    margin: Margin,
    num_classes: int,
    num_local: int,
    mesh: Mesh,
    precision=jax.lax.Precision.HIGHEST,
    grad_dtype=jnp.float32,
) -> jnp.ndarray:
    """Mean margin-softmax cross-entropy over the global batch (see partial_fc_loss_and_state
    for the per-sample losses and their running state).

    embeddings: [global_batch, E], sharded along the batch.
    labels: [global_batch] int, sharded likewise, values in [0, num_classes).
    rows, class_ids: what `gather_rows` and `sample_class_ids` give: [D * r, E] centres and
      their indices within each device's block of `num_local` classes.
    Returns a replicated float32 scalar.
    """
    loss, _ = partial_fc_loss_and_state(
        embeddings,
        labels,
        rows,
        class_ids,
        margin=margin,
        num_classes=num_classes,
        num_local=num_local,
        mesh=mesh,
        precision=precision,
        grad_dtype=grad_dtype,
    )
    return loss


def partial_fc_loss_and_state(
    embeddings: jnp.ndarray,
    labels: jnp.ndarray,
    rows: jnp.ndarray,
    class_ids: jnp.ndarray,
    *,
    margin: Margin | PerSampleLoss,
    num_classes: int,
    num_local: int,
    mesh: Mesh,
    precision=jax.lax.Precision.HIGHEST,
    loss_state: Any = None,
    key: jax.Array | None = None,
    grad_dtype=jnp.float32,
) -> tuple[jnp.ndarray, Any]:
    """(loss, new loss state): `partial_fc_loss` for the combined margin or a per-sample
    loss (jaxface.heads.losses). `loss_state` is the loss's running state (replicated;
    None: its initial value) and `key` the step's key (losses that draw). The per-row
    quantities (norms, margins, statistics, the target cosine) are the global batch's,
    computed identically on every device; per-class work stays on the class's device.
    `grad_dtype`: see loss_on_device.
    """
    per_sample = isinstance(margin, PerSampleLoss)
    if per_sample and loss_state is None:
        loss_state = margin.init_state()
    if not per_sample:
        loss_state = {}
    key_data = jax.random.key_data(key) if per_sample and margin.needs_key else None

    shard_loss = partial(
        loss_on_device,
        margin=margin,
        num_classes=num_classes,
        num_local=num_local,
        precision=precision,
        grad_dtype=grad_dtype,
    )

    return jax.shard_map(
        shard_loss,
        mesh=mesh,
        in_specs=(P(DATA_AXIS, None), P(DATA_AXIS), P(DATA_AXIS, None), P(DATA_AXIS), P(), P()),
        out_specs=(P(), P()),
        check_vma=True,
    )(embeddings, labels, rows, class_ids, loss_state, key_data)


def loss_on_device(
    local_emb,
    local_labels,
    local_rows,
    picked,
    state,
    key_data,
    *,
    margin,
    num_classes: int,
    num_local: int,
    precision=jax.lax.Precision.HIGHEST,
    cos_offset=None,
    grad_dtype=jnp.float32,
):
    """`partial_fc_loss_and_state`'s body on one device inside a shard_map over DATA_AXIS:
    (loss, new loss state), both equal on every device. local_emb [B_local, E], local_rows
    this device's scored rows, picked their indices in its block; `state` and `key_data` as
    there (the loss's running state, the raw key of losses that draw, else None).

    `cos_offset` ([B_global, rows] zeros, varying) is added to the cosines before they are
    clipped, so that its gradient is the loss's gradient with respect to them
    (jaxface.heads.centre_update); then a third value is returned: (this device's
    normalised embeddings [B_local, E], the unclipped cosines, the rows' inverse norms and
    squared norms), what the centres' update needs besides that gradient.

    `grad_dtype`: the loss's gradient with respect to the cosine product (before the
    centres' norms) is rounded to it (`Policy.cosine_grad_dtype`), so that XLA stores it so
    for the two products that read it."""
    per_sample = isinstance(margin, PerSampleLoss)
    # [B_local, E] per device -> [B_global, E]; transposes to a reduce-scatter.
    emb = jax.lax.all_gather(local_emb.astype(jnp.float32), DATA_AXIS, tiled=True)
    # [B_local] -> [B_global]
    batch_labels = jax.lax.all_gather(local_labels, DATA_AXIS, tiled=True)
    first_class = jax.lax.axis_index(DATA_AXIS) * num_local
    targets = _remap(picked, batch_labels - first_class, num_local)
    # The centres' norms scale the logit columns after the matmul rather than the
    # centres before it: a normalised copy of the centre block (and its gradient)
    # would be one more [rows, E] buffer, 10-20 % of the head's memory.
    rows32 = local_rows.astype(jnp.float32)
    sum_sq = jnp.sum(jnp.square(rows32), axis=-1)
    inv_norm = 1.0 / jnp.sqrt(jnp.maximum(sum_sq, 1e-24))  # as _l2_normalize
    emb_sum_sq = jnp.sum(jnp.square(emb), axis=-1, keepdims=True)
    emb_norm = jnp.sqrt(jnp.maximum(emb_sum_sq, 1e-24))  # as _l2_normalize
    unit = emb / emb_norm
    cos = _cotangent_in(jnp.dot(unit, rows32.T, precision=precision), grad_dtype) * inv_norm
    if cos_offset is not None:
        unclipped = cos
        cos = cos + cos_offset
        b_local = local_emb.shape[0]
        first_row = jax.lax.axis_index(DATA_AXIS) * b_local
        parts = (
            jax.lax.dynamic_slice_in_dim(unit, first_row, b_local),
            unclipped,
            inv_norm,
            sum_sq,
        )
    cos = jnp.clip(cos, -1.0, 1.0)  # [B_global, rows]
    is_target = jnp.arange(picked.shape[0])[None, :] == targets[:, None]
    extra = jnp.zeros((), jnp.float32)
    if per_sample:
        target_cos = None
        if margin.needs_target_cos:
            # [B_global]: the owner's target cosine, on every class shard.
            owned = jnp.where(is_target, jax.lax.stop_gradient(cos), 0.0).sum(axis=1)
            target_cos = jax.lax.psum(owned, DATA_AXIS)
        ctx = RowContext(
            norms=emb_norm[:, 0],
            target_cos=target_cos,
            state=state,
            key=None if key_data is None else jax.random.wrap_key_data(key_data),
        )
        row_info, state, extra = margin.rows(ctx)
        # Equal on every device but computed from all-gathered values, which shard_map
        # types as varying: take device 0's (a psum of it and zeros: exact, and the
        # regulariser's gradient counted once).
        state, extra = jax.tree.map(_from_first_device, (state, extra))
        logits = margin.logits(cos, is_target, row_info)
    else:
        logits = margin.logits(cos, is_target)
    logits = jnp.where((first_class + picked < num_classes)[None, :], logits, -jnp.inf)
    # [B_global] per device -> the max over all classes.
    row_max = jax.lax.pmax(jax.lax.stop_gradient(logits.max(axis=1)), DATA_AXIS)
    row_max = jax.lax.stop_gradient(row_max)
    # [B_global] partial sums -> full sums over all class shards.
    sum_exp = jax.lax.psum(jnp.exp(logits - row_max[:, None]).sum(axis=1), DATA_AXIS)
    # [B_global]: only the owning shard contributes a non-zero target logit.
    target = jax.lax.psum(jnp.where(is_target, logits, 0.0).sum(axis=1), DATA_AXIS)
    # log p_y in the log domain: no underflow, so no 1e-30 clamp is needed (arcface_torch's
    # clamp is why its loss sticks at 69.08 when p_y underflows).
    log_prob = target - row_max - jnp.log(sum_exp)
    if cos_offset is not None:
        return -jnp.mean(log_prob) + extra, state, parts
    return -jnp.mean(log_prob) + extra, state


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _cotangent_in(x, dtype):
    """x, whose cotangent is rounded to `dtype` (and carried on in x's dtype)."""
    return x


def _cotangent_in_fwd(x, dtype):
    return x, None


def _cotangent_in_bwd(dtype, _, g):
    return (g.astype(dtype).astype(g.dtype),)


_cotangent_in.defvjp(_cotangent_in_fwd, _cotangent_in_bwd)


def _from_first_device(x):
    first = jax.lax.axis_index(DATA_AXIS) == 0
    return jax.lax.psum(jnp.where(first, x, jnp.zeros_like(x)), DATA_AXIS)


def _sample_classes(key_data, shard, local_labels, num_local, num_sample, num_real_local):
    """Indices (sorted) of the centres this device keeps.

    As arcface_torch: every positive class of this block, then random negatives.
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
    return jnp.sort(picked)


def _remap(picked, local_labels, num_local):
    """Position of each owned label among the picked classes; -1 where another block owns
    it (every owned label is picked: positives always are)."""
    owned = (local_labels >= 0) & (local_labels < num_local)
    if picked.shape[0] == num_local:  # the whole block: positions are the labels themselves
        return jnp.where(owned, local_labels, -1)
    remapped = jnp.searchsorted(picked, jnp.clip(local_labels, 0, num_local - 1))
    return jnp.where(owned, remapped, -1)
