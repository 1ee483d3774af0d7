"""The train state, its shardings, and pure init / train / embed step functions."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxface.heads import Margin, init_class_centres, partial_fc_loss
from jaxface.heads.partial_fc import gather_rows, sample_class_ids
from jaxface.heads.sampled_sgd import SampledSGD
from jaxface.mesh import DATA_AXIS
from jaxface.models import IMAGE_SIZE, IResNet, normalize_images
from jaxface.precision import LossScale, all_finite


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # {"backbone": Flax params, "head": {"centres": [num_padded, E]}}
    batch_stats: Any  # BatchNorm running statistics
    opt_state: Any
    rng: jax.Array  # uint32 key data: dropout and class sampling
    loss_scale: LossScale  # fp16's dynamic loss scale (1 and unused otherwise)


def _is_head(path) -> bool:
    return any(getattr(k, "key", None) == "head" for k in path)


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
    """Class centres (and their optimizer slots) split by class; everything else replicated."""

    def spec(path, leaf):
        if _is_head(path) and leaf.ndim == 2:
            return NamedSharding(mesh, P(DATA_AXIS, None))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(spec, abstract_state)


def make_init_fn(
    model: IResNet, tx: optax.GradientTransformation, num_classes: int, num_padded: int
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
        )

    return init


def make_train_step(
    model: IResNet,
    tx: optax.GradientTransformation,
    schedule,
    margin: Margin,
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
    """
    policy = model.policy
    head_precision = policy.matmul_precision
    sampled_sgd = isinstance(tx, SampledSGD)
    if sampled_sgd and (num_sample is None or grad_accum != 1):
        raise ValueError("SampledSGD needs num_sample (sample_rate < 1) and grad_accum 1")
    num_devices = mesh.shape[DATA_AXIS]

    def loss_fn(params, batch_stats, images, labels, key, scale, presampled=None):
        # presampled: (class ids, rows per device) when params hold only the sampled rows.
        dropout_key, sample_key = jax.random.split(key)
        x = normalize_images(images, policy.compute_dtype)
        variables = {"params": params["backbone"], "batch_stats": batch_stats}
        if freeze_bn:
            embeddings = model.apply(variables, x, train=False)
            new_stats = batch_stats
        else:
            embeddings, updates = model.apply(
                variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key}
            )
            new_stats = updates["batch_stats"]
        loss = partial_fc_loss(
            embeddings,
            labels,
            params["head"]["centres"],
            margin=margin,
            num_classes=num_classes,
            mesh=mesh,
            precision=head_precision,
            num_sample=num_sample,
            key=sample_key,
            class_ids=None if presampled is None else presampled[0],
            num_local=None if presampled is None else presampled[1],
        )
        # fp16: the backward pass runs on the scaled loss so that small gradients survive.
        return loss * scale, (loss, new_stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def finish(state, params, batch_stats, opt_state, loss, grads, scale, finite):
        """The next state and the step's metrics (kept on the device)."""
        metrics = {
            "loss": loss,
            "lr": schedule(state.step),
            "backbone_grad_norm": optax.tree.norm(grads["backbone"]),
            "loss_scale": scale,
            "grads_finite": finite,
        }
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            loss_scale=state.loss_scale.update(finite) if policy.loss_scaling else state.loss_scale,
        )
        return new_state, metrics

    def sampled_train_step(state: TrainState, images, labels):
        # Sample first, differentiate with respect to the sampled rows only, then update
        # the whole matrix elementwise in place (SampledSGD): no dense [C, E] gradient.
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        scale = state.loss_scale.scale
        centres = state.params["head"]["centres"]
        num_local = centres.shape[0] // num_devices
        _, sample_key = jax.random.split(step_key)  # the key loss_fn would sample with
        class_ids = sample_class_ids(
            labels,
            sample_key,
            num_classes=num_classes,
            num_local=num_local,
            num_sample=num_sample,
            mesh=mesh,
        )
        params = {
            "backbone": state.params["backbone"],
            "head": {"centres": gather_rows(centres, class_ids, mesh=mesh)},
        }
        (_, (loss, batch_stats)), grads = grad_fn(
            params, state.batch_stats, images, labels, step_key, scale, (class_ids, num_local)
        )
        grads = jax.tree.map(lambda g: g / scale, grads)
        finite = all_finite(grads)
        updates, backbone_opt = tx.backbone.update(
            grads["backbone"], state.opt_state["backbone"], state.params["backbone"]
        )
        backbone = optax.apply_updates(state.params["backbone"], updates)
        if policy.loss_scaling:
            backbone, backbone_opt = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (backbone, backbone_opt),
                (state.params["backbone"], state.opt_state["backbone"]),
            )
        centres, head_opt = tx.update_head(
            centres,
            state.opt_state["head"],
            class_ids,
            grads["head"]["centres"],
            finite if policy.loss_scaling else jnp.bool_(True),
            mesh,
        )
        params = {"backbone": backbone, "head": {"centres": centres}}
        opt_state = {"backbone": backbone_opt, "head": head_opt}
        return finish(state, params, batch_stats, opt_state, loss, grads, scale, finite)

    def train_step(state: TrainState, images, labels):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        scale = state.loss_scale.scale
        if grad_accum == 1:
            (_, (loss, batch_stats)), grads = grad_fn(
                state.params, state.batch_stats, images, labels, step_key, scale
            )
        else:

            def micro_step(carry, inputs):
                grad_sum, stats, loss_sum, i = carry
                (_, (loss, stats)), grads = grad_fn(
                    state.params, stats, *inputs, jax.random.fold_in(step_key, i), scale
                )
                grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
                return (grad_sum, stats, loss_sum + loss, i + 1), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            carry = (zeros, state.batch_stats, jnp.zeros((), jnp.float32), 0)
            # Unrolled: XLA:CPU runs convolutions inside a loop body far slower; k is small.
            (grad_sum, batch_stats, loss_sum, _), _ = jax.lax.scan(
                micro_step, carry, (images, labels), unroll=True
            )
            grads = jax.tree.map(lambda g: g / grad_accum, grad_sum)
            loss = loss_sum / grad_accum
        grads = jax.tree.map(lambda g: g / scale, grads)
        finite = all_finite(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if policy.loss_scaling:
            # Overflow: keep the parameters and optimizer state (GradScaler skips the step);
            # BatchNorm statistics were updated by the forward pass, as in PyTorch.
            params = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), params, state.params
            )
            opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), opt_state, state.opt_state
            )
        return finish(state, params, batch_stats, opt_state, loss, grads, scale, finite)

    return sampled_train_step if sampled_sgd else train_step


def make_embed_fn(model: IResNet):
    """(backbone params, batch_stats, uint8 images) -> float32 embeddings, eval mode."""

    def embed(params, batch_stats, images):
        x = normalize_images(images, model.policy.compute_dtype)
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

    return embed
