"""The train state, its shardings, and pure init / train / embed step functions."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxface.fused_sgd import FusedSGD, concat_order
from jaxface.grad_buckets import BUCKET_BYTES, backward_buckets, flatten, forward_order
from jaxface.heads import Margin, PerSampleLoss, centre_update, init_class_centres
from jaxface.heads.partial_fc import loss_on_device, sample_on_device
from jaxface.heads.sampled_sgd import SampledSGD
from jaxface.mesh import DATA_AXIS, class_sharding, replicated
from jaxface.models import IMAGE_SIZE, IResNet, normalize_images
from jaxface.optim import LARGE_LEAF, all_finite, global_norm
from jaxface.precision import LossScale


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # {"backbone": Flax params, "head": {"centres": [num_padded, E]}}
    # BatchNorm running statistics, each device's own (as each DDP rank keeps its own):
    # every leaf [D, ...], split over the devices. Read them with `running_stats` (their
    # mean); checkpoints and exports hold that mean (`saved_state`).
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data: dropout and class sampling
    loss_scale: LossScale  # fp16's dynamic loss scale (1 and unused otherwise)
    # The per-sample loss's running state (AdaFace's norm statistics, CurricularFace's t):
    # replicated scalars, {} for the combined margin. Saved and restored with the rest.
    loss_state: Any = dataclasses.field(default_factory=dict)


def is_head(path) -> bool:
    """True for a leaf under a "head" key: the class centres and their optimizer slots."""
    return any(getattr(k, "key", None) == "head" for k in path)


def state_shardings(abstract_state: TrainState, mesh: Mesh, per_device_stats=True) -> TrainState:
    """Class centres (and their optimizer slots) split by class, BatchNorm statistics by
    device (unless `per_device_stats` is False: the saved state's); everything else
    replicated."""

    def spec(path, leaf):
        if is_head(path) and leaf.ndim == 2:
            return class_sharding(mesh)
        if per_device_stats and getattr(path[0], "name", None) == "batch_stats":
            return NamedSharding(mesh, P(DATA_AXIS))
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(spec, abstract_state)


def running_stats(batch_stats):
    """The running statistics a model is evaluated and saved with: the devices' mean."""
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), batch_stats)


def saved_state(state: TrainState) -> TrainState:
    """`state` as checkpoints hold it: the devices' mean running statistics (the mean is
    all that is ever read, and a resume from it on any device count reads the same mean),
    convolution kernels (and their optimizer slots) HWIO, as the models define them."""
    return state.replace(
        params=_kernels(state.params, to_step=False),
        opt_state=_kernels(state.opt_state, to_step=False),
        batch_stats=running_stats(state.batch_stats),
    )


def device_state(state: TrainState, num_devices: int) -> TrainState:
    """A saved (or initial) state as the step holds it: every device starts from the
    same running statistics; convolution kernels and their slots output-channel first."""
    return state.replace(
        params=_kernels(state.params, to_step=True),
        opt_state=_kernels(state.opt_state, to_step=True),
        batch_stats=stats_on_devices(state.batch_stats, num_devices),
    )


# The step holds every convolution kernel (a 4-D leaf) as OHWI, output channel first: the
# layout cuDNN reads filters in and returns their gradients in for NHWC images. Held HWIO
# (Flax's layout, the models' and checkpoints'), every kernel was transposed for the forward
# pass and its gradient transposed back for the update: 106 transpose kernels in r50's
# 1-device step. `model_params` views them as HWIO again, a transpose XLA folds into the
# convolution's own filter layout.
def _kernels(tree, to_step: bool):
    perm = (3, 0, 1, 2) if to_step else (1, 2, 3, 0)
    return jax.tree.map(lambda x: jnp.transpose(x, perm) if x.ndim == 4 else x, tree)


def model_params(backbone):
    """The step's backbone parameters as the model takes them (kernels HWIO)."""
    return _kernels(backbone, to_step=False)


def stats_on_devices(batch_stats, num_devices: int):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_devices, *x.shape)), batch_stats)


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


def _local_bn_groups(bn_groups, num_devices: int):
    """The model's BatchNorm grouping of the global batch as seen by one device of the
    step's shard_map: 1 group of the whole batch (sync BN) -> statistics across DATA_AXIS;
    k groups per device -> k."""
    if num_devices == 1 or isinstance(bn_groups, str):
        return bn_groups
    if bn_groups == 1:
        return DATA_AXIS
    if bn_groups % num_devices:
        raise ValueError(f"bn_groups={bn_groups} is not a multiple of {num_devices} devices")
    return bn_groups // num_devices


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
    reduce_dtype=jnp.float32,
    bucket_bytes: int = BUCKET_BYTES,
    fused_head: bool = True,
):
    """(state, uint8 images, int32 labels) -> (state, metrics).

    Images are [B, 112, 112, 3] and labels [B] for the global batch B, sharded over the mesh;
    with `grad_accum` k > 1 they are [k, B, ...]: k micro-batches whose gradients are
    averaged into one optimizer step (arcface_torch sums them, a known bug). `num_sample`
    turns on Partial FC sampling. `freeze_bn` runs BatchNorm on its running statistics.
    Metrics stay on the device.

    Forward and backward run per device inside one shard_map, as DDP ranks do: each device
    differentiates its share of the loss, the backbone's gradients are summed across devices
    in `reduce_dtype` as a few flat buckets in backward order (jaxface.grad_buckets), each
    device keeps its own BatchNorm running statistics (the state's are [D, ...]), and the
    class centres' gradients stay on their device. The state is in the step's layout
    (`device_state`: kernels OHWI, statistics per device). With `SampledSGD` the step
    differentiates with respect to the sampled rows only, then updates the whole matrix
    elementwise in place: no dense [C, E] gradient. With `FusedSGD`, the whole block scored
    (no sampling, no accumulation) and `fused_head`, the step differentiates with respect
    to the cosines and `jaxface.heads.centre_update` updates the centres from them (on
    NVIDIA GPUs in one kernel): no dense [C, E] gradient either. Otherwise the gradient
    flows through the gather to the whole block. The returned function's
    `uses_head_kernel` says whether the kernel is in it.
    """
    policy = model.policy
    rows_only = isinstance(tx, SampledSGD)
    if rows_only and (num_sample is None or grad_accum != 1):
        raise ValueError("SampledSGD needs num_sample (sample_rate < 1) and grad_accum 1")
    num_devices = mesh.shape[DATA_AXIS]
    model = model.clone(bn_groups=_local_bn_groups(model.bn_groups, num_devices))
    # The dense head's centres updated from the cosines' gradient (centre_update).
    dense_sgd = isinstance(tx, FusedSGD) and num_sample is None and grad_accum == 1
    via_cosines = fused_head and dense_sgd
    use_kernel = via_cosines and head_kernel_available(mesh)

    def bucket_groups(backbone, batch_stats):
        """The backbone's leaves in all-reduce buckets: one on one device (nothing to
        overlap; in `concat_order`, as the fused optimizer concatenates them, so that XLA
        folds the bucket's split and the optimizer's concatenation away)."""
        sizes = [x.size for x in jax.tree.leaves(backbone)]
        if num_devices == 1:
            large = [[i] for i, n in enumerate(sizes) if n >= LARGE_LEAF]
            return [[i for i in concat_order(sizes) if sizes[i] < LARGE_LEAF]] + large
        image = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
        order = forward_order(
            lambda p, stats, x: model.apply({"params": model_params(p), "batch_stats": stats}, x),
            backbone,
            batch_stats,
            image,
        )
        return backward_buckets(sizes, order, bucket_bytes)

    def device_loss(
        params, batch_stats, images, labels, picked, aux, scale, loss_state, centres=None
    ):
        """The loss (equal on every device) of this device's images and class rows, scaled,
        with (loss, (BatchNorm statistics, loss state), what the centres' update needs).
        `centres` given (not differentiated): the head is params["head"]["cos_offset"]."""
        dropout_key, loss_key_data, num_local = aux  # num_local: a static int
        x = normalize_images(images, policy.compute_dtype)
        variables = {"params": model_params(params["backbone"]), "batch_stats": batch_stats}
        if freeze_bn:
            embeddings, new_stats = model.apply(variables, x, train=False), batch_stats
        else:
            embeddings, updates = model.apply(
                variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key}
            )
            new_stats = updates["batch_stats"]
        offset = None if centres is None else params["head"]["cos_offset"]
        if centres is None:
            centres = params["head"]["centres"]
        full = picked.shape[0] == centres.shape[0]  # the whole block, sorted: no gather
        rows = centres if rows_only or full else centres[picked]
        out = loss_on_device(
            embeddings,
            labels,
            rows,
            picked,
            loss_state,
            loss_key_data,
            margin=margin,
            num_classes=num_classes,
            num_local=num_local,
            precision=policy.matmul_precision,
            cos_offset=offset,
            # Rounded where the fused update reads it (its float32 copy is then never
            # written); elsewhere XLA kept both copies (+76 bytes per class sampled at 0.1).
            grad_dtype=jnp.float32 if offset is None else policy.cosine_grad_dtype,
        )
        loss, loss_state, parts = out if offset is not None else (*out, None)
        # fp16: the backward pass runs on the scaled loss so that small gradients survive.
        return loss * scale, (loss, (new_stats, loss_state), parts)

    grad_fn = jax.value_and_grad(device_loss, has_aux=True)

    def device_micro_batch(params, batch_stats, images, labels, key, scale, loss_state, num_local):
        """(loss, (statistics, loss state), this device's scaled gradients, picked rows)."""
        dropout_key, sample_key = jax.random.split(key)
        # The per-sample losses' draws (ElasticFace's margins): their own stream, so the
        # dropout and sampling keys are those of the combined margin.
        loss_key = jax.random.fold_in(key, 0x10557)
        loss_key_data = (
            jax.random.key_data(loss_key)
            if isinstance(margin, PerSampleLoss) and margin.needs_key
            else None
        )
        # Each device drops out its own units, as each DDP rank draws its own.
        dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(DATA_AXIS))
        if num_sample is None:
            picked = jnp.arange(num_local, dtype=jnp.int32)
        else:
            picked = sample_on_device(
                labels,
                jax.random.key_data(sample_key),
                num_classes=num_classes,
                num_local=num_local,
                num_sample=num_sample,
            )
        if rows_only:
            params = {**params, "head": {"centres": params["head"]["centres"][picked]}}
        centres = None
        if via_cosines:
            # Differentiated instead of the centres: zeros added to the cosines, whose
            # gradient is the loss's with respect to the cosines. Varying, as the cosines
            # are (an invariant input's gradient would be summed over the devices).
            centres = params["head"]["centres"]
            batch = labels.shape[0] * num_devices
            offset = jnp.zeros((batch, num_local), jnp.float32)
            params = {
                **params,
                "head": {"cos_offset": jax.lax.pcast(offset, DATA_AXIS, to="varying")},
            }
        # Varying copies of the replicated weights: their gradients stay this device's
        # share, summed below in buckets rather than by autodiff leaf by leaf.
        params = {**params, "backbone": jax.lax.pcast(params["backbone"], DATA_AXIS, to="varying")}
        (_, (loss, stats, parts)), grads = grad_fn(
            params,
            batch_stats,
            images,
            labels,
            picked,
            (dropout_key, loss_key_data, num_local),
            scale,
            loss_state,
            centres,
        )
        if via_cosines:
            unit, unclipped, inv_norm, sum_sq = parts
            dcos = grads["head"]["cos_offset"]
            scaled, c, finite = centre_update.row_terms(
                dcos, unclipped, inv_norm, sum_sq, policy.cosine_grad_dtype
            )
            head = {"s": scaled, "emb": unit, "c": c, "finite": finite[None]}
            grads = {**grads, "head": head}
        return loss, stats, grads, picked

    def device_step(
        params, batch_stats, images, labels, key_data, scale, loss_state, *, num_local, buckets
    ):
        """One device's part of the step: (loss, running statistics, loss state, summed
        backbone gradients, this device's centre gradients, its picked rows)."""
        key = jax.random.wrap_key_data(key_data)
        batch_stats = jax.tree.map(lambda x: x[0], batch_stats)  # this device's [1, ...]
        if grad_accum == 1:
            loss, (stats, loss_state), grads, picked = device_micro_batch(
                params, batch_stats, images, labels, key, scale, loss_state, num_local
            )
        else:
            # Gradients averaged over the k micro-batches; BatchNorm statistics updated by
            # each in turn, as k forward passes in PyTorch would.
            def body(carry, inputs):
                grad_sum, (stats, loss_state), loss_sum, i = carry
                loss, (stats, loss_state), grads, _ = device_micro_batch(
                    params,
                    stats,
                    *inputs,
                    jax.random.fold_in(key, i),
                    scale,
                    loss_state,
                    num_local,
                )
                grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
                return (grad_sum, (stats, loss_state), loss_sum + loss, i + 1), None

            zeros = {
                "backbone": jax.lax.pcast(
                    jax.tree.map(jnp.zeros_like, params["backbone"]), DATA_AXIS, to="varying"
                ),
                "head": jax.tree.map(jnp.zeros_like, params["head"]),  # a block: varying
            }
            carry = (zeros, (batch_stats, loss_state), jnp.zeros((), jnp.float32), 0)
            # Unrolled: XLA:CPU runs convolutions inside a loop body far slower; k is small.
            (grads, (stats, loss_state), loss, _), _ = jax.lax.scan(
                body, carry, (images, labels), unroll=True
            )
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            loss = loss / grad_accum
            picked = None
        # One all-reduce per bucket, in backward order, in reduce_dtype.
        flat = flatten(grads["backbone"], buckets, reduce_dtype)
        summed = jax.lax.psum(flat.vectors, DATA_AXIS)
        backbone = flat.replace(vectors=[v.astype(jnp.float32) for v in summed])
        # Running statistics: the mean of the devices' own (arcface_torch keeps one set per
        # rank; rank 0's is what it saves), as one buffer.
        stats = jax.tree.map(lambda x: x[None], stats)
        head = grads["head"]
        if picked is None:
            picked = jnp.zeros((0,), jnp.int32)
        return loss, stats, loss_state, backbone, head, picked

    def train_step(state: TrainState, images, labels):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        # Without loss scaling the scale is the constant 1 (not the state's value), so
        # neither the loss nor the gradients pass through a multiply or divide by it.
        scale = state.loss_scale.scale if policy.loss_scaling else jnp.float32(1.0)
        # Each device's block of centres, from the matrix itself (jaxface.config.derive
        # sizes it: ceil(C / D), aligned when the head is dense).
        num_local = state.params["head"]["centres"].shape[0] // num_devices
        for x in jax.tree.leaves(state.batch_stats):
            if x.ndim < 2 or x.shape[0] != num_devices:
                raise ValueError(
                    f"BatchNorm statistics of shape {x.shape}: the step holds them per device, "
                    f"[{num_devices}, ...]; pass jaxface.step.device_state(state, {num_devices})"
                )
        buckets = bucket_groups(state.params["backbone"], running_stats(state.batch_stats))
        data = P(DATA_AXIS) if grad_accum == 1 else P(None, DATA_AXIS)
        param_specs = {"backbone": P(), "head": {"centres": P(DATA_AXIS, None)}}
        head_spec = P(DATA_AXIS, None)
        if via_cosines:
            head_spec = {
                "s": P(None, DATA_AXIS),  # [B, C]: each device's columns
                "emb": P(DATA_AXIS, None),
                "c": P(DATA_AXIS),
                "finite": P(DATA_AXIS),  # [D]: each device's s
            }
        loss, stats, loss_state, backbone, head, class_ids = jax.shard_map(
            partial(device_step, num_local=num_local, buckets=buckets),
            mesh=mesh,
            in_specs=(param_specs, P(DATA_AXIS), data, data, P(), P(), P()),
            out_specs=(P(), P(DATA_AXIS), P(), P(), head_spec, P(DATA_AXIS)),
            check_vma=True,
        )(
            state.params,
            state.batch_stats,
            images,
            labels,
            jax.random.key_data(key),
            scale,
            state.loss_state,
        )
        cosines = None
        if via_cosines:
            # The centres' gradient is never formed: their update reads these instead.
            cosines, head = head, {"centres": None}
        grads = {"backbone": backbone.tree(state.params["backbone"]), "head": head}
        if policy.loss_scaling:
            grads = jax.tree.map(lambda g: g / scale, grads)
        finite = all_finite(grads)
        if via_cosines:
            cosines = {**cosines, "unscale": 1.0 / scale if policy.loss_scaling else 1.0}
            finite = finite & jnp.all(cosines["finite"])
        if rows_only:
            # The sampled rows' gradient depends on the rows themselves; without the barrier
            # XLA recomputes it inside the finite check, scheduled after the in-place update
            # of the centres, and so copies the whole centre block first (2.56 GB at 10 M
            # classes on 8 devices). Materialised here, the update needs no copy.
            head, finite = jax.lax.optimization_barrier((grads["head"], finite))
            grads = {**grads, "head": head}
        params, opt_state = apply_updates(state, grads, class_ids, finite, cosines)
        metrics = {
            "loss": loss,
            # The rate this update used: the optimizer's own count, which a skipped fp16
            # step does not advance (the step counter does).
            "lr": schedule(optimizer_count(state.opt_state, state.step)),
            "backbone_grad_norm": global_norm(grads["backbone"]),
            "loss_scale": scale,
            "grads_finite": finite,
        }
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=stats,
            loss_state=loss_state,
            opt_state=opt_state,
            loss_scale=state.loss_scale.update(finite) if policy.loss_scaling else state.loss_scale,
        )
        return new_state, metrics

    def keep_if_finite(finite, new, old):
        # fp16 overflow: keep the parameters and optimizer state (GradScaler skips the
        # step); BatchNorm statistics were updated by the forward pass, as in PyTorch.
        if not policy.loss_scaling:
            return new
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    def centre_updater(cosines):
        """FusedSGD's `alone` for the centres: centre_update on each device's block."""

        def update(w, m, step_size, apply):
            local = partial(
                centre_update.update, precision=policy.matmul_precision, kernel=use_kernel
            )
            hyper = centre_update.hyper_vector(
                step_size, tx.momentum, tx.weight_decay, apply, cosines["unscale"]
            )
            # Unchecked: pallas_call has no varying-type rule.
            return jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(P(None, DATA_AXIS), P(), P(DATA_AXIS, None), P(DATA_AXIS, None))
                + (P(DATA_AXIS), P()),
                out_specs=(P(DATA_AXIS, None), P(DATA_AXIS, None)),
                check_vma=False,
            )(cosines["s"], cosines["emb"], w, m, cosines["c"], hyper)

        return update

    def apply_updates(state, grads, class_ids, finite, cosines=None):
        """(params, optimizer state) after the update."""
        gate = finite if policy.loss_scaling else None
        if isinstance(tx, FusedSGD):
            alone = None if cosines is None else centre_updater(cosines)
            return tx.apply(state.params, grads, state.opt_state, gate, alone)
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

    train_step.uses_head_kernel = use_kernel
    return train_step


def head_kernel_available(mesh) -> bool:
    """True where centre_update's Pallas kernel runs: NVIDIA GPUs (it is Triton's), the CUDA
    plugin's compile-only devices included."""
    device = mesh.devices.flat[0]
    return device.platform in ("gpu", "cuda") and device.device_kind.startswith("NVIDIA")


def make_embed_fn(model: IResNet):
    """(backbone params, batch_stats, uint8 images) -> float32 embeddings, eval mode."""

    def embed(params, batch_stats, images):
        x = normalize_images(images, model.policy.compute_dtype)
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

    return embed
