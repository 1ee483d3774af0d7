"""The train state, its shardings, and pure init / train / embed step functions."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxface.fused_sgd import FusedSGD
from jaxface.heads import (
    Margin,
    PerSampleLoss,
    gather_rows,
    init_class_centres,
    partial_fc_loss_and_state,
    sample_class_ids,
)
from jaxface.heads.sampled_sgd import SampledSGD
from jaxface.mesh import DATA_AXIS, class_sharding, replicated
from jaxface.models import IMAGE_SIZE, IResNet, normalize_images
from jaxface.optim import all_finite, global_norm
from jaxface.precision import LossScale


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # {"backbone": Flax params, "head": {"centres": [num_padded, E]}}
    batch_stats: Any  # BatchNorm running statistics
    opt_state: Any
    rng: jax.Array  # uint32 key data: dropout and class sampling
    loss_scale: LossScale  # fp16's dynamic loss scale (1 and unused otherwise)
    # The per-sample loss's running state (AdaFace's norm statistics, CurricularFace's t):
    # replicated scalars, {} for the combined margin. Saved and restored with the rest.
    loss_state: Any = dataclasses.field(default_factory=dict)


def is_head(path) -> bool:
    """True for a leaf under a "head" key: the class centres and their optimizer slots."""
    return any(getattr(k, "key", None) == "head" for k in path)


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
    """Class centres (and their optimizer slots) split by class; everything else replicated."""

    def spec(path, leaf):
        return class_sharding(mesh) if is_head(path) and leaf.ndim == 2 else replicated(mesh)

    return jax.tree_util.tree_map_with_path(spec, abstract_state)


def optimizer_count(opt_state, default):
    """The updates the optimizer has applied (its schedule's count: optax's `count`
    leaves, all equal), or `default` for an optimizer without one."""
    counts = [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
        if getattr(path[-1], "name", None) == "count"
    ]
    return counts[0] if counts else default


def make_init_fn(
    model: IResNet,
    tx: optax.GradientTransformation,
    num_classes: int,
    num_padded: int,
    loss: Margin | PerSampleLoss | None = None,
):
    """seed (int32 scalar) -> TrainState. Jit it with out_shardings to build it sharded."""

    def init(seed):
        key = jax.random.key(seed)
        k_backbone, k_head, k_rng = jax.random.split(key, 3)
        images = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
        variables = model.init({"params": k_backbone}, images, train=False)
        params = {
            "backbone": variables["params"],
            "head": {
                "centres": init_class_centres(k_head, num_classes, num_padded, model.embedding_size)
            },
        }
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(params),
            rng=jax.random.key_data(k_rng),
            loss_scale=LossScale.create(model.policy.loss_scaling),
            loss_state=loss.init_state() if isinstance(loss, PerSampleLoss) else {},
        )

    return init


def make_train_step(
    model: IResNet,
    tx: optax.GradientTransformation,
    schedule,
    margin: Margin | PerSampleLoss,
    num_classes: int,
    mesh: Mesh,
    *,
    num_sample: int | None = None,
    grad_accum: int = 1,
    freeze_bn: bool = False,
):
    """(state, uint8 images, int32 labels) -> (state, metrics).

    Images are [B, 112, 112, 3] and labels [B] for the global batch B, sharded over the mesh;
    with `grad_accum` k > 1 they are [k, B, ...]: k micro-batches whose gradients are
    averaged into one optimizer step (arcface_torch sums them, a known bug). `num_sample`
    turns on Partial FC sampling. `freeze_bn` runs BatchNorm on its running statistics.
    Metrics stay on the device.

    With `SampledSGD` the step samples first and differentiates with respect to the sampled
    rows only, then updates the whole matrix elementwise in place: no dense [C, E]
    gradient. Otherwise the gradient flows through the gather to the whole matrix.
    """
    policy = model.policy
    rows_only = isinstance(tx, SampledSGD)
    if rows_only and (num_sample is None or grad_accum != 1):
        raise ValueError("SampledSGD needs num_sample (sample_rate < 1) and grad_accum 1")
    num_devices = mesh.shape[DATA_AXIS]

    def loss_fn(params, batch_stats, images, labels, class_ids, dropout_key, scale, aux_in):
        loss_state, loss_key, num_local = aux_in  # num_local: a static int
        x = normalize_images(images, policy.compute_dtype)
        variables = {"params": params["backbone"], "batch_stats": batch_stats}
        if freeze_bn:
            embeddings, new_stats = model.apply(variables, x, train=False), batch_stats
        else:
            embeddings, updates = model.apply(
                variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key}
            )
            new_stats = updates["batch_stats"]
        centres = params["head"]["centres"]
        rows = centres if rows_only else gather_rows(centres, class_ids, mesh=mesh)
        loss, loss_state = partial_fc_loss_and_state(
            embeddings,
            labels,
            rows,
            class_ids,
            margin=margin,
            num_classes=num_classes,
            num_local=num_local,
            mesh=mesh,
            precision=policy.matmul_precision,
            loss_state=loss_state,
            key=loss_key,
        )
        # fp16: the backward pass runs on the scaled loss so that small gradients survive.
        return loss * scale, (loss, (new_stats, loss_state))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_batch(params, batch_stats, images, labels, key, scale, loss_state):
        """(loss, (BatchNorm statistics, loss state), scaled gradients, sampled class ids)
        of one batch."""
        dropout_key, sample_key = jax.random.split(key)
        # The per-sample losses' draws (ElasticFace's margins): their own stream, so the
        # dropout and sampling keys are those of the combined margin.
        loss_key = jax.random.fold_in(key, 0x10557)
        # Each device's block of centres, from the matrix itself (jaxface.config.derive
        # sizes it: ceil(C / D), aligned when the head is dense).
        num_local = params["head"]["centres"].shape[0] // num_devices
        class_ids = sample_class_ids(
            labels,
            sample_key,
            num_classes=num_classes,
            num_local=num_local,
            num_sample=num_sample,
            mesh=mesh,
        )
        if rows_only:
            rows = gather_rows(params["head"]["centres"], class_ids, mesh=mesh)
            params = {**params, "head": {"centres": rows}}
        (_, (loss, stats)), grads = grad_fn(
            params,
            batch_stats,
            images,
            labels,
            class_ids,
            dropout_key,
            scale,
            (loss_state, loss_key, num_local),
        )
        return loss, stats, grads, class_ids

    def accumulated(state, images, labels, key, scale):
        """Gradients averaged over the k micro-batches; BatchNorm statistics updated by
        each in turn, as k forward passes in PyTorch would."""

        def body(carry, inputs):
            grad_sum, (stats, loss_state), loss_sum, i = carry
            loss, stats, grads, _ = micro_batch(
                state.params, stats, *inputs, jax.random.fold_in(key, i), scale, loss_state
            )
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (grad_sum, stats, loss_sum + loss, i + 1), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        carry = (zeros, (state.batch_stats, state.loss_state), jnp.zeros((), jnp.float32), 0)
        # Unrolled: XLA:CPU runs convolutions inside a loop body far slower; k is small.
        (grad_sum, stats, loss_sum, _), _ = jax.lax.scan(body, carry, (images, labels), unroll=True)
        grads = jax.tree.map(lambda g: g / grad_accum, grad_sum)
        return loss_sum / grad_accum, stats, grads, None

    def keep_if_finite(finite, new, old):
        # fp16 overflow: keep the parameters and optimizer state (GradScaler skips the
        # step); BatchNorm statistics were updated by the forward pass, as in PyTorch.
        if not policy.loss_scaling:
            return new
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    def apply_updates(state, grads, class_ids, finite):
        """(params, optimizer state) after the update."""
        gate = finite if policy.loss_scaling else None
        if isinstance(tx, FusedSGD):
            return tx.apply(state.params, grads, state.opt_state, gate)
        if not rows_only:
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            new = (optax.apply_updates(state.params, updates), opt_state)
            return keep_if_finite(finite, new, (state.params, state.opt_state))
        old_backbone = (state.params["backbone"], state.opt_state["backbone"])
        if isinstance(tx.backbone, FusedSGD):
            backbone, backbone_opt = tx.backbone.apply(
                old_backbone[0], grads["backbone"], old_backbone[1], gate
            )
        else:
            updates, backbone_opt = tx.backbone.update(
                grads["backbone"], old_backbone[1], old_backbone[0]
            )
            backbone, backbone_opt = keep_if_finite(
                finite, (optax.apply_updates(old_backbone[0], updates), backbone_opt), old_backbone
            )
        centres, head_opt = tx.update_head(
            state.params["head"]["centres"],
            state.opt_state["head"],
            class_ids,
            grads["head"]["centres"],
            finite if policy.loss_scaling else jnp.bool_(True),
            mesh,
        )
        params = {"backbone": backbone, "head": {"centres": centres}}
        return params, {"backbone": backbone_opt, "head": head_opt}

    def train_step(state: TrainState, images, labels):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        # Without loss scaling the scale is the constant 1 (not the state's value), so
        # neither the loss nor the gradients pass through a multiply or divide by it.
        scale = state.loss_scale.scale if policy.loss_scaling else jnp.float32(1.0)
        if grad_accum == 1:
            loss, stats, grads, class_ids = micro_batch(
                state.params, state.batch_stats, images, labels, key, scale, state.loss_state
            )
        else:
            loss, stats, grads, class_ids = accumulated(state, images, labels, key, scale)
        if policy.loss_scaling:
            grads = jax.tree.map(lambda g: g / scale, grads)
        finite = all_finite(grads)
        if rows_only:
            # The sampled rows' gradient depends on the rows themselves; without the barrier
            # XLA recomputes it inside the finite check, scheduled after the in-place update
            # of the centres, and so copies the whole centre block first (2.56 GB at 10 M
            # classes on 8 devices). Materialised here, the update needs no copy.
            head, finite = jax.lax.optimization_barrier((grads["head"], finite))
            grads = {**grads, "head": head}
        params, opt_state = apply_updates(state, grads, class_ids, finite)
        metrics = {
            "loss": loss,
            # The rate this update used: the optimizer's own count, which a skipped fp16
            # step does not advance (the step counter does).
            "lr": schedule(optimizer_count(state.opt_state, state.step)),
            "backbone_grad_norm": global_norm(grads["backbone"]),
            "loss_scale": scale,
            "grads_finite": finite,
        }
        stats, loss_state = stats
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=stats,
            loss_state=loss_state,
            opt_state=opt_state,
            loss_scale=state.loss_scale.update(finite) if policy.loss_scaling else state.loss_scale,
        )
        return new_state, metrics

    return train_step


def make_embed_fn(model: IResNet):
    """(backbone params, batch_stats, uint8 images) -> float32 embeddings, eval mode."""

    def embed(params, batch_stats, images):
        x = normalize_images(images, model.policy.compute_dtype)
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

    return embed
