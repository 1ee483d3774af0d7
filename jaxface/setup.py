"""Everything a training step needs, built once from a config and a mesh.

The trainer, the memory planner (`jaxface.plan`), `compare` and `compare.profile` all call
`build()`, so what they compile is the same step. `Run` holds the pieces; nothing in it
touches data or files. The mesh may be made of real devices or of a compile-only topology
(`jaxface.plan` compiles for devices it does not have).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jaxface.checkpoint import array_name
from jaxface.config import Config, ConfigError, Derived, derive
from jaxface.heads import Margin, PerSampleLoss, loss_from_config
from jaxface.heads.losses import NORM_LOSSES
from jaxface.mesh import batch_sharding, micro_batch_sharding, replicated
from jaxface.models import IMAGE_SIZE, get_model
from jaxface.optim import make_optimizer
from jaxface.precision import Policy, policy_from_config
from jaxface.step import (
    TrainState,
    device_state,
    make_embed_fn,
    make_init_fn,
    make_train_step,
    model_params,
    running_stats,
    saved_state,
    state_shardings,
)


@dataclass(frozen=True)
class Run:
    """One training job's model, optimizer, head and jitted functions on one mesh."""

    cfg: Config
    mesh: Mesh
    derived: Derived
    policy: Policy
    model: Any  # a Flax backbone from jaxface.models.get_model
    tx: optax.GradientTransformation
    schedule: Callable
    margin: Margin | PerSampleLoss  # the head's loss (config key `loss`)
    init: Callable  # seed -> TrainState as saved (unjitted)
    # ShapeDtypeStructs carrying the shardings below, of the state as checkpoints hold it
    # (one set of BatchNorm statistics: jaxface.step.saved_state)...
    abstract_state: TrainState
    shardings: TrainState
    # ... and as the train step holds it (the statistics per device: step.device_state).
    step_abstract_state: TrainState
    step_shardings: TrainState
    train_step: Callable  # jitted, state donated: (state, images, labels) -> (state, metrics)
    embed: Callable  # jitted: (backbone params, batch_stats, uint8 images) -> embeddings
    head_kernel: bool = False  # the step holds centre_update's Pallas kernel (NVIDIA GPUs)

    @property
    def data_sharding(self) -> NamedSharding:
        """Of one step's images and labels: [B, ...], or [k, B, ...] when accumulating."""
        if self.cfg.gradient_acc == 1:
            return batch_sharding(self.mesh)
        return micro_batch_sharding(self.mesh)

    def init_state(self, seed: int | None = None) -> TrainState:
        """The initial state as the step holds it, each leaf created where its sharding
        puts it."""
        seed = self.cfg.seed if seed is None else seed
        d = self.mesh.size
        return jax.jit(lambda s: device_state(self.init(s), d), out_shardings=self.step_shardings)(
            seed
        )

    def to_step(self, state: TrainState) -> TrainState:
        """A state as saved (a restored checkpoint) -> as the step holds it."""
        d = self.mesh.size
        return jax.jit(lambda s: device_state(s, d), out_shardings=self.step_shardings)(state)

    def to_saved(self, state: TrainState) -> TrainState:
        """The step's state -> as a checkpoint holds it (a new state; `state` is kept)."""
        return jax.jit(saved_state, out_shardings=self.shardings)(state)

    def backbone(self, state: TrainState):
        """(backbone params, BatchNorm statistics) of the step's state as the model and
        every reader outside the step take them: to evaluate, export and convert."""
        return jax.jit(
            lambda s: (model_params(s.params["backbone"]), running_stats(s.batch_stats)),
            out_shardings=(self.shardings.params["backbone"], self.shardings.batch_stats),
        )(state)

    def init_arrays(self, names, seed: int | None = None) -> dict[str, jax.Array]:
        """Some arrays of the initial state, by name (`jaxface.checkpoint.array_name`): the
        ones a converting resume creates. Only those are computed (XLA drops the rest)."""
        seed = self.cfg.seed if seed is None else seed
        wanted = set(names)

        def pick(tree):
            leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
            return {array_name(path): x for path, x in leaves if array_name(path) in wanted}

        return jax.jit(lambda s: pick(self.init(s)), out_shardings=pick(self.shardings))(seed)

    def abstract_batch(self) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        """Shapes, dtypes and shardings of one step's (images, labels)."""
        lead = () if self.cfg.gradient_acc == 1 else (self.cfg.gradient_acc,)
        batch = (*lead, self.derived.global_batch)
        sharding = self.data_sharding
        return (
            jax.ShapeDtypeStruct((*batch, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.uint8, sharding=sharding),
            jax.ShapeDtypeStruct(batch, jnp.int32, sharding=sharding),
        )

    def lower(self) -> jax.stages.Lowered:
        """The train step lowered for abstract inputs: `.compile()` it to inspect memory
        and HLO without allocating anything."""
        return self.train_step.lower(self.step_abstract_state, *self.abstract_batch())


# XLA:GPU options for the train step on more than one GPU. XLA's latency-hiding scheduler
# keeps one collective in flight at a time by default, so the gradient all-reduces queue
# behind each other and most start after the last backward convolution; with up to 8 in
# flight, each bucket (jaxface.grad_buckets) starts when its gradients exist: 77 % of r50's
# all-reduce bytes before the last backward convolution on 8 H200s (54 % with 4 in
# flight; docs/multi-gpu.md). XLA's all-reduce combiner is off (a threshold of 1 byte): the
# buckets are already the units to reduce, and with bf16 sums XLA merged them in pairs, each
# pair waiting for its later half (r50 on 4 x 8 H200s: 2.95 -> 0.83 ms of communication left
# exposed, 84 -> 93 % of the bytes started early on 8). Passed per compilation, so CPU runs
# and other programs are untouched.
GPU_STEP_OPTIONS = {
    "xla_gpu_experimental_parallel_collective_overlap_limit": 8,
    "xla_gpu_all_reduce_combine_threshold_bytes": 1,
}


def step_compiler_options(mesh: Mesh) -> dict | None:
    """The train step's XLA options: GPU_STEP_OPTIONS on a mesh of several GPUs."""
    platform = mesh.devices.flat[0].platform
    if platform in ("gpu", "cuda", "rocm") and mesh.size > 1:
        return dict(GPU_STEP_OPTIONS)
    return None


def build(cfg: Config, mesh: Mesh, *, freeze_bn: bool = False) -> Run:
    """Model, optimizer, margin, state shardings and jitted step for `cfg` on `mesh`."""
    derived = derive(cfg, mesh.size)
    policy = policy_from_config(cfg)
    model = get_model(
        cfg.network,
        embedding_size=cfg.embedding_size,
        dropout=cfg.dropout,
        policy=policy,
        bn_groups=1 if cfg.sync_bn else mesh.size,
        remat=cfg.remat,
    )
    tx, schedule = make_optimizer(cfg, derived)
    margin = loss_from_config(cfg)
    if cfg.loss in NORM_LOSSES and getattr(model, "normalises_output", False):
        raise ConfigError(
            f"{cfg.source}: config key 'loss'={cfg.loss!r} reads the embedding's norm before "
            f"normalisation, but backbone {cfg.network!r} returns L2-normalised embeddings "
            "(norm 1); use a backbone that returns the un-normalised embedding (any IResNet)"
        )
    init = make_init_fn(model, tx, cfg.num_classes, derived.num_classes_padded, margin)
    shapes = jax.eval_shape(init, 0)
    shardings = state_shardings(shapes, mesh, per_device_stats=False)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )
    step_shapes = jax.eval_shape(lambda s: device_state(init(s), mesh.size), 0)
    step_shardings = state_shardings(step_shapes, mesh)
    step_abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), step_shapes, step_shardings
    )
    step = make_train_step(
        model,
        tx,
        schedule,
        margin,
        cfg.num_classes,
        mesh,
        num_sample=derived.num_sample,
        grad_accum=cfg.gradient_acc,
        freeze_bn=freeze_bn,
        reduce_dtype={"fp32": jnp.float32, "bf16": jnp.bfloat16}[cfg.grad_reduce],
        fused_head=cfg.fused_head_update,
    )
    return Run(
        cfg=cfg,
        mesh=mesh,
        derived=derived,
        policy=policy,
        model=model,
        tx=tx,
        schedule=schedule,
        margin=margin,
        init=init,
        abstract_state=abstract,
        shardings=shardings,
        step_abstract_state=step_abstract,
        step_shardings=step_shardings,
        train_step=jax.jit(
            step,
            donate_argnums=0,
            out_shardings=(step_shardings, replicated(mesh)),
            compiler_options=step_compiler_options(mesh),
        ),
        embed=jax.jit(make_embed_fn(model)),
        head_kernel=step.uses_head_kernel,
    )
