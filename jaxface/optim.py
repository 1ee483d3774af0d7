"""The optax chain and the learning-rate schedule, as arcface_torch's but stepped per update.

SGD: clip the backbone's gradients to a global norm, add weight decay on every parameter
(BatchNorm, PReLU and the class centres included), then momentum. This is torch.optim.SGD's
order (decay is added to the gradient before the momentum buffer), so the updates match.
AdamW: the same clipping, then decoupled weight decay as torch.optim.AdamW.
With class sampling and SGD (and no gradient accumulation) the centres are updated by
`SampledSGD`: the same maths without a dense gradient of the centre matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxface.config import Config, Derived
from jaxface.fused_sgd import FusedSGD, concat_order
from jaxface.heads.sampled_sgd import SampledSGD

# Leaves of at least this many elements are reduced and updated on their own: the class
# centres (316 M at 617,970 classes) and IResNet's fc kernel (12.8 M; 51 MB of gradient that
# the concatenation would write once more, r50 on one H200: 11.01 -> 10.96 GB a step for 5
# kernels more). Every other backbone leaf (r50's largest convolution: 2.4 M) goes into the
# one concatenated vector: one written copy of the gradients instead of two or three
# reduction kernels per leaf.
LARGE_LEAF = 1 << 23


def lr_schedule(base_lr: float, warmup_steps: int, total_steps: int, power: float = 1.0):
    """Linear warm-up from 0, then polynomial decay to 0 at `total_steps`."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = base_lr * step / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        decay = base_lr * jnp.power(jnp.clip(1.0 - progress, 0.0, 1.0), power)
        return jnp.where(step < warmup_steps, warm, decay)

    return schedule


def flat_views(tree, large: int = LARGE_LEAF) -> list[jnp.ndarray]:
    """The leaves of `tree` as few float32 vectors: every leaf under `large` elements raveled
    into one (in `concat_order`, as FusedSGD concatenates them), each larger leaf on its own.

    Reduced (a norm, a finite check), the concatenated leaves cost a few kernels in all
    instead of two or three each: hundreds of small launches fewer on a GPU."""
    leaves = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)]
    small = [leaves[i] for i in concat_order([x.size for x in leaves]) if leaves[i].size < large]
    views = [x for x in leaves if x.size >= large]
    return ([jnp.concatenate(small)] if small else []) + views


def global_norm(tree) -> jnp.ndarray:
    """The L2 norm of all leaves together (optax.tree.norm), summed over flat views."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in flat_views(tree)))


def all_finite(tree) -> jnp.ndarray:
    """True if no leaf holds an inf or NaN: one check per flat view, not one per leaf."""
    checks = [jnp.all(jnp.isfinite(v)) for v in flat_views(tree)]
    return jnp.stack(checks).all() if checks else jnp.asarray(True)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm with the norm summed over one flat view of the updates."""

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        trigger = norm < max_norm

        def clip(t):
            return jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def _backbone_only(transform: optax.GradientTransformation) -> optax.GradientTransformation:
    # Params are {"backbone": ..., "head": ...}: a label per top-level subtree.
    return optax.partition(
        {"backbone": transform, "head": optax.identity()},
        lambda params: {name: name for name in params},
    )


def make_optimizer(cfg: Config, derived: Derived):
    """Returns (optax transformation, schedule)."""
    schedule = lr_schedule(cfg.lr, derived.warmup_steps, derived.schedule_steps, cfg.lr_power)
    clip = (
        _backbone_only(clip_by_global_norm(cfg.grad_clip_norm))
        if cfg.grad_clip_norm > 0
        else optax.identity()
    )
    if cfg.optimizer == "sgd" and derived.num_sample is not None and cfg.gradient_acc == 1:
        # Sampling: the centres get the row update of SampledSGD (same maths, no dense
        # gradient); the backbone the chain below without the partition.
        backbone = optax.chain(
            clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm > 0 else optax.identity(),
            optax.add_decayed_weights(cfg.weight_decay),
            optax.sgd(schedule, momentum=cfg.momentum or None),
        )
        if cfg.momentum:
            backbone = FusedSGD(
                backbone, schedule, cfg.momentum, cfg.weight_decay, LARGE_LEAF, cfg.grad_clip_norm
            )
        tx = SampledSGD(backbone, schedule, cfg.momentum, cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        tx = optax.chain(
            clip,
            optax.add_decayed_weights(cfg.weight_decay),
            optax.sgd(schedule, momentum=cfg.momentum or None),
        )
        if cfg.momentum:
            # The same maths in one pass over a flat view (jaxface.fused_sgd).
            tx = FusedSGD(
                tx,
                schedule,
                cfg.momentum,
                cfg.weight_decay,
                LARGE_LEAF,
                cfg.grad_clip_norm,
                clip_only="backbone",
            )
    elif cfg.optimizer == "adamw":
        b1, b2 = cfg.adamw_betas
        tx = optax.chain(
            clip,
            optax.adamw(schedule, b1=b1, b2=b2, eps=cfg.adamw_eps, weight_decay=cfg.weight_decay),
        )
    else:
        raise ValueError(f"config key 'optimizer'={cfg.optimizer!r} must be sgd or adamw")
    return tx, schedule
